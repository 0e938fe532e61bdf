"""Tune's settings that live in environment variables, set for the duration of one sweep's `fit()`.

Loggers: Tune logs every result three ways by default (result.json, progress.csv and, where tensorboardX is
installed, event files). In the full-scale rehearsal (bench/scale.py) a quarter of the driver's CPU went to
the event files alone, and on a bucket each is one more object per trial. The Parquet results hold every
row; the reconciliation reads result.json (JsonLoggerCallback, which a fresh experiment's callbacks list
names); `--callback tensorboard` brings the event files back. An experiment whose callbacks do not name
the JSON logger (one restored from before this) keeps Tune's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ray.tune import Tuner
from ray.tune.logger import JsonLoggerCallback

NO_DEFAULT_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def names_json_logger(tuner: Tuner) -> bool:
    """Whether the experiment's own callbacks include the JSON logger (Tuner has no public getter)."""
    local = getattr(tuner, "_local_tuner", None)
    callbacks = local.get_run_config().callbacks if local is not None else None
    return any(isinstance(c, JsonLoggerCallback) for c in callbacks or ())


@contextmanager
def tune_env(tuner: Tuner) -> Iterator[dict[str, str]]:
    """The settings above in os.environ (Tune reads them when fit() builds its controller), restored after."""
    values = {NO_DEFAULT_LOGGERS: "1"} if names_json_logger(tuner) else {}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
