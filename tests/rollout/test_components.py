"""`--policy` accepts a published policy as a file, its version directory, or an experiment's weights directory."""

import pytest

from rollout.components import policy_file
from slotmem.errors import InputError


def _publish(weights, version, committed=True):
    d = weights / f"policy_v{version:06d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if committed:
        (d / "_COMMITTED.json").write_text("{}")
    return d


def test_policy_file_forms(tmp_path):
    weights = tmp_path / "weights"
    _publish(weights, 1)
    newest = _publish(weights, 12)
    _publish(weights, 13, committed=False)  # being written: never picked
    assert policy_file(str(newest / "model.safetensors")) == newest / "model.safetensors"
    assert policy_file(str(newest)) == newest / "model.safetensors"
    assert policy_file(str(weights)) == newest / "model.safetensors"  # the newest committed version
    with pytest.raises(InputError, match="does not exist"):
        policy_file(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds one .safetensors file"):
        policy_file(str(empty))
