"""`slotmem runs`: the pipeline's run tree (parent, stage, rollout and sample runs) with key metrics."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from cluster.mlflow_names import (KEY_METRICS, TAG_PARENT, TAG_ROUND, TAG_STAGE, _probe_http, _sqlite_path,
                                  local_storage_root, mask_uri, resolve_tracking_uri)
from slotmem.errors import InputError


def main_runs(args, cfg) -> int:
    """`slotmem runs --config X`: every parent run of the experiment, its descendants indented below it."""
    uri = resolve_tracking_uri(cfg.tracking, local_storage_root(cfg.storage))
    if uri is None:
        raise InputError("no MLflow store: set tracking.tracking_uri or $MLFLOW_TRACKING_URI "
                         f"(storage.root {cfg.storage.root!r} is not local)")
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise InputError(f"no MLflow store at {db} (run `slotmem pipeline` first, or set tracking.tracking_uri)")
    if uri.startswith(("http://", "https://")) and (reason := _probe_http(uri)) is not None:
        raise InputError(f"MLflow server {mask_uri(uri)} is unreachable ({reason})")
    name = cfg.tracking.experiment or cfg.storage.experiment
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    print(f"MLflow experiment {name!r} at {mask_uri(uri)}")
    runs = _all_runs(client, exp.experiment_id) if exp is not None else []
    if not runs:
        print("no runs")
        return 0
    ids = {r.info.run_id for r in runs}
    children: dict[str | None, list] = {}
    for r in runs:
        parent = r.data.tags.get(TAG_PARENT)
        children.setdefault(parent if parent in ids else None, []).append(r)
    rows: list[list[str]] = []

    def walk(run, depth: int) -> None:
        rows.append(_row(run, depth=depth))
        for child in children.get(run.info.run_id, []):
            walk(child, depth + 1)

    for top in children.get(None, []):
        walk(top, 0)
    print(_format_table(["run", "id", "status", "stage", "round", *KEY_METRICS], rows))
    tops = len(children.get(None, []))
    print(f"{tops} parent run(s), {len(runs) - tops} child run(s)")
    return 0


def _all_runs(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run, *, depth: int) -> list[str]:
    tags, metrics = run.data.tags, run.data.metrics  # run.data.metrics holds each metric's last value
    name = ("  " * depth) + (run.info.run_name or run.info.run_id)
    cells = [name, run.info.run_id[:8], run.info.status, tags.get(TAG_STAGE, "-"), tags.get(TAG_ROUND, "-")]
    return cells + [_fmt(metrics.get(key)) for key in KEY_METRICS.values()]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)
