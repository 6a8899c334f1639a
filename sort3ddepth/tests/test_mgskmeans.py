"""MGSK-means run control (damping after a first plateau), the member check that ends a
generation and the final assignment (the posterior model at the purity target), and the starts
that rebuild missing groups from independent cuts (rebuild_starts)."""

import dataclasses
import types

import numpy as np
import pytest

from sort3ddepth.engine import fourier
from sort3ddepth.engine.cli import build_parser
from sort3ddepth.engine.comparison import two_way_comparison
from sort3ddepth.engine.depth import (
    Partition,
    assign_members,
    final_assignment,
    fragments,
    rebuild_starts,
    sure_groups,
    within_box_accept,
)
from sort3ddepth.engine.depth.box import _starts_from_groups
from sort3ddepth.engine.geometry import axis_turn, pose_neighbours
from sort3ddepth.engine.mgskmeans import (
    MAX_ITER,
    NEIGHBOUR_PRIOR,
    ClusterMaps,
    centre_per_orientation,
    mgsk_pair,
    pose_marginal,
)
from sort3ddepth.engine.parallel import Comm
from sort3ddepth.engine.preprocess import prepare
from sort3ddepth.engine.star_io import read_star
from sort3ddepth.tests.sorting_data import make_star


class CyclingMaps:
    """A stand-in for ClusterMaps whose "maps" are the label snapshot of the other half, and
    whose scores make a fixed share of the images chase their partner's label + 1 (K = 3): those
    images never settle, so every sweep has the same change, the pattern of a cycle."""

    def __init__(self, n, n_cyclers, seed=0):
        rng = np.random.default_rng(seed)
        self.d = types.SimpleNamespace(half=np.arange(n) % 2)
        self.partner = np.arange(n) ^ 1  # image 2j <-> 2j+1, other half
        self.cycler = np.zeros(n, bool)
        self.cycler[rng.choice(n // 2, n_cyclers // 2, replace=False) * 2] = True
        self.cycler[self.partner[self.cycler]] = True
        self.home = rng.integers(0, 3, n)  # where the other images want to be

    def resolution_limit(self, group_size):
        return 10

    def accumulate(self, subset, memberships, rmax=None):
        m = np.asarray(memberships, np.float64).T.copy()  # (2K, n): who is in which map
        return m, m.copy()

    def fourier_maps(self, data, w, group_size):
        return data.copy()

    def scores(self, maps, subset, half, rmax=None):
        rows = np.nonzero(self.d.half[subset] == half)[0]
        n_maps = maps.shape[0]
        out = np.zeros((rows.size, n_maps))
        for run in range(n_maps // 3):
            lab_other = maps[3 * run : 3 * run + 3].argmax(axis=0)  # labels of the other half
            want = np.where(
                self.cycler[rows], (lab_other[self.partner[rows]] + 1) % 3, self.home[rows]
            )
            out[np.arange(rows.size), 3 * run + want] = 1.0
        return out


def test_a_cycling_run_is_damped_then_stops_and_reports_what_images_wanted():
    n, n_cyclers = 600, 120
    maps = CyclingMaps(n, n_cyclers)
    rng = np.random.default_rng(3)
    init = maps.home.copy()
    init[maps.cycler] = rng.integers(0, 3, n_cyclers)
    log = []
    best, n_iter = mgsk_pair(
        maps,
        np.arange(n),
        3,
        [init, init.copy()],
        schedules=[[0], [0]],
        frozen=True,
        search=False,
        orientation=np.zeros(n, np.int64),
        rng=rng,
        log=log.append,
    )
    changes = [float(line.split("change % ")[1].split(",")[0]) for line in log]
    # the cyclers keep moving: without damping the run would stop at its first plateau (4
    # sweeps); damping needs 3 more sweeps for its own plateau, then stops before MAX_ITER
    assert 7 <= n_iter[0] < MAX_ITER, (n_iter, changes)
    # the change is what the images wanted (about the cyclers' share, 20 %), damped or not:
    # a damped sweep makes about half the moves but must not report half the change
    assert all(abs(c - 100.0 * n_cyclers / n) < 10.0 for c in changes[1:]), changes
    # the other images sit where they want to be
    assert np.array_equal(best[0][~maps.cycler], maps.home[~maps.cycler])


@pytest.fixture(scope="module")
def three_groups(tmp_path_factory):
    folder = tmp_path_factory.mktemp("member_check")
    star, truth = make_star(folder, n_per_class=300, n_classes=3, snr=3.0, seed=4)
    opts = build_parser().parse_args(["--instack", str(star), "--output_dir", str(folder)])
    opts.k_initial, opts.mask_map, opts.focus_map, opts.apply_noise = 3, None, None, True
    rng = np.random.default_rng(0)
    data = prepare(read_star(star), Comm(), opts, rng, log=lambda *a: None)
    return data, truth


def _member_ctx(data, logged, min_purity=0.98):
    return types.SimpleNamespace(
        data=data, maps=ClusterMaps(data, Comm()), log=logged.append, min_purity=min_purity
    )


def test_member_check_sends_misfits_to_the_pool_and_takes_clear_pool_images(three_groups):
    data, truth = three_groups
    n = len(truth)
    rng = np.random.default_rng(1)
    labels = truth.copy()
    wrong = rng.random(n) < 0.1  # 10 % forced into another group
    labels[wrong] = (truth[wrong] + rng.integers(1, 3, wrong.sum())) % 3
    pooled = rng.random(n) < 0.2  # 20 % left in the pool
    subset = np.arange(n)
    part = Partition(
        [subset[(labels == j) & ~pooled] for j in range(3)],
        subset[pooled],
        0.9,
        [{"jaccard": float(j)} for j in range(3)],
    )
    logged = []
    ctx = _member_ctx(data, logged)
    out = assign_members(ctx, subset, part, "test: ")
    kept = np.concatenate(out.clusters)
    assert np.array_equal(np.sort(np.concatenate([kept, out.pool])), subset)
    final = out.labels(subset)  # 3 = the pool
    for j, c in enumerate(out.clusters):
        assert np.mean(truth[c] == j) >= 0.98
    misfit, good = wrong & ~pooled, ~wrong & ~pooled
    # misfits leave the cluster they were forced into, for their own or the pool
    assert np.mean(final[misfit] == labels[misfit]) <= 0.05
    assert np.mean((final[misfit] == truth[misfit]) | (final[misfit] == 3)) >= 0.95
    assert np.mean(final[good] == truth[good]) >= 0.93  # few good members do
    joined = pooled & (final < 3)
    assert joined.sum() >= 0.3 * pooled.sum()  # clear pool images join
    assert np.mean(final[joined] == truth[joined]) >= 0.98  # ... their own cluster
    assert [s["jaccard"] for s in out.stats] == [0.0, 1.0, 2.0]  # stats stay aligned
    left = int(np.sum(~pooled & (final == 3)))
    assert "member check" in logged[0] and f"{left} of {int((~pooled).sum())}" in logged[0]
    assert f"{int(joined.sum())} of {int(pooled.sum())} pool images join" in logged[0]
    for j, st in enumerate(out.stats):  # the estimate says what was measured
        assert abs(st["estimated_purity"] - np.mean(truth[out.clusters[j]] == j)) <= 0.03


def test_member_check_is_sure_of_nothing_in_random_clusters(tmp_path):
    """Homogeneous data cut at random, a fifth of it in the pool: the clusters' maps differ only
    by noise, so no image is sure of either and no pool image reaches the purity target."""
    star, _ = make_star(tmp_path, n_per_class=600, n_classes=1, snr=3.0, seed=8)
    opts = build_parser().parse_args(["--instack", str(star), "--output_dir", str(tmp_path)])
    opts.k_initial, opts.mask_map, opts.focus_map, opts.apply_noise = 2, None, None, True
    data = prepare(read_star(star), Comm(), opts, np.random.default_rng(0), log=lambda *a: None)
    rng = np.random.default_rng(2)
    subset = np.arange(600)
    lab = rng.permutation(600) % 5 // 2  # 2 = the pool (120 images)
    part = Partition([subset[lab == 0], subset[lab == 1]], subset[lab == 2], 0.5, [{}, {}])
    logged = []
    ctx = _member_ctx(data, logged)
    out = assign_members(ctx, subset, part, "")
    assert "pool images join" in logged[0]
    assert np.sum(np.isin(subset[lab == 2], out.pool)) >= 0.95 * np.sum(lab == 2)


def test_member_check_keeps_a_pool_that_could_be_a_group(three_groups):
    """Two clusters and a third group in the pool: the posterior compares only the two clusters there
    are, so the pool is left whole for the next generation."""
    data, truth = three_groups
    subset = np.arange(len(truth))
    part = Partition([subset[truth == 0], subset[truth == 1]], subset[truth == 2], 0.9, [{}, {}])
    logged = []
    ctx = _member_ctx(data, logged)
    out = assign_members(ctx, subset, part, "")
    assert np.array_equal(np.intersect1d(out.pool, subset[truth == 2]), subset[truth == 2])
    assert "could hold a group" in logged[0]


def test_member_check_leaves_a_single_cluster_alone(three_groups):
    data, truth = three_groups
    part = Partition([np.arange(len(truth))], np.zeros(0, np.int64), 1.0, [{}])
    ctx = types.SimpleNamespace(data=data, maps=None, log=print)
    assert assign_members(ctx, np.arange(len(truth)), part, "") is part


def test_final_assignment_takes_a_later_group_out_of_an_earlier_cluster(three_groups):
    """An earlier generation's cluster holds a fifth of a group found only later (its check
    could not compare with a map it did not have): checked over all clusters, those images
    leave, the clusters keep their order, and clear unaccounted images join their own."""
    data, truth = three_groups
    n = len(truth)
    rng = np.random.default_rng(5)
    everyone = np.arange(n)
    stray = (truth == 2) & (rng.random(n) < 0.2)  # group 2 images in cluster 0
    unacc = ~stray & (rng.random(n) < 0.1)
    clusters = [
        everyone[((truth == 0) | stray) & ~unacc],
        everyone[(truth == 1) & ~unacc],
        everyone[(truth == 2) & ~stray & ~unacc],
    ]
    logged = []
    ctx = _member_ctx(data, logged)
    out, pool, memb = final_assignment(ctx, clusters, everyone[unacc])
    assert np.array_equal(np.sort(np.concatenate(out + [pool])), everyone)
    for j, c in enumerate(out):
        assert np.mean(truth[c] == j) >= 0.98, (j, np.bincount(truth[c]))
    assert np.mean(np.isin(everyone[stray], out[0])) <= 0.1  # the strays leave
    joined = np.isin(everyone[unacc], np.concatenate(out))
    assert joined.sum() >= 0.3 * unacc.sum()
    assert "final assignment over the 3 clusters" in logged[0]
    assert f"{int(joined.sum())} of {int(unacc.sum())} unaccounted images join" in logged[0]
    assert memb.posterior.shape == (n, 3)
    assert np.allclose(memb.posterior.sum(axis=1), 1.0)
    assert np.mean(memb.posterior.argmax(axis=1) == truth) >= 0.97


def _agreement(labels, truth):
    """Share of images whose label is the majority label of their true group."""
    return sum(np.bincount(labels[truth == g]).max() for g in np.unique(truth)) / len(truth)


def _cut_ctx(data, seed):
    """What the cuts read of a SortContext (search mode; set search/frozen for K given)."""
    return types.SimpleNamespace(
        data=data,
        maps=ClusterMaps(data, Comm()),
        rng=np.random.default_rng(seed),
        search=True,
        frozen=False,
    )


def test_rebuild_cuts_a_merged_group_and_keeps_the_others(three_groups):
    data, truth = three_groups
    merged = np.nonzero(truth > 0)[0]  # groups 1 and 2 merged: the largest
    starts = rebuild_starts(
        _cut_ctx(data, 2),
        np.arange(len(truth)),
        [np.nonzero(truth == 0)[0], merged],
        np.zeros(0, int),
        k=3,
    )
    for lab in starts:
        assert lab.min() >= 0 and lab.max() == 2
        assert len(np.unique(lab[truth == 0])) == 1  # the kept group stays whole
    # the cut separates groups 1 and 2 (a random cut agrees ~0.67 with the truth; one run of a
    # K = 2 pair may stop in a poorer optimum)
    agree = [_agreement(lab, truth) for lab in starts]
    assert min(agree) >= 0.75 and np.mean(agree) >= 0.85, agree


def test_rebuild_cuts_a_pool_that_holds_two_groups(three_groups):
    data, truth = three_groups
    starts = rebuild_starts(
        _cut_ctx(data, 3),
        np.arange(len(truth)),
        [np.nonzero(truth == 0)[0]],
        np.nonzero(truth > 0)[0],
        k=3,
    )
    agree = [_agreement(lab, truth) for lab in starts]
    assert min(agree) >= 0.75 and np.mean(agree) >= 0.85, agree


def test_rebuild_makes_a_one_group_pool_a_group_in_one_start_only(three_groups):
    """Both starts holding the pool as a group would make it "reproduce" whatever it holds."""
    data, truth = three_groups
    ctx = types.SimpleNamespace(data=data, maps=None, rng=np.random.default_rng(5))
    kept = [np.nonzero(truth == g)[0] for g in (0, 1)]
    a, b = rebuild_starts(ctx, np.arange(len(truth)), kept, np.nonzero(truth == 2)[0], k=3)
    assert _agreement(a, truth) == 1.0  # no cut needed (maps=None)
    assert _agreement(b[truth < 2], truth[truth < 2]) == 1.0
    shares = np.bincount(b[truth == 2], minlength=3) / np.sum(truth == 2)
    assert shares.max() < 0.45, shares  # dealt at random over the 3 groups


def test_rebuild_gives_up_when_no_group_can_be_built(three_groups):
    data, truth = three_groups
    ctx = types.SimpleNamespace(data=data, maps=None, rng=np.random.default_rng(6))
    small = [np.arange(30), np.arange(30, 60)]  # too small to cut, no pool
    assert rebuild_starts(ctx, np.arange(60), small, np.zeros(0, int), k=3) is None


def test_k_given_cuts_missing_groups_from_the_pool_and_search_mode_deals_it(three_groups):
    """With K given, a box that restarts from stable groups with two or more groups missing
    gets them from a cut of the pool (dealt at random, two missing states became two view
    chimeras that independent runs reproduced); search mode deals the pool as before."""
    data, truth = three_groups
    kept = [np.nonzero(truth == 0)[0]]
    pool = np.nonzero(truth > 0)[0]
    sub = np.arange(len(truth))
    given = _cut_ctx(data, 3)
    given.search, given.frozen = False, True
    starts = _starts_from_groups(given, sub, kept, pool, k=3, swap_ratio=0.1)
    for lab in starts:
        assert np.all(lab[kept[0]] == 0)  # the stable group is kept whole, nothing swapped
    agree = [_agreement(lab, truth) for lab in starts]
    assert min(agree) >= 0.75 and np.mean(agree) >= 0.85, agree
    dealt = _starts_from_groups(_cut_ctx(data, 3), sub, kept, pool, k=3, swap_ratio=0.1)
    assert max(_agreement(lab[pool], truth[pool]) for lab in dealt) < 0.7


def test_coarse_maps_on_a_smaller_grid_score_as_on_the_full_grid(three_groups):
    """at_limit(r): maps limited to shell r are reconstructed and compared on the smallest grid
    with the same Fourier spacing; the scores must be those of the full grid at that limit."""
    data, truth = three_groups
    n = len(truth)
    full = ClusterMaps(data, Comm())
    rmax = data.nx // 4 - 1
    coarse = full.at_limit(rmax)
    assert coarse.grid < data.nx and full.at_limit(data.nx // 2 - 1) is full
    memb = np.eye(3)[truth] * (data.half == 0)[:, None]
    subset = np.arange(n)
    out = []
    for b in (full, coarse):
        d, w = b.accumulate(subset, memb, rmax=rmax)
        assert d.shape[1] == 2 * b.grid
        fv = b.fourier_maps(d, w, n / 3 / 2)
        out.append(b.scores(fv, subset, half=1, rmax=rmax))
    rel = [s - s.mean(axis=1, keepdims=True) for s in out]
    assert np.corrcoef(rel[0].ravel(), rel[1].ravel())[0, 1] > 0.995
    assert np.mean(out[0].argmax(1) == out[1].argmax(1)) >= 0.98
    assert np.mean(out[1].argmax(1) == truth[data.half == 1]) >= 0.95


def test_sure_groups_are_only_those_that_reproduce():
    """within_box_accept keeps everything when nothing passes (the original's fallback); the
    search-mode decisions built on "kept" groups must not: two unrelated partitions have no sure
    group, two that agree on three groups and scatter the rest have exactly those three."""
    rng = np.random.default_rng(0)
    n = 2100
    res = two_way_comparison(rng.integers(0, 7, n), rng.integers(0, 7, n))
    assert within_box_accept(res, False, 50, 1).all()
    assert not sure_groups(res, 50).any()
    a = np.repeat(np.arange(6), n // 6)
    b = a.copy()
    rest = a >= 3  # groups 3-5: cut differently
    b[rest] = 3 + rng.integers(0, 3, rest.sum())
    res = two_way_comparison(a, b)
    sure = sure_groups(res, 50)
    assert sorted(len(p.members) for p, ok in zip(res.pairs, sure) if ok) == [n // 6] * 3


def test_fragments_are_small_next_to_the_median_kept_group():
    assert list(fragments([572, 551, 273])) == [False, False, True]
    assert list(fragments([3419, 3381, 3310, 1763])) == [False, False, False, True]
    assert not fragments([3400, 3300, 3200, 3100, 3000]).any()


def test_pose_neighbours_score_a_turned_pose_as_the_true_one(three_groups):
    """Every pose turned by one of the six neighbour turns (pose_sigma_deg 4): scored with the
    neighbourhood, the images prefer their own state's map as often as at their true pose, and
    their scores are closer to the true pose's than at the turned pose alone, where fewer
    images prefer their own state's map."""
    data, truth = three_groups
    subset = np.arange(len(truth))
    turns = pose_neighbours(4.0)
    assert pose_neighbours(0.0) is None
    np.testing.assert_allclose(
        turns @ turns.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (6, 3, 3)), atol=1e-12
    )
    maps = ClusterMaps(data, Comm()).build(subset, np.eye(3)[truth], len(truth) / 3, half=0)
    which = np.arange(data.rots.shape[0]) % 6
    turned = dataclasses.replace(data, rots=data.rots @ turns[which].transpose(0, 2, 1))
    true = ClusterMaps(data, Comm()).scores(maps, subset, half=1)
    alone = ClusterMaps(turned, Comm()).scores(maps, subset, half=1)
    marginal = ClusterMaps(turned, Comm(), pose_turns=turns).scores(maps, subset, half=1)
    assert np.median(np.abs(marginal - true)) < 0.5 * np.median(np.abs(alone - true))
    assert np.mean(alone) < np.mean(true) - 0.02 * np.abs(true).mean()
    own = truth[data.half == 1]
    right = [np.mean(s.argmax(1) == own) for s in (true, alone, marginal)]
    assert right[2] == pytest.approx(right[0], abs=0.01) and right[1] < right[0]


def test_pose_marginal_is_the_likelihood_of_the_neighbourhood():
    """Scores alike at every pose: the same score. One pose far better: its log-likelihood
    u^2 / 2 plus the log of its prior weight (the given pose 1, a neighbour NEIGHBOUR_PRIOR,
    normalised). The result grows with every pose's score."""
    var = np.full((2, 3), 4.0)
    same = np.full((7, 2, 3), 10.0)
    np.testing.assert_allclose(pose_marginal(same, var), same[0])
    lone = np.zeros((7, 2, 3))
    lone[3] = 40.0  # u = 20 at one neighbour
    total = 1.0 + 6.0 * NEIGHBOUR_PRIOR
    u = pose_marginal(lone, var) / 2.0
    np.testing.assert_allclose(u**2 / 2.0, 200.0 + np.log(NEIGHBOUR_PRIOR / total), rtol=1e-9)
    near = np.zeros((7, 2, 3))
    near[3] = 6.0
    for j in range(7):
        higher = near.copy()
        higher[j] += 1.0
        assert np.all(pose_marginal(higher, var) > pose_marginal(near, var))


def test_pose_prior_is_centred_on_the_given_rotation(three_groups):
    """A pose refined by +sigma about x from its given rotation: of its neighbours, the one
    turned back is the given rotation (log prior 0), the pose itself is one sigma away (-1/2),
    the one turned on two sigma (-2); a log prior that puts all weight on one pose gives that
    pose's score."""
    data, _ = three_groups
    sigma = 3.0
    turns = pose_neighbours(sigma)
    given = data.rots @ axis_turn(-sigma, 0)
    maps = ClusterMaps(data, Comm(), pose_turns=turns, given_rots=given)
    loc = np.arange(5)
    base = data.rots[loc]
    prior = [maps._pose_log_prior(base @ t, base, loc) for t in (np.eye(3), *turns)]
    np.testing.assert_allclose(prior[0], -0.5, atol=1e-9)
    np.testing.assert_allclose(prior[1], -2.0, atol=1e-9)  # +sigma about x
    np.testing.assert_allclose(prior[2], 0.0, atol=1e-6)  # -sigma about x: the given pose
    scores = np.random.default_rng(0).normal(10.0, 2.0, (7, 5, 3))
    only = np.full((7, 5), -1e3)
    only[2] = 0.0
    np.testing.assert_allclose(pose_marginal(scores, np.ones((5, 3)), only), scores[2])


@pytest.mark.parametrize("graded", [False, True])
def test_score_noise_variance_is_that_of_pure_noise_images(three_groups, graded):
    """Images of white noise (masked like every comparison image) scored against real maps:
    the variance of the scores over the images is the variance each score's own noise
    estimate predicts (with binary and with graded shell factors)."""
    from sort3ddepth.engine.preprocess import comparison_circle

    data, truth = three_groups
    n, nx = len(truth), data.nx
    rng = np.random.default_rng(3)
    circle = comparison_circle(nx, data.radius * nx / data.box)
    vols = ClusterMaps(data, Comm()).build(np.arange(n), np.eye(3)[truth], n / 3)
    shells = np.arange(data.shell_weights.shape[1])
    factors = np.where(shells <= nx // 4, 1.0, 0.0)
    if graded:
        factors = factors * np.linspace(1.0, 0.2, factors.size)
    z2 = []
    for _ in range(8):  # 7,200 noise images: the mean of z^2 known to ~2 %
        noise = fourier.images_to_fourier(rng.standard_normal((n, nx, nx)) * circle)
        flat = dataclasses.replace(
            data, comp_f=noise, shell_weights=np.ones_like(data.shell_weights)
        )
        s, var = ClusterMaps(flat, Comm()).scores(
            vols, np.arange(n), shell_factors=factors, noise=True
        )
        z2.append(s**2 / var)
    ratio = np.concatenate(z2).mean(axis=0)  # measured / predicted variance
    assert np.all(np.abs(ratio - 1.0) < 0.06), ratio


def test_preferences_are_centred_on_the_groups_mean_not_the_images():
    """900 images that score d higher against map 0 and 300 that score d higher against map 1,
    plus a per-view offset of map 1 (a map better determined for some views): centred with
    the groups' labels, each group keeps its preference (boundary halfway) and the view offset
    is gone; centred over the images, the large group's preference halves and the small one's
    grows by half (the boundary moves into the large group)."""
    rng = np.random.default_rng(3)
    d, n0, n1 = 1.0, 900, 300
    labels = np.repeat([0, 1], [n0, n1])
    views = rng.integers(0, 2, n0 + n1)
    scores = np.where(labels[:, None] == np.arange(2)[None], d, 0.0)
    scores[:, 1] += 0.7 * views  # map 1 scores higher for every image of view 1
    scores += rng.normal(0.0, 0.2, scores.shape)

    def own_minus_other(s):
        diff = s[:, 0] - s[:, 1]
        return diff[labels == 0].mean(), -diff[labels == 1].mean()

    big, small = own_minus_other(centre_per_orientation(scores, views, labels))
    assert abs(big - d) < 0.05 and abs(small - d) < 0.05, (big, small)
    big, small = own_minus_other(centre_per_orientation(scores, views))
    assert abs(big - d / 2) < 0.05 and abs(small - 1.5 * d) < 0.05, (big, small)
