"""depth.layers: the between-box comparison keeps what both boxes reproduced."""

from types import SimpleNamespace

import numpy as np

from sort3ddepth.engine.depth.layers import between_boxes
from sort3ddepth.engine.depth.partition import Partition


def _ctx(search, img_per_grp):
    return SimpleNamespace(
        rng=np.random.default_rng(0), log=lambda *a: None, search=search, img_per_grp=img_per_grp
    )


def _boxes(sizes):
    """Two boxes that found the same groups of `sizes` (consecutive index ranges) exactly."""
    edges = np.cumsum([0, *sizes])
    groups = [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]
    box = Partition(groups, np.zeros(0, np.int64))
    return np.arange(edges[-1]), box, Partition(list(groups), np.zeros(0, np.int64))


def test_search_mode_keeps_every_reproduced_group():
    """Three groups reproduced exactly, at a working size that would allow two: search mode has
    no user group size, so nothing may be dropped for it."""
    subset, a, b = _boxes([400, 300, 200])
    res = between_boxes(_ctx(True, 450), subset, a, b)
    assert sorted(len(c) for c in res.clusters) == [200, 300, 400]
    assert len(res.pool) == 0


def test_given_group_size_caps_the_number_of_groups():
    """With the user's img_per_grp, at most n / img_per_grp groups (the smallest is dropped)."""
    subset, a, b = _boxes([400, 300, 200])
    res = between_boxes(_ctx(False, 450), subset, a, b, n_allowed=2)
    assert sorted(len(c) for c in res.clusters) == [300, 400]
    assert len(res.pool) == 200
