"""Storage resolution, retries against a real failing S3 endpoint, atomic writes, weight publishing."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file, save

from cluster.storage import (
    COMMITTED, WEIGHTS_FILE, Storage, committed_policy_versions, fetch_weights, is_transient, latest_policy_version,
    policy_meta, publish_weights, resolve_storage,
)
from slotmem.config import StorageConfig
from slotmem.errors import InputError
from tests.servers import free_port

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzzSECRET"


def _local(tmp_path, **kw) -> Storage:
    return resolve_storage(StorageConfig(root=str(tmp_path / "root"), experiment="exp", **kw))


def _s3(s3_server, **kw) -> Storage:
    root = f"s3://{s3_server['bucket']}/t-{uuid.uuid4().hex[:8]}"
    return resolve_storage(StorageConfig(root=root, experiment="exp", s3_endpoint=s3_server["endpoint"], **kw))


def _s3_options(st: Storage) -> dict:
    """The options an S3FileSystem was built with (what pyarrow pickles it as)."""
    return st.fs.__reduce__()[1][0]


# ----------------------------------------------------------------------------------------------
# resolution and layout
# ----------------------------------------------------------------------------------------------


def test_local_path_and_file_uri_resolve_to_absolute_local_fs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = resolve_storage(StorageConfig(root="runs", experiment="exp"))
    assert isinstance(st.fs, pafs.LocalFileSystem)
    assert st.root == str(tmp_path / "runs")
    assert st.round_dir(3) == f"{tmp_path}/runs/exp/rollouts/round_0003"
    assert st.weights_dir(12) == f"{tmp_path}/runs/exp/weights/policy_v000012"
    assert st.checkpoints_dir() == f"{tmp_path}/runs/exp/checkpoints"
    assert st.uri(st.base) == f"file://{tmp_path}/runs/exp"

    st2 = resolve_storage(StorageConfig(root=f"file://{tmp_path}/other/", experiment="e2"))
    assert st2.root == f"{tmp_path}/other" and st2.is_local
    with pytest.raises(InputError, match="absolute"):
        resolve_storage(StorageConfig(root="file://relative/dir", experiment="e"))


def test_s3_resolution_endpoint_region_and_credentials_never_shown():
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": "tok-SECRET",
           "AWS_ENDPOINT_URL": "http://10.1.2.3:9000"}
    st = resolve_storage(StorageConfig(root="s3://my-bucket/some/prefix/", experiment="exp"), environ=env)
    assert isinstance(st.fs, pafs.S3FileSystem)
    assert st.root == "my-bucket/some/prefix" and st.scheme == "s3"
    assert st.round_dir(0) == "my-bucket/some/prefix/exp/rollouts/round_0000"
    assert st.uri(st.round_dir(0)) == "s3://my-bucket/some/prefix/exp/rollouts/round_0000"
    opts = _s3_options(st)
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("10.1.2.3:9000", "http", "us-east-1")
    # the keys stay with the process (the SDK's default chain reads them there): none in the filesystem's
    # options, the pickle a Ray actor or Train worker receives, a repr or a str
    assert not opts["access_key"] and not opts["secret_key"] and not opts["session_token"]
    for data in (repr(st).encode(), str(st).encode(), pickle.dumps(st), pickle.dumps(st.checkpoint_filesystem())):
        assert SECRET.encode() not in data and b"AKIDEXAMPLE" not in data and b"tok-SECRET" not in data
    # a pickled Storage resolves again where it lands: same place
    again = pickle.loads(pickle.dumps(st))
    assert again.root == st.root and again.uri(again.base) == st.uri(st.base)
    # Ray Train's checkpoint uploads retry on their own, also in the copy a worker unpickles
    shipped = pickle.loads(pickle.dumps(st.checkpoint_filesystem()))
    assert shipped.handler.attempts == 3 * st.retries and shipped.handler.storage_cfg == st.config

    # config endpoint wins over the environment; a bare host:port means https
    st = resolve_storage(StorageConfig(root="s3://my-bucket", experiment="exp", s3_endpoint="minio.local:9000",
                                       s3_region="eu-west-1"), environ=env)
    opts = _s3_options(st)
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("minio.local:9000", "https", "eu-west-1")

    # no keys in the environment: pyarrow's default AWS chain (instance profile, ...) is used
    assert _s3_options(resolve_storage(StorageConfig(root="s3://my-bucket", experiment="e"), environ={}))[
        "access_key"] in (None, "")

    # half a credential pair: the error names the missing variable, never the value of the other
    with pytest.raises(InputError, match="AWS_ACCESS_KEY_ID") as err:
        resolve_storage(StorageConfig(root="s3://my-bucket", experiment="exp"),
                        environ={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert SECRET not in str(err.value)
    with pytest.raises(InputError, match="bucket"):
        resolve_storage(StorageConfig(root="s3://ab", experiment="exp"), environ={})


# ----------------------------------------------------------------------------------------------
# retries
# ----------------------------------------------------------------------------------------------


def test_retry_survives_a_real_s3_outage(s3_server):
    """A moto server that is down for ~1 s: the write succeeds on a later attempt."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    st = resolve_storage(StorageConfig(root=f"s3://{s3_server['bucket']}/outage", experiment="exp",
                                       s3_endpoint=f"http://127.0.0.1:{port}", retries=5))
    st = dataclasses.replace(st, retries=5, retry_base_delay=0.3)
    servers = []

    def come_back():
        time.sleep(1.0)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        servers.append(server)

    threading.Thread(target=come_back, daemon=True).start()
    t0 = time.monotonic()
    try:
        st.write_bytes(st.path("probe.bin"), b"payload")
        assert time.monotonic() - t0 >= 0.9  # it really waited for the server
        assert st.read_bytes(st.path("probe.bin")) == b"payload"
    finally:
        for s in servers:
            s.stop()

    # With the server gone and one attempt only, the error names the file and says it is transient.
    st1 = dataclasses.replace(st, retries=1)
    with pytest.raises(OSError) as err:
        st1.read_bytes(st1.path("probe.bin"))
    assert is_transient(err.value) and "probe.bin" in str(err.value)
    assert "testing" not in str(err.value).replace("slotmem-test", "")  # credentials of the fixture


def test_retry_classifies_errors(tmp_path):
    st = dataclasses.replace(resolve_storage(StorageConfig(root=str(tmp_path), experiment="exp")), retries=4,
                             retry_base_delay=0.01)
    st.write_bytes(st.path("a.txt"), b"real data")
    calls = []

    def flaky_read():  # a real filesystem read whose first two calls fail like a throttled S3
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return st.fs.open_input_stream(st.path("a.txt")).read()

    assert st.retry("read a.txt", flaky_read) == b"real data" and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        return st.fs.open_input_stream(st.path("nope.txt")).read()

    with pytest.raises(FileNotFoundError):
        st.retry("read nope.txt", missing)
    assert len(calls) == 1  # not transient: no retry

    for text, transient in (("AWS Error UNKNOWN (HTTP status 503) during PutObject operation", True),
                            ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7", True),
                            ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied", False),
                            ("Path does not exist 'bucket/part-a-00500.parquet'", False)):
        assert is_transient(OSError(text)) is transient, text


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def test_write_bytes_is_atomic_and_leaves_no_temp_files(tmp_path):
    st = _local(tmp_path)
    path = st.path("dir", "marker.json")
    st.write_json(path, {"a": 1})
    st.write_json(path, {"a": 2})  # overwrite by rename
    assert st.read_json(path) == {"a": 2}
    assert [i.base_name for i in st.list_dir(st.path("dir"))] == ["marker.json"]
    st.write_bytes(st.path("dir", "bad.json"), b"{not json")
    with pytest.raises(InputError, match="bad.json"):
        st.read_json(st.path("dir", "bad.json"))


# ----------------------------------------------------------------------------------------------
# policy weights
# ----------------------------------------------------------------------------------------------


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.weight": torch.randn(4, 3, generator=g), "head.bias": torch.randn(5, generator=g).bfloat16()}


def _publish_fetch_roundtrip(st: Storage, tmp_path):
    assert latest_policy_version(st) is None
    publish_weights(st, 0, _state(0), meta={"step": 0})
    publish_weights(st, 1, save(_state(1)), meta={"step": 100})
    # a publisher killed after the weights file but before the commit record: version 2 stays invisible
    st.write_bytes(f"{st.weights_dir(2)}/{WEIGHTS_FILE}", save(_state(2)))
    assert committed_policy_versions(st) == [0, 1]
    assert latest_policy_version(st) == 1
    assert policy_meta(st, 1)["meta"] == {"step": 100}

    local = fetch_weights(st, 1, tmp_path / "cache")
    loaded = load_file(str(local))
    for k, v in _state(1).items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert fetch_weights(st, 1, tmp_path / "cache") == local  # cached copy reused

    publish_weights(st, 1, save(_state(1)))  # same bytes again: a no-op
    with pytest.raises(InputError, match="already published"):
        publish_weights(st, 1, save(_state(7)))
    with pytest.raises(InputError, match="not published"):
        fetch_weights(st, 2, tmp_path / "cache")


def test_publish_and_fetch_weights_local(tmp_path):
    st = _local(tmp_path)
    _publish_fetch_roundtrip(st, tmp_path)

    # from a file on disk
    src = tmp_path / "w.safetensors"
    src.write_bytes(save(_state(3)))
    publish_weights(st, 3, src)
    assert latest_policy_version(st) == 3

    # bytes altered after commit: fetch refuses them, naming the file
    (tmp_path / "root" / "exp" / "weights" / "policy_v000003" / WEIGHTS_FILE).write_bytes(save(_state(4)))
    with pytest.raises(InputError, match=r"policy_v000003.*sha256"):
        fetch_weights(st, 3, tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "policy_v000003" / WEIGHTS_FILE).exists()


def test_a_restarted_attempt_supersedes_a_version_only_when_told(tmp_path):
    st = _local(tmp_path)
    publish_weights(st, 2, _state(1))
    with pytest.raises(InputError, match="already published .* different weights"):
        publish_weights(st, 2, _state(2))  # two writers of one version: refused
    first = policy_meta(st, 2)["sha256"]
    publish_weights(st, 2, _state(2), supersede=True)  # the rerun after a checkpoint replaces it
    record = policy_meta(st, 2)
    assert record["sha256"] != first and record["meta"]["supersedes_sha256"] == first
    fetched = fetch_weights(st, 2, tmp_path / "cache")
    assert hashlib.sha256(Path(fetched).read_bytes()).hexdigest() == record["sha256"]
    assert latest_policy_version(st) == 2


def test_publish_and_fetch_weights_s3(s3_server, tmp_path):
    st = _s3(s3_server)
    _publish_fetch_roundtrip(st, tmp_path)
    assert st.exists(f"{st.weights_dir(0)}/{COMMITTED}")
