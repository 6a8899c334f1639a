"""Result files: written atomically (temporary name, then rename), so a killed run never leaves a
truncated file that looks finished. Only rank 0 writes."""

import json
import os
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np


def atomic_write(path, writer, suffix=""):
    """writer(tmp_name) fills a temporary file next to `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + path.name + ".", suffix=suffix + ".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text):
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, w)


def write_selection(path, indices):
    """Particle indices (0-based, input order), one a line."""
    write_text(path, "".join(f"{int(i)}\n" for i in np.sort(np.asarray(indices))))


def read_selection(path):
    txt = Path(path).read_text().split()
    return np.array([int(t) for t in txt], np.int64)


MAP_LABEL = b"sort3ddepth"  # the MRC header's one label: no time stamp (mrcfile's default has
# one), so that the same run gives the same bytes, whenever and on however many ranks it ran


def write_map(path, vol, pixel_size):
    def w(tmp):
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.asarray(vol, np.float32))
            m.voxel_size = float(pixel_size)
            m.header.label[0] = MAP_LABEL
            m.header.nlabl = 1

    atomic_write(path, w, ".mrc")


def write_npy(path, array):
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, w, ".npy")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


class Log:
    """Progress log: rank 0 appends timestamped lines to log.txt and echoes them to stdout."""

    def __init__(self, path=None, enabled=True, echo=True):
        self.path = Path(path) if path else None
        self.enabled = enabled
        self.echo = echo
        self.t0 = time.time()

    def __call__(self, msg=""):
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = str(msg).splitlines() or [""]
        text = "".join(f"{stamp} [{time.time() - self.t0:8.1f} s] {line}\n" for line in lines)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(text)
        if self.echo:
            print(text, end="", flush=True)
