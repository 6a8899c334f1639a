"""depth.layers: the between-box comparison keeps what both boxes reproduced."""

from types import SimpleNamespace

import numpy as np

from sort3ddepth.engine.depth.layers import between_boxes
from sort3ddepth.engine.depth.partition import Partition


def _ctx(search, img_per_grp, n=5000):
    """A context whose n particles have random views and halves (no group follows them)."""
    rng = np.random.default_rng(0)
    views = rng.standard_normal((n, 3))
    data = SimpleNamespace(
        views=views / np.linalg.norm(views, axis=1, keepdims=True), half=rng.integers(0, 2, n)
    )
    return SimpleNamespace(
        rng=rng, log=lambda *a: None, search=search, img_per_grp=img_per_grp, data=data
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


def test_a_reproduced_minority_state_is_kept():
    """States of 50 / 25 / 15 / 10 %: SPHIRE drops every group under a third of the largest
    (here the 450 and the 300); groups that both boxes reproduce are kept down to a tenth of
    the largest (not the 25 outliers both boxes set aside), and one that only one box found (a
    splinter, whose border is arbitrary) is not."""
    subset, a, b = _boxes([1500, 750, 450, 300, 25])
    res = between_boxes(_ctx(True, 750), subset, a, b)
    assert sorted(len(c) for c in res.clusters) == [300, 450, 750, 1500]
    subset, a, b = _boxes([1500, 750, 450, 300])
    # box b split the 300 differently: half of it in the 450, half in the pool
    split = Partition(
        [b.clusters[0], b.clusters[1], np.union1d(b.clusters[2], b.clusters[3][:150])],
        b.clusters[3][150:],
    )
    res = between_boxes(_ctx(True, 750), subset, a, split)
    assert sorted(len(c) for c in res.clusters) == [450, 750, 1500]


def test_a_reproduced_group_that_follows_the_views_is_rejected():
    """Both boxes split the images the same way, but one group is the images seen from near
    the z axis (or its opposite): a state's images come from every direction, so that group is
    no state; the group of random images next to it is kept. Only where asked (the split
    check)."""
    ctx = _ctx(True, 1000, n=3000)
    polar = np.nonzero(np.abs(ctx.data.views[:, 2]) > 0.75)[0]
    rng = np.random.default_rng(1)
    rest = np.setdiff1d(np.arange(3000), polar)
    other = np.sort(rng.choice(rest, 900, replace=False))
    box = Partition([polar, other], np.setdiff1d(rest, other))
    again = Partition([polar, other], box.pool)
    res = between_boxes(ctx, np.arange(3000), box, again, views_test=True)
    assert [len(c) for c in res.clusters] == [900]
    res = between_boxes(ctx, np.arange(3000), box, again)  # the generations' comparison
    assert sorted(len(c) for c in res.clusters) == sorted([900, len(polar)])


def _layer_of_stand_in_boxes(monkeypatch, explorer):
    """Layer 0 of four boxes in search mode; box 0 returns `explorer`, the others two groups.
    Returns (the K each box was given, the K later layers keep at least, the log)."""
    from sort3ddepth.engine.depth import layers

    given = []

    def stand_in_box(ctx, subset, k, **kw):
        given.append(k)
        return explorer if len(given) == 1 else Partition([subset[:50], subset[50:]], subset[:0])

    monkeypatch.setattr(layers, "run_box", stand_in_box)
    logged = []
    ctx = SimpleNamespace(search=True, frozen=False, checkpoints=None, log=logged.append)
    _, k_learned = layers._run_layer(ctx, 0, 0, np.arange(100), starts=[None] * 4, k=7, k_learned=2)
    return given, k_learned, logged


def test_box_learning_hands_on_the_k_whose_groups_were_kept(monkeypatch):
    """An explorer that kept 2 groups of a run at K = 4 and set images aside, because at K = 2
    those images would be shared out among its groups, teaches K = 4, to the layer's boxes and
    to the later layers: boxes at K = 2 put every image into the two groups, and the pairs
    reproduce that (a-k4-uneq-3500 at depth order 2 lost states so). Without that finding it
    teaches the K of its groups."""
    groups, aside = [np.arange(0, 40), np.arange(40, 70)], np.arange(70, 100)
    shared_out = Partition(groups, aside, rand_index=0.99, k_found=2, k_taught=4)
    given, k_learned, logged = _layer_of_stand_in_boxes(monkeypatch, shared_out)
    assert given == [7, 4, 4, 4] and k_learned == 4
    assert "K = 4 (its 2 groups were kept at K = 4" in logged[0]
    kept_all = Partition(groups, aside, rand_index=0.99, k_found=2, k_taught=2)
    given, k_learned, logged = _layer_of_stand_in_boxes(monkeypatch, kept_all)
    assert given == [7, 2, 2, 2] and k_learned == 2
    assert logged[0].endswith("the next boxes start with K = 2")
