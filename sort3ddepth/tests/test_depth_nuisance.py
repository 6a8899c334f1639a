"""depth.nuisance: a group that its images' views or halves tell from the rest is no state."""

from types import SimpleNamespace

import numpy as np

from sort3ddepth.engine.depth.nuisance import NuisanceTest


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    views = rng.standard_normal((n, 3))
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    return SimpleNamespace(views=views, half=rng.integers(0, 2, n))


def test_random_groups_follow_nothing():
    data = _data(3000)
    test = NuisanceTest(data, np.arange(3000))
    for seed in range(5):
        members = np.sort(np.random.default_rng(seed).choice(3000, 700 + 200 * seed, False))
        what, how = test.follows(members)
        assert how < 0.1, (what, how)


def test_a_group_of_nearby_views_follows_the_views():
    """Images seen within ~40 degrees of the z axis, from either side (a view and its opposite
    give the same central section): 'views', near 1; a random half of them: near 0."""
    data = _data(3000)
    polar = np.nonzero(np.abs(data.views[:, 2]) > 0.75)[0]
    test = NuisanceTest(data, np.arange(3000))
    what, how = test.follows(polar)
    assert what == "views" and how > 0.8
    assert np.mean(data.views[polar, 2] > 0) < 0.6  # both sides of the sphere
    _, how = test.follows(polar[::2])
    assert how < 0.6


def test_a_group_of_one_half_follows_the_halves():
    """600 images all of half 0: near 1; 20 images split 14 / 6 (chance): below the policy's
    0.5."""
    data = _data(2000)
    halves = [np.nonzero(data.half == h)[0] for h in (0, 1)]
    few = np.sort(np.concatenate([halves[0][:14], halves[1][:6]]))
    assert NuisanceTest(data, np.arange(2000)).follows(few)[1] < 0.5
    members = halves[0][:600]
    what, how = NuisanceTest(data, np.arange(2000)).follows(members)
    assert what == "halves" and how > 0.8


def test_large_subsets_are_sampled_the_same_way_on_every_call():
    data = _data(20000)
    subset = np.arange(0, 20000, 2)
    members = subset[np.abs(data.views[subset, 0]) > 0.8]
    a = NuisanceTest(data, subset).follows(members)
    b = NuisanceTest(data, subset).follows(members)
    assert a == b and a[0] == "views" and a[1] > 0.8
