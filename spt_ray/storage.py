"""Sweep storage: a local (or shared-mount) path, or any URI pyarrow.fs understands (s3://, gs://, file://...).

Everything spt_ray persists (sensitivity maps, Parquet results, Tune experiments) lives under one storage
root. Local paths take a plain-`os` fast path; URIs go through `pyarrow.fs.FileSystem.from_uri`, so the
same code writes to a bucket. Writes are "complete before visible": local files are written under a
hidden temporary name and renamed; object stores publish an object only when its upload completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


class StorageError(OSError):
    """A write to the storage failed; the one-line message says why and what to do about it."""


_FIXES = {errno.ENOSPC: "free space there or pass another --storage",
          errno.EDQUOT: "free space there or pass another --storage",
          errno.EACCES: "make it writable or pass another --storage",
          errno.EPERM: "make it writable or pass another --storage",
          errno.EROFS: "pass a --storage on a writable filesystem",
          errno.ENOTDIR: "a file is in the way: pass a --storage that is (or will be) a folder",
          errno.EEXIST: "a file is in the way: pass a --storage that is (or will be) a folder"}


@dataclass(frozen=True)
class Storage:
    """A storage root; `path(...)` joins parts, the methods read and write whole files atomically."""

    root: str
    fs: pafs.FileSystem = field(compare=False, repr=False)
    base: str = field(compare=False, repr=False)  # the root as the filesystem names it
    local: bool = field(compare=False, repr=False)

    @classmethod
    def of(cls, location: str | os.PathLike) -> "Storage":
        location = os.fspath(location)
        if is_uri(location):
            fs, base = pafs.FileSystem.from_uri(location)
            return cls(location.rstrip("/"), fs, base.rstrip("/"), False)
        root = str(Path(location).expanduser().resolve())
        return cls(root, pafs.LocalFileSystem(), root, True)

    def __reduce__(self):  # pyarrow filesystems pickle, but rebuilding from the root is cheaper and portable
        return (Storage.of, (self.root,))

    # ---- names ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (for `self.fs`) of a location under the root."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """The location as users and Tune name it: a plain path locally, a URI otherwise (a URI's query,
        e.g. `?endpoint_override=...`, stays at its end)."""
        root, sep, query = self.root.partition("?") if not self.local else (self.root, "", "")
        return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts if p]]) + sep + query

    # ---- files ---------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.local:
            return os.path.exists(path)
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def makedirs(self, path: str) -> None:
        if self.local:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.create_dir(path, recursive=True)

    def read_bytes(self, path: str) -> bytes:
        if self.local:
            with open(path, "rb") as fh:
                return fh.read()
        with self.fs.open_input_stream(path) as fh:
            return fh.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it.

        A failed local write (full disk, read-only folder) removes its hidden temporary file: left behind,
        such files pile up (zero bytes each on a full disk) in folders readers list. The error is a
        StorageError naming the path, the cause and the fix.
        """
        parent = path.rsplit("/", 1)[0]
        try:
            self.makedirs(parent)
            if not self.local:
                with self.fs.open_output_stream(path) as fh:  # object stores publish on close
                    fh.write(data)
                return
            tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except StorageError:
            raise
        except OSError as err:
            fix = _FIXES.get(err.errno, "check the storage location (--storage)")
            raise StorageError(f"cannot write {path} under storage {self.root} "
                               f"({err.strerror or type(err).__name__}); {fix}") from err

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def list_files(self, path: str, suffix: str = "") -> list[str]:
        """Every file below `path` (recursively) whose name ends in `suffix`, hidden files skipped."""
        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                      and not i.base_name.startswith((".", "_")))
