"""One-way ANOVA of a per-particle variable (defocus, smearing, norm) across the final clusters.

The test tells the user whether a cluster is explained by a nuisance variable rather than by
structure (e.g. one cluster = the high-defocus micrographs). Degenerate inputs (too few groups,
no within-group degrees of freedom, constant values) give F = p = nan and a reason, never an
exception or a warning: the ANOVA is a report at the end of a long run.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from scipy import stats

__all__ = [
    "GroupStats",
    "PairTest",
    "AnovaResult",
    "one_way_anova",
    "format_anova",
    "unique_per_cluster",
]


@dataclass
class GroupStats:
    name: object
    n: int
    mean: float  # nan when empty
    std: float  # sample std (ddof=1); nan when n < 2


@dataclass
class PairTest:
    a: object
    b: object
    mean_a: float
    mean_b: float
    F: float
    p: float
    reason: Optional[str] = None  # why F/p are nan (or inf), None for a regular test


@dataclass
class AnovaResult:
    groups: List[GroupStats]
    grand_mean: float  # mean of all values pooled over the groups
    F: float
    p: float
    reason: Optional[str] = None
    pairs: List[PairTest] = field(default_factory=list)


def _f_test(arrays):
    """(F, p, reason) of a one-way ANOVA; the degenerate cases are caught before scipy sees them."""
    used = [x for x in arrays if x.size > 0]
    if len(used) < 2:
        return float("nan"), float("nan"), "fewer than 2 groups with data"
    n_total = sum(x.size for x in used)
    if n_total - len(used) < 1:
        return float("nan"), float("nan"), "no within-group degrees of freedom (1 value per group)"
    if all(np.ptp(x) == 0 for x in used):  # exact test: no rounding noise from the mean
        if np.ptp(np.concatenate(used)) == 0:
            return float("nan"), float("nan"), "all values are identical"
        return float("inf"), 0.0, "zero within-group variance (groups fully separated)"
    with np.errstate(all="ignore"):
        res = stats.f_oneway(*used)
    F, p = float(res[0]), float(res[1])
    if not np.isfinite(F):
        return float("nan"), float("nan"), "numerically degenerate test"
    return F, p, None


def _clean(values):
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def one_way_anova(groups: Dict[object, np.ndarray]) -> AnovaResult:
    """One-way ANOVA over the groups (name -> values) plus every pair-wise two-group test.

    Non-finite values are dropped. Pairs follow the dict order: (A, B) for every A before B.
    """
    names = list(groups)
    arrays = [_clean(groups[k]) for k in names]
    gstats = []
    for name, x in zip(names, arrays):
        mean = float(x.mean()) if x.size else float("nan")
        std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
        gstats.append(GroupStats(name, int(x.size), mean, std))
    pooled = np.concatenate(arrays) if arrays else np.zeros(0)
    grand = float(pooled.mean()) if pooled.size else float("nan")
    F, p, reason = _f_test(arrays)
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            f2, p2, r2 = _f_test([arrays[i], arrays[j]])
            pairs.append(PairTest(names[i], names[j], gstats[i].mean, gstats[j].mean, f2, p2, r2))
    return AnovaResult(gstats, grand, F, p, reason, pairs)


def _num(x, width=14):
    """A number in a fixed-width column; nan/inf shown as words."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return f"{'nan':>{width}}"
    if isinstance(x, float) and np.isinf(x):
        return f"{'inf' if x > 0 else '-inf':>{width}}"
    return f"{x:>{width}.6g}"


def format_anova(variable_name, result: AnovaResult) -> List[str]:
    """Log lines of one ANOVA block; every line starts with "ANOVA" (the original's convention)."""
    w = 14
    gid_w = max([3] + [len(str(g.name)) for g in result.groups])
    lines = [
        "ANOVA " + "=" * 70,
        f"ANOVA of {variable_name}",
        f"ANOVA   {'F-value':>{w}}  {'Significance(%)':>{w + 2}}",
        f"ANOVA   {_num(result.F, w)}  {_num(result.p * 100.0, w + 2)}"
        + (f"   ({result.reason})" if result.reason else ""),
        f"ANOVA:  {variable_name} mean of all clusters: {_num(result.grand_mean, 0).strip()}",
        "ANOVA:  Group averages",
        f"ANOVA   {'GID':>{gid_w}}  {'N':>8}  {'mean':>{w}}  {'std':>{w}}",
    ]
    for g in result.groups:
        lines.append(
            f"ANOVA   {str(g.name):>{gid_w}}  {g.n:>8d}  {_num(g.mean, w)}  {_num(g.std, w)}"
        )
    lines.append("ANOVA  Pair-wise tests")
    lines.append(
        f"ANOVA   {'A':>{gid_w}}  {'B':>{gid_w}}  {'avgA':>{w}}  {'avgB':>{w}}  "
        f"{'F_value':>{w}}  {'Significance(%)':>{w + 2}}"
    )
    for t in result.pairs:
        lines.append(
            f"ANOVA   {str(t.a):>{gid_w}}  {str(t.b):>{gid_w}}  {_num(t.mean_a, w)}  "
            f"{_num(t.mean_b, w)}  {_num(t.F, w)}  {_num(t.p * 100.0, w + 2)}"
            + (f"   ({t.reason})" if t.reason else "")
        )
    return lines


def unique_per_cluster(values, labels):
    """Cluster -> sorted distinct values of its members (labels < 0 and non-finite values skipped).

    The original de-duplicates defocus per cluster so that each micrograph counts once.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lab = np.asarray(labels).ravel().astype(np.int64)
    if v.shape != lab.shape:
        raise ValueError(f"{v.size} values for {lab.size} labels")
    keep = (lab >= 0) & np.isfinite(v)
    v, lab = v[keep], lab[keep]
    order = np.lexsort((v, lab))
    v, lab = v[order], lab[order]
    first = np.ones(v.size, bool)
    first[1:] = (lab[1:] != lab[:-1]) | (v[1:] != v[:-1])
    v, lab = v[first], lab[first]
    clusters, starts = np.unique(lab, return_index=True)
    ends = np.append(starts[1:], lab.size)
    return {int(c): v[s:e] for c, s, e in zip(clusters, starts, ends)}
