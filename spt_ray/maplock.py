"""One computation per sensitivity map across drivers that share a storage: a lock file next to the map.

Two clusters (or two drivers, each with its own Ray and its own store actor) pointed at one storage would
each compute a missing map. The store that creates `<storage>/sensitivity/<key>/compute.lock` first
computes; the others wait until the lock is gone and load the map it wrote. The holder refreshes the
lock's modification time while it computes (a heartbeat), so a lock left by a killed driver is recognised
by its age and taken over after `stale_s`.

Creation is atomic on a local or shared filesystem (O_CREAT | O_EXCL). On a bucket (a pyarrow URI) it is
write-then-read-back: pyarrow offers no atomic create, so two drivers starting within the same instant
may both compute. A stale takeover has the same window. Neither is ever incorrect, only wasteful: maps are
written whole and renamed into place, and one key always names the same content.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .storage import Storage

LOCK_FILE = "compute.lock"
T = TypeVar("T")


class MapLock:
    """The compute lock of one map directory; `token` tells this holder from any other."""

    def __init__(self, storage: Storage, directory: str, stale_s: float):
        self.storage, self.directory, self.stale_s = storage, directory, float(stale_s)
        self.path = f"{directory}/{LOCK_FILE}"
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"

    def acquire(self) -> bool:
        """Take the lock when nobody holds it, or when its holder stopped refreshing it for `stale_s`."""
        if self._create():
            return True
        if self.age() > self.stale_s:
            self._remove()
            return self._create()
        return False

    def held_by_other(self) -> bool:
        """Whether another driver holds a live lock (one refreshed within `stale_s`)."""
        return self.age() <= self.stale_s

    def age(self) -> float:
        """Seconds since the lock was created or refreshed; infinite when there is no lock."""
        if self.storage.local:
            try:
                return time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return float("inf")
        info = self.storage.fs.get_file_info(self.path)
        return time.time() - info.mtime.timestamp() if info.mtime is not None else float("inf")

    def refresh(self) -> None:
        if self.storage.local:
            os.utime(self.path)
        else:
            self._write()

    def release(self) -> None:
        if self._owner() == self.token:
            self._remove()

    # ---- files ------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "created_at": time.time()}).encode()

    def _create(self) -> bool:
        self.storage.makedirs(self.directory)
        if self.storage.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._body())
            return True
        if self.storage.exists(self.path):
            return False
        self._write()
        return self._owner() == self.token

    def _write(self) -> None:
        with self.storage.fs.open_output_stream(self.path) as fh:
            fh.write(self._body())

    def _owner(self) -> str | None:
        try:
            return json.loads(self.storage.read_bytes(self.path)).get("token")
        except (OSError, ValueError, AttributeError):
            return None

    def _remove(self) -> None:
        try:
            if self.storage.local:
                os.remove(self.path)
            else:
                self.storage.fs.delete_file(self.path)
        except (FileNotFoundError, OSError):
            pass


async def once_across_drivers(lock: MapLock, compute: Callable[[], Awaitable[T]],
                              reload: Callable[[], Awaitable[T | None]], poll_s: float = 1.0) -> tuple[str, T]:
    """("computed", compute()) when this driver takes the lock, else ("waited", reload()) once the holder
    released it with the map written; a holder that dies without writing it lets the next waiter compute.
    `reload` (None: no usable map) runs again once the lock is held: another driver may have finished
    between this driver's first look and its lock. The lock is refreshed every stale_s / 4 while
    `compute` runs, and released whatever happens."""
    while not await asyncio.to_thread(lock.acquire):
        while await asyncio.to_thread(lock.held_by_other):
            await asyncio.sleep(poll_s)
        loaded = await reload()
        if loaded is not None:
            return "waited", loaded

    async def heartbeat() -> Any:
        while True:
            await asyncio.sleep(lock.stale_s / 4)
            await asyncio.to_thread(lock.refresh)

    beat = asyncio.create_task(heartbeat())
    try:
        loaded = await reload()
        return ("waited", loaded) if loaded is not None else ("computed", await compute())
    finally:
        beat.cancel()
        await asyncio.to_thread(lock.release)
