"""Durable storage: one pyarrow filesystem for shards, checkpoints and published weights.

``resolve_storage(storage_cfg)`` turns ``storage.root`` into a ``Storage``: a pyarrow filesystem
plus the base path under it. A local path or ``file://`` URI gives ``LocalFileSystem`` with an
absolute path; ``s3://bucket/prefix`` gives ``S3FileSystem`` with the endpoint from
``storage.s3_endpoint`` or ``$AWS_ENDPOINT_URL(_S3)`` (MinIO, moto). Credentials are never handed to it:
every process finds its own through the AWS SDK's default chain (environment of the node, a mounted
shared-credentials file, IRSA web identity, the EC2 instance profile), which also refreshes expiring STS
tokens. So nothing secret is ever pickled with a ``Storage`` (it pickles as its config and is resolved again
where it lands), put in a repr, a log line or an error.

Layout under the root (DESIGN §4):

    {root}/{experiment}/rollouts/round_{k:04d}/       parquet shards + _MANIFEST.json (rollout/shards.py)
    {root}/{experiment}/weights/policy_v{N:06d}/      model.safetensors + _COMMITTED.json
    {root}/{experiment}/checkpoints/                  Ray Train storage_path

Commit protocol: a directory's content is complete only once its small marker file exists, and
that marker is written last and atomically (local: temp name + rename; S3: one PUT, which S3
makes visible all at once). Readers look for the marker first and trust nothing else.

Retries live in one place, ``Storage.retry``: pyarrow's own S3 retry strategy is set to a single
attempt so ``storage.retries`` is the total number of attempts of every operation here. Ray Data
read tasks retry S3 errors on their own (``DataContext.retried_io_errors``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from slotmem.config import StorageConfig
from slotmem.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMITTED = "_COMMITTED.json"
WEIGHTS_FILE = "model.safetensors"
_POLICY_DIR = re.compile(r"^policy_v(\d{6,})$")
_COPY_CHUNK = 8 << 20  # bytes per read when streaming a file

# An OSError whose text matches one of these is worth retrying: network failures, 5xx answers,
# throttling. Anything else (missing key, access denied, bad bucket) fails at once.
_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|SLOW_DOWN|THROTTLING|"
    r"REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED)"
    r"|HTTP status 5\d\d|status code:? 5\d\d|\b50[0234] (Internal|Bad Gateway|Service Unavailable|Gateway)"
    r"|SlowDown|Throttl|RequestTimeout|InternalError|ServiceUnavailable"
    r"|curlCode|Could(n't| not) connect|Connection (refused|reset|aborted)|connection was (reset|closed)"
    r"|[Tt]imed out|Broken pipe",
)


def is_transient(err: BaseException) -> bool:
    """True for storage errors that a retry can fix (connection, 5xx, throttling)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(err, OSError) and bool(_TRANSIENT.search(str(err)))


# ----------------------------------------------------------------------------------------------
# the Storage handle
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """A pyarrow filesystem and the experiment's base path on it.

    Paths handed to and returned by the methods are filesystem paths (``/abs/dir/...`` locally,
    ``bucket/prefix/...`` on S3), i.e. what pyarrow and ``ray.data.read_parquet(filesystem=fs)``
    take. ``uri(path)`` adds the scheme back for humans and MLflow tags.
    """

    fs: pafs.FileSystem = field(repr=False)
    config: StorageConfig = field(repr=False)
    """What it was resolved from: a Storage pickles as this and is resolved again by the receiving process."""
    root: str
    """Filesystem path of storage.root."""
    experiment: str
    scheme: str
    """'file' or 's3'."""
    retries: int = 3
    retry_base_delay: float = field(default=0.5, repr=False)
    """Seconds before the second attempt; doubles per attempt (capped at 8 s)."""

    def __repr__(self) -> str:
        return f"Storage({self.uri(self.base)!r}, retries={self.retries})"

    def __reduce__(self):
        # resolved again on the other side: the receiving node's own credential chain and endpoint settings
        return resolve_storage, (self.config,)

    def checkpoint_filesystem(self) -> pafs.FileSystem:
        """The filesystem Ray Train writes checkpoints through: it retries on its own (the SDK's standard retry
        strategy with storage.retries * 3 attempts, kept when Ray ships it to the workers: cluster/retrying_fs.py),
        since Ray calls it without Storage.retry around it."""
        if self.is_local:
            return self.fs
        from cluster.retrying_fs import retrying_s3_filesystem

        return retrying_s3_filesystem(self.config, attempts=3 * self.retries)

    # -- layout --------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"{self.root}/{self.experiment}"

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *(p.strip("/") for p in parts)])

    def rollouts_dir(self) -> str:
        return self.path("rollouts")

    def round_dir(self, k: int) -> str:
        return self.path("rollouts", f"round_{k:04d}")

    def weights_dir(self, version: int | None = None) -> str:
        if version is None:
            return self.path("weights")
        return self.path("weights", f"policy_v{version:06d}")

    def checkpoints_dir(self) -> str:
        return self.path("checkpoints")

    def uri(self, path: str) -> str:
        return f"s3://{path}" if self.scheme == "s3" else f"file://{path}"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    # -- retried primitives --------------------------------------------------------------------

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn up to `retries` times, backing off exponentially on transient errors.

        `what` names the operation and file for the log line and the final error.
        """
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except OSError as e:
                if not is_transient(e):
                    raise
                if attempt == self.retries:
                    raise OSError(f"{what}: still failing after {attempt} attempt(s): {e}") from e
                delay = min(self.retry_base_delay * 2 ** (attempt - 1), 8.0)
                log.warning("%s: transient storage error (attempt %d/%d), retrying in %.1fs: %s",
                            what, attempt, self.retries, delay, e)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def check_writable(self) -> None:
        """Write and delete a probe under the experiment; InputError (one line) when the root cannot be written."""
        probe = self.path(f".probe-{uuid.uuid4().hex[:12]}")
        try:
            self.write_bytes(probe, b"slotmem")
            self.retry(f"delete {self.uri(probe)}", lambda: self.fs.delete_file(probe))
        except OSError as e:
            text = str(e)
            bucket = self.root.split("/", 1)[0]
            if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text:
                raise InputError(f"storage.root {self.uri(self.root)}: the bucket {bucket!r} does not exist (create it "
                                 f"first, e.g. `aws s3 mb s3://{bucket}`)") from None
            if isinstance(e, PermissionError) or "ACCESS_DENIED" in text or "AccessDenied" in text:
                raise InputError(f"storage.root {self.uri(self.root)} is not writable here ({type(e).__name__}): "
                                 "check its permissions, or the credentials of this node") from None
            raise InputError(f"storage.root {self.uri(self.root)} cannot be written: {text.splitlines()[0]}") from None

    def info(self, path: str) -> pafs.FileInfo:
        return self.retry(f"stat {self.uri(path)}", lambda: self.fs.get_file_info(path))

    def exists(self, path: str) -> bool:
        return self.info(path).type != pafs.FileType.NotFound

    def list_dir(self, path: str) -> list[pafs.FileInfo]:
        """Direct children of a directory; [] when it does not exist."""
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return self.retry(f"list {self.uri(path)}", lambda: self.fs.get_file_info(selector))

    def makedirs(self, path: str) -> None:
        if self.is_local:  # S3 has no directories; creating one would write a marker object
            self.retry(f"mkdir {self.uri(path)}", lambda: self.fs.create_dir(path, recursive=True))

    def read_bytes(self, path: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()

        return self.retry(f"read {self.uri(path)}", read)

    def read_json(self, path: str) -> Any:
        data = self.read_bytes(path)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{self.uri(path)} is not valid JSON ({e})") from None

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it.

        Local: write `.{name}.tmp-{uuid}` beside it, then rename (atomic on POSIX); a killed writer
        leaves only a dot-file that no reader lists. S3: one PUT of the complete buffer; S3 makes
        an object visible only when its upload completes.
        """
        parent, name = path.rsplit("/", 1)
        self.makedirs(parent)
        if not self.is_local:
            def put():
                with self.fs.open_output_stream(path) as f:
                    f.write(data)

            self.retry(f"write {self.uri(path)}", put)
            return
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def upload_file(self, local_path: Path, path: str) -> None:
        """Stream a local file to `path` without holding it in memory.

        Not atomic on S3 if reading the local file fails half-way (pyarrow completes the upload
        when the stream closes), so use it only under a commit marker written afterwards.
        """
        parent, name = path.rsplit("/", 1)
        self.makedirs(parent)
        target = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}" if self.is_local else path

        def copy():
            with open(local_path, "rb") as src, self.fs.open_output_stream(target) as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)

        try:
            self.retry(f"upload {self.uri(path)}", copy)
            if self.is_local:
                self.fs.move(target, path)
        finally:
            if self.is_local and self.fs.get_file_info(target).type != pafs.FileType.NotFound:
                self.fs.delete_file(target)

    def copy_to_local(self, path: str, local_path: Path) -> str:
        """Stream a file to a local path (temp name + rename); returns its sha256 hex."""
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.tmp-{uuid.uuid4().hex[:12]}")

        def copy() -> str:
            digest = hashlib.sha256()
            with self.fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            return digest.hexdigest()

        try:
            sha = self.retry(f"download {self.uri(path)}", copy)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return sha


# ----------------------------------------------------------------------------------------------
# resolving storage.root
# ----------------------------------------------------------------------------------------------


def resolve_storage(storage_cfg: StorageConfig, environ: dict[str, str] | None = None) -> Storage:
    """StorageConfig -> Storage (filesystem + base path). `environ` defaults to os.environ."""
    env = os.environ if environ is None else environ
    root = storage_cfg.root
    if root.startswith("s3://"):
        fs, base = _s3_filesystem(storage_cfg, env)
        scheme = "s3"
    else:
        local = root[len("file://"):] if root.startswith("file://") else root
        if root.startswith("file://") and not local.startswith("/"):
            raise InputError(f"storage.root {root!r}: a file:// URI needs an absolute path (file:///abs/dir)")
        fs, base, scheme = pafs.LocalFileSystem(), str(Path(local).expanduser().absolute()), "file"
    return Storage(fs=fs, config=storage_cfg, root=base.rstrip("/") or "/", experiment=storage_cfg.experiment,
                   scheme=scheme, retries=storage_cfg.retries)


def _s3_filesystem(storage_cfg: StorageConfig, env, attempts: int = 1) -> tuple[pafs.S3FileSystem, str]:
    bucket_and_prefix = storage_cfg.root[len("s3://"):].strip("/")
    bucket = bucket_and_prefix.split("/", 1)[0]
    if not 3 <= len(bucket) <= 63:
        raise InputError(f"storage.root {storage_cfg.root!r}: expected s3://BUCKET/PREFIX with a bucket name "
                         f"of 3-63 characters")
    endpoint = storage_cfg.s3_endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_override"], kwargs["scheme"] = _split_endpoint(endpoint)
    kwargs["region"] = storage_cfg.s3_region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        raise InputError(f"S3 credentials: {missing} is not set but its partner is; set both or neither")
    # No credentials passed: the SDK's default chain finds them in every process (module docstring). Storage.retry
    # owns the retries of our own calls (one SDK attempt each); Ray Train's checkpoint filesystem retries itself.
    fs = pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
    return fs, bucket_and_prefix


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """'http://host:port' -> ('host:port', 'http'); a bare 'host:port' is taken as https."""
    if "://" not in endpoint:
        return endpoint.rstrip("/"), "https"
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"S3 endpoint {endpoint!r}: expected http(s)://HOST[:PORT] or HOST[:PORT]")
    return parsed.netloc, parsed.scheme


# ----------------------------------------------------------------------------------------------
# versioned policy weights (trainer publishes, rollout actors fetch)
# ----------------------------------------------------------------------------------------------


def publish_weights(storage: Storage, version: int, weights: bytes | str | Path | dict,
                    meta: dict[str, Any] | None = None, *, supersede: bool = False) -> str:
    """Publish generator weights as policy_v{version}; returns the version directory.

    `weights` is serialized safetensors (bytes), a local .safetensors file, or a state dict of
    tensors. The safetensors file is written first and `_COMMITTED.json` (size, sha256, meta)
    last, so `latest_policy_version` never returns a half-written version. Publishing a version
    again with identical bytes is a no-op (a resumed trainer may do that); different bytes are an
    error unless `supersede`: a trainer attempt restarted from a checkpoint re-publishes the versions the
    failed attempt published after that checkpoint, which its rerun need not reproduce bit for bit (rows
    committed meanwhile, row placement); the marker goes first, so no reader takes the version as
    committed while its file is replaced, and the new marker records the sha256 it superseded.
    """
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InputError(f"policy version must be a non-negative integer, got {version!r}")
    vdir = storage.weights_dir(version)
    if isinstance(weights, dict):
        from safetensors.torch import save

        weights = save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
    if isinstance(weights, (bytes, bytearray)):
        data = bytes(weights)
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        stream_from: Path | None = None
    else:
        stream_from = Path(weights)
        if not stream_from.is_file():
            raise InputError(f"weights file {str(stream_from)!r} does not exist")
        sha, size = _sha256_file(stream_from), stream_from.stat().st_size

    commit_path = f"{vdir}/{COMMITTED}"
    if storage.exists(commit_path):
        existing = storage.read_json(commit_path)
        if existing.get("sha256") == sha:
            return vdir
        if supersede:
            storage.retry("withdraw a superseded policy marker", lambda: storage.fs.delete_file(commit_path))
            meta = {**(meta or {}), "supersedes_sha256": existing.get("sha256")}
        else:
            raise InputError(f"policy version {version} is already published at {storage.uri(vdir)} with "
                             f"different weights (sha256 {existing.get('sha256', '?')[:12]}…, new {sha[:12]}…)")
    if stream_from is None:
        storage.write_bytes(f"{vdir}/{WEIGHTS_FILE}", data)
    else:
        storage.upload_file(stream_from, f"{vdir}/{WEIGHTS_FILE}")
    storage.write_json(commit_path, {"version": version, "file": WEIGHTS_FILE, "num_bytes": size, "sha256": sha,
                                     "created_at": time.time(), "meta": meta or {}})
    return vdir


def committed_policy_versions(storage: Storage) -> list[int]:
    """Published versions whose `_COMMITTED.json` exists, ascending."""
    candidates = []
    for info in storage.list_dir(storage.weights_dir()):
        m = _POLICY_DIR.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            candidates.append(int(m.group(1)))
    markers = [f"{storage.weights_dir(v)}/{COMMITTED}" for v in candidates]
    infos = storage.retry("stat policy markers", lambda: storage.fs.get_file_info(markers)) if markers else []
    return sorted(v for v, i in zip(candidates, infos) if i.type == pafs.FileType.File)


def latest_policy_version(storage: Storage) -> int | None:
    """Newest committed policy version, or None when nothing is published yet."""
    versions = committed_policy_versions(storage)
    return versions[-1] if versions else None


def policy_meta(storage: Storage, version: int) -> dict[str, Any]:
    """The `_COMMITTED.json` record of a version (InputError if it is not committed)."""
    path = f"{storage.weights_dir(version)}/{COMMITTED}"
    if not storage.exists(path):
        raise InputError(f"policy version {version} is not published (no {storage.uri(path)})")
    return storage.read_json(path)


def fetch_weights(storage: Storage, version: int, local_dir: str | Path) -> Path:
    """Download a committed version to `local_dir/policy_v{N}/model.safetensors`; checks sha256.

    A file already there with the right sha256 is reused, so actors can call this every
    trajectory at the cost of one hash.
    """
    record = policy_meta(storage, version)
    dest = Path(local_dir) / f"policy_v{version:06d}" / WEIGHTS_FILE
    if dest.is_file() and dest.stat().st_size == record["num_bytes"] and _sha256_file(dest) == record["sha256"]:
        return dest
    sha = storage.copy_to_local(f"{storage.weights_dir(version)}/{record['file']}", dest)
    if sha != record["sha256"]:
        dest.unlink(missing_ok=True)
        raise InputError(f"policy version {version}: {storage.uri(storage.weights_dir(version))}/{record['file']} "
                         f"has sha256 {sha[:12]}…, its commit record says {record['sha256'][:12]}… (corrupt upload)")
    return dest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

