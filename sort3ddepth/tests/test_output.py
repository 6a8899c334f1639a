"""Result files: atomic writes and reproducible bytes."""

import time

import mrcfile
import numpy as np
import pytest

from sort3ddepth.engine import output


def test_a_map_written_twice_has_the_same_bytes(tmp_path):
    """The MRC header carries no time stamp: the same map written a second later is the same
    file, so two runs of one command can be compared byte for byte."""
    vol = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32)
    output.write_map(tmp_path / "a.mrc", vol, 2.5)
    time.sleep(1.1)
    output.write_map(tmp_path / "b.mrc", vol, 2.5)
    assert (tmp_path / "a.mrc").read_bytes() == (tmp_path / "b.mrc").read_bytes()
    with mrcfile.open(tmp_path / "a.mrc") as m:
        assert np.array_equal(m.data, vol)
        assert m.voxel_size.x == pytest.approx(2.5)
        assert m.header.label[0].strip() == output.MAP_LABEL


def test_a_failed_write_leaves_no_file(tmp_path):
    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        output.atomic_write(tmp_path / "x.txt", broken)
    assert list(tmp_path.iterdir()) == []
