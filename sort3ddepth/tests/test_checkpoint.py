"""checkpoint.Checkpoints: a finished unit comes back with the random generator as it was after
it, so a resumed run draws what an uninterrupted one draws."""

import numpy as np

from sort3ddepth.engine.checkpoint import FOLDER, Checkpoints
from sort3ddepth.engine.parallel import Comm


def test_a_saved_unit_restores_its_payload_and_the_generator(tmp_path):
    logged = []
    rng = np.random.default_rng(5)
    rng.random(3)
    Checkpoints(tmp_path, Comm()).save("gen000/layer0/box1", rng, partition=[1, 2, 3])
    expected_next = rng.random(4)  # what the run drew after the unit
    fresh = np.random.default_rng(99)
    got = Checkpoints(tmp_path, Comm(), log=logged.append).load("gen000/layer0/box1", fresh)
    assert got == {"partition": [1, 2, 3]}
    np.testing.assert_array_equal(fresh.random(4), expected_next)
    assert logged == ["resume: gen000 layer0 box1 loaded from an earlier run"]
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == ["gen000_layer0_box1.pkl"]


def test_missing_unreadable_or_disabled_units_are_done_again(tmp_path):
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    cp = Checkpoints(tmp_path, Comm())
    assert cp.load("gen000", rng) is None
    cp.save("gen000", rng, partition=None)
    (tmp_path / FOLDER / "gen000.pkl").write_bytes(b"truncated by a kill")
    assert cp.load("gen000", rng) is None and cp.loaded == 0
    off = Checkpoints(tmp_path / "off", Comm(), enabled=False)
    off.save("gen000", rng, partition=None)
    assert off.load("gen000", rng) is None and not (tmp_path / "off").exists()
    assert rng.bit_generator.state == state  # nothing drew or restored
