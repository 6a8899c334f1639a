"""Maps from each image inserted at its pose's neighbours, weighted (stack mode, pose errors).

Why: with --pose_sigma_deg, an image is scored by its marginal over the refined pose and six
turns of sigma (mgskmeans.pose_marginal); its insertions into the maps should carry the same
uncertainty, as meridien's smears do. Each image is inserted at those seven poses, weighted by
its posterior against its own half's consensus map (the likelihood realign.py refines with,
times the Gaussian prior of width sigma about the given rotation): smears built locally, and
reconstructed by the smear path (smearing.LocalSmears), not a second one. Where the likelihood
is sharp, an image keeps one entry and costs what it did (bench/README.md, "Maps from weighted
insertions")."""

from dataclasses import dataclass

import numpy as np

from .realign import turn_log_posteriors
from .smearing import LocalSmears

POSE_WEIGHT_FLOOR = 1e-3  # entries below this share of their image's weight are dropped (the
# rest renormalised): an insertion at a thousandth changes a map by less than its noise, and
# costs a full slice


@dataclass
class PoseEntries:
    """Smear entries of the rank's images (the fields smearing.LocalSmears.build reads)."""

    offsets: np.ndarray  # (n_local + 1,) entries of image i: offsets[i]:offsets[i+1]
    parent: np.ndarray  # (E,) local image of each entry
    rotation: np.ndarray  # (E, 3, 3)
    shift: np.ndarray  # (E, 2) zeros: realign.py already moved the images
    weight: np.ndarray  # (E,) each image's weights sum to 1

    @property
    def n_entries(self):
        return len(self.parent)


def pose_entries(rots, turns, log_post):
    """PoseEntries of images at rotations `rots` (n, 3, 3) turned by `turns` (J, 3, 3), from
    their log posteriors (J, n): weights normalised per image, those below POSE_WEIGHT_FLOOR
    dropped (an image's best pose always kept) and the rest renormalised."""
    w = np.exp(log_post - log_post.max(axis=0, keepdims=True))
    w /= w.sum(axis=0, keepdims=True)
    keep = (w >= POSE_WEIGHT_FLOOR) | (w == w.max(axis=0, keepdims=True))
    w = np.where(keep, w, 0.0)
    w /= w.sum(axis=0, keepdims=True)
    img, turn = np.nonzero(keep.T)  # image-major: each image's entries contiguous
    counts = np.bincount(img, minlength=rots.shape[0])
    return PoseEntries(
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        img.astype(np.int64),
        np.ascontiguousarray(rots[img] @ turns[turn]),
        np.zeros((img.size, 2)),
        w[turn, img],
    )


def pose_smears(maps, comm, given_rots, *, sigma_deg, log):
    """The rank's smearing.LocalSmears of its images over their refined pose and its six turns
    of sigma_deg (maps: mgskmeans.ClusterMaps without pose turns, at the refined poses), or None
    without pose errors or in meridien mode (its own smears)."""
    d = maps.d
    if not sigma_deg or d.smears is not None:
        return None
    turns, log_post = turn_log_posteriors(maps, given_rots, sigma_deg)
    entries = pose_entries(d.rots, turns, log_post)
    groups = np.zeros(d.hi - d.lo, np.int64) if d.groups is None else d.groups
    smears = LocalSmears.build(
        entries,
        d.rec_f,
        d.nx,
        np.ones(d.hi - d.lo),
        coefs=d.ctf_coefs,
        groups=groups,
        n_precompute=0,
    )
    counts = comm.allreduce_sum(
        np.array([entries.n_entries, np.count_nonzero(np.diff(entries.offsets) == 1)], np.int64)
    )
    log(
        f"pose errors: maps made from each image inserted at its refined pose and turns of "
        f"{sigma_deg:g} deg weighed by its posterior against its half's consensus map: "
        f"{counts[0] / d.n_total:.2f} insertions per image, {100.0 * counts[1] / d.n_total:.1f} % "
        f"of the images at one pose (the others' below {POSE_WEIGHT_FLOOR:g})"
    )
    return smears
