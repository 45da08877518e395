"""The main job's own checks. The pipeline end to end is tested where an operator runs it: tests/test_readme.py
runs `make demo` (the toy world, judged before training and after every stage) and the README's cluster
walk-through (submit, a clean stop in Stage I, a resubmission that skips Stage 0, resumes Stage I from its
checkpoint and leaves one MLflow run tree), tests/loop/test_multinode.py loses a rollout node mid-run,
tests/trainer/test_driver.py resumes a killed stage with identical losses."""

import pytest

from slotmem.config import ConfigError, load_config


def test_a_lag_bound_below_the_publish_interval_is_refused(repo_root):
    with pytest.raises(ConfigError, match="pipeline.max_policy_lag .* must be at least trainer.publish_every - 1"):
        load_config(f"{repo_root}/configs/tiny-random.yaml", ["trainer.publish_every=5", "pipeline.max_policy_lag=2"])


def test_the_judge_needs_a_sample_in_the_toy_grammar(repo_root, tmp_path):
    from loop.pipeline import check_judge
    from slotmem.errors import InputError

    with pytest.raises(ConfigError, match="pipeline.judge .* pipeline.sample_video=true"):
        load_config(f"{repo_root}/configs/tiny.yaml", ["pipeline.sample_video=false"])
    check_judge(load_config(f"{repo_root}/configs/tiny.yaml"))  # the toy script: fine
    with pytest.raises(InputError, match="pipeline.judge=toyworld: the built-in sample prompts .*red fox"):
        check_judge(load_config(f"{repo_root}/configs/tiny.yaml", ["pipeline.sample_prompts="]))
    script = tmp_path / "script.jsonl"
    script.write_text('{"prompt": "a red circle on a grey background"}\n{"prompt": "a purple cow", "switch_frame": 40}\n')
    with pytest.raises(InputError, match=f"{script}: .*'a purple cow'"):
        check_judge(load_config(f"{repo_root}/configs/tiny.yaml", [f"pipeline.sample_prompts={script}"]))
