"""Where a result came from, for results.json: the date, the machine and the library versions
(RESULTS.md cites them; times are only comparable on the same machine and load)."""

from __future__ import annotations

import datetime
import os
import platform


def environment() -> dict:
    """Date (UTC), platform, processor, CPU count, Python/TensorFlow/Keras versions and the load
    average when the run started (a loaded machine explains slow times)."""
    import keras
    import tensorflow as tf

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average": load,
    }
