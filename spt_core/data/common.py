"""Shared data pieces: the DataError type, task metadata, image reading and seeded DataLoaders."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

GROUPS = ("Natural", "Specialized", "Structured")


class DataError(ValueError):
    """Bad or missing data. The message is one line: the file (and line), the problem and the fix."""


@dataclass(frozen=True)
class TaskInfo:
    """A task's identity: its suite ("vtab", "mini", "fgvc"), group, class count and native image size."""

    name: str
    group: str
    num_classes: int
    suite: str
    img_size: int = 224

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_rgb(path: Path, *, listed_in: str) -> Image.Image:
    """Open an image (any mode, JPEG/PNG/...) as RGB; raise DataError naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path} (listed in {listed_in}): {_one_line(err)}; "
                        "fix: replace the file with a valid JPEG/PNG or remove its entry") from None


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a folder, else raise DataError."""
    if not path.is_dir():
        raise DataError(f"{what} {path} not found; fix: {fix}")
    return path


def require_file(path: Path, what: str, fix: str) -> Path:
    """Return ``path`` if it is a file, else raise DataError."""
    if not path.is_file():
        raise DataError(f"{what} {path} not found; fix: {fix}")
    return path


def check_images_exist(paths: list[Path], where: list[str], listed_in: Path) -> None:
    """Raise one DataError for the first missing image (with how many are missing in total)."""
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        first = missing[0]
        raise DataError(f"{where[first]}: image {paths[first]} not found ({len(missing)} of {len(paths)} "
                        f"images listed in {listed_in.name} are missing); fix: restore the images or "
                        "regenerate the list")


def _strip_worker_traceback(err: DataError) -> DataError:
    """A DataError raised in a DataLoader worker arrives with the worker's traceback; keep its last line."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return err
    last = lines[-1]
    marker = "DataError: "
    return DataError(last.split(marker, 1)[1] if marker in last else last)


class SafeDataLoader(DataLoader):
    """A DataLoader whose DataErrors surface as the one-line message, also from worker processes.

    Without workers, random transforms run on a private torch RNG stream seeded from the loader's
    generator once per epoch (as worker processes are), so augmentation is reproducible and the caller's
    global RNG is neither used nor advanced by data loading."""

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        private = self.num_workers == 0 and self.generator is not None
        if private:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
            data_state = torch.Generator().manual_seed(seed).get_state()
        while True:
            if private:
                outer_state = torch.get_rng_state()
                torch.set_rng_state(data_state)
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as err:
                self._stop_workers(it)
                raise _strip_worker_traceback(err) from None
            finally:
                if private:
                    data_state = torch.get_rng_state()
                    torch.set_rng_state(outer_state)
            yield batch


    def _stop_workers(self, it: Iterator[Any]) -> None:
        """Stop the worker processes of a loader that raised (its data is bad; it is not iterated again): left
        to garbage collection, torch joins persistent workers with a 5 s timeout each."""
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        if self.persistent_workers:
            self._iterator = None


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A deterministic loader: ``train`` shuffles with a generator seeded by ``seed`` (epoch k's order and
    augmentation are functions of the seed); eval keeps file order. Worker RNGs derive from the same
    generator, and the global torch RNG is never consumed."""
    return SafeDataLoader(
        dataset, batch_size=batch_size, shuffle=train, drop_last=drop_last and train,
        generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
        worker_init_fn=_seed_worker if num_workers else None, persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def make_loaders(train_set: Dataset, eval_set: Dataset, *, batch_size: int = 64,
                 eval_batch_size: int | None = None, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = False, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """(train loader shuffled with ``seed``, eval loader in file order)."""
    common = dict(seed=seed, num_workers=num_workers, pin_memory=pin_memory)
    return (make_loader(train_set, batch_size=batch_size, train=True, drop_last=drop_last, **common),
            make_loader(eval_set, batch_size=eval_batch_size or batch_size, train=False, **common))
