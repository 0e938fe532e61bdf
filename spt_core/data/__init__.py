"""Data: VTAB-1k and FGVC loaders, the embedded mini suite, seeded DataLoaders, DataError."""

from .common import GROUPS, DataError, SafeDataLoader, TaskInfo, load_rgb, make_loader, make_loaders
from .fgvc import FGVC_SPLITS, FGVC_TASKS, FgvcDataset, fgvc_dir, fgvc_loaders, fgvc_transform
from .mini import MINI_SPECS, MINI_TASKS, MINI_VERSION, generate_task, write_mini_suite
from .suites import PROTOCOL_SPLITS, build_dataset, protocol_splits
from .vtab import VTAB_SPLITS, VTAB_TASKS, VtabDataset, read_list_file, task_info, vtab_loaders, vtab_transform

__all__ = [
    "FGVC_SPLITS", "FGVC_TASKS", "GROUPS", "MINI_SPECS", "MINI_TASKS", "MINI_VERSION", "PROTOCOL_SPLITS", "VTAB_SPLITS", "VTAB_TASKS",
    "DataError", "FgvcDataset", "build_dataset", "SafeDataLoader", "TaskInfo", "VtabDataset", "fgvc_dir", "fgvc_loaders",
    "fgvc_transform", "generate_task", "load_rgb", "make_loader", "make_loaders", "protocol_splits", "read_list_file", "task_info",
    "vtab_loaders", "vtab_transform", "write_mini_suite",
]
