"""Where a result came from, for results.json: the date, the machine and the library versions
(RESULTS.md cites them; times are only comparable on the same machine and load)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Optional


def load_average() -> Optional[list]:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def mark_end(environment: dict) -> dict:
    """`environment` (a record of `environment()`) with the load average at the run's end added as
    "load_average_end"."""
    environment["load_average_end"] = load_average()
    return environment


def environment() -> dict:
    """Date (UTC), platform, processor, CPU count, Python/TensorFlow/Keras versions and the load
    average when the run started (a loaded machine explains slow times)."""
    import keras
    import tensorflow as tf

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average": load_average(),
    }
