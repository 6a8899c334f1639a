"""Finished units of a run (generations, boxes, runs inside a box), kept so that running the same
command again on the same --output_dir continues where a killed run stopped.

Each unit's result is stored with the state of the one random generator at its end. Resuming
loads the finished units in the order the run made them and restores the generator after each,
so a resumed run draws exactly the random numbers an uninterrupted run draws: the clusters are
identical. A unit that was running when the job died has no file and is simply done again.
Files are written atomically by rank 0 and read by rank 0, which broadcasts them.
"""

import pickle
from pathlib import Path

from . import output

FOLDER = "checkpoints"


class Checkpoints:
    def __init__(self, out_dir, comm, log=None, enabled=True):
        self.folder = Path(out_dir) / FOLDER
        self.comm = comm
        self.log = log
        self.enabled = enabled
        self.loaded = 0

    def _path(self, key):
        return self.folder / (key.replace("/", "_") + ".pkl")

    def load(self, key, rng):
        """The payload stored for `key` (and rng set to its state then), or None."""
        if not self.enabled:
            return None
        payload = None
        if self.comm.is_root:
            path = self._path(key)
            if path.exists():
                try:
                    with open(path, "rb") as f:
                        payload = pickle.load(f)
                except Exception:  # unreadable: the unit is done again
                    payload = None
        payload = self.comm.bcast(payload)
        if payload is None:
            return None
        rng.bit_generator.state = payload.pop("_rng")
        self.loaded += 1
        if self.log is not None:
            self.log(f"resume: {key.replace('/', ' ')} loaded from an earlier run")
        return payload

    def save(self, key, rng, **payload):
        if not self.enabled or not self.comm.is_root:
            return
        payload["_rng"] = rng.bit_generator.state
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        output.atomic_write(self._path(key), write)
