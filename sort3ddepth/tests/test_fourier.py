"""Fourier kernels, CTF and geometry: accuracy against direct computations and adjointness."""

import numpy as np
import pytest
from scipy import ndimage

from sort3ddepth.engine import ctf as C
from sort3ddepth.engine import fourier as F
from sort3ddepth.engine import geometry as G
from sort3ddepth.engine.particles import CTFParams
from sort3ddepth.engine.simulate import load_demo_map


@pytest.fixture(scope="module")
def ribosome():
    return load_demo_map(64)


def _random_ctf(rng, n):
    """CTF parameters of n images: random astigmatic defocus (0.8-2 um) and angle, 300 kV."""
    return CTFParams(
        rng.uniform(8000, 20000, n),
        rng.uniform(8000, 20000, n),
        rng.uniform(0, 180, n),
        np.full(n, 300.0),
        np.full(n, 2.7),
        np.full(n, 0.1),
        np.zeros(n),
    )


def test_euler_matches_relion_documented_formula():
    """RELION's Euler_angles2matrix (ZYZ, documented in Sorzano et al. 2004, 'Conventions')."""
    rng = np.random.default_rng(3)
    for rot, tilt, psi in rng.uniform(-180, 180, (20, 3)):
        a, b, g = np.deg2rad([rot, tilt, psi])
        ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
        expected = np.array(
            [
                [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                [sb * ca, sb * sa, cb],
            ]
        )
        np.testing.assert_allclose(G.euler_to_matrix(rot, tilt, psi), expected, atol=1e-12)
    # a side view at rot=0, tilt=90 looks along +x
    np.testing.assert_allclose(
        G.projection_directions(G.euler_to_matrix(0, 90, 0)), [1, 0, 0], atol=1e-12
    )


def test_euler_round_trip():
    rng = np.random.default_rng(0)
    mats = G.random_rotations(500, rng)
    back = G.euler_to_matrix(*G.matrix_to_euler(mats).T)
    np.testing.assert_allclose(back, mats, atol=1e-9)
    np.testing.assert_allclose(
        mats @ mats.transpose(0, 2, 1), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12
    )


def _real_space_projection(vol, rot):
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    acc = np.zeros((n, n))
    for z in c:
        q = rot.T @ np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, z)])
        acc += ndimage.map_coordinates(
            vol, np.stack([q[2], q[1], q[0]]) + n // 2, order=3, mode="constant"
        ).reshape(n, n)
    return acc


def test_projection_matches_real_space_projection(ribosome):
    rots = G.random_rotations(4, np.random.default_rng(1))
    proj = F.fourier_to_images(F.project(F.volumes_to_fourier(ribosome, pad=2), rots)[:, 0], 64)
    for i in range(4):
        direct = _real_space_projection(ribosome, rots[i])
        assert np.corrcoef(direct.ravel(), proj[i].ravel())[0, 1] >= 0.99
        assert abs((proj[i] * direct).sum() / (direct**2).sum() - 1) < 0.02


def test_backprojection_is_adjoint_of_projection():
    n, rng = 32, np.random.default_rng(2)
    rots = G.random_rotations(40, rng)
    # Hermitian-consistent data: transforms of real arrays
    vol = np.fft.fftshift(np.fft.rfftn(rng.standard_normal((2 * n,) * 3)), axes=(0, 1))
    fv = F.FourierVolumes(np.ascontiguousarray(vol[..., None].astype(np.complex64)), n, 2.0)
    x = np.fft.rfft2(rng.standard_normal((40, n, n))).astype(np.complex64)
    coefs = C.ctf_coefficients(CTFParams.constant(40, defocus=12000.0), n, 3.0)
    proj = F.project(fv, rots)[:, 0] * C.ctf_images(CTFParams.constant(40, defocus=12000.0), n, 3.0)
    wimg = np.r_[1.0, np.full(n // 2 - 1, 2.0), 1.0]
    lhs = np.sum(wimg * (np.conj(x) * proj).real)
    data, _ = F.backproject(x, rots, np.ones((40, 1)), coefs, pad=2)
    wvol = np.r_[1.0, np.full(n - 1, 2.0), 1.0]
    rhs = np.sum(wvol * (np.conj(data[0]) * fv.data[..., 0]).real)
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


def test_backprojection_thread_split_and_memberships_agree():
    n, rng = 24, np.random.default_rng(5)
    rots = G.random_rotations(30, rng)
    x = np.fft.rfft2(rng.standard_normal((30, n, n))).astype(np.complex64)
    lab = rng.integers(0, 3, 30)
    memb = np.eye(3)[lab]
    d1, w1 = F.backproject(x, rots, memb, pad=2, n_threads=1)
    d2, w2 = F.backproject(x, rots, memb, pad=2, n_threads=3)
    np.testing.assert_allclose(d1, d2, rtol=1e-10, atol=1e-9)
    # map k of a hard assignment = back-projection of the images labelled k alone
    dk, wk = F.backproject(x[lab == 1], rots[lab == 1], np.ones(((lab == 1).sum(), 1)), pad=2)
    np.testing.assert_allclose(d1[1], dk[0], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(w1[1], wk[0], rtol=1e-10, atol=1e-9)
    # image_index: entries can reuse images (smears) with their own rotation and weight
    d3, _ = F.backproject(
        x,
        np.concatenate([rots, rots]),
        np.concatenate([memb, memb]) * 0.5,
        pad=2,
        image_index=np.r_[np.arange(30), np.arange(30)],
    )
    np.testing.assert_allclose(d3, d1, rtol=1e-10, atol=1e-9)


def test_fused_distance_equals_explicit_projection(ribosome):
    rng = np.random.default_rng(4)
    n, box = 25, 64
    maps = np.stack([ribosome, np.roll(ribosome, 3, axis=0)])
    fv = F.volumes_to_fourier(maps, pad=2)
    rots = G.random_rotations(n, rng)
    ctf = _random_ctf(rng, n)
    imgs = np.fft.rfft2(rng.standard_normal((n, box, box))).astype(np.complex64)
    weights = rng.uniform(0.5, 2.0, (3, box // 2 + 2))
    groups = rng.integers(0, 3, n)
    rmin, rmax = 2.0, 20.0
    d = F.squared_distances(
        fv,
        rots,
        imgs,
        ctf_coefs=C.ctf_coefficients(ctf, box, 4.0),
        rmin=rmin,
        rmax=rmax,
        shell_weights=weights,
        groups=groups,
    )
    proj = F.project(fv, rots) * C.ctf_images(ctf, box, 4.0)[:, None]
    ky, kx = F.frequency_grid(box)
    r = np.sqrt(kx**2 + ky**2)
    band = (r >= rmin) & (r <= rmax)
    herm = np.where((kx > 0) & (kx < box // 2), 2.0, 1.0)
    for i in range(n):
        w = band * herm * weights[groups[i], np.minimum(np.rint(r).astype(int), box // 2 + 1)]
        for k in range(2):
            expected = np.sum(w * np.abs(imgs[i] - proj[i, k]) ** 2)
            assert d[i, k] == pytest.approx(expected, rel=1e-4)


def test_poses_in_one_call_equal_one_call_per_pose(ribosome):
    """Each image at J poses in one call (the pose neighbours' scores) gives, bit for bit, what
    J calls give, also for a selection of the images."""
    rng = np.random.default_rng(5)
    n, box = 30, 64
    fv = F.volumes_to_fourier(np.stack([ribosome, np.roll(ribosome, 2, axis=1)]), pad=2)
    rots = G.random_rotations(n, rng)
    posed = np.stack([rots] + [rots @ t for t in G.pose_neighbours(2.0)])
    imgs = np.fft.rfft2(rng.standard_normal((n, box, box))).astype(np.complex64)
    kw = dict(ctf_coefs=C.ctf_coefficients(_random_ctf(rng, n), box, 4.0), rmin=1.0, rmax=25.0)
    select = rng.permutation(n)[:17]
    for sel in (None, select):
        cross, pp, xx = F.distance_terms(fv, posed, imgs, select=sel, **kw)
        assert cross.shape == pp.shape == (7, n if sel is None else 17, 2)
        for j in range(7):
            one = F.distance_terms(fv, posed[j], imgs, select=sel, **kw)
            np.testing.assert_array_equal(cross[j], one[0])
            np.testing.assert_array_equal(pp[j], one[1])
            np.testing.assert_array_equal(xx, one[2])
        assert not np.array_equal(cross[0], cross[1])


def test_ctf_values_and_astigmatism():
    box, apix = 128, 1.5
    q = 0.07
    one = CTFParams(
        np.array([20000.0]),
        np.array([14000.0]),
        np.array([30.0]),
        np.array([300.0]),
        np.array([0.0]),
        np.array([q]),
        np.array([0.0]),
    )
    img = C.ctf_images(one, box, apix)[0]
    assert img[0, 0] == pytest.approx(q, rel=1e-5)  # CTF(0) = +Q (white particles)
    lam = C.electron_wavelength(300.0)
    assert lam == pytest.approx(0.019687, rel=1e-4)
    # with Cs = 0, along the astigmatism angle the defocus is dU: first zero where
    # pi*lam*dU*s^2 + atan(Q/sqrt(1-Q^2)) = pi
    s0 = np.sqrt((np.pi - np.arctan(q / np.sqrt(1 - q * q))) / (np.pi * lam * 20000.0))
    kzero = s0 * box * apix
    ang = np.deg2rad(30.0)
    along = C.ctf_value.py_func(
        C.ctf_coefficients(one, box, apix)[0], kzero * np.cos(ang), kzero * np.sin(ang)
    )
    across = C.ctf_value.py_func(
        C.ctf_coefficients(one, box, apix)[0], -kzero * np.sin(ang), kzero * np.cos(ang)
    )
    assert abs(along) < 1e-6 and abs(across) > 0.2


def test_shift_moves_content_by_plus_origin():
    box = 32
    img = np.zeros((1, box, box), np.float32)
    img[0, 16 - 2, 16 + 3] = 1.0  # particle at (x, y) = (+3, -2) from the centre
    # RELION origin that re-centres it is (-3, +2): the content moves by +origin
    out = F.fourier_to_images(
        F.shift_images(F.images_to_fourier(img), np.array([[-3.0, 2.0]])), box
    )
    assert np.unravel_index(np.argmax(out[0]), out[0].shape) == (16, 16)


def test_shifted_images_have_the_same_bits_whatever_else_is_shifted_with_them():
    """shift_images computes each distinct shift's phasors once: an image must get the same
    bits alone, in a batch that shares its shift, and in one where every shift differs (signed
    zeros kept apart)."""
    rng = np.random.default_rng(3)
    images = rng.normal(size=(300, 36, 19)) + 1j * rng.normal(size=(300, 36, 19))
    images = images.astype(np.complex64)
    shifts = rng.choice([0.0, -0.0, 0.25, -0.5, 1.0 / 3.0], size=(300, 2))
    shifts[::3] = rng.normal(size=(100, 2))  # every third image a shift of its own
    batch = F.shift_images(images, shifts)
    for i in (0, 1, 2, 5, 299):
        alone = F.shift_images(images[i : i + 1], shifts[i : i + 1])
        assert np.array_equal(alone.view(np.uint32), batch[i : i + 1].view(np.uint32))
    shared = F.shift_images(images, np.repeat(shifts[1:2], 300, axis=0))
    assert np.array_equal(shared[1].view(np.uint32), batch[1].view(np.uint32))
    assert len({tuple(r) for r in shifts[1::3].tolist()}) < 100  # shifts were shared
    kx_phase = np.exp(-2j * np.pi / 36 * shifts[3, 0] * np.fft.rfftfreq(36, 1 / 36))
    assert np.allclose(batch[3, 0], images[3, 0] * kx_phase, atol=1e-5)


def test_fourier_crop_keeps_amplitudes(ribosome):
    small = F.resize_volume(ribosome, 32)
    assert small.shape == (32,) * 3
    assert small.sum() == pytest.approx(ribosome.sum() / 8, rel=1e-6)
    img = ribosome.sum(axis=0)[None].astype(np.float32)
    cropped = F.fourier_to_images(F.crop_fourier_images(F.images_to_fourier(img), 32), 32)
    assert cropped.sum() == pytest.approx(img.sum() / 4, rel=1e-4)


class ReplayRanks:
    """`size` MPI ranks emulated in one process, one after another: the j-th collective call of
    a rank is answered with the reduction over all ranks of the j-th call's inputs recorded in
    the previous pass (its own input on the first pass). Running every rank a few passes gives
    each rank exactly what it would get under mpirun, for code whose collectives are the same on
    all ranks (the scales of a back-projection, then its accumulators)."""

    def __init__(self, size):
        self.size = size
        self.seen = None  # per rank: [(kind, value), ...] of the last pass

    def run(self, fn, passes=3):
        for _ in range(passes):
            record = []
            results = []
            for r in range(self.size):
                calls = []
                record.append(calls)
                results.append(fn(r, _RankComm(self, r, calls)))
            self.seen = record
        return results

    def reduced(self, j, kind, own):
        if self.seen is None:
            return own
        vals = [calls[j][1] for calls in self.seen]
        if kind == "max":
            return max(vals)
        total = vals[0].copy()
        for v in vals[1:]:
            total += v  # int64 accumulators: exact, as MPI_SUM on integers
        return total


class _RankComm:
    def __init__(self, replay, rank, calls):
        self.replay, self.rank, self.size, self.calls = replay, rank, replay.size, calls

    def allreduce_max(self, value):
        self.calls.append(("max", value))
        return self.replay.reduced(len(self.calls) - 1, "max", value)

    def allreduce_sum(self, array):
        self.calls.append(("sum", array.copy()))
        array[...] = self.replay.reduced(len(self.calls) - 1, "sum", array)
        return array


@pytest.mark.parametrize("n_parts", [2, 3])
def test_backprojection_split_into_ranks_is_bit_identical(n_parts):
    """Maps summed over a random split of the entries into ranks (each rank's sums, then the
    Allreduce, as backproject(..., comm) does) have the same bits as the one-rank sums, with
    CTF, shell weights, fuzzy weights and a cropped grid."""
    n, box, rng = 90, 24, np.random.default_rng(7 + n_parts)
    rots = G.random_rotations(n, rng)
    x = (
        np.fft.rfft2(rng.standard_normal((n, box, box)))
        * 10.0 ** rng.uniform(-2, 2, n)[:, None, None]
    ).astype(np.complex64)
    ctf = _random_ctf(rng, n)
    coefs = C.ctf_coefficients(ctf, box, 4.0)
    memb = rng.uniform(0.0, 1.0, (n, 3)) * (rng.random((n, 3)) < 0.7)
    sw = rng.uniform(0.5, 2.0, (2, box // 2 + 2))
    groups = rng.integers(0, 2, n)
    one = F.backproject(x, rots, memb, coefs, pad=2, shell_weights=sw, groups=groups, rmax=10)
    bounds = np.r_[0, np.sort(rng.choice(np.arange(1, n), n_parts - 1, replace=False)), n]

    def rank(r, comm=None):
        sl = slice(bounds[r], bounds[r + 1])
        return F.backproject(
            x[sl],
            rots[sl],
            memb[sl],
            coefs[sl],
            pad=2,
            shell_weights=sw,
            groups=groups[sl],
            rmax=10,
            comm=comm,
        )

    for data, w in ReplayRanks(n_parts).run(rank):
        assert data.tobytes() == one[0].tobytes()
        assert w.tobytes() == one[1].tobytes()
    # the sums are also exact against the float64 sums they stand for
    ref_d = np.zeros_like(one[0])
    for r in range(n_parts):
        ref_d += rank(r)[0]  # without comm: this rank's entries alone
    np.testing.assert_allclose(one[0], ref_d, rtol=0, atol=1e-9 * np.abs(one[0]).max())


def test_backprojection_on_a_rank_without_entries():
    """A rank whose share of a subset is empty takes part in the sums and gets the same bits
    (seen: a search-mode cut of a small pool on 2 ranks)."""
    n, box, rng = 20, 16, np.random.default_rng(3)
    rots = G.random_rotations(n, rng)
    x = np.fft.rfft2(rng.standard_normal((n, box, box))).astype(np.complex64)
    memb = np.eye(2)[rng.integers(0, 2, n)]
    one = F.backproject(x, rots, memb, pad=2)

    def rank(r, comm):
        sl = slice(0, 0) if r == 0 else slice(0, n)
        return F.backproject(x[sl], rots[sl], memb[sl], pad=2, comm=comm)

    for data, w in ReplayRanks(2).run(rank):
        assert data.tobytes() == one[0].tobytes()
        assert w.tobytes() == one[1].tobytes()
