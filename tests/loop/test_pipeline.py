"""The main job's own checks. The pipeline end to end is tested where an operator runs it: tests/test_readme.py
runs `make demo` and the README's cluster walk-through (submit, a clean stop in Stage I, a resubmission that skips
Stage 0, resumes Stage I from its checkpoint and leaves one MLflow run tree), tests/loop/test_multinode.py loses a
rollout node mid-run, tests/trainer/test_driver.py resumes a killed stage with identical losses."""

import pytest

from slotmem.config import ConfigError, load_config


def test_a_lag_bound_below_the_publish_interval_is_refused(repo_root):
    with pytest.raises(ConfigError, match="pipeline.max_policy_lag .* must be at least trainer.publish_every - 1"):
        load_config(f"{repo_root}/configs/tiny-random.yaml", ["trainer.publish_every=5", "pipeline.max_policy_lag=2"])
