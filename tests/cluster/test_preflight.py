"""Checks before a job starts: a writable root, no node-local storage or tracking on a multi-node cluster, and the
cluster shape waited for through the autoscaler, with its request withdrawn afterwards."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cluster import preflight as pf
from cluster.shape import ClusterShape
from cluster.storage import resolve_storage
from slotmem.config import StorageConfig, load_config
from slotmem.errors import ConfigError, InputError


def test_missing_bucket_and_unwritable_roots_are_one_line(s3_server, tmp_path):
    missing = resolve_storage(StorageConfig(root="s3://no-such-bucket-here/x", experiment="e",
                                            s3_endpoint=s3_server["endpoint"]))
    with pytest.raises(InputError, match="the bucket 'no-such-bucket-here' does not exist") as err:
        missing.check_writable()
    assert "\n" not in str(err.value)
    resolve_storage(StorageConfig(root=f"s3://{s3_server['bucket']}/ok", experiment="e",
                                  s3_endpoint=s3_server["endpoint"])).check_writable()
    locked = tmp_path / "locked"
    (locked / "e").mkdir(parents=True)
    os.chmod(locked / "e", stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(InputError, match="is not writable here"):
                resolve_storage(StorageConfig(root=str(locked), experiment="e")).check_writable()
    finally:
        os.chmod(locked / "e", stat.S_IRWXU)
    storage = resolve_storage(StorageConfig(root=str(tmp_path / "fine"), experiment="e"))
    storage.check_writable()
    assert [p.name for p in (tmp_path / "fine" / "e").iterdir()] == []  # the probe is gone


def test_node_local_storage_and_tracking_are_refused_on_several_nodes(monkeypatch, repo_root, tmp_path):
    cfg = load_config(f"{repo_root}/configs/tiny-random.yaml", [f"storage.root={tmp_path}"])
    storage = resolve_storage(cfg.storage)
    monkeypatch.setattr(pf, "alive_nodes", lambda: [{"Alive": True}])
    pf.check_multi_node(cfg, storage, "sqlite:///x.db")  # one node: anything goes
    monkeypatch.setattr(pf, "alive_nodes", lambda: [{"Alive": True}] * 3)
    with pytest.raises(ConfigError, match="local directory, but the cluster has 3 nodes.*shared_filesystem"):
        pf.check_multi_node(cfg, storage, None)
    shared = load_config(f"{repo_root}/configs/tiny-random.yaml", [f"storage.root={tmp_path}",
                                                                   "storage.shared_filesystem=true"])
    pf.check_multi_node(shared, storage, "sqlite:///x.db")
    on_s3 = load_config(f"{repo_root}/configs/tiny-random.yaml", ["storage.root=s3://bkt/p"])
    s3 = resolve_storage(on_s3.storage)
    with pytest.raises(ConfigError, match="tracking URI 'sqlite:///x.db' is a file on one node.*MLflow server"):
        pf.check_multi_node(on_s3, s3, "sqlite:///x.db")
    pf.check_multi_node(on_s3, s3, "http://mlflow:5000")


def test_shape_waits_for_the_autoscaler_then_withdraws_its_request(ray_cluster):
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    big = ClusterShape(num_rollout_actors=2, gpus_per_actor=1, cpus_per_actor=1, num_trainer_workers=2,
                       gpus_per_worker=1, cpus_per_worker=1, zero_stage=2)
    lines = []
    with pytest.raises(InputError, match=r"needs 2 actors × 1 GPU \+ 2 workers × 1 GPU = 4 GPU.*waited 1 s"):
        pf.wait_for_resources(big, concurrent=True, timeout_s=1.0, log=lines.append)
    assert lines and "waiting up to 1 s for the autoscaler" in lines[0]
    request = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
    assert request == []  # ray.autoscaler.sdk.request_resources stores the bundle list: nothing left requested
    small = big.only("rollout")
    assert small.num_trainer_workers == 0 and len(small.bundles()) == 2
    cpu = ClusterShape(num_rollout_actors=1, gpus_per_actor=0, cpus_per_actor=0.5, num_trainer_workers=1,
                       gpus_per_worker=0, cpus_per_worker=1, zero_stage=2)
    pf.wait_for_resources(cpu, concurrent=True, timeout_s=0.0)  # fits now: returns at once
