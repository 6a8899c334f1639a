"""The posterior model of membership (engine/membership.py) on score vectors whose truth is
known: calibration of the posterior and of the estimated purity, the selection at a purity
target, and the rule that keeps an unsure but reproduced group."""

import numpy as np
import pytest

from sort3ddepth.engine.membership import (
    UNSURE_FLOOR,
    fit_posteriors,
    loglik_posteriors,
    purity_curve,
    select_members,
)


def _mixture(n_per, means, noise, seed, shared=0.6):
    """Score vectors: each image's scores share an image-level term (as scores of one image
    against several maps do), plus its class's mean and independent noise."""
    rng = np.random.default_rng(seed)
    means = np.asarray(means, float)
    truth = np.repeat(np.arange(len(means)), n_per)
    common = rng.normal(0, shared, (len(truth), 1))
    scores = means[truth] + common + rng.normal(0, noise, (len(truth), means.shape[1]))
    return scores, truth


def _noisy_labels(truth, k, wrong, seed, pool=0.0):
    rng = np.random.default_rng(seed)
    lab = truth.copy()
    flip = rng.random(len(lab)) < wrong
    lab[flip] = (lab[flip] + rng.integers(1, k, flip.sum())) % k
    lab[rng.random(len(lab)) < pool] = k
    return lab


@pytest.mark.parametrize("sep", [1.0, 1.6, 3.0])
def test_posterior_is_calibrated(sep):
    """Images binned by their largest posterior: the share right in each bin matches the mean
    posterior there, from labels with 10 % wrong and 20 % in the pool."""
    k = 4
    scores, truth = _mixture(3000, sep * np.eye(k), 1.0, seed=int(sep * 10))
    post = fit_posteriors(scores, _noisy_labels(truth, k, 0.1, 1, pool=0.2))
    p, best = post.max(axis=1), post.argmax(axis=1)
    for lo, hi in [(0.5, 0.8), (0.8, 0.95), (0.95, 1.01)]:
        rows = (p >= lo) & (p < hi)
        if rows.sum() >= 400:
            assert abs(np.mean(best[rows] == truth[rows]) - p[rows].mean()) < 0.03, (lo, hi)


@pytest.mark.parametrize("target", [0.9, 0.97, 0.99])
def test_estimated_purity_matches_the_truth_at_the_target(target):
    k = 3
    scores, truth = _mixture(3000, 2.2 * np.eye(k), 1.0, seed=4)
    post = fit_posteriors(scores, _noisy_labels(truth, k, 0.15, 2, pool=0.1))
    memb = select_members(post, target, min_size=20)
    for j in range(k):
        rows = memb.labels == j
        measured = np.mean(truth[rows] == j)
        assert memb.estimated_purity[j] >= target
        assert abs(memb.estimated_purity[j] - measured) <= 0.02, (j, measured)
    acc = np.mean(memb.labels < k)
    assert 0.2 < acc < 1.0  # a real trade-off: neither all nor nothing


def test_close_groups_are_kept_not_dropped():
    """Two states that differ little: single images are only 70-90 % sure, yet the group is
    reproduced, so it keeps its former members that it more likely holds than not."""
    scores, truth = _mixture(1000, 0.5 * np.eye(2), 1.0, seed=7)
    lab = _noisy_labels(truth, 2, 0.2, 3)
    post = fit_posteriors(scores, lab)
    memb = select_members(post, 0.999, min_size=20, own=lab)
    for j in range(2):
        assert memb.below_target[j]
        kept = memb.labels == j
        assert kept.sum() >= 300
        assert np.all(post[kept, j] >= UNSURE_FLOOR) and np.all(lab[kept] == j)
        assert memb.estimated_purity[j] < 0.999


def test_unlabelled_images_need_the_target_to_join():
    """The unsure-group rule keeps former members only: images from the pool never join
    below the target."""
    scores, truth = _mixture(800, 0.5 * np.eye(2), 1.0, seed=9)
    lab = _noisy_labels(truth, 2, 0.2, 4, pool=0.3)
    memb = select_members(fit_posteriors(scores, lab), 0.999, min_size=20, own=lab)
    assert not np.any((lab == 2) & (memb.labels < 2))


def test_one_cluster():
    scores = np.random.default_rng(0).normal(size=(50, 1))
    assert np.all(fit_posteriors(scores, np.zeros(50, np.int64)) == 1.0)


def test_fit_rows():
    """Fitted on the labelled rows only, the unlabelled ones still get a posterior."""
    s, truth = _mixture(300, 3 * np.eye(2), 1.0, seed=1)
    lab = np.where(np.arange(600) % 3 == 0, 2, truth)
    post = fit_posteriors(s, lab, fit_rows=lab < 2)
    assert np.mean(post.argmax(1)[lab == 2] == truth[lab == 2]) > 0.9


def test_purity_curve_is_monotone():
    s, truth = _mixture(500, 1.5 * np.eye(3), 1.0, seed=2)
    t, acc, pur = purity_curve(fit_posteriors(s, truth))
    assert acc[0] == 1.0 and np.all(np.diff(acc) <= 0)
    ok = np.isfinite(pur)
    assert np.all(np.diff(pur[ok]) >= -1e-12) and pur[0] < pur[ok][-1]


def _loglik_set(shares, n, seed, spread=0.0):
    """Log-likelihoods of images whose information varies tenfold (each image's signal
    amplitude a_i): image = a_i mu_c + unit noise in 6 dims, loglik_k = -|image - a_i mu_k|^2/2;
    with `spread`, each is seen with an error of sd spread * a_i (as noisy maps do)."""
    rng = np.random.default_rng(seed)
    k = len(shares)
    mu = 0.6 * np.eye(k, 6)
    truth = rng.choice(k, n, p=shares)
    amp = rng.uniform(0.3, 3.0, n)
    x = amp[:, None] * mu[truth] + rng.standard_normal((n, 6))
    ll = -0.5 * np.sum((x[:, None, :] - amp[:, None, None] * mu[None]) ** 2, axis=2)
    ll += spread * amp[:, None] * rng.standard_normal((n, k))
    return ll, spread * amp[:, None] * np.ones((1, k)), truth


def _calibration_gap(post, truth):
    """Largest |share right - mean posterior| over bins of the largest posterior."""
    p, best = post.max(axis=1), post.argmax(axis=1)
    gaps = []
    for lo, hi in [(0.4, 0.7), (0.7, 0.9), (0.9, 0.97), (0.97, 1.01)]:
        rows = (p >= lo) & (p < hi)
        if rows.sum() >= 300:
            gaps.append(abs(np.mean(best[rows] == truth[rows]) - p[rows].mean()))
    return max(gaps)


def test_likelihood_posterior_is_calibrated_when_information_varies():
    """Images from sure to hopeless, clusters of shares 60/30/10 started from wrong labels:
    the posterior is calibrated and the shares come out right."""
    ll, spread, truth = _loglik_set([0.6, 0.3, 0.1], 12000, seed=1)
    start = _noisy_labels(truth, 3, 0.3, 5)
    post = loglik_posteriors(ll, spread, start)
    assert _calibration_gap(post, truth) < 0.03
    assert np.allclose(post.mean(axis=0), [0.6, 0.3, 0.1], atol=0.02)
    assert np.allclose(loglik_posteriors(ll[:, :1], spread[:, :1], start), 1.0)


def test_map_noise_makes_the_posterior_less_sure_and_nearer_calibrated():
    """Log-likelihoods seen through noisy maps (an error of sd 0.3 a_i, on the scale of the
    matrix cells' measured map noise): ignoring the noise is too sure; averaging over it is
    nearer calibrated (not exactly: for errors as large as the signal it stays too sure)."""
    ll, spread, truth = _loglik_set([0.5, 0.5], 12000, seed=2, spread=0.3)
    start = _noisy_labels(truth, 2, 0.2, 6)
    naive = loglik_posteriors(ll, np.zeros_like(spread), start)
    post = loglik_posteriors(ll, spread, start)
    assert np.mean(post.max(axis=1)) < np.mean(naive.max(axis=1))
    assert _calibration_gap(naive, truth) > 0.04
    assert _calibration_gap(post, truth) < 0.75 * _calibration_gap(naive, truth)
    assert _calibration_gap(post, truth) < 0.035
