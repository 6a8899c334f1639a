import warnings

import numpy as np
import pytest
from scipy import stats

from sort3ddepth.engine.anova import format_anova, one_way_anova, unique_per_cluster


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_matches_scipy():
    rng = np.random.default_rng(0)
    g = {0: rng.normal(1.0, 1, 40), 1: rng.normal(1.5, 1, 30), 2: rng.normal(1.0, 2, 25)}
    r = one_way_anova(g)
    ref = stats.f_oneway(*g.values())
    assert r.F == pytest.approx(ref[0]) and r.p == pytest.approx(ref[1])
    assert r.reason is None
    assert r.grand_mean == pytest.approx(np.concatenate(list(g.values())).mean())
    assert [x.n for x in r.groups] == [40, 30, 25]
    assert r.groups[1].std == pytest.approx(np.std(g[1], ddof=1))
    assert [(t.a, t.b) for t in r.pairs] == [(0, 1), (0, 2), (1, 2)]
    t = r.pairs[1]
    ref = stats.f_oneway(g[0], g[2])
    assert t.F == pytest.approx(ref[0]) and t.p == pytest.approx(ref[1])
    assert t.mean_a == pytest.approx(g[0].mean())


def test_degenerate_cases():
    r = one_way_anova({0: [1.0, 2.0, 3.0]})
    assert np.isnan(r.F) and np.isnan(r.p) and "fewer than 2" in r.reason
    r = one_way_anova({0: [1.0, 2.0], 1: []})
    assert np.isnan(r.F) and "fewer than 2" in r.reason and r.groups[1].n == 0
    assert np.isnan(r.groups[1].mean)
    r = one_way_anova({0: [1.0], 1: [2.0], 2: [5.0]})
    assert np.isnan(r.F) and "degrees of freedom" in r.reason
    assert np.isnan(r.groups[0].std)
    r = one_way_anova({"a": [3.0, 3.0, 3.0], "b": [3.0, 3.0]})
    assert np.isnan(r.F) and np.isnan(r.p) and "identical" in r.reason
    r = one_way_anova({"a": [1.0, 1.0], "b": [2.0, 2.0]})
    assert np.isinf(r.F) and r.p == 0.0 and r.reason
    # one group with a single value still takes part
    r = one_way_anova({0: [1.0, 2.0, 3.0], 1: [10.0]})
    assert np.isfinite(r.F) and r.reason is None
    r = one_way_anova({0: [1.0, np.nan, 2.0], 1: [3.0, 4.0, np.inf]})
    assert [g.n for g in r.groups] == [2, 2]
    r = one_way_anova({})
    assert np.isnan(r.F) and r.pairs == []


def test_format_anova():
    rng = np.random.default_rng(1)
    g = {k: rng.normal(20000 + 500 * k, 300, 30 + k) for k in range(4)}
    lines = format_anova("defocus", one_way_anova(g))
    assert all(line.startswith("ANOVA") for line in lines)
    assert "ANOVA of defocus" in lines
    assert any("defocus mean of all clusters" in line for line in lines)
    i = next(i for i, line in enumerate(lines) if "GID" in line)
    table = lines[i : i + 5]
    assert len({len(line) for line in table}) == 1  # aligned columns
    j = next(i for i, line in enumerate(lines) if "Pair-wise tests" in line)
    pair_rows = lines[j + 2 :]
    assert len(pair_rows) == 6 and len({len(line) for line in lines[j + 1 :]}) == 1
    # degenerate results format too
    lines = format_anova("norm", one_way_anova({0: [1.0]}))
    assert all(line.startswith("ANOVA") for line in lines)
    assert any("nan" in line and "fewer than 2" in line for line in lines)
    print("\n" + "\n".join(format_anova("defocus", one_way_anova(g))))


def test_unique_per_cluster():
    values = np.array([1.5, 1.5, 2.0, 3.0, 3.0, 1.5, 7.0, np.nan, 9.0])
    labels = np.array([0, 0, 0, 1, 1, 1, -1, 1, 2])
    u = unique_per_cluster(values, labels)
    assert list(u) == [0, 1, 2]
    np.testing.assert_array_equal(u[0], [1.5, 2.0])
    np.testing.assert_array_equal(u[1], [1.5, 3.0])
    np.testing.assert_array_equal(u[2], [9.0])
    with pytest.raises(ValueError):
        unique_per_cluster(values, labels[:-1])


def test_clusters_that_follow_the_half_sets_are_reported():
    """The input's half sets (rlnRandomSubset) get an ANOVA line of their own: clusters made
    of one half each stand out (p ~ 0), clusters drawn across both halves do not; without half
    sets in the input, no such line."""
    from types import SimpleNamespace

    from sort3ddepth.engine.sorter import _anova_lines

    rng = np.random.default_rng(0)
    n = 400

    class Particles(SimpleNamespace):
        def __len__(self):
            return n

    def particles(half_set):
        ctf = SimpleNamespace(defocus_u=rng.uniform(1e4, 3e4, n), defocus_v=np.full(n, 2e4))
        return Particles(ctf=ctf, norm=None, half_set=half_set)

    half = np.repeat([0, 1], n // 2)
    by_half = [np.arange(0, n // 2), np.arange(n // 2, n)]
    across = [np.arange(0, n, 2), np.arange(1, n, 2)]
    names = ["Cluster_000", "Cluster_001"]
    lines, tables = _anova_lines(particles(half), by_half, names)
    assert tables["half set"]["p"] < 1e-10
    assert [g["mean"] for g in tables["half set"]["groups"]] == [0.0, 1.0]
    warned = [x for x in lines if x.startswith("WARNING: the clusters follow the input's half")]
    assert len(warned) == 1 and "from 0.00 to 1.00 against 0.50" in warned[0], warned
    lines, tables = _anova_lines(particles(half), across, names)
    assert tables["half set"]["p"] > 0.5 and any("half set" in line for line in lines)
    assert not any(x.startswith("WARNING") for x in lines)
    _, tables = _anova_lines(particles(None), by_half, names)
    assert "half set" not in tables


def test_a_small_lean_to_one_half_warns_nobody():
    """At 40,000 particles, two clusters whose shares of half 2 are 0.47 and 0.53 differ beyond
    chance (p ~ 1e-33) but by less than HALVES_WARNING_SHARE: the ANOVA reports it, no warning
    (a state the halves' own biases nudge is still a state); 0.35 and 0.65 warns."""
    from types import SimpleNamespace

    from sort3ddepth.engine.sorter import _anova_lines

    n = 40000

    class Particles(SimpleNamespace):
        def __len__(self):
            return n

    ctf = SimpleNamespace(defocus_u=np.full(n, 2e4), defocus_v=np.full(n, 2e4))
    clusters = [np.arange(0, n // 2), np.arange(n // 2, n)]
    rng = np.random.default_rng(1)
    for lean, warns in ((0.03, False), (0.15, True)):
        share = np.repeat([0.5 - lean, 0.5 + lean], n // 2)
        half = (rng.random(n) < share).astype(np.int64)
        lines, tables = _anova_lines(
            Particles(ctf=ctf, norm=None, half_set=half), clusters, ["C0", "C1"]
        )
        assert tables["half set"]["p"] < 1e-20
        assert any(x.startswith("WARNING: the clusters follow") for x in lines) == warns, lean
