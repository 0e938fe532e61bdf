"""A cheap fingerprint of what one split of a task reads: list files' bytes + every listed image's size and mtime.

Why: a sensitivity map is cached under a key; if the key ignored the data, a map computed from an older copy
of a task (an edited list, a replaced image) would be reused silently. Hashing every image's bytes would cost
a full read of the split; the list files' bytes (paths and labels) plus each image's (size, mtime_ns) catch
every edit a copy, a rewrite or a regeneration makes, for a `stat` per image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from .common import DataError
from .fgvc import FgvcDataset
from .vtab import VtabDataset


def files_fingerprint(list_files: Iterable[Path], images: Iterable[Path]) -> str:
    """sha256 over each list file's name and bytes, then each image's (size, mtime_ns) in listed order."""
    h = hashlib.sha256()
    try:
        for path in list_files:
            data = Path(path).read_bytes()
            h.update(f"{Path(path).name}\0{len(data)}\0".encode())
            h.update(data)
        for path in images:
            st = os.stat(path)
            h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    except OSError as err:
        raise DataError(f"cannot read {err.filename} to fingerprint the data: {err.strerror}; "
                        "fix: restore the file or regenerate the split lists") from None
    return h.hexdigest()


def split_fingerprint(suite: str, root: str | Path, task: str, split: str) -> dict[str, object]:
    """{"sha256", "images"} of one split. FGVC labels are remapped over all three split files, so all three
    count; a VTAB-layout list file holds its own labels. Validates the split as its Dataset does."""
    if suite == "fgvc":
        fgvc = FgvcDataset(root, task, split)
        lists = [fgvc.data_dir / f"{part}.json" for part in ("train", "val", "test")]
        paths = fgvc.paths
    else:
        vtab = VtabDataset(root, task, split)
        lists, paths = [vtab.list_file], vtab.paths
    return {"sha256": files_fingerprint(lists, paths), "images": len(paths)}
