"""What a stage reports: MLflow metrics every iteration (rank 0) and a few console lines per stage.

Metric names (MLflow): losses ``loss/dmd``, ``loss/critic``, ``loss/slot`` and its parts ``loss/slot_con``,
``loss/slot_rec``, ``loss/slot_feat`` (Stage 0); slot health ``slot/cosine`` (mean off-diagonal cosine of a chunk's
slots), ``slot/mask_coverage`` (share of tokens passing eq. 9's mask), ``slot/norm``; ``grad_norm/*``;
staleness ``policy_lag/p50``, ``policy_lag/p95`` (trainer version - row policy version, in generator updates, over
the last ``LAG_WINDOW`` rows), ``reuse/mean`` (uses of the rows trained on), ``data_wait_s`` and
``data_wait_fraction`` (time waiting for rows: for the fleet, and for reads); ``steps_per_s``; ``policy_version``.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from trainer.data import Assignment

LAG_WINDOW = 200
CONSOLE_LINES = 4  # progress lines per stage on the console (plus a start and an end line)
PROGRESS_EVERY_S = 120.0  # and one at least this often, so `slotmem status` is current on long stages
_NAMES = {"dmd": "loss/dmd", "critic": "loss/critic", "slot": "loss/slot", "slot_con": "loss/slot_con",
          "slot_rec": "loss/slot_rec", "slot_feat": "loss/slot_feat", "slot_cosine": "slot/cosine",
          "slot_mask_coverage": "slot/mask_coverage", "slot_norm": "slot/norm",
          "grad_norm_generator": "grad_norm/generator", "grad_norm_critic": "grad_norm/critic",
          "dmd_grad_norm": "dmd/grad_norm"}


def console_losses(stage: int) -> tuple[str, ...]:
    """The losses and slot health a stage shows on the console (short names, _NAMES' keys): L_rec is in the
    objective of Stage II only, so only Stage II shows it."""
    return ("critic", "dmd", "slot_con", *(("slot_rec",) if stage == 2 else ()), "slot_feat", "slot_cosine",
            "slot_mask_coverage")


def stage_name(stage: int) -> str:
    return f"stage{stage}"


class StepMetrics:
    def __init__(self, *, stage: int, total: int, tracker, rank: int, post=None):
        """`post`: sends a console line to the driver (cluster/control.py); None prints it here."""
        self.stage = stage
        self.total = total
        self.tracker = tracker
        self.rank = rank
        self.post = post
        self.last_line = time.perf_counter()
        self.lags: deque[int] = deque(maxlen=LAG_WINDOW)
        self.uses: deque[int] = deque(maxlen=LAG_WINDOW)
        self.wait_s = 0.0
        self.first_step: int | None = None
        self.t_start = time.perf_counter()

    def _print(self, line: str) -> None:
        if self.rank == 0:
            self.last_line = time.perf_counter()
            text = f"[train {stage_name(self.stage)}] {line}"
            print(text, flush=True)  # the worker's log file
            if self.post is not None:
                self.post(text)

    def say(self, line: str) -> None:
        """A console line from rank 0 (through the driver when it relays)."""
        self._print(line)

    def stopped(self, step: int) -> None:
        self._print(f"stopped on request after step {step + 1}/{self.total} (checkpointed)")

    def start(self, *, resumed: bool, step: int, world: int, zero: int, device: str) -> None:
        self.first_step, self.t_start = step, time.perf_counter()
        self._print(f"{'resuming at' if resumed else 'starting at'} step {step}/{self.total}, {world} workers, "
                    f"ZeRO-{zero}, device {device}")

    def data(self, plan: Assignment, seconds: float) -> None:
        """One update's rows: their staleness and uses, and the time it took to get them."""
        self.lags.extend(plan.lags)
        self.uses.extend(r.uses for r in plan.rows)
        self.wait_s += seconds

    def step(self, step: int, plan, mean: dict[str, float], *, seconds: float, engines) -> None:
        if self.rank != 0:
            self.wait_s = 0.0
            return
        metrics = {_NAMES[k]: v for k, v in mean.items() if k in _NAMES}
        lags = np.asarray(self.lags) if self.lags else np.zeros(1)
        metrics.update({"policy_lag/p50": float(np.percentile(lags, 50)), "policy_lag/p95": float(np.percentile(lags, 95)),
                        "policy_lag": float(lags.mean()), "reuse/mean": float(np.mean(self.uses or [0])),
                        "data_wait_s": self.wait_s, "data_wait_fraction": self.wait_s / max(seconds, 1e-9),
                        "steps_per_s": 1.0 / max(seconds, 1e-9), "policy_version": plan.version})
        self.wait_s = 0.0
        for name, engine in engines.trained.items():
            for i, group in enumerate(engine.optimizer.param_groups):
                metrics[f"lr/{name}/{group.get('name', i)}"] = group["lr"]
        if step == self.first_step:  # what this rank holds under the ZeRO stage (optimizer state exists after a step)
            from trainer.deepspeed_setup import zero_partition_stats

            for name, engine in engines.trained.items():
                stats = zero_partition_stats(engine)
                metrics.update({f"zero/{name}_param_elements": stats.param_elements,
                                f"zero/{name}_param_elements_total": stats.param_elements_total,
                                f"zero/{name}_optimizer_state_elements": stats.optimizer_state_elements})
        self.tracker.log_metrics(metrics, step=step)
        interval = max(1, self.total // CONSOLE_LINES)
        due = time.perf_counter() - self.last_line > PROGRESS_EVERY_S
        if (step + 1) % interval == 0 or step + 1 == self.total or due:
            rate = (step + 1 - self.first_step) / max(time.perf_counter() - self.t_start, 1e-9)
            shown = " ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}"
                             for k in (_NAMES[n] for n in console_losses(self.stage)) if k in metrics)
            self._print(f"step {step + 1}/{self.total} {shown} lag p50/p95={metrics['policy_lag/p50']:.3g}/"
                        f"{metrics['policy_lag/p95']:.3g} {rate:.2f} steps/s")
