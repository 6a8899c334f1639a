"""MGSK-means: K-means with a minimum group size over images vs CTF-projected cluster maps.

One iteration: reconstruct the K maps from the current members (Wiener-regularised with the FSC
expected for a group of this size), normalise each map inside the 3D mask, score images against
the CTF-multiplied projection of every map at the image's own orientation (SPHIRE's "cross"
score <X, CTF P_k> / |CTF P_k|), then reassign under the minimum group size, per orientation
group. The run returns its BEST assignment (lowest change), not the last one. At its first plateau
a run goes on damped (each wanted move made with probability 1/2): alternating halves can trap
a run in a cycle where the same images flip every sweep, and damping breaks it.

Self-bias: a map built from an image's own noise attracts that image back (at realistic SNR and
group sizes the effect outweighs the structural signal, and K-means freezes at its random start).
So the data are split into two fixed random halves and the iterations alternate: maps from the
members of one half re-assign the images of the other half. An image is never scored against a
map that contains it, and the labels keep one meaning in both halves.

The two independent runs of a box iteration step in lockstep: their 2K maps share one
back-projection pass and one distance pass (the per-pixel rotation and CTF work is shared).
"""

from dataclasses import dataclass, field

import numpy as np

from . import fourier
from .assignment import constrained_assignment
from .comparison import split_two_classes
from .geometry import angle_between
from .preprocess import comparison_circle, good_fft_size, scaled_fsc
from .reconstruction import difference_weights, reconstruct

MAX_ITER = 15
STOP_CHANGE = 5.0  # % of images changing group below which a run may stop (SPHIRE: 10; measured:
# at 10 % the assignments were still improving, see the issue notes)
SHIFT_CHUNK = 4096  # images moved (copied) at a time when scores are taken at shifted origins
NEIGHBOUR_PRIOR = float(np.exp(-0.5))  # prior weight of a pose neighbour next to its pose's
# 1 when the prior is centred on the pose scored: a Gaussian of width sigma, one sigma away
MIN_PER_ORIENTATION = 20  # an orientation group needs K * this many images to be kept
MIN_GROUP_FOR_MEAN = 5  # a group's images in an orientation group that its mean preference
# counts from (centre_per_orientation): the mean of fewer is noisier than the shift it corrects


class ClusterMaps:
    """Builds cluster maps from memberships and scores images against them, over MPI ranks."""

    def __init__(
        self, data, comm, symmetry=None, *, pad=2, grid=None, pose_turns=None, given_rots=None
    ):
        self.d = data
        self.comm = comm
        self.sym = symmetry
        self.pad = pad
        # images are scored at their pose and, when pose_turns (geometry.pose_neighbours) is
        # set, at its neighbours pose @ turn: their marginal counts (pose_marginal), under a
        # Gaussian prior of the turns' angle about given_rots (n_local, 3, 3: the rotations
        # before realign.py refined them; None: about the pose scored)
        self.pose_turns = pose_turns
        self.given_rots = given_rots
        # maps are reconstructed and compared on a box of `grid` voxels spanning the images'
        # field of view (grid < nx: coarser voxels, for maps limited to low resolution)
        self.grid = data.nx if grid is None else int(grid)
        self.mask = (
            data.mask3d
            if self.grid == data.nx
            else np.clip(fourier.resize_volume(data.mask3d, self.grid), 0.0, 1.0).astype(np.float32)
        )
        inside = self.mask > 0.5
        self._inside = inside if inside.any() else np.ones_like(inside)
        self._coarse = {}
        self._rec_max = None  # fourier.component_max of the rank's images, made once

    def _npad(self, n):
        return fourier.padded_size(n, self.pad)

    def at_limit(self, rmax):
        """The maps builder for maps limited to shell `rmax`: the same Fourier spacing on the
        smallest grid that holds those shells (the central part of the full one), so that
        back-projection sums, reconstruction FFTs and scoring volumes shrink with the limit.
        Measured (bench_sort set, 64 px, 10 maps, a half-step over 8,640 images, 1 process) at
        shell 15: maps 1.1 s on the full (padded 128^3) grid, 0.15 s on this one (padded 64^3);
        back-projection and scores unchanged (~0.5 s each); the scores agree (argmax 99.5 %)."""
        grid = good_fft_size(2 * int(rmax) + 2)
        if grid >= self.grid:
            return self
        if grid not in self._coarse:
            self._coarse[grid] = ClusterMaps(
                self.d,
                self.comm,
                self.sym,
                pad=self.pad,
                grid=grid,
                pose_turns=self.pose_turns,
                given_rots=self.given_rots,
            )
        return self._coarse[grid]

    def resolution_limit(self, group_size):
        """Shell (sorting grid) where the FSC expected for `group_size` images vanishes: maps
        are zero beyond it, so nothing past it needs inserting."""
        nx = self.d.nx
        f = scaled_fsc(self.d.fsc_full[: nx // 2 + 1], self.d.n_total, max(int(group_size), 1))
        below = np.nonzero(f[1:] < 0.01)[0]
        return min(nx // 2 - 1, int(below[0]) + 1 if below.size else nx // 2 - 1)

    def accumulate(self, subset, memberships, half=None, rmax=None):
        """Fourier sums (data, weights) of the K maps from (n_subset, K) insertion weights (rows
        in subset order; only images of random half `half` unless None), summed over ranks.
        Linear in the weights: a change of labels can be applied as a difference.
        On a coarse grid (at_limit) rmax defaults to the grid's reach: an image pixel beyond it
        can only add to voxels past the shells that maps_from keeps."""
        d = self.d
        if rmax is None and self.grid < d.nx:
            rmax = self.grid // 2 + 1
        loc = d.local(subset)
        a, _ = np.searchsorted(subset, [d.lo, d.hi])
        memb = memberships[a : a + len(loc)]
        if half is not None:
            memb = memb * (d.half[d.lo + loc] == half)[:, None]
        used = np.nonzero(np.any(memb != 0, axis=1))[0]
        grid = self._npad(self.grid)
        # the sums over ranks are exact (fixed point): the same bits for any split over ranks,
        # and a sum patched with label differences is what the patched-in sums add up to
        if d.smears is not None:  # meridien: every smear entry of a member is one slice
            return d.smears.backproject(
                loc[used],
                memb[used],
                memb.shape[1],
                self._npad(d.nx),
                rmax=rmax,
                shell_w=d.shell_weights,
                grid=grid,
                comm=self.comm,
            )
        return fourier.backproject(
            d.rec_f,
            d.rots[loc[used]],
            np.ascontiguousarray(memb[used], np.float64),
            d.ctf_coefs,
            pad=self.pad,
            rmax=rmax,
            shell_weights=d.shell_weights,
            image_index=loc[used],
            grid=grid,
            comm=self.comm,
            value_max=self._image_max(),
        )

    def move_images(self, local, shifts):
        """Move the rank's images at positions `local` by `shifts` (n, 2) sorting pixels, the
        comparison and the reconstruction images alike (realign.py refines origins)."""
        d = self.d
        d.comp_f[local] = fourier.shift_images(d.comp_f[local], shifts)
        d.rec_f[local] = fourier.shift_images(d.rec_f[local], shifts)
        self._rec_max = None

    def _image_max(self):
        if self._rec_max is None:
            self._rec_max = fourier.component_max(self.d.rec_f)
        return self._rec_max

    def maps_from(self, data, w, group_size):
        """Maps (K, grid, grid, grid) from Fourier sums, Wiener-regularised with the FSC expected
        for groups of `group_size` images and limited where that FSC vanishes."""
        nx = self.d.nx
        f = scaled_fsc(self.d.fsc_full[: nx // 2 + 1], self.d.n_total, max(int(group_size), 1))
        return reconstruct(
            data,
            w,
            self.grid,
            fsc=f,
            rmax=min(self.resolution_limit(group_size), self.grid // 2 - 1),
            symmetry=self.sym,
        )

    def build(self, subset, memberships, group_size, half=None):
        """Maps (K, grid, grid, grid) from the members of `subset` (in random half `half`)."""
        data, w = self.accumulate(subset, memberships, half)
        n_used = len(subset) if half is None else int(np.sum(self.d.half[subset] == half))
        return self.maps_from(data, w, group_size * n_used / max(len(subset), 1))

    def comparison_volumes(self, maps, out=None, slots=None):
        """Each map normalised inside the mask (mean 0, std 1) and multiplied by it, as
        fourier.FourierVolumes (written into out[..., slots] when given)."""
        norm = np.empty_like(maps)
        for k, m in enumerate(maps):
            vals = m[self._inside]
            sd = vals.std()
            norm[k] = 0.0 if sd <= 0 else (m - vals.mean()) / sd * self.mask
        fv = fourier.volumes_to_fourier(norm, pad=self.pad, out=out, slots=slots)
        # gathered at the images' frequencies: the spacing is that of an nx box at this pad
        return fourier.FourierVolumes(fv.data, self.d.nx, self._npad(self.d.nx) / self.d.nx)

    def fourier_maps(self, data, w, group_size):
        """Comparison volumes (fourier.FourierVolumes) straight from Fourier sums: each rank
        reconstructs and transforms every size-th map and the ranks sum the results, instead of
        every rank doing every map's FFTs. One rank: its volumes as they are (no copy)."""
        if self.comm.size == 1:
            return self.comparison_volumes(self.maps_from(data, w, group_size))
        k = data.shape[0]
        mine = np.arange(self.comm.rank, k, self.comm.size)
        npad = self._npad(self.grid)
        out = np.zeros((npad, npad, npad // 2 + 1, k), np.complex64)
        if mine.size:
            self.comparison_volumes(
                self.maps_from(data[mine], w[mine], group_size), out=out, slots=mine
            )
        self.comm.allreduce_sum(out)
        return fourier.FourierVolumes(out, self.d.nx, self._npad(self.d.nx) / self.d.nx)

    def scores(
        self,
        maps,
        subset,
        half=None,
        *,
        rmax=None,
        shell_factors=None,
        noise=False,
        rots=None,
        shifts=None,
    ):
        """Cross scores of the images of `subset` in random half `half` (None: all) against the
        K maps (real-space maps, or fourier_maps' volumes), on every rank: (n_selected, K), rows
        in subset order. rmax: the shell the maps were limited to (maps_from): pixels beyond it
        hold only the mask's leakage. Measured at 60 px: rmax 25 instead of 29 makes the pass
        1.55x faster; where the limit is Nyquist (bench_sort) it saves nothing.
        shell_factors: (nshell,) extra weight per frequency shell (discriminative weights).
        With pose_turns, each score is the marginal over the given pose and its neighbours
        (pose_marginal): with pose errors of ~2 degrees (median) a 3 x 700 set was one group at
        the given poses alone (bench/README.md, "Pose errors").
        noise: also return the variance (n_selected, K) each score would have from the image's
        own noise alone (_score_noise), for a likelihood of the scores.
        rots: the rotations to score the rank's images at, (n_local, 3, 3) (default their
        poses; realign.py tries turned ones). shifts: (n_local, 2) sorting pixels each image is
        moved by before it is scored (realign.py tries shifted origins; None: as they are)."""
        d = self.d
        loc = d.local(subset)
        if half is not None:
            loc = loc[d.half[d.lo + loc] == half]
        fv = maps if isinstance(maps, fourier.FourierVolumes) else self.comparison_volumes(maps)
        sw = self._weights(shell_factors)
        base = d.rots if rots is None else rots
        turns = [] if self.pose_turns is None else list(self.pose_turns)
        poses = with_neighbours(base, turns)
        # the rank's images as they are, the selected ones scored at every pose (no copy)
        cross, pp, xx = self._terms(fv, poses, loc, rmax=rmax, sw=sw, shifts=shifts)
        posed_scores = cross / np.sqrt(pp + 1e-30)
        terms = (cross[0], pp[0], xx)
        n_sel = len(subset) if half is None else int(np.sum(d.half[subset] == half))
        var = None
        if noise or turns:
            var = self._score_noise(
                fv, loc, base, rmax=rmax, shell_factors=shell_factors, terms=terms
            )
        score = posed_scores[0]
        if turns:
            log_prior = [self._pose_log_prior(posed[loc], base[loc], loc) for posed in poses]
            score = pose_marginal(posed_scores, var, np.stack(log_prior))
        if not noise:
            return self.comm.gather_rows(score, n_sel)
        return self.comm.gather_rows(score, n_sel), self.comm.gather_rows(var, n_sel)

    def _pose_log_prior(self, posed, base, loc):
        """Log prior (n,) of the poses `posed` of the images at local positions `loc`: a
        Gaussian of the neighbours' turn angle (sigma) about their given rotations, or about
        `base` (the poses scored) when there are none."""
        sigma = angle_between(self.pose_turns[0], np.eye(3))
        centre = base if self.given_rots is None else self.given_rots[loc]
        return -0.5 * (angle_between(centre, posed) / sigma) ** 2

    def _factors(self, shell_factors):
        """shell_factors (None: ones) on the length of the shell weights, zero beyond."""
        n = self.d.shell_weights.shape[1]
        if shell_factors is None:
            return np.ones(n)
        f = np.zeros(n)
        m = min(f.size, len(shell_factors))
        f[:m] = shell_factors[:m]
        return f

    def _weights(self, shell_factors, power=1):
        """The images' shell weights times shell_factors**power (None: the weights alone)."""
        sw = self.d.shell_weights
        return sw if shell_factors is None else sw * self._factors(shell_factors)[None, :] ** power

    def _terms(self, fv, rots, loc, *, rmax, sw, shifts=None):
        d = self.d
        if shifts is None or loc.size == 0:
            return fourier.distance_terms(
                fv,
                rots,
                d.comp_f,
                d.ctf_coefs,
                rmin=1.0,
                rmax=rmax,
                shell_weights=sw,
                groups=d.groups,
                select=loc,
            )
        parts = []  # moved copies of SHIFT_CHUNK images at a time, not of the whole stack
        for a in range(0, loc.size, SHIFT_CHUNK):
            at = loc[a : a + SHIFT_CHUNK]
            parts.append(
                fourier.distance_terms(
                    fv,
                    rots[..., at, :, :],
                    fourier.shift_images(d.comp_f[at], shifts[at]),
                    None if d.ctf_coefs is None else d.ctf_coefs[at],
                    rmin=1.0,
                    rmax=rmax,
                    shell_weights=sw,
                    groups=None if d.groups is None else d.groups[at],
                )
            )
        cross, pp, xx = zip(*parts)
        axis = cross[0].ndim - 2  # the images' axis of (n, K) or (J, n, K)
        return np.concatenate(cross, axis), np.concatenate(pp, axis), np.concatenate(xx)

    def _score_noise(self, fv, loc, rots, *, rmax, shell_factors, terms):
        """Variance of each score cross / sqrt(pp) from the image's own noise: the image's noise
        power per weighted pixel (what its best map leaves of |X|^2, over the band's pixels
        counted with their shell factor), divided by the mean square of the comparison circle
        (masking lowers the power of the noise but not its covariance with a projection inside
        the circle), times pp2 / pp, pp2 being pp with the shell factors squared. Checked on
        pure-noise images (test_mgskmeans): measured / predicted variance 1.004 +- 0.045 over
        8 sets of 900 images. Not included: a focus map's projected mask (it scales the noise
        further); with pose_turns, the noise is that of the given pose's scores."""
        d = self.d
        cross, pp, xx = terms
        _, _, _, _, shell, herm = fourier.pixel_table(d.nx, 1.0, rmax)
        f = self._factors(shell_factors)
        n_eff = float(np.sum(herm * f[np.minimum(shell, f.size - 1)]))
        circle = comparison_circle(d.nx, d.radius * d.nx / d.box)
        fit = np.max(cross**2 / (pp + 1e-30), axis=1) if pp.shape[1] else np.zeros(len(xx))
        power = np.maximum(xx - fit, 0.0) / max(n_eff * float(np.mean(circle**2)), 1e-30)
        pp2 = pp
        if shell_factors is not None and not np.array_equal(f**2, f):
            _, pp2, _ = self._terms(fv, rots, loc, rmax=rmax, sw=self._weights(shell_factors, 2))
        return power[:, None] * pp2 / (pp + 1e-30)


def with_neighbours(rots, turns):
    """(1 + len(turns), n, 3, 3): the rotations, then the rotations turned by each turn (a view,
    not a copy, without turns; made in place, not stacked from copies: n can be 10^5 a rank)."""
    if not len(turns):
        return rots[None]
    out = np.empty((1 + len(turns),) + rots.shape, np.result_type(rots, *turns))
    out[0] = rots
    for j, turn in enumerate(turns, 1):
        np.matmul(rots, turn, out=out[j])
    return out


def pose_marginal(posed_scores, var, log_prior=None):
    """Scores (n, K) of images whose pose is uncertain, from their scores (J, n, K) at their
    pose (first) and its J - 1 neighbours (geometry.pose_neighbours), the variance (n, K) of a
    score from the image's own noise and the poses' log prior (J, n; default: the pose 0, a
    neighbour log NEIGHBOUR_PRIOR). In noise units u = score / sd the log-likelihood is u^2 / 2
    (free amplitude); the neighbourhood's likelihood is its prior-weighted mean, and the result
    is the u that has that likelihood, times sd: the same score when every pose scores alike.
    The best pose alone (a max) let noise pick a pose per map: on refined poses it split a
    two-state set at chance, reproducibly (bench/README.md, "The pose neighbours as a
    marginal"). Negative u count as -u^2 / 2 (a monotone extension: they carry no likelihood,
    but MGSK-means still ranks them)."""
    n_pose, n = posed_scores.shape[:2]
    if log_prior is None:
        log_prior = np.full((n_pose, n), np.log(NEIGHBOUR_PRIOR))
        log_prior[0] = 0.0
    w = np.exp(log_prior - log_prior.max(axis=0, keepdims=True))
    w /= w.sum(axis=0, keepdims=True)
    sd = np.sqrt(np.maximum(var, 1e-300))
    u = posed_scores / sd[None]
    g = np.sign(u) * u * u / 2.0
    top = g.max(axis=0)
    like = top + np.log(np.einsum("jn,jnk->nk", w, np.exp(g - top[None])))
    return np.sign(like) * np.sqrt(2.0 * np.abs(like)) * sd


def merge_small_orientation_groups(og, k, rng):
    """Orientation groups holding fewer than K*20 images are dissolved at random into the kept
    ones (SPHIRE), so the per-group quota stays meaningful."""
    labels, counts = np.unique(og, return_counts=True)
    keep = labels[counts >= k * MIN_PER_ORIENTATION]
    if keep.size == 0:
        return np.zeros_like(og)
    out = og.copy()
    lost = ~np.isin(og, keep)
    out[lost] = keep[rng.integers(0, keep.size, lost.sum())]
    return out


def min_size_schedule(high, low, nstep):
    """high -> low in nstep entries; each entry the midpoint of the previous one and low."""
    if nstep <= 1:
        return [int(high)]
    if nstep == 2:
        return [int(high), int(low)]
    if nstep == 3:
        return [int(high), int((high + low) / 2), int(low)]
    out = [float(high)]
    for _ in range(nstep - 1):
        out.append((out[-1] + low) / 2)
    return [int(v) for v in out]


def interleaved_schedule(high, low, nstep):
    """The second run of a pair walks the midpoints of an (nstep+1)-entry schedule, so the two
    independent runs do not step through the same sizes."""
    s = min_size_schedule(high, low, nstep + 1)
    return [int((a + b) / 2) for a, b in zip(s[:-1], s[1:])]


def cap_oversized(labels, k, rng):
    """Search mode: strip members beyond a size cutoff from oversized groups and deal them
    round-robin to all groups (the original's "AI"), so one map cannot swallow the data."""
    sizes = np.bincount(labels, minlength=k).astype(float)
    if k < 2 or sizes.sum() == 0:
        return labels
    is_large, small_c, large_c = split_two_classes(sizes)
    avg = sizes.mean()
    if k == 2:
        cutoff = (small_c + large_c) / 2 if small_c / max(large_c, 1) < 0.33 else 2 * avg
    elif is_large.sum() == 1:
        cutoff = small_c
    elif small_c / max(large_c, 1) > 0.33:
        big = sizes[is_large]
        cv = big.std() / max(big.mean(), 1)
        cutoff = large_c + (1 if cv > 0.5 else 2) * big.std()
    else:
        cutoff = 2 * avg
    cutoff = max(int(cutoff), 1)
    out = labels.copy()
    excess = []
    for g in np.nonzero(sizes > cutoff)[0]:
        members = np.nonzero(out == g)[0]
        excess.append(rng.choice(members, members.size - cutoff, replace=False))
    if excess:
        ex = np.sort(np.concatenate(excess))
        ex = ex[rng.permutation(ex.size)]
        out[ex] = np.arange(ex.size) % k
    return out


def _plateau(r):
    """The change has stopped falling: 3 sweeps (since damping began, if damped) of small
    spread, the last not below the first."""
    last = r.changes[-3:]
    return (
        len(r.changes) >= max(4, r.damped_at + 3)
        and 100.0 not in last
        and np.std(last) < (2.0 if r.frozen else 1.0)
        and last[-1] > last[0] - 0.5
    )


@dataclass
class RunState:
    labels: np.ndarray
    schedule: list
    frozen: bool
    search: bool
    step: int = 0
    best_labels: np.ndarray = None
    best_change: float = 100.0
    changes: list = field(default_factory=list)
    done: bool = False
    n_iter: int = 0
    stepped_last: bool = False
    umat: np.ndarray = None  # (n, K) fuzzy memberships (rows of unit L2 norm)
    damped: bool = False  # after a first plateau: each wanted move is made with p = 1/2
    damped_at: int = 0  # sweeps done when damping began
    wanted: int = 0  # images that wanted to move in the current sweep

    @property
    def min_size(self):
        return self.schedule[min(self.step, len(self.schedule) - 1)]


def rank_memberships(scores):
    """Fuzzy memberships from scores: the group ranked j-th (0 = best) gets K - j, and the row
    is scaled to unit L2 norm (SPHIRE's use_umat, m = 1)."""
    k = scores.shape[1]
    ranks = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)
    u = (k - ranks).astype(np.float64)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def mix_memberships(u, labels, change_fraction, size_ratio):
    """After re-assignment: shrink the fuzzy part by c = change^2 * (current / first minimum
    size), add 1 to the assigned group and renormalise; as the changes vanish U tends to
    one-hot."""
    out = u * (change_fraction**2 * size_ratio)
    out[np.arange(len(labels)), labels] += 1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def centre_per_orientation(scores, groups, labels=None):
    """Scores (n, K) as preferences: each row minus its mean (raw scores mostly measure how much
    signal an image has, the same for every map), then, inside each orientation group, each
    map's column minus its mean there. Without the second step a map that happens to be better
    determined for some view directions (or built from more images) draws the images of those
    views whatever their structure, and independent runs reproduce such a split of a homogeneous
    set (measured in bench/README.md, "Search mode on small sets"). Without labels, groups of
    unequal true sizes are pulled towards equal sizes.
    labels: the images' current groups. Given, a column's mean is the mean of the groups' means
    (of the groups with at least MIN_GROUP_FOR_MEAN images in the orientation group), not of the
    images: the images' mean is mostly the largest group's, and removing it moves the boundary
    between two groups into the large one (900 + 300 images of two states: its images' mean
    preference for their own map halves, the small one's grows by half). The groups' mean keeps
    the boundary halfway (bench/README.md, "The groups' mean, not the images'")."""
    s = scores - scores.mean(axis=1, keepdims=True)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        s[rows] -= _column_means(s[rows], None if labels is None else labels[rows])
    return s


def _column_means(s, labels):
    """(1, K): the mean of the groups' mean rows (groups of >= MIN_GROUP_FOR_MEAN rows), or the
    rows' mean when fewer than two such groups (or no labels)."""
    if labels is not None:
        ids, counts = np.unique(labels, return_counts=True)
        ids = ids[counts >= MIN_GROUP_FOR_MEAN]
        if ids.size >= 2:
            return np.mean([s[labels == j].mean(axis=0) for j in ids], axis=0)[None]
    return s.mean(axis=0, keepdims=True)


def mgsk_pair(
    maps_builder,
    subset,
    k,
    inits,
    *,
    schedules,
    frozen,
    search,
    orientation,
    rng,
    log=None,
    tag="",
    use_umat=False,
    rmax_cap=None,
    weighted=False,
):
    """Two independent MGSK-means runs on `subset` (sorted global indices) in lockstep.

    inits: two (n,) starting labels; schedules: two lists of minimum sizes. Each iteration is a
    sweep of two half-steps (half 1 re-assigned from half-0 maps, then half 0 from half-1 maps).
    rmax_cap: a lower resolution limit (shell) for maps and scores, for coarse exploratory runs.
    weighted: each run scores with shells weighted by how reliably its two halves' maps agree on
    their differences (reconstruction.difference_weights), for splitting a cluster in two.
    Returns the two best assignments and the sweep counts."""
    n = len(subset)
    og = merge_small_orientation_groups(orientation[subset], k, rng)
    sweeps = _PairSweeps(
        maps_builder,
        subset,
        k,
        og=og,
        rng=rng,
        use_umat=use_umat,
        rmax_cap=rmax_cap,
        weighted=weighted,
    )
    runs = [
        RunState(np.asarray(init, np.int64).copy(), list(sch), frozen, search)
        for init, sch in zip(inits, schedules)
    ]
    for r in runs:
        r.umat = np.eye(k)[r.labels] if use_umat else None
    it = 0
    while it < MAX_ITER and not all(r.done for r in runs):
        active = [r for r in runs if not r.done]
        for h in (1, 0):  # re-assign half h from maps of the other half
            sweeps.half_step(runs, active, h)
        for r in active:
            _end_sweep(r, n)
        if log:
            log(
                f"{tag}MGSK-means iteration {it}: change % "
                + ", ".join(f"{r.changes[-1]:.1f}" for r in runs if r.changes)
                + "; min size "
                + ", ".join(str(r.min_size) for r in runs)
            )
        it += 1
    return [r.best_labels for r in runs], [r.n_iter for r in runs]


class _PairSweeps:
    """The half-steps of mgsk_pair. The Fourier sums of the 2K maps of both runs are kept per
    half and updated by the label changes only (a full accumulation per half-step would
    dominate the cost); the resolution limit is the one of a group of n/K images of a half, or
    the caller's lower cap."""

    def __init__(self, maps_builder, subset, k, *, og, rng, use_umat, rmax_cap, weighted=False):
        n = len(subset)
        self.weighted = weighted
        self.subset, self.k, self.n, self.og, self.rng = subset, k, n, og, rng
        self.use_umat = use_umat
        self.halves = maps_builder.d.half[subset]
        self.rows_of = [np.nonzero(self.halves == h)[0] for h in (0, 1)]
        self.sums = [None, None]
        self.used = [np.zeros((n, 2 * k)), np.zeros((n, 2 * k))]
        self.half_maps = {}  # weighted: (half, run) -> that run's maps from the half's sums,
        # dropped when the run's members of that half change (_update_sums)
        self.group_half = [(n / k) * self.rows_of[h].size / n for h in (0, 1)]
        rmax = max(maps_builder.resolution_limit(g) for g in self.group_half)
        if rmax_cap is not None and rmax_cap < rmax:
            rmax = int(rmax_cap)
            maps_builder = maps_builder.at_limit(rmax)
        self.maps_builder, self.rmax = maps_builder, rmax

    def half_step(self, runs, active, h):
        """Re-assign half ``h`` of every active run from the maps of the other half."""
        rows = self.rows_of[h]
        if rows.size == 0:
            return
        src = 1 - h
        self._update_sums(runs, src)
        if self.weighted:
            self._weighted_step(runs, h)
            return
        k, mb = self.k, self.maps_builder
        cols = np.concatenate(
            [np.arange(j * k, (j + 1) * k) for j, r in enumerate(runs) if not r.done]
        )
        sums = self.sums[src]
        maps = mb.fourier_maps(sums[0][cols], sums[1][cols], self.group_half[src])
        scores = mb.scores(
            maps,
            self.subset,
            half=h,
            rmax=min(self.rmax, mb.resolution_limit(self.group_half[src])),
        )
        for j, r in enumerate(active):
            self._reassign(r, scores[:, j * k : (j + 1) * k], rows)

    def _weighted_step(self, runs, h):
        """half_step with each run's scores weighted per shell by the difference FSC of its
        maps from the two halves: where the groups do not differ, a shell adds only the maps'
        noise (bench/README.md, "Why states are missed")."""
        rows, src, mb = self.rows_of[h], 1 - h, self.maps_builder
        self._update_sums(runs, h)
        rmax = min(self.rmax, mb.resolution_limit(self.group_half[src]))
        for j, r in enumerate(runs):
            if r.done:
                continue
            maps = [self._half_maps(g, j) for g in (src, h)]
            weights = difference_weights(maps[0], maps[1], mb.mask)
            scores = mb.scores(maps[0], self.subset, half=h, rmax=rmax, shell_factors=weights)
            self._reassign(r, scores, rows)

    def _half_maps(self, g, j):
        """Run j's maps from the sums of half g, made again only when its members there moved
        (a half step changes one half: the other half's maps are those of the step before)."""
        if (g, j) not in self.half_maps:
            cols = np.arange(j * self.k, (j + 1) * self.k)
            sums, size = self.sums[g], self.group_half[g]
            self.half_maps[g, j] = self.maps_builder.maps_from(sums[0][cols], sums[1][cols], size)
        return self.half_maps[g, j]

    def _update_sums(self, runs, src):
        """The sums of half ``src`` brought to the runs' current memberships."""
        n, k = self.n, self.k
        memb = np.zeros((n, 2 * k))
        for j, r in enumerate(runs):
            if self.use_umat:  # every image goes into every map with its fuzzy weight
                memb[:, j * k : (j + 1) * k] = r.umat
            else:
                memb[np.arange(n), j * k + r.labels] = 1.0
        memb[self.halves != src] = 0.0
        delta = memb - self.used[src]
        # a change inserts two entries (out of the old map, into the new): past half the
        # images moved, summing the members afresh is cheaper
        if self.sums[src] is None or np.count_nonzero(delta) > np.count_nonzero(memb):
            self.sums[src] = self.maps_builder.accumulate(self.subset, memb, rmax=self.rmax)
        elif np.any(delta):
            dd, dw = self.maps_builder.accumulate(self.subset, delta, rmax=self.rmax)
            self.sums[src][0].__iadd__(dd)
            self.sums[src][1].__iadd__(dw)
        self.used[src] = memb
        for j in range(len(runs)):
            if np.any(delta[:, j * k : (j + 1) * k]):
                self.half_maps.pop((src, j), None)

    def _reassign(self, r, run_scores, rows):
        """Run ``r``'s images ``rows`` to their preferred maps under its minimum size (a damped
        run makes a random half of the moves); ``r.wanted`` counts what the images wanted."""
        og, rng = self.og, self.rng
        # the groups' mean in the split check's runs only: in the depth search's box runs the
        # images' mean holds them off a drift that loses states (bench/README.md, "The groups'
        # mean, not the images'": 0 of 4 states in a-k4-uneq-snr02-pose2)
        labels = r.labels[rows] if self.weighted else None
        s = centre_per_orientation(run_scores, og[rows], labels)
        new = constrained_assignment(s, r.min_size * rows.size / self.n, rng, og[rows])
        if r.search:
            new = cap_oversized(new, self.k, rng)
        old = r.labels[rows]
        moved = np.nonzero(new != old)[0]
        r.wanted += moved.size
        if r.damped:  # break a cycle: only a random half of the moves is made
            stay = moved[rng.random(moved.size) < 0.5]
            new[stay] = old[stay]
        if self.use_umat:
            frac = float(np.mean(new != old))
            r.umat[rows] = mix_memberships(
                rank_memberships(s), new, frac, r.min_size / max(r.schedule[0], 1)
            )
        r.labels[rows] = new


def _end_sweep(r, n):
    """After a sweep: record run ``r``'s change, keep its best labels, step its minimum size
    down (unfrozen runs) and decide whether it is done."""
    # the change is what the images WANTED: damping halves the moves, not the measure,
    # so a damped sweep cannot pass for a settled one (stop rule, best labels)
    change = 100.0 * r.wanted / max(n, 1)
    r.wanted = 0
    r.changes.append(change)
    r.n_iter += 1
    if change < r.best_change or r.best_labels is None:
        r.best_change, r.best_labels = change, r.labels.copy()
    # unfrozen: walk the minimum size down once the assignment settles (< 50 % change)
    at_last = r.step >= len(r.schedule) - 1
    if not r.frozen and not at_last and change < 50.0 and not r.stepped_last:
        r.step += 1
        r.stepped_last = True
    else:
        r.stepped_last = False
    at_last = r.step >= len(r.schedule) - 1
    if change < STOP_CHANGE and (r.frozen or at_last):
        r.done = True
    elif _plateau(r):
        if r.damped:
            r.done = True  # a second plateau, damped: a genuine optimum
        else:
            # a first plateau is often a cycle (the same images flip every sweep under
            # alternating halves); damped moves let the run leave it
            r.damped, r.damped_at = True, r.n_iter
