"""`slotmem` command line: one console script, one subcommand per job.

Every subcommand takes ``--config PRESET.yaml`` and any number of ``--set section.field=value``
overrides. Heavy imports (torch, ray, deepspeed, mlflow) happen inside the subcommand, so
``slotmem config show`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from slotmem.config import ConfigError, dump_yaml, load_config
from slotmem.errors import InputError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML preset (configs/tiny.yaml, configs/wan2.1-1.3b.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field; repeatable")


def _cmd_config_show(args, cfg) -> int:
    print(dump_yaml(cfg), end="")
    return 0


def _lazy(module: str, func: str):
    def run(args, cfg):
        import importlib

        return importlib.import_module(module).__getattribute__(func)(args, cfg)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slotmem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    _add_config_args(show)
    show.set_defaults(func=_cmd_config_show)

    p = sub.add_parser("generate", help="stream a video (single prompt or an interactive JSONL script) to mp4")
    _add_config_args(p)
    p.add_argument("--prompt", default=None, help="single prompt (120 latent frames)")
    p.add_argument("--prompts", default=None, help="interactive script: JSONL file, one {\"prompt\": ...} per line "
                   "or one {\"prompts\": [...]} line (240 latent frames)")
    p.add_argument("--switch-frames", default=None, help="comma-separated latent switch frames (default 40,80,...)")
    p.add_argument("--num-frames", type=int, default=None, help="latent frames to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="out.mp4")
    p.add_argument("--policy", default=None, help="a published policy to load into the generator: its version directory "
                   "({root}/{experiment}/weights/policy_vNNNNNN) or the model.safetensors in it")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_lazy("rollout.generate", "main"))

    p = sub.add_parser("rollout", help="run one rollout round on a Ray cluster and commit its shards")
    _add_config_args(p)
    p.add_argument("--round", type=int, default=0, dest="round_index")
    p.set_defaults(func=_lazy("rollout.round", "main"))

    p = sub.add_parser("train", help="run one training stage as a Ray Train + DeepSpeed job on the committed rollouts")
    _add_config_args(p)
    p.add_argument("--stage", type=int, choices=(0, 1, 2), required=True,
                   help="0 slot warm-up, 1 Stage I (grouper frozen), 2 Stage II (L_rec on)")
    p.set_defaults(func=_lazy("trainer.driver", "main"))

    p = sub.add_parser("pipeline", help="the main job: a rollout fleet feeding Stage 0 -> I -> II, then a sample")
    _add_config_args(p)
    p.set_defaults(func=_lazy("loop.pipeline", "main"))

    p = sub.add_parser("submit", help="submit a slotmem command to a Ray cluster (Ray Jobs API)")
    _add_config_args(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--no-wait", action="store_true", help="return after submission instead of following logs")
    p.add_argument("--submission-id", default=None, help="the job's id (default: slotmem-SUBCOMMAND-TIME-RANDOM); "
                   "Ray refuses an id that was used before")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- SUBCOMMAND [ARGS]: the slotmem command to run")
    p.set_defaults(func=_lazy("cluster.submit", "main_submit"))

    for name, func, help_ in (("status", "main_status", "where a submitted job is: phase, iteration, losses, lag"),
                              ("logs", "main_logs", "logs of a submitted job"),
                              ("stop", "main_stop", "stop a submitted job cleanly (checkpoint, MLflow KILLED)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream the log until the job ends")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=900.0,
                           help="seconds to wait for the clean stop before `ray job stop` (default 900)")
        p.set_defaults(func=_lazy("cluster.jobs", func), no_config=True)

    p = sub.add_parser("runs", help="list the pipeline's MLflow runs with their key metrics")
    _add_config_args(p)
    p.set_defaults(func=_lazy("cluster.runs", "main_runs"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.runtime import use_token_auth_if_given

    use_token_auth_if_given()  # before anything imports Ray, which reads RAY_AUTH_MODE once
    args = build_parser().parse_args(argv)
    try:
        cfg = None if getattr(args, "no_config", False) else load_config(args.config, args.overrides)
        return int(args.func(args, cfg) or 0)
    except ConfigError as e:
        print(f"slotmem: config error: {e}", file=sys.stderr)
        return 2
    except (InputError, FileNotFoundError) as e:
        print(f"slotmem: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `slotmem status ... | head`: the reader left; no traceback, as other CLIs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
