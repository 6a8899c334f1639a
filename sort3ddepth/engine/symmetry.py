"""Point-group symmetry for 3D sorting: symmetry operators, asymmetric unit, orientation groups.

Conventions
-----------
Operators are (3, 3) rotation matrices acting on map coordinates as column vectors
(x' = R @ x); a map with point group G satisfies f(R x) = f(x) for all R in G. Because G is
closed under inversion, the set of symmetry images {R d} of a projection direction d (the third
row of a RELION matrix, see geometry.py) does not depend on whether one applies R or R.T.

Orientation of each group (matching RELION where RELION has a single default):

* ``c<n>``: n-fold axis along z (as RELION).
* ``d<n>``: c<n> plus a 2-fold axis along x (as RELION).
* ``t``: RELION's setting: a 3-fold axis along z and a 2-fold axis along (0, sqrt(2/3), sqrt(1/3))
  (checked against relion_reconstruct --sym T).
  NOTE: RELION's ``T`` instead puts a 3-fold axis on z; maps refined in RELION with T need
  rotating before their asymmetric units agree with this one.
* ``o``: 4-fold axes along x, y and z, 3-folds along the body diagonals (as RELION).
* ``i`` (alias ``i2``): RELION's default icosahedral setting I2 (Crowther 222): 2-fold axes along
  x, y and z, 5-fold axes along (+-1, 0, +-tau), (0, +-tau, +-1), (+-tau, +-1, 0) (tau the golden
  ratio), so the 5-folds nearest +z lie in the xz plane at (+-0.5257, 0, 0.8507), and the 3-fold
  nearest +z is (0, 0.3568, 0.9342) in the yz plane. (I1 would be I2 turned 90 degrees about z.)

Asymmetric unit (AU) of projection directions
---------------------------------------------
The AU is the Voronoi cell of a fixed generic reference direction r0 within its orbit {R_g^T r0}:
d is in the AU iff among all images R_g d the identity image is the one closest to r0. The cells
of the orbit tile the sphere with ``order`` congruent pieces, so exactly one image of a generic
direction is in the AU. r0 avoids every symmetry axis and every plane perpendicular to a 2-fold
axis, so with ``mirror=True`` (d and -d are the same view: their projections are mirror images)
the orbit under G x {+1, -1} has 2 * order distinct points and the same Voronoi rule halves the
AU consistently: d is folded to s * R_g d with (g, s) maximising s * r0 . R_g d.
"""

import re

import numpy as np

_TAU = (1.0 + np.sqrt(5.0)) / 2.0
_ACCEPTED = "use c<n>, d<n> (n >= 1), t, o or i"
_CHUNK = 1 << 16  # rows per block: bounds the (n, order) temporaries to a few MiB


def axis_angle_matrix(axis, angle):
    """Active rotation by ``angle`` radians about ``axis`` (Rodrigues), acting on column vectors."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _close_group(generators, order):
    """All products of the generators, identity first (breadth-first, so the order is fixed)."""
    elems = [np.eye(3)]
    keys = {tuple(np.round(np.eye(3), 6).ravel())}
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                m = g @ a
                key = tuple(np.round(m, 6).ravel() + 0.0)  # + 0.0 turns -0.0 into 0.0
                if key not in keys:
                    keys.add(key)
                    elems.append(m)
                    new.append(m)
        if len(elems) > order:
            break
        frontier = new
    if len(elems) != order:
        raise RuntimeError(f"generators closed into {len(elems)} elements, expected {order}")
    return np.stack(elems)


def parse_symmetry(symbol):
    """PointGroup from a RELION-style symbol: c<n>, d<n> (n >= 1), t, o, i (or i2), any case."""
    return PointGroup(symbol)


def _normalise_symbol(symbol):
    """Canonical lower-case symbol ('C04 ' -> 'c4', 'I2' -> 'i'); ValueError naming a bad one."""
    s = symbol.strip().lower() if isinstance(symbol, str) else None
    m = re.fullmatch(r"([cd])([0-9]+)", s) if s is not None else None
    if m and int(m.group(2)) >= 1:
        return f"{m.group(1)}{int(m.group(2))}"
    if s in ("t", "o", "i", "i2"):
        return "i" if s == "i2" else s
    raise ValueError(f"unknown symmetry {symbol!r}: {_ACCEPTED}")


def _group_matrices(symbol):
    kind = symbol[0]
    if kind in "cd":
        n = int(symbol[1:])
        cn = np.stack([axis_angle_matrix((0, 0, 1), 2 * np.pi * k / n) for k in range(n)])
        if kind == "c":
            return cn
        flip_x = np.diag([1.0, -1.0, -1.0])  # 2-fold about x
        return np.concatenate([cn, cn @ flip_x])
    if kind == "t":
        # RELION's orientation (checked against relion_reconstruct --sym T): a 3-fold on z and a
        # 2-fold in the y-z plane at the tetrahedral angle from z, (0, sqrt(2/3), sqrt(1/3))
        gens = [
            axis_angle_matrix((0, 0, 1), 2 * np.pi / 3),
            axis_angle_matrix((0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0)), np.pi),
        ]
        return _close_group(gens, 12)
    if kind == "o":
        gens = [
            axis_angle_matrix((0, 0, 1), np.pi / 2),
            axis_angle_matrix((1, 1, 1), 2 * np.pi / 3),
        ]
        return _close_group(gens, 24)
    if kind == "i":
        gens = [
            np.diag([-1.0, -1.0, 1.0]),
            axis_angle_matrix((1.0, 0.0, _TAU), 2 * np.pi / 5),
            axis_angle_matrix((0.0, 1.0, _TAU**2), 2 * np.pi / 3),
        ]
        return _close_group(gens, 60)
    raise AssertionError(symbol)  # unreachable: symbols are normalised first


def _reference_direction(symbol):
    """Generic r0: off every axis and not normal to any 2-fold (else -r0 would be an image)."""
    if symbol[0] in "cd":
        n = int(symbol[1:])
        # phi - k*pi/n is never +-pi/2, so no 2-fold axis (x rotated by k*pi/n) is normal to r0
        theta, phi = 0.6, 0.37 * np.pi / n
    else:
        theta, phi = 0.3, 0.23
    return np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])


def fibonacci_sphere(n):
    """n quasi-uniform unit vectors (golden-angle spiral): a deterministic, even sampling."""
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _as_directions(directions):
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != 3:
        raise ValueError(f"directions must have shape (n, 3), got {d.shape}")
    return d


class PointGroup:
    """A rotational point group with its asymmetric unit of projection directions."""

    def __init__(self, symbol):
        self.symbol = _normalise_symbol(symbol)
        self.matrices = _group_matrices(self.symbol)
        self.order = int(self.matrices.shape[0])
        self.reference_direction = _reference_direction(self.symbol)
        # Row g is R_g^T r0, so that r0 . (R_g d) = orbit[g] . d for every direction d.
        self._orbit = self.reference_direction @ self.matrices

    def __repr__(self):
        return f"PointGroup({self.symbol!r}, order={self.order})"

    def _best_operator(self, d, mirror):
        """Index g (and sign s) maximising s * r0 . R_g d, i.e. the cell holding d."""
        dots = d @ self._orbit.T
        if mirror:
            g = np.argmax(np.abs(dots), axis=1)
            s = np.where(dots[np.arange(len(d)), g] < 0, -1.0, 1.0)
        else:
            g = np.argmax(dots, axis=1)
            s = np.ones(len(d))
        return g, s

    def in_asymmetric_unit(self, directions, mirror=False, tol=1e-12):
        """(n,) bool: is each direction in the AU (the identity cell; mirror halves it)?"""
        d = _as_directions(directions)
        out = np.empty(len(d), dtype=bool)
        for a in range(0, len(d), _CHUNK):
            dots = d[a : a + _CHUNK] @ self._orbit.T
            own = dots[:, 0]
            if mirror:
                dots = np.abs(dots)
            out[a : a + _CHUNK] = own >= dots.max(axis=1) - tol
        return out

    def to_asymmetric_unit(self, directions, mirror=False):
        """(AU directions (n, 3), operator index (n,)): AU[i] = s * matrices[idx[i]] @ d[i].

        The sign s is +1 unless ``mirror`` is set (then -d counts as d and s may be -1).
        """
        d = _as_directions(directions)
        au = np.empty_like(d)
        idx = np.empty(len(d), dtype=np.int64)
        for a in range(0, len(d), _CHUNK):
            blk = d[a : a + _CHUNK]
            g, s = self._best_operator(blk, mirror)
            au[a : a + _CHUNK] = s[:, None] * np.einsum("nij,nj->ni", self.matrices[g], blk)
            idx[a : a + _CHUNK] = g
        return au, idx

    def orientation_group_centres(
        self, n_groups, mirror=True, *, n_samples=None, seed=0, max_iter=50
    ):
        """(n_groups, 3) centres splitting the AU into cells of about equal solid angle.

        Spherical k-means (k-means++ start, Lloyd iterations, fixed seed so reruns agree) over a
        Fibonacci sphere folded into the AU; folding is measure-preserving, so the folded points
        sample the AU uniformly and equal-count clusters are equal-area cells.
        """
        n_groups = int(n_groups)
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        if n_samples is None:
            n_samples = int(np.clip(200 * n_groups, 20000, 100000))
        pts, _ = self.to_asymmetric_unit(fibonacci_sphere(n_samples), mirror=mirror)
        if n_groups >= len(pts):
            raise ValueError(f"n_groups={n_groups} is too many for {len(pts)} samples")
        rng = np.random.default_rng(seed)
        centres = _kmeans_pp_init(pts, n_groups, rng)
        labels = None
        for _ in range(max_iter):
            new = _nearest(pts, centres)
            if labels is not None and np.count_nonzero(new != labels) <= 1e-3 * len(pts):
                break  # nearly converged; the area balancing below does the fine tuning
            labels = new
            sums = np.zeros_like(centres)
            np.add.at(sums, labels, pts)
            counts = np.bincount(labels, minlength=n_groups)
            empty = counts == 0
            if empty.any():  # re-seed empty cells at the samples worst served by their centre
                worst = np.argsort(np.einsum("ij,ij->i", pts, centres[labels]))[: empty.sum()]
                sums[empty] = pts[worst]
            centres = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        if n_groups > 1:
            au_area = 4.0 * np.pi / (self.order * (2 if mirror else 1))
            centres = _balance_areas(pts, centres, au_area)
        return centres

    def assign_orientation_groups(self, directions, centres, mirror=True):
        """(n,) int label of the nearest centre after folding each direction into the AU."""
        d = _as_directions(directions)
        centres = np.asarray(centres, dtype=np.float64)
        labels = np.empty(len(d), dtype=np.int64)
        for a in range(0, len(d), _CHUNK):
            au, _ = self.to_asymmetric_unit(d[a : a + _CHUNK], mirror=mirror)
            labels[a : a + _CHUNK] = _nearest(au, centres)
        return labels


def _nearest(points, centres):
    """Index of the closest centre on the sphere (largest dot product), in blocks."""
    out = np.empty(len(points), dtype=np.int64)
    for a in range(0, len(points), _CHUNK):
        out[a : a + _CHUNK] = np.argmax(points[a : a + _CHUNK] @ centres.T, axis=1)
    return out


def _top2(points, centres):
    """Nearest and second-nearest centre and the dot-product margin between them."""
    dots = points @ centres.T
    rows = np.arange(len(points))
    j = np.argmax(dots, axis=1)
    best = dots[rows, j]
    dots[rows, j] = -np.inf
    k = np.argmax(dots, axis=1)
    return j, k, best - dots[rows, k]


def _balance_areas(points, centres, au_area, *, n_iter=40, step=0.7):
    """Nudge centres so the Voronoi cells (still plain nearest-centre) get equal sample counts.

    Lloyd cells in thin or pointed asymmetric units (e.g. dn wedges) can differ by 2x. Moving
    centres by tangent steps u changes the area of cell j to first order by
    sum_k V_jk . (u_j - u_k), where V_jk integrates the boundary points p of cells j, k divided by
    the margin gradient; V_jk is estimated from the samples in a thin strip along each boundary.
    Each iteration solves that linear system (least squares) for the equal-area target, with a
    damped, length-limited step; the best configuration seen is kept.
    """
    n, k = len(points), len(centres)
    area = 1.0 / n  # areas in units of the AU area: each sample stands for 1 / n
    target = 1.0 / k
    r = np.sqrt(target * au_area / np.pi)  # rough cell radius in radians
    eps = 0.5 * r * r  # margin width of the boundary strips (~ r / 4 in distance)
    best, best_ratio = centres, np.inf
    for _ in range(n_iter):
        j, kk, margin = _top2(points, centres)
        counts = np.bincount(j, minlength=k)
        ratio = counts.max() / max(counts.min(), 1) if counts.min() > 0 else np.inf
        if ratio < best_ratio:
            best, best_ratio = centres.copy(), ratio
        if ratio < 1.05:
            break
        strip = margin < eps
        pj, pk, pp = j[strip], kk[strip], points[strip]
        # V for the ordered pair (j, k): both sides of the boundary, hence the 1/2.
        w = 0.5 * area / eps
        # Tangent basis (2 vectors) at every centre, so u_j = basis_j @ t_j keeps |c_j| = 1.
        a = np.where(np.abs(centres[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
        b1 = np.cross(centres, a)
        b1 /= np.linalg.norm(b1, axis=1, keepdims=True)
        b2 = np.cross(centres, b1)
        basis = np.stack([b1, b2], axis=2)  # (k, 3, 2)
        jac = np.zeros((k, k, 2))
        # A point p near the (pj, pk) boundary adds w p.(u_pj - u_pk) to dA_pj, minus that to dA_pk.
        gj = w * np.einsum("ni,nid->nd", pp, basis[pj])
        gk = w * np.einsum("ni,nid->nd", pp, basis[pk])
        np.add.at(jac, (pj, pj), gj)
        np.add.at(jac, (pj, pk), -gk)
        np.add.at(jac, (pk, pk), gk)
        np.add.at(jac, (pk, pj), -gj)
        want = target - counts * area
        t = np.linalg.lstsq(jac.reshape(k, 2 * k), want, rcond=1e-6)[0].reshape(k, 2)
        u = np.einsum("kid,kd->ki", basis, t) * step
        norm = np.linalg.norm(u, axis=1, keepdims=True)
        u *= np.minimum(1.0, 0.25 * r / np.maximum(norm, 1e-300))
        centres = centres + u
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return best


def _kmeans_pp_init(points, k, rng):
    """k-means++ seeding with chord distance squared, 2 - 2 cos."""
    centres = np.empty((k, 3))
    centres[0] = points[rng.integers(len(points))]
    d2 = 2.0 - 2.0 * points @ centres[0]
    for j in range(1, k):
        p = np.maximum(d2, 0.0)
        total = p.sum()
        i = rng.choice(len(points), p=p / total) if total > 0 else rng.integers(len(points))
        centres[j] = points[i]
        d2 = np.minimum(d2, 2.0 - 2.0 * points @ centres[j])
    return centres


def effective_orientation_groups(requested, order):
    """Groups per AU: max(4, requested // order), SPHIRE's rule (request is per sphere)."""
    requested, order = int(requested), int(order)
    if order < 1:
        raise ValueError(f"group order must be >= 1, got {order}")
    return max(4, requested // order)
