"""Progress of a functional loop (hyper-steps, say) on Keras' `Progbar`.

`keras.utils.Progbar` is what `fit` shows; for a hand-written loop it lacks two things this
wrapper adds: a loop resumed at step `initial` (the bar counts from there, and its time per step
and ETA use this process's steps only), and log files (a redrawn line on a terminal; one line
every `log_seconds` and at the end when stdout is not a terminal, without carriage returns or
colour codes).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Optional

import keras

from tf_bilevel import _validate


_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")  # Progbar's bold/colour codes: noise in a log file


class _ResumedProgbar(keras.utils.Progbar):
    """Progbar whose time per step counts the steps after `initial` only."""

    def __init__(self, target: int, initial: int, **kwargs):
        super().__init__(target, **kwargs)
        self._initial = initial

    def _estimate_step_duration(self, current, now):
        return super()._estimate_step_duration(current - self._initial, now)


class Progress:
    """A progress bar for steps `initial+1 … target` of a loop.

    ```
    bar = tfb.Progress(R, label="hypercleaning K=5")
    for k in range(R):
        result = step(params, batch, val_batch)
        bar.update(k + 1, val_loss=float(result.outer_value))
    ```

    Args:
      target: the step count at the end (e.g. R hyper-iterations).
      initial: steps done before this process (a resumed loop).
      label: printed once, above the bar.
      log_seconds: when stdout is not a terminal, the seconds between two printed lines.
      unit_name: what a step is called in the time per step ("step" → "12ms/step").

    `update(done, **metrics)` shows the metrics' latest values (not running means).
    """

    def __init__(self, target: int, *, initial: int = 0, label: Optional[str] = None, log_seconds: float = 30.0,
                 unit_name: str = "step"):
        target = _validate.integer(target, "Progress(target=...)", "the steps at the end")
        initial = _validate.integer(initial, "Progress(initial=...)", f"the steps done before, at most target={target}",
                                    minimum=0, below=target + 1)
        if not log_seconds >= 0:
            raise ValueError(f"Progress(log_seconds=...) must be >= 0 seconds, got {log_seconds!r}")
        self.target, self.initial = target, initial
        self.interactive = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
        if label:
            print(label, flush=True)
        self._bar = _ResumedProgbar(target, initial, interval=0.05 if self.interactive else log_seconds,
                                    stateful_metrics=(), unit_name=unit_name)
        # Progbar redraws with \b and \r whenever the `posix` module is loaded (always on Linux):
        # a log file would get one endless line. Redraw on a terminal only.
        self._bar._dynamic_display = self.interactive
        self._bar._seen_so_far = initial

    def update(self, done: int, **metrics: float) -> None:
        """Step `done` finished, with these metric values (floats)."""
        self._bar.stateful_metrics.update(metrics)  # latest values, not running means
        values = [(name, float(value)) for name, value in metrics.items()]
        if self.interactive:
            self._bar.update(done, values)
        else:
            line = io.StringIO()
            with contextlib.redirect_stdout(line):
                self._bar.update(done, values)
            sys.stdout.write(_ANSI_STYLE.sub("", line.getvalue()))
        sys.stdout.flush()
