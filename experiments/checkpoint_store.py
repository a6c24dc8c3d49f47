"""The saved state of one resumable loop: TF variables in a tf.train.Checkpoint, the Python-side
state (curves, counters) in a JSON sidecar of each checkpoint, and the result once it is done.

In `directory`: ckpt-<i> (the variables after i iterations, the latest only), state-<i>.json
(its sidecar) and result.json. The sidecar is written before its checkpoint and older sidecars
are removed after it, so the latest complete checkpoint always has its sidecar, wherever a kill
lands. A damaged file (truncated, garbage) is a StateFileError naming it and `remedy`; TF
checks the checksums of the variables it restores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from experiments.run_state import damaged, jsonable, read_state_json, reading_state, write_json_atomically


def arrays_sha256(arrays: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A hash of the arrays `keys` (names, dtypes, shapes and bytes), for a settings fingerprint:
    a run on other data is never resumed from the state of another."""
    digest = hashlib.sha256()
    for key in keys:
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class SidecarCheckpoint:
    def __init__(self, directory: Path, remedy: str, state_keys: Sequence[str] = (),
                 result_keys: Sequence[str] = (), counter: str = "iteration"):
        self.directory = Path(directory)
        self.result_path = self.directory / "result.json"
        self.remedy = remedy
        self.counter = counter  # the sidecar's key of the number of iterations done
        self._state_keys, self._result_keys = (counter, *state_keys), tuple(result_keys)
        self._manager: Optional[tf.train.CheckpointManager] = None

    def result(self) -> Optional[dict]:
        """The result of a finished loop, None if it is not finished."""
        if not self.result_path.exists():
            return None
        return read_state_json(self.result_path, self.remedy, self._result_keys)

    def save_result(self, result: dict) -> None:
        write_json_atomically(self.result_path, jsonable(result))

    def attach(self, **variables: Any) -> None:
        """Tracks `variables` (tf.Variables, built Keras optimizers): what `save` writes and
        `restore` assigns."""
        with self._reading_index():
            self._manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(**variables), str(self.directory), max_to_keep=1)

    def _reading_index(self):
        """TF parses <directory>/checkpoint (the index of checkpoints) as text: garbage raises."""
        return reading_state(self.directory / "checkpoint", self.remedy,
                             (tf.errors.OpError, ValueError, UnicodeDecodeError, OSError))

    def _sidecar(self, done: int) -> Path:
        return self.directory / f"state-{done}.json"

    def latest_state(self) -> Optional[dict]:
        """The sidecar of the latest checkpoint (None if there is none); its `counter` is the
        number of iterations done."""
        index = self.directory / "checkpoint"
        with self._reading_index():
            latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            if index.exists():  # TF ignores an index it cannot parse (a truncated one, say)
                raise damaged(index, "TensorFlow cannot parse it", self.remedy)
            return None
        try:
            done = int(latest.rsplit("-", 1)[1])
        except ValueError:
            raise damaged(index, f"it names the checkpoint {latest!r}", self.remedy) from None
        sidecar = self._sidecar(done)
        if not sidecar.exists():
            raise damaged(self.directory, f"checkpoint {Path(latest).name} has no sidecar {sidecar.name}", self.remedy)
        state = read_state_json(sidecar, self.remedy, self._state_keys)
        if state[self.counter] != done:
            raise damaged(sidecar, f"it holds {self.counter} {state[self.counter]!r}, not {done}", self.remedy)
        return state

    def restore(self, done: int) -> None:
        """Assigns the variables of checkpoint ckpt-<done>; all must be there."""
        prefix = self.directory / f"ckpt-{done}"
        # IndexError: TF's reader of a truncated data file; AssertionError: something not restored.
        with reading_state(f"the checkpoint {prefix} ({prefix.name}.index, {prefix.name}.data-*)", self.remedy,
                           (tf.errors.OpError, IndexError, AssertionError, ValueError, OSError)):
            self._manager.checkpoint.restore(str(prefix)).assert_consumed()

    def save(self, done: int, state: dict) -> None:
        """Saves the variables as ckpt-<done> with `state` as its sidecar."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self._sidecar(done), jsonable({**state, self.counter: done}))
        self._manager.save(checkpoint_number=done)
        for old in self.directory.glob("state-*.json"):
            if old.name != self._sidecar(done).name:
                old.unlink()
