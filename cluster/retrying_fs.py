"""The S3 filesystem Ray Train checkpoints through: retrying in every process it is shipped to.

A pyarrow ``S3FileSystem`` pickles without its retry strategy (its ``__reduce__`` keeps endpoint, region and
credentials only), so the copy Ray Train's controller and workers upload checkpoints with falls back to the
SDK's default. This wrapper is a ``PyFileSystem`` whose handler pickles as the storage config and the number
of attempts, and builds its S3 filesystem, with ``AwsStandardS3RetryStrategy(attempts)`` and the receiving
node's own credential chain, in the process that uses it. Every call is delegated unchanged.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from slotmem.config import StorageConfig


class RetryingS3Handler(pafs.FileSystemHandler):
    def __init__(self, storage_cfg: StorageConfig, attempts: int):
        self.storage_cfg = storage_cfg
        self.attempts = attempts
        self._fs: pafs.S3FileSystem | None = None

    def __reduce__(self):
        return RetryingS3Handler, (self.storage_cfg, self.attempts)

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingS3Handler) and (other.storage_cfg, other.attempts) == (
            self.storage_cfg, self.attempts)

    def __ne__(self, other) -> bool:
        return not self == other

    @property
    def fs(self) -> pafs.S3FileSystem:
        if self._fs is None:
            import os

            from cluster.storage import _s3_filesystem

            self._fs = _s3_filesystem(self.storage_cfg, os.environ, attempts=self.attempts)[0]
        return self._fs

    def get_type_name(self) -> str:
        return "slotmem-retrying-s3"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def retrying_s3_filesystem(storage_cfg: StorageConfig, attempts: int) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(RetryingS3Handler(storage_cfg, attempts))
