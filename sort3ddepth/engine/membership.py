"""Which particles belong to which cluster: a calibrated posterior over the clusters' maps.

Which groups exist is decided by reproducibility (depth.py); this module decides their members.
* Scores: every image against maps built from the members of each cluster in the OTHER
  cross-validation folds (an image never scores against a map it helped build), kept only
  where the clusters' half maps differ reproducibly (reconstruction.difference_mask), shells
  weighted by how reliably the halves agree on the clusters' differences
  (reconstruction.difference_weights).
* Model: a likelihood per image and cluster (cluster_loglik): the image is its cluster's map
  projected with its CTF at its pose, times a free amplitude, plus noise whose power is measured
  on the image itself (mgskmeans.ClusterMaps.scores with noise), over the shells where the
  clusters differ reliably; the maps' own noise (measured between the maps of 3/4 and 1/2 of
  the data) widens it, and lowers the scores against a map the more the fewer images built it
  (corrected by the measured gain from 1/2 to 3/4 of the data). The posterior of cluster k is
  the likelihood times the cluster's share (fitted by EM), averaged over draws of the maps'
  noise. The maps are then rebuilt once from the posteriors and the posterior computed again
  (MEMBER_EM_ROUNDS): more rebuilds drift towards blends. It compares only the clusters there
  are: images of a state that no cluster stands for would join the nearest ones at a high
  posterior, so images in no cluster join only when they are too few to be a group.
  (pair.py still refines MGSK-means runs with a Gaussian mixture over the score vectors,
  fit_posteriors: a density model fitted to the scores, for labels that may be far off.)
* Selection: a cluster takes the images whose most probable cluster it is, in decreasing
  posterior, while the mean posterior of those taken (its estimated purity) stays at or above
  the purity target. A cluster whose images are all unsure keeps those it more likely holds than
  not (posterior >= 1/2): a group that independent runs reproduced is never dropped whole
  because single images cannot tell it from a close neighbour.
"""

from dataclasses import dataclass

import numpy as np

from .mixture import MIN_WEIGHT, fit_mixture
from .reconstruction import difference_mask, difference_weights

DEFAULT_MIN_PURITY = 0.98  # --min_purity: members enter a cluster while its estimated purity
# stays at or above this
CV_FOLDS = 4  # cross-validation folds of the membership maps, two per random half
# (a map from 3/4 of the data instead of a half: less noise)
EM_MAX_ITER = 200  # EM iterations at most (converges in tens on benchmark sets)
EM_TOL = 1e-7  # ... stop when no responsibility moves more than this
UNSURE_FLOOR = 0.5  # a cluster below the purity target even for its surest images keeps
# those it more likely holds than not
BAND_FSC = 0.143  # the likelihood counts the shells where the clusters' half maps' difference
# FSC reaches this (the usual threshold of a reliable shell)
MAP_NOISE_SAMPLE = 1000  # images per fold scored against the other half's maps, to measure
# the maps' noise (enough for its sd to ~3 %)
MAP_NOISE_DRAWS = 32  # draws of the maps' noise the posterior is averaged over
MAP_NOISE_SEED = 20261203  # their fixed stream: every rank and every rank count draws the same
MAP_GAIN_STEPS = 1.0  # each cluster's scores times (1 + this x (g - 1)), g its scores' gain
# from the 1/2 maps to the 3/4 maps (_map_gain); 0, 1 and 2 steps measured on the benchmark's
# true groups: 2 remove the deflation under the 1 / data law and overshoot (bench/README.md,
# "the map gain")
SHARE_EM_ITER = 100  # EM iterations of the clusters' shares at most ...
SHARE_EM_TOL = 1e-6  # ... stop when no share moves more than this
MEMBER_EM_ROUNDS = 2  # maps from the members, then once from the posteriors: from the TRUE
# groups of every matrix cell one rebuild puts more images in their state's cluster and a second
# fewer again, the unsure images' posteriors feeding other states into each map (bench/README.md,
# "One rebuild of the member maps")
MAP_WEIGHT_FLOOR = 1e-3  # posteriors below this do not enter the rebuilt maps, and a weight
# that moves by less keeps its value (a map of N images moves by < N * 1e-3 image-equivalents;
# only the (image, map) pairs that moved are inserted again)


@dataclass
class Membership:
    """posterior (n, m) over the m clusters for the n scored images; labels (n,) the decision
    (cluster index, m = unaccounted); estimated_purity (m,) the mean posterior of each cluster's
    members (nan for an empty cluster); below_target (m,) the clusters whose surest images do
    not reach the purity target with min_size of them: they keep images under the UNSURE_FLOOR
    rule, fewer than min_size when even those are too few (then a caller drops them)."""

    posterior: np.ndarray
    labels: np.ndarray
    estimated_purity: np.ndarray
    below_target: np.ndarray


def folds(data, everyone):
    """Cross-validation fold (0..3) of each image: two folds per random half, split by a fixed
    bit of its index (so folds never mix the halves and never depend on the ranks)."""
    idx = np.asarray(everyone, np.int64)
    bit = ((idx * 2654435761) >> 11) & 1
    return 2 * np.asarray(data.half[idx], np.int64) + bit


def _fold_sums(maps, everyone, weights, fold, *, cache):
    """Fourier sums (data, weights) of each fold's maps. cache: a dict kept by the caller
    between calls on the same images and maps builder; then only the images whose weights
    changed are inserted, as differences (the sums are linear in the weights), and the cache
    is updated (its sums in place: earlier results built on them are not to be used again).
    Every rank holds the same weights, so every rank makes the same calls."""
    prev = None if cache is None else cache.get("weights")
    if prev is None or prev.shape != weights.shape:
        sums = [maps.accumulate(everyone, weights * (fold == f)[:, None]) for f in range(CV_FOLDS)]
    else:
        sums = []
        for f, old in enumerate(cache["sums"]):
            delta = (weights - prev) * (fold == f)[:, None]
            if not np.any(delta):
                sums.append(old)
                continue
            dd, dw = maps.accumulate(everyone, delta)
            old[0].__iadd__(dd)  # in place: a second copy of every fold's sums raised the peak
            old[1].__iadd__(dw)
            sums.append(old)
    if cache is not None:
        cache.update(weights=np.array(weights, copy=True), sums=sums)
    return sums


@dataclass
class _FoldMaps:
    """The cross-validated maps of one set of weights: per fold, the Fourier sums of its
    images (sums), their total, the clusters' mean size, and the focus (where the clusters'
    half maps differ reproducibly); maps are made on demand, focused around their mean."""

    maps: object  # mgskmeans.ClusterMaps
    sums: list
    total: list
    size: float
    focus: np.ndarray

    def _focused(self, data, weights, size):
        vols = self.maps.maps_from(data, weights, size)
        mean = vols.mean(axis=0)
        return mean[None] + self.focus[None] * (vols - mean[None])

    def without(self, f):
        """Maps from every fold but f (3/4 of the data): the maps fold f's images score against."""
        return self._focused(
            self.total[0] - self.sums[f][0],
            self.total[1] - self.sums[f][1],
            self.size * (CV_FOLDS - 1) / CV_FOLDS,
        )

    def other_half(self, f):
        """Maps from the random half fold f is not in (1/2 of the data, inside without(f))."""
        other = [g for g in range(CV_FOLDS) if g // (CV_FOLDS // 2) != f // (CV_FOLDS // 2)]
        return self._focused(
            *[sum(self.sums[g][i] for g in other) for i in (0, 1)],
            self.size * len(other) / CV_FOLDS,
        )


def _fold_maps(maps, everyone, weights, *, fold, cache=None):
    """The _FoldMaps of `weights` (n, m) over `everyone`, and the shell weights of the clusters'
    differences (reconstruction.difference_weights of the two random halves' maps)."""
    m = weights.shape[1]
    size = max(float(weights.sum()) / m, 1.0)
    sums = _fold_sums(maps, everyone, weights, fold, cache=cache)
    total = [sum(s[i] for s in sums) for i in (0, 1)]
    per_half = CV_FOLDS // 2
    halves = [
        maps.maps_from(
            *[sum(s[i] for s in sums[h * per_half : (h + 1) * per_half]) for i in (0, 1)],
            size / 2,
        )
        for h in (0, 1)
    ]
    shells = difference_weights(halves[0], halves[1], maps.mask)
    focus = difference_mask(halves[0], halves[1], maps.mask > 0.5)
    return _FoldMaps(maps, sums, total, size, focus), shells


def cluster_scores(maps, data, everyone, weights, *, cache=None):
    """Cross-validated scores (n, m) of every image of `everyone` (sorted global indices)
    against m clusters, and the shell weights. weights (n, m): each image's share in each
    cluster's maps (one-hot labels, or posteriors). An image is scored against maps built from
    the images of the other folds (3/4 of the data), restricted to where the clusters'
    half maps differ reproducibly (reconstruction.difference_mask) around their mean, shells
    weighted by difference_weights. maps: mgskmeans.ClusterMaps; data: its SortingData.
    cache: see _fold_sums (repeated calls as the weights change little: refinement sweeps)."""
    fold = folds(data, everyone)
    fm, shells = _fold_maps(maps, everyone, weights, fold=fold, cache=cache)
    scores = np.zeros((len(everyone), weights.shape[1]))
    for f in range(CV_FOLDS):
        rows = np.nonzero(fold == f)[0]
        if rows.size:
            scores[rows] = maps.scores(fm.without(f), everyone[rows], shell_factors=shells)
    return scores, shells


def cluster_loglik(maps, data, everyone, weights, *, cache=None):
    """Log-likelihood (n, m) of every image of `everyone` under each of m clusters, its spread
    (n, m) from the noise of the maps, and the shell weights (difference FSC^2).

    An image X = a CTF P_k + noise, the amplitude a free (>= 0): its log-likelihood under map k,
    up to a term shared by all maps, is u^2 / 2 with u = score / (its noise sd) (the score
    against the cross-validated map of cluster k, mgskmeans.ClusterMaps.scores with noise).
    Only the shells where the clusters' half maps differ reliably (difference FSC >= BAND_FSC)
    count, at full weight: graded weights are not a likelihood (too sure even against the
    true maps, bench/README.md). The maps are noisy too: an error du in u moves the
    log-likelihood by u du; the sd of du is measured between the maps an image scores against
    (3/4 of the data) and those of the other half (1/2), on a sample of each fold, centred per
    image (a shift common to all maps moves no posterior), per cluster by _map_noise. Scores
    against a map run low by its noise, the more so the fewer images built it: each cluster's
    are raised by their measured gain from 1/2 to 3/4 of the data (_map_gain). No
    reliable shell: all zeros. cache: see _fold_sums (the rounds of decide)."""
    n, m = weights.shape
    fold = folds(data, everyone)
    fm, shells = _fold_maps(maps, everyone, weights, fold=fold, cache=cache)
    band = (shells >= BAND_FSC**2).astype(float)
    u = np.zeros((n, m))
    if m < 2 or not band.any():
        return u, u.copy(), shells
    deltas, sums = [], np.zeros((2, m))
    for f in range(CV_FOLDS):
        rows = np.nonzero(fold == f)[0]
        if not rows.size:
            continue
        s, u[rows] = _fold_u(maps, fm.without(f), everyone[rows], band)
        step = -(-rows.size // MAP_NOISE_SAMPLE)
        sample = rows[::step]
        s2, var2 = maps.scores(fm.other_half(f), everyone[sample], shell_factors=band, noise=True)
        delta = u[sample] - s2 / np.sqrt(np.maximum(var2, 1e-300))
        deltas.append(delta - delta.mean(axis=1, keepdims=True))
        sums[0] += s[::step].sum(axis=0)
        sums[1] += s2.sum(axis=0)
    u = np.maximum(u * _map_gain(*sums)[None, :], 0.0)
    return 0.5 * u**2, u * _map_noise(np.concatenate(deltas), weights.sum(axis=0))[None, :], shells


def _fold_u(maps, fold_maps, images, band):
    """Scores of `images` against `fold_maps` over the shells `band`, and the same in units
    of their noise sd (u)."""
    s, var = maps.scores(fold_maps, images, shell_factors=band, noise=True)
    return s, s / np.sqrt(np.maximum(var, 1e-300))


def split_gain(maps, data, everyone, labels, *, k):
    """(mean, standard error) over the images of `everyone` of the log-likelihood gain (nats)
    of the K groups of `labels` (a mixture, shares from the labels) over ONE map of all of
    them, every image scored against maps built without its fold (the likelihood of
    cluster_loglik, without the maps' noise and gain: a held-out comparison of two models).
    Groups that differ only by noise make noisier maps than their union and lose, groups
    along the views lose too (the union's map fits every view as well as the map of the views
    that built it), groups of two states gain (bench/README.md, "A held-out judge of a
    split")."""
    n = len(everyone)
    weights = np.column_stack([np.eye(k)[labels], np.ones(n)])
    fold = folds(data, everyone)
    fm, shells = _fold_maps(maps, everyone, weights, fold=fold)
    band = (shells >= BAND_FSC**2).astype(float)
    if not band.any():
        return 0.0, 0.0
    u = np.zeros((n, k + 1))
    for f in range(CV_FOLDS):
        rows = np.nonzero(fold == f)[0]
        if rows.size:
            u[rows] = _fold_u(maps, fm.without(f), everyone[rows], band)[1]
    loglik = 0.5 * np.maximum(u, 0.0) ** 2
    share = np.bincount(labels, minlength=k)[:k] / max(n, 1)
    held = share > 0
    mix = loglik[:, :k][:, held] + np.log(share[held])[None, :]
    top = mix.max(axis=1)
    gain = top + np.log(np.exp(mix - top[:, None]).sum(axis=1)) - loglik[:, k]
    return float(gain.mean()), float(gain.std() / np.sqrt(max(n, 1)))


def _map_gain(sum_3_4, sum_1_2):
    """Factor (m,) on each cluster's scores: 1 + MAP_GAIN_STEPS (g - 1), g the ratio of the
    sampled images' scores against its 3/4 maps to those against its 1/2 maps. A map's noise
    adds power that no image matches, so every score against it runs low, more so the fewer
    images built it (a 300-image cluster's by ~0.3 %, a 900-image one's by ~0.1 %, measured
    with the 1 / data law on fold subsets); next to the few-tenths-of-a-percent differences
    between clusters' scores, that alone moved images from small clusters to large ones and
    made the shares' EM grow the large ones (bench/README.md). No gain where a sum is not
    positive."""
    ok = (sum_3_4 > 0) & (sum_1_2 > 0)
    g = np.where(ok, sum_3_4 / np.where(ok, sum_1_2, 1.0), 1.0)
    return 1.0 + MAP_GAIN_STEPS * (g - 1.0)


def _map_noise(deltas, sizes):
    """sd (m,) of the error of each cluster's 3/4 map in units of u, from the differences
    `deltas` (rows centred) between the scores against the 3/4 and the 1/2 maps. A map's
    error variance is taken as c / size (c one constant for all; a small cluster's map is
    the noisier); centring over m maps leaves (1 - 1/m) of the summed variances. The 3/4 map's
    error has twice the variance of its difference from the 1/2 map, which holds 2 of its 3
    folds."""
    m = len(sizes)
    inv = 1.0 / np.maximum(np.asarray(sizes, float), 1.0)
    c = np.sum(np.mean(deltas**2, axis=0)) / ((1.0 - 1.0 / m) * np.sum(inv))
    return np.sqrt(2.0 * c * inv)


def _averaged_posterior(loglik, spread, log_share):
    """Posterior (n, m) averaged over MAP_NOISE_DRAWS draws of the maps' noise (pairs of
    mirrored draws, a fixed stream that depends on nothing but the draw: the same on every
    rank and for any number of ranks)."""
    n, m = loglik.shape
    out = np.zeros((n, m))
    for d in range(MAP_NOISE_DRAWS // 2):
        eps = spread * np.random.default_rng([MAP_NOISE_SEED, d]).standard_normal((n, m))
        for sign in (1.0, -1.0):
            out += _normalise(loglik + sign * eps + log_share[None, :])
    return out / (2 * (MAP_NOISE_DRAWS // 2))


def loglik_posteriors(loglik, spread, labels, fit_rows=None):
    """Posterior (n, m) from the log-likelihoods and their spread (cluster_loglik), with the
    clusters' shares fitted by EM on the rows `fit_rows` (bool mask; default all), started from
    `labels` (cluster index, m: none). One cluster: posterior 1."""
    n, m = loglik.shape
    if m < 2:
        return np.ones((n, m))
    fit = np.ones(n, bool) if fit_rows is None else np.asarray(fit_rows, bool)
    start = labels[fit & (labels < m)]
    share = np.bincount(start, minlength=m).astype(float) + 1.0
    share /= share.sum()
    for _ in range(SHARE_EM_ITER):
        post = _averaged_posterior(loglik, spread, np.log(share))
        new = np.maximum(post[fit].mean(axis=0) if fit.any() else share, MIN_WEIGHT)
        new /= new.sum()
        moved = float(np.max(np.abs(new - share)))
        share = new
        if moved < SHARE_EM_TOL:
            break
    return _averaged_posterior(loglik, spread, np.log(share))


def _normalise(logp):
    logp = logp - logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def fit_posteriors(scores, labels, fit_rows=None, *, tol=EM_TOL):
    """Posterior (n, m) of each image over the m clusters from its score vector: the Gaussian
    mixture with a shared covariance (mixture.py), started from `labels` (cluster index, m:
    none) and fitted by EM on the rows `fit_rows` (bool mask; default all), until no
    responsibility moves more than `tol`. One cluster: posterior 1."""
    n, m = scores.shape
    if m < 2:
        return np.ones((n, m))
    fit = np.ones(n, bool) if fit_rows is None else np.asarray(fit_rows, bool)
    member = labels < m
    resp = np.zeros((n, m))
    resp[np.nonzero(member)[0], labels[member]] = 1.0
    fit_mixture(np.ascontiguousarray(scores, np.float64), resp, member, fit, tol, EM_MAX_ITER)
    return resp


def select_members(posterior, min_purity, candidates=None, *, min_size=1, own=None):
    """The decision: each image goes to its most probable cluster if it is among that cluster's
    surest images whose mean posterior stays >= min_purity, else to none (label m).
    candidates: bool mask of the images that may be members (default all). own: each image's
    cluster before (m: none; default none). A cluster whose target prefix holds fewer than
    min_size images keeps instead its own former members that it more likely holds than not
    (posterior >= UNSURE_FLOOR), flagged in below_target, however few they are: a cluster that
    keeps too few to stay is flagged too (found_again looks for such a cluster's twin).
    Returns a Membership."""
    n, m = posterior.shape
    cand = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool)
    own = np.full(n, m, np.int64) if own is None else np.asarray(own, np.int64)
    best = np.argmax(posterior, axis=1) if m else np.zeros(n, np.int64)
    labels = np.full(n, m, np.int64)
    purity = np.full(m, np.nan)
    below = np.zeros(m, bool)
    for k in range(m):
        rows = np.nonzero(cand & (best == k))[0]
        p = posterior[rows, k]
        order = np.argsort(-p, kind="stable")
        running = np.cumsum(p[order]) / np.arange(1, len(order) + 1)
        chosen = rows[order[: int(np.sum(running >= min_purity))]]  # the mean falls: a prefix
        if len(chosen) < min_size:
            chosen = rows[(own[rows] == k) & (p >= UNSURE_FLOOR)]
            below[k] = True
        labels[chosen] = k
        if len(chosen):
            purity[k] = float(posterior[chosen, k].mean())
    return Membership(posterior, labels, purity, below)


def purity_curve(posterior, points=101):
    """The trade-off the user slides along: for thresholds t on the posterior, the fraction of
    images accounted (most probable cluster, posterior >= t) and the estimated purity of what is
    accounted. Returns (thresholds, accounted fraction, estimated purity) of length `points`."""
    n, m = posterior.shape
    t = np.linspace(0.0, 1.0, points)
    if n == 0 or m == 0:
        return t, np.zeros(points), np.full(points, np.nan)
    p = posterior.max(axis=1)
    acc = np.array([np.mean(p >= x) for x in t])
    pur = np.array([p[p >= x].mean() if np.any(p >= x) else np.nan for x in t])
    return t, acc, pur


def decide(maps, data, everyone, groups, *, open_rows, pool_joins, min_purity, min_size):
    """Members of `groups` (sorted global indices, all within the sorted `everyone`) by the
    posterior model. open_rows: bool mask over `everyone` of the images this decision may
    place (the others are scored and shape the model only). pool_joins: images in no group may
    join one and shape the model; when False they may hold a group no cluster stands for, so
    they neither join nor shape it. The maps start from the groups' members and are rebuilt
    from the posteriors MEMBER_EM_ROUNDS - 1 times (each image in each map with its posterior:
    misplaced members no longer blur the maps). Returns (labels before: group index or
    len(groups) for none, Membership, shell weights)."""
    m = len(groups)
    labels = np.full(len(everyone), m, np.int64)
    for j, c in enumerate(groups):
        labels[np.searchsorted(everyone, c)] = j
    fit = np.ones(len(everyone), bool) if pool_joins else labels < m
    weights = np.eye(m + 1)[labels][:, :m]
    cache = {}  # the fold sums, patched with the weights that moved (_fold_sums)
    for _ in range(MEMBER_EM_ROUNDS):
        loglik, spread, shells = cluster_loglik(maps, data, everyone, weights, cache=cache)
        post = loglik_posteriors(loglik, spread, labels, fit)
        # each inserted (image, map) pair costs one back-projection and most images are
        # near-certain: a posterior below MAP_WEIGHT_FLOOR stays out of the map, and a weight
        # that moved by less than MAP_WEIGHT_FLOOR keeps its value
        new = np.where(post >= MAP_WEIGHT_FLOOR, post, 0.0) * fit[:, None]
        weights = np.where(np.abs(new - weights) >= MAP_WEIGHT_FLOOR, new, weights)
    cand = np.asarray(open_rows, bool) & ((labels < m) | bool(pool_joins))
    return labels, select_members(post, min_purity, cand, min_size=min_size, own=labels), shells
