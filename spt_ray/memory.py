"""Returning freed heap memory to the OS, for processes that live across many trials or rankings."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_freed_memory() -> None:
    """Return the heap memory freed so far to the OS (glibc only; elsewhere a no-op).

    Tune runs every trial of a reused worker in a new thread, and the store derives rankings on a thread
    pool; glibc serves each thread from an arena of its own that keeps what it frees. Allocation over a
    ViT-B/16 ranking (2M entries) left 150-300 MB resident per trial, so a worker grew past 2 GB after ten
    trials and Ray's OOM killer took workers in the full-scale rehearsal (bench/scale.py); the store kept
    1.6 GB after deriving 19 rankings. malloc_trim(0) releases the free pages of every arena.
    """
    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)
