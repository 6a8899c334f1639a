"""A Gaussian mixture with one covariance shared by all components, fitted by EM: the density
model membership.fit_posteriors puts over the images' score vectors.

One serial numba kernel: search-mode refinement fits it tens of times per pair of runs, ~100 EM
iterations each over every image (bench/README.md, "Where bench_sort's time goes"), and numpy's
per-call overhead on (n, K) arrays made it about as costly as computing the scores it models. Serial on
purpose: every rank fits the same mixture, and the bits must not depend on the thread count.
"""

import numpy as np
from numba import njit

COVARIANCE_RIDGE = 1e-6  # relative ridge on every covariance: scores against near-equal
# maps are collinear and the covariance would not invert
MIN_WEIGHT = 1e-6  # a component's mixing weight never falls below this


@njit(cache=True)
def _row_sum(resp, n):
    v = 0.0
    for k in range(resp.shape[1]):
        v += resp[n, k]
    return v


@njit(cache=True)
def _m_step(scores, resp, rows):
    """Mixing weights (m,), means (m, d) and the shared covariance (d, d) from the
    responsibilities of `rows`. The covariance is the second moment of the scores about their
    (responsibility-weighted) centre less that of the means: one pass over the images, and
    nothing large cancels."""
    m, dim = resp.shape[1], scores.shape[1]
    nk = np.zeros(m)
    for n in rows:
        for k in range(m):
            nk[k] += resp[n, k]
    total = max(nk.sum(), 1e-300)
    centre = np.zeros(dim)
    for n in rows:
        w = _row_sum(resp, n) / total
        for a in range(dim):
            centre[a] += w * scores[n, a]
    means = np.zeros((m, dim))
    second = np.zeros((dim, dim))
    d = np.empty(dim)
    for n in rows:
        w = _row_sum(resp, n) / total
        for a in range(dim):
            d[a] = scores[n, a] - centre[a]
        for k in range(m):
            for a in range(dim):
                means[k, a] += resp[n, k] * d[a]
        for a in range(dim):
            for b in range(a, dim):
                second[a, b] += w * d[a] * d[b]
    for k in range(m):
        means[k] /= max(nk[k], 1e-300)
    cov = np.empty((dim, dim))
    for a in range(dim):
        for b in range(a, dim):
            v = second[a, b]
            for k in range(m):
                v -= nk[k] / total * means[k, a] * means[k, b]
            cov[a, b] = v
            cov[b, a] = v
    ridge = COVARIANCE_RIDGE * max(np.trace(cov) / dim, 1e-300)
    for a in range(dim):
        cov[a, a] += ridge
    weight = np.maximum(nk / total, MIN_WEIGHT)
    return weight / weight.sum(), means + centre, cov


@njit(cache=True)
def _cholesky_solve(cov, means):
    """Sigma^-1 mu_k for every row k of means (m, d), Sigma symmetric positive definite (the
    ridge sees to it): Cholesky in plain loops, which numba compiles in a fraction of the time
    its LAPACK binding takes (the first run of a fresh install pays that compilation)."""
    dim = cov.shape[0]
    low = np.zeros((dim, dim))
    for a in range(dim):
        for b in range(a + 1):
            v = cov[a, b]
            for c in range(b):
                v -= low[a, c] * low[b, c]
            low[a, b] = np.sqrt(max(v, 1e-300)) if a == b else v / low[b, b]
    out = np.empty_like(means)
    y = np.empty(dim)
    for k in range(means.shape[0]):
        for a in range(dim):  # L y = mu
            v = means[k, a]
            for c in range(a):
                v -= low[a, c] * y[c]
            y[a] = v / low[a, a]
        for a in range(dim - 1, -1, -1):  # L^T x = y
            v = y[a]
            for c in range(a + 1, dim):
                v -= low[c, a] * out[k, c]
            out[k, a] = v / low[a, a]
    return out


@njit(cache=True)
def _e_step(scores, weight, means, cov, rows, out):
    """out[rows] = the responsibilities: log pi_k + log N(s; mu_k, Sigma) up to the term
    shared by all components, normalised per image. Returns how far the most moved one went."""
    m, dim = means.shape
    lin = _cholesky_solve(cov, means)
    const = np.log(weight)
    for k in range(m):
        const[k] -= 0.5 * np.sum(lin[k] * means[k])
    logp = np.empty(m)
    moved = 0.0
    for n in rows:
        top = -np.inf
        for k in range(m):
            v = const[k]
            for a in range(dim):
                v += scores[n, a] * lin[k, a]
            logp[k] = v
            top = max(top, v)
        norm = 0.0
        for k in range(m):
            logp[k] = np.exp(logp[k] - top)
            norm += logp[k]
        for k in range(m):
            p = logp[k] / norm
            moved = max(moved, abs(p - out[n, k]))
            out[n, k] = p
    return moved


@njit(cache=True)
def fit_mixture(scores, resp, member, fit, tol, max_iter):
    """EM from the one-hot responsibilities `resp` (n, m) of the rows `member` (the others
    start from the model of those), the model fitted on the rows `fit`, until no
    responsibility moves more than tol (or max_iter). resp is updated in place."""
    n = scores.shape[0]
    everyone = np.arange(n)
    rows_fit = everyone[fit]
    others = everyone[~member]
    if others.size:
        weight, means, cov = _m_step(scores, resp, everyone[member])
        _e_step(scores, weight, means, cov, others, resp)
    for _ in range(max_iter):
        weight, means, cov = _m_step(scores, resp, rows_fit)
        if _e_step(scores, weight, means, cov, everyone, resp) < tol:
            break
