"""Fourier-space hot paths: projection, back-projection and the fused image-vs-map distance.

Layout conventions (one place, used everywhere):
* 2D images: numpy rfft2 of the image with its centre (N//2, N//2) moved to the origin
  (``rfft2(ifftshift(img))``); shape (N, N//2+1); row iy holds ky = iy (iy < N/2) or iy - N.
* 3D maps for gathering/scattering: zero-padded to Np = pad*N, same centring, rfftn, then the
  z and y axes fftshift-ed, so frequency (kx, ky, kz) in padded-grid units sits at
  [kz + Np//2, ky + Np//2, kx] with kx >= 0 (Hermitian half grid; the other half is the
  complex conjugate at -k). K maps are stacked on the LAST axis so a trilinear gather reads the
  K values of one voxel contiguously.
* A 2D frequency q = (kx, ky) of an image with rotation A lies in the map at A.T @ (kx, ky, 0)
  (geometry.py). Scaling by ``pad`` maps image frequencies to padded-grid units.
* Sums over the half plane count the columns 0 < kx < N/2 twice, so every "norm" or "distance"
  is the full-plane sum.

All kernels are numba ``parallel=True``; per-particle work goes to one thread, so sums for one
particle never depend on the number of threads. Back-projection sums in fixed point
(``FixedPointSums``): every term is rounded to an int64 multiple of one quantum, the same on all
ranks, before it is added, so the sums are exact and do not depend on the thread count, on the
order of the entries or on how the particles are split over MPI ranks.
"""

import numba
import numpy as np
import scipy.fft
from numba import njit, prange

from .ctf import ctf_value
from .parallel import fixed_point_scale


class FourierVolumes:
    """K maps prepared for gathering: padded, gridding-corrected, on the Hermitian half grid."""

    def __init__(self, data, box, pad):
        self.data = data  # (Np, Np, Np//2+1, K) complex64
        self.box = box
        self.pad = pad

    @property
    def n_maps(self):
        return self.data.shape[-1]


def _sinc2_profile(box, npad):
    x = np.arange(box) - box // 2
    return np.sinc(x / npad) ** 2


def padded_size(n, pad):
    """The padded box for an n-voxel box at padding factor `pad`: round(pad * n), made even so
    that the half-complex grid has a centre at npad // 2 (every reconstruction and projection
    agrees on this size)."""
    npad = int(round(pad * n))
    return npad + npad % 2


def volumes_to_fourier(vols, *, pad=2, gridding_correction=True, out=None, slots=None):
    """Prepare maps (N,N,N) or (K,N,N,N) for projection. Trilinear interpolation in Fourier space
    multiplies the projection by sinc^2(x/Np) per axis; dividing the map by it beforehand cancels
    that (``gridding_correction``). out, slots: write map i into out[..., slots[i]] of a given
    (Np, Np, Np//2+1, M) complex64 array (other slots untouched) instead of a new array."""
    vols = np.asarray(vols, dtype=np.float64)
    if vols.ndim == 3:
        vols = vols[None]
    k, n = vols.shape[0], vols.shape[-1]
    npad = padded_size(n, pad)
    if out is None:
        out = np.empty((npad, npad, npad // 2 + 1, k), np.complex64)
        slots = range(k)
    corr = None
    if gridding_correction:
        s = _sinc2_profile(n, npad)
        corr = s[:, None, None] * s[None, :, None] * s[None, None, :]
    # the map's centre goes to voxel 0 of the padded cube (what ifftshift of a centred, zero-
    # padded cube gives) by placing it at wrapped indices: no padded float64 copies, and a
    # single-precision FFT (the result is stored as complex64 anyway)
    wrap = (np.arange(n) - n // 2) % npad
    big = np.zeros((npad, npad, npad), np.float32)
    for i in range(k):
        big[np.ix_(wrap, wrap, wrap)] = vols[i] / corr if corr is not None else vols[i]
        f = scipy.fft.rfftn(big, workers=-1)
        _fftshift_yz_into(f, out[..., slots[i]])
    return FourierVolumes(out, n, npad / n)


def _fftshift_yz_into(f, out):
    """out = fftshift(f, axes=(0, 1)), written block by block (no temporary copy)."""
    h0, h1 = f.shape[0] // 2, f.shape[1] // 2
    a0, a1 = f.shape[0] - h0, f.shape[1] - h1
    out[:h0, :h1] = f[a0:, a1:]
    out[:h0, h1:] = f[a0:, :a1]
    out[h0:, :h1] = f[:a0, a1:]
    out[h0:, h1:] = f[:a0, :a1]


def images_to_fourier(images):
    """(n, N, N) real images -> (n, N, N//2+1) complex64 centred rfft2."""
    images = np.asarray(images, dtype=np.float32)
    return np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1))).astype(np.complex64)


def fourier_to_images(images_f, box):
    return np.fft.fftshift(np.fft.irfft2(images_f, s=(box, box)), axes=(-2, -1)).astype(np.float32)


def frequency_grid(box):
    """(ky, kx) integer frequency arrays of the rfft2 grid, shape (N, N//2+1) each."""
    ky = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1, dtype=np.float64)
    return np.meshgrid(ky, kx, indexing="ij")


def shift_images(images_f, shifts):
    """Re-centre particles: RELION's origin (x, y) in pixels is the shift that centres the particle,
    i.e. the content moves by +origin: F *= exp(-2 pi i k.origin / N)."""
    n_img, box = images_f.shape[0], images_f.shape[1]
    ky, kx = frequency_grid(box)
    out = np.empty_like(images_f)
    for start in range(0, n_img, 1024):
        s = np.ascontiguousarray(shifts[start : start + 1024], np.float64)
        # each distinct shift's phasors once, told apart by their bits (the pose checks move
        # every image alike: the complex exponentials were 5.3 of the origin profile's 12.4 s
        # at bench_sort's size); exp is elementwise, so an image gets the same bits either way
        bits, which = np.unique(s.view(np.int64), axis=0, return_inverse=True)
        s = bits.view(np.float64)
        phase = -2j * np.pi / box * (s[:, 0, None, None] * kx + s[:, 1, None, None] * ky)
        # the phasors times the images, IN the phasors' array: the same operation numpy does
        # for large batches (it reuses the temporary), now for any batch size, so an image
        # gets the same bits in any chunk (a fresh output took another SIMD path, with other
        # rounding, for batches under 256 KiB)
        ph = np.exp(phase).astype(np.complex64)[which.reshape(-1)]
        ph *= images_f[start : start + 1024]
        out[start : start + 1024] = ph
    return out


def crop_fourier_images(images_f, new_box):
    """Fourier-crop (n, N, N//2+1) to (n, n', n'//2+1); real-space amplitudes are preserved
    (the pixel size grows by N/n')."""
    box = images_f.shape[1]
    if new_box == box:
        return images_f
    if new_box > box:
        raise ValueError(f"cannot crop {box} px images to a larger size {new_box}")
    h = new_box // 2
    rows = np.r_[0:h, box - h : box]
    out = images_f[:, rows, : h + 1] * np.float32((new_box / box) ** 2)
    return np.ascontiguousarray(out)


def resize_volume(vol, new_box):
    """Fourier crop or pad a real map (N,N,N) to new_box^3, keeping real-space amplitudes."""
    vol = np.asarray(vol, np.float64)
    n = vol.shape[0]
    if n == new_box:
        return vol.copy()
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    out = np.zeros((new_box,) * 3, np.complex128)
    m = min(n, new_box)
    so, sn = n // 2 - m // 2, new_box // 2 - m // 2
    out[sn : sn + m, sn : sn + m, sn : sn + m] = f[so : so + m, so : so + m, so : so + m]
    res = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real
    return res * (new_box / n) ** 3


# ----------------------------------------------------------------------------------------------
# numba kernels
# ----------------------------------------------------------------------------------------------


@njit(inline="always", fastmath=True)
def _gather(vol, px, py, pz, vals):
    """Trilinear interpolation of the K maps at padded-grid frequency (px, py, pz) into vals."""
    nz, ny, nxh = vol.shape[0], vol.shape[1], vol.shape[2]
    conj = False
    if px < 0.0:
        px, py, pz, conj = -px, -py, -pz, True
    c = ny // 2
    y = py + c
    z = pz + c
    x0, y0, z0 = int(np.floor(px)), int(np.floor(y)), int(np.floor(z))
    for k in range(vals.shape[0]):
        vals[k] = 0.0
    if x0 + 1 >= nxh or y0 < 0 or y0 + 1 >= ny or z0 < 0 or z0 + 1 >= nz:
        return
    w = _trilinear_weights(px - x0, y - y0, z - z0)
    for k in range(vals.shape[0]):
        v = _trilinear_sum(vol, z0, y0, x0, k, w)
        vals[k] = np.conj(v) if conj else v


@njit(inline="always", fastmath=True)
def _trilinear_weights(fx, fy, fz):
    """The 8 corner weights of a trilinear interpolation at fractions (fx, fy, fz) of its grid
    cell, in the corner order of _trilinear_sum."""
    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
    return (
        gz * gy * gx,
        gz * gy * fx,
        gz * fy * gx,
        gz * fy * fx,
        fz * gy * gx,
        fz * gy * fx,
        fz * fy * gx,
        fz * fy * fx,
    )


@njit(inline="always", fastmath=True)
def _trilinear_sum(vol, z0, y0, x0, k, w):
    """Map k of vol interpolated in the cell at corner (z0, y0, x0) with the weights w of
    _trilinear_weights."""
    return (
        w[0] * vol[z0, y0, x0, k]
        + w[1] * vol[z0, y0, x0 + 1, k]
        + w[2] * vol[z0, y0 + 1, x0, k]
        + w[3] * vol[z0, y0 + 1, x0 + 1, k]
        + w[4] * vol[z0 + 1, y0, x0, k]
        + w[5] * vol[z0 + 1, y0, x0 + 1, k]
        + w[6] * vol[z0 + 1, y0 + 1, x0, k]
        + w[7] * vol[z0 + 1, y0 + 1, x0 + 1, k]
    )


@njit(parallel=True, fastmath=True, cache=True)
def _project_kernel(vol, rots, box, pad, rmax2, out):
    half = box // 2
    nk = vol.shape[3]
    for i in prange(rots.shape[0]):
        vals = np.empty(nk, np.complex128)
        r = rots[i]
        for iy in range(box):
            ky = float(iy if iy <= (box - 1) // 2 else iy - box)
            for ix in range(half + 1):
                kx = float(ix)
                if kx * kx + ky * ky > rmax2:
                    for k in range(nk):
                        out[i, k, iy, ix] = 0.0
                    continue
                px = (r[0, 0] * kx + r[1, 0] * ky) * pad
                py = (r[0, 1] * kx + r[1, 1] * ky) * pad
                pz = (r[0, 2] * kx + r[1, 2] * ky) * pad
                _gather(vol, px, py, pz, vals)
                for k in range(nk):
                    out[i, k, iy, ix] = vals[k]


def view_order(rotations):
    """An order of images by viewing direction (5-degree rings of the slice normal, folded onto
    one hemisphere, walked back and forth), so that the images one thread takes in turn gather
    from the same part of the maps and find it in cache. Measured: 8,560 images of 60 px
    against 8 maps at pad 2, 2 threads: 2.24 s in input order, 1.21 s in this order."""
    nrm = np.array(rotations[:, 2, :], np.float64)
    nrm[nrm[:, 2] < 0] *= -1.0
    ring = (np.degrees(np.arccos(np.clip(nrm[:, 2], -1.0, 1.0))) // 5).astype(np.int64)
    sector = (np.degrees(np.arctan2(nrm[:, 1], nrm[:, 0])) % 360.0 // 5).astype(np.int64)
    sector = np.where(ring % 2 == 0, sector, 100 - sector)
    return np.argsort(ring * 1000 + sector, kind="stable").astype(np.int64)


def pixel_table(box, rmin=0.0, rmax=None):
    """The rfft2 pixels inside the band rmin <= |k| <= rmax, as parallel arrays
    (iy, ix, kx, ky, shell, hermitian factor 1 or 2); kernels loop over this list, not the grid."""
    ky, kx = frequency_grid(box)
    r2 = kx**2 + ky**2
    sel = (r2 <= _rmax2(box, rmax)) & (r2 >= float(rmin) ** 2)
    iy, ix = np.nonzero(sel)
    herm = np.where((ix > 0) & (ix < box // 2), 2.0, 1.0)
    shell = np.rint(np.sqrt(r2[iy, ix])).astype(np.int64)
    return (
        iy.astype(np.int64),
        ix.astype(np.int64),
        kx[iy, ix].copy(),
        ky[iy, ix].copy(),
        shell,
        herm,
    )


@njit(parallel=True, fastmath=True, cache=True)
def _distance_kernel(
    vol,
    rots,
    imgs,
    coefs,
    use_ctf,
    shell_w,
    groups,
    pad,
    order,
    piy,
    pix,
    pkx,
    pky,
    pshell,
    pherm,
    cross,
    pp,
    xx,
):
    """rots (J, n, 3, 3): each image at J poses, its pixel, weight and CTF read once for all."""
    nk = vol.shape[3]
    nj = rots.shape[0]
    nz, ny, nxh = vol.shape[0], vol.shape[1], vol.shape[2]
    c = ny // 2
    npix = piy.shape[0]
    for ii in prange(order.shape[0]):
        i = order[ii]
        acc_c = np.zeros((nj, nk))
        acc_p = np.zeros((nj, nk))
        acc_x = 0.0
        g = groups[i]
        for j in range(npix):
            w = shell_w[g, pshell[j]] * pherm[j]
            if w == 0.0:
                continue
            kx = pkx[j]
            ky = pky[j]
            ctf = ctf_value(coefs[i], kx, ky) if use_ctf else 1.0
            x = imgs[i, piy[j], pix[j]]
            xr, xi = x.real, x.imag
            acc_x += w * (xr * xr + xi * xi)
            for t in range(nj):
                r = rots[t, i]
                px = (r[0, 0] * kx + r[1, 0] * ky) * pad
                py = (r[0, 1] * kx + r[1, 1] * ky) * pad
                pz = (r[0, 2] * kx + r[1, 2] * ky) * pad
                sgn = 1.0
                if px < 0.0:
                    px, py, pz, sgn = -px, -py, -pz, -1.0
                y = py + c
                z = pz + c
                x0, y0, z0 = int(px), int(np.floor(y)), int(np.floor(z))
                if x0 + 1 >= nxh or y0 < 0 or y0 + 1 >= ny or z0 < 0 or z0 + 1 >= nz:
                    continue
                tw = _trilinear_weights(px - x0, y - y0, z - z0)
                # conj(P) when the point was mirrored: flip the sign of the imaginary part
                xi_s = xi * sgn
                for k in range(nk):
                    v = _trilinear_sum(vol, z0, y0, x0, k, tw)
                    pr, pim = ctf * v.real, ctf * v.imag
                    acc_c[t, k] += w * (xr * pr + xi_s * pim)
                    acc_p[t, k] += w * (pr * pr + pim * pim)
        for t in range(nj):
            for k in range(nk):
                cross[t, i, k] = acc_c[t, k]
                pp[t, i, k] = acc_p[t, k]
        xx[i] = acc_x


@njit(inline="always", fastmath=True)
def _scatter(data, wts, px, py, pz, vr, vi, w, k, m, zlo, zhi):
    """Adjoint of the trilinear gather for one sample: add (value, weight) * trilinear weight * m
    into map k of data and wts, only at the corners whose z lies in
    [zlo, zhi) (the caller's slab); corners on the missing half (x < 0) are dropped (the caller
    also scatters the Hermitian mirror when it reaches x = 0). vr, vi and w come already
    multiplied by the fixed-point scales: every term is rounded to an integer before it is added
    (data[..., 0] real part, data[..., 1] imaginary part, int64)."""
    nz, ny, nxh = data.shape[1], data.shape[2], data.shape[3]
    c = ny // 2
    y = py + c
    z = pz + c
    x0, y0, z0 = int(np.floor(px)), int(np.floor(y)), int(np.floor(z))
    if z0 + 1 < zlo or z0 >= zhi:
        return
    if x0 + 1 < 0 or x0 >= nxh - 1 or y0 < 0 or y0 + 1 >= ny or z0 < 0 or z0 + 1 >= nz:
        return
    fx, fy, fz = px - x0, y - y0, z - z0
    for dz in range(2):
        zi = z0 + dz
        if zi < zlo or zi >= zhi:
            continue
        wz = (fz if dz else 1.0 - fz) * m
        for dy in range(2):
            wzy = wz * (fy if dy else 1.0 - fy)
            for dx in range(2):
                xi = x0 + dx
                if xi < 0:
                    continue
                t = wzy * (fx if dx else 1.0 - fx)
                data[k, zi, y0 + dy, xi, 0] += np.int64(np.rint(t * vr))
                data[k, zi, y0 + dy, xi, 1] += np.int64(np.rint(t * vi))
                wts[k, zi, y0 + dy, xi] += np.int64(np.rint(t * w))


@njit(parallel=True, fastmath=True, cache=True)
def _backproject_kernel(
    imgs,
    img_index,
    rots,
    coefs,
    use_ctf,
    mptr,
    ment,
    mwt,
    n_slabs,
    shell_w,
    groups,
    pad,
    piy,
    pix,
    pkx,
    pky,
    pshell,
    pherm,
    data_scale,
    weight_scale,
    data,
    wts,
):
    """One task per (map, z-slab): it runs through the map's entries in the order given and adds
    only into its slab, so tasks never write the same voxel. The sums are integer (fixed point) and
    exact, so neither the thread count nor the order matters for the result; slabs balance the
    threads when there are few maps and keep each task's writes in a cache-friendlier part of
    the grid (measured: 17,280 images of 64 px into 5 maps at pad 2 on 2 threads: 3.4 s with one
    task per map, 1.4 s with 4 slabs per map)."""
    npix = piy.shape[0]
    nz = data.shape[1]
    c = nz // 2
    for task in prange((mptr.shape[0] - 1) * n_slabs):
        k = task // n_slabs
        s = task % n_slabs
        zlo = (nz * s) // n_slabs
        zhi = (nz * (s + 1)) // n_slabs
        for q in range(mptr[k], mptr[k + 1]):
            e = ment[q]
            m = mwt[q]
            i = img_index[e]
            r = rots[e]
            g = groups[i]
            for j in range(npix):
                kx = pkx[j]
                ky = pky[j]
                pz = (r[0, 2] * kx + r[1, 2] * ky) * pad
                # neither the sample nor its mirror reaches this slab: skip it
                za = pz + c
                zb = c - pz
                if (za + 1.0 < zlo or za >= zhi) and (zb + 1.0 < zlo or zb >= zhi):
                    continue
                nw = shell_w[g, pshell[j]]
                if nw == 0.0:
                    continue
                ctf = ctf_value(coefs[i], kx, ky) if use_ctf else 1.0
                x = imgs[i, piy[j], pix[j]]
                f = ctf * nw * data_scale
                vr, vi = x.real * f, x.imag * f
                w = ctf * ctf * nw * weight_scale
                px = (r[0, 0] * kx + r[1, 0] * ky) * pad
                py = (r[0, 1] * kx + r[1, 1] * ky) * pad
                if px > -1.0:
                    _scatter(data, wts, px, py, pz, vr, vi, w, k, m, zlo, zhi)
                # a half-plane sample stands for its mirror -q too (columns 0 < kx < N/2)
                if pherm[j] == 2.0 and px < 1.0:
                    _scatter(data, wts, -px, -py, -pz, vr, -vi, w, k, m, zlo, zhi)


@njit(parallel=True, cache=True)
def _component_max(imgs, out):
    """out[i] = the largest |real| or |imaginary| part of image i."""
    for i in prange(imgs.shape[0]):
        m = 0.0
        for iy in range(imgs.shape[1]):
            for ix in range(imgs.shape[2]):
                v = imgs[i, iy, ix]
                m = max(m, abs(v.real), abs(v.imag))
        out[i] = m


def component_max(images_f):
    """(n,) largest |real| or |imaginary| part of each complex image (a bound for fixed point)."""
    imgs = np.ascontiguousarray(images_f, np.complex64)
    out = np.zeros(imgs.shape[0])
    if imgs.size:
        _component_max(imgs, out)
    return out


def terms_per_voxel(spacing):
    """Most samples of one inserted slice that add into one voxel, at `spacing` padded-grid units
    per image frequency. A sample adds into the 8 corners of its grid cell, so a voxel gets the
    samples inside the open cube of side 2 around it; the samples of a slice (with the Hermitian
    mirrors) are a square lattice of that spacing in a plane, and a plane meets the cube inside a
    disc of radius sqrt(3): at most (2 sqrt(3) / spacing + 1)^2 lattice points (19 at spacing 1,
    7 at spacing 2)."""
    return int(np.floor(2.0 * np.sqrt(3.0) / float(spacing) + 1.0) ** 2)


class FixedPointSums:
    """Back-projection accumulators of K maps in fixed point: ``data`` (K, Np, Np, Np//2+1, 2)
    int64 (real, imaginary) and ``weights`` (K, Np, Np, Np//2+1) int64, at one scale for data and
    one for weights (parallel.fixed_point_scale). The scales come from a bound on every term and
    a bound on the number of terms per voxel, both taken over ALL ranks (``for_entries``), so
    each term is the same integer whichever rank adds it and the sums (within a rank, then over
    ranks) are exact: the maps have the same bits for any number of ranks and threads, in any
    entry order. ``finish`` sums over ranks and converts to (complex128, float32) in place.

    Memory: the data accumulator has the size of the complex128 one it replaces; the weights
    accumulator is 8 bytes a voxel instead of 4 until ``finish`` (24 instead of 20 in all);
    the result is 20 bytes a voxel as before (measured, 17,280 images of 64 px into 5 maps at
    pad 2: peak 127 MiB instead of 103 MiB, result 102 MiB)."""

    def __init__(self, shape, data_scale, weight_scale):
        self.data = np.zeros(tuple(shape) + (2,), np.int64)
        self.weights = np.zeros(tuple(shape), np.int64)
        self.data_scale = float(data_scale)
        self.weight_scale = float(weight_scale)

    @classmethod
    def for_entries(
        cls, shape, value_max, weight, ctf_coefs, *, use_ctf, shell_max, spacing, box, comm=None
    ):
        """Accumulators for the (entry, map) pairs about to be inserted on this rank: for each
        pair, ``value_max`` bounds the real and imaginary parts of its image, ``weight`` is its
        insertion weight, ``ctf_coefs`` (pairs, 6) its image's CTF row and ``shell_max`` the
        largest shell weight of its group. With comm: the bounds are maxima over all ranks and
        the count a sum over all ranks (every rank must call this, with or without pairs)."""
        wt = np.abs(np.asarray(weight, np.float64))
        amp = np.ones_like(wt)
        if use_ctf and wt.size:  # |sin| <= 1; a negative B-factor term can exceed 1
            kmax2 = 2.0 * (box // 2) ** 2
            amp = np.exp(np.maximum(-np.asarray(ctf_coefs, np.float64)[:, 5], 0.0) * kmax2)
        nw = np.abs(np.asarray(shell_max, np.float64))
        d_bound = float(np.max(wt * np.asarray(value_max) * amp * nw)) if wt.size else 0.0
        w_bound = float(np.max(wt * amp * amp * nw)) if wt.size else 0.0
        n = np.array([wt.size], np.int64)
        if comm is not None:
            d_bound = comm.allreduce_max(d_bound)
            w_bound = comm.allreduce_max(w_bound)
            comm.allreduce_sum(n)
        n_terms = int(n[0]) * terms_per_voxel(spacing)
        return cls(shape, fixed_point_scale(d_bound, n_terms), fixed_point_scale(w_bound, n_terms))

    def finish(self, comm=None):
        """Sum over ranks (exact), then (data complex128, weights float32) of the maps; the
        data array is converted in place (it is a view of the int64 accumulator's memory)."""
        if comm is not None:
            comm.allreduce_sum(self.data)
            comm.allreduce_sum(self.weights)
        acc, shape = self.data, self.weights.shape
        flt = acc.view(np.float64)
        _from_fixed(acc.reshape(-1), flt.reshape(-1), 1.0 / self.data_scale)
        return flt.view(np.complex128).reshape(shape), self._weights_to_float32()

    def _weights_to_float32(self):
        """The int64 weight sums as float32, written over the first half of their own buffer
        (block by block, each block read whole before it is written, and only over elements
        already read), which is then shrunk to that half: no second array."""
        wacc, self.weights = self.weights, None
        shape, n = wacc.shape, wacc.size
        inv = 1.0 / self.weight_scale
        src = wacc.reshape(-1)
        dst = src.view(np.float32)
        a = 0
        while a < n:
            # bytes [4a, 4b) hold int64 elements [a/2, b/2): read already when b <= 2a
            b = min(n, max(2 * a, 1 << 16), a + (1 << 18))
            dst[a:b] = (src[a:b] * inv).astype(np.float32)
            a = b
        del src, dst
        try:
            wacc.resize(((n + 1) // 2,), refcheck=True)  # gives back the unused half
        except ValueError:  # still referenced elsewhere: copy
            return wacc.reshape(-1).view(np.float32)[:n].reshape(shape).copy()
        return wacc.view(np.float32)[:n].reshape(shape)


@njit(parallel=True, cache=True)
def _from_fixed(acc, flt, inv_d):
    """flt[i] = acc[i] / scale IN PLACE (flt is acc's memory seen as float64: each element is
    read before it is written, at the same address). Zeros are left alone (0 and 0.0 have the
    same bits), so pages no sample reached (the corners beyond the largest shell) stay unmapped."""
    for i in prange(acc.shape[0]):
        v = acc[i]
        if v != 0:
            flt[i] = v * inv_d


# ----------------------------------------------------------------------------------------------
# wrappers
# ----------------------------------------------------------------------------------------------


def _rmax2(box, rmax):
    r = box // 2 - 1 if rmax is None else min(float(rmax), box // 2 - 1)
    return float(r) ** 2


def _shell_weights(box, shell_weights, groups, n):
    nshell = box // 2 + 2
    if shell_weights is None:
        sw = np.ones((1, nshell))
    else:
        sw = np.atleast_2d(np.asarray(shell_weights, np.float64))
        if sw.shape[1] < nshell:
            sw = np.concatenate([sw, np.zeros((sw.shape[0], nshell - sw.shape[1]))], axis=1)
        sw = np.ascontiguousarray(sw)
    g = np.zeros(n, np.int64) if groups is None else np.ascontiguousarray(groups, np.int64)
    if g.size and (g.min() < 0 or g.max() >= sw.shape[0]):
        raise ValueError("particle group index outside the rows of the shell weights")
    return sw, g


def _coefs(ctf_coefs, n):
    if ctf_coefs is None:
        return np.zeros((n, 6)), False
    return np.ascontiguousarray(ctf_coefs, np.float64), True


def project(fvols, rotations, rmax=None):
    """Central-slice projections of K maps at n orientations -> (n, K, N, N//2+1) complex64
    (no CTF, no shift); frequencies beyond rmax (pixels, default N/2-1) are zero."""
    rots = np.ascontiguousarray(rotations, np.float64).reshape(-1, 3, 3)
    box = fvols.box
    out = np.empty((rots.shape[0], fvols.n_maps, box, box // 2 + 1), np.complex64)
    _project_kernel(fvols.data, rots, box, float(fvols.pad), _rmax2(box, rmax), out)
    return out


def distance_terms(
    fvols,
    rotations,
    images_f,
    ctf_coefs=None,
    *,
    rmin=0.0,
    rmax=None,
    shell_weights=None,
    groups=None,
    select=None,
):
    """Fused comparison of n images with the CTF-multiplied projections of K maps, without storing
    the projections. Returns (cross (n,K), pp (n,K), xx (n,)) with, over the frequency band
    rmin <= |k| <= rmax and shell weights w(group, shell):
    cross = sum w Re(conj(X) CTF P_k), pp = sum w |CTF P_k|^2, xx = sum w |X|^2.
    The squared distance is xx - 2 cross + pp; a normalised cross score is cross / sqrt(pp).
    rotations (J, n, 3, 3): each image at J poses (its pose neighbours), cross and pp then
    (J, n, K): an image's pixels and CTF are read once for all J poses, and nearby poses
    gather from the same voxels (bench/README.md, "The pose neighbours in one pass").
    select: score only the images at these positions (rotations, images_f, ctf_coefs and groups
    then hold all the images; the rows of the results follow select), without a copy of them."""
    rots = np.asarray(rotations, np.float64)
    posed = rots.ndim == 4
    rots = np.ascontiguousarray(rots if posed else rots.reshape(1, -1, 3, 3))
    n = rots.shape[1]
    imgs = np.ascontiguousarray(images_f, np.complex64)
    if imgs.shape[0] != n or imgs.shape[1] != fvols.box:
        raise ValueError(
            f"{imgs.shape[0]} images of {imgs.shape[1]} px for {n} rotations and "
            f"{fvols.box} px maps"
        )
    coefs, use_ctf = _coefs(ctf_coefs, n)
    sw, g = _shell_weights(fvols.box, shell_weights, groups, n)
    sel = np.arange(n) if select is None else np.ascontiguousarray(select, np.int64)
    cross = np.empty((rots.shape[0], n, fvols.n_maps))
    pp = np.empty((rots.shape[0], n, fvols.n_maps))
    xx = np.empty(n)
    table = pixel_table(fvols.box, rmin, rmax)
    _distance_kernel(
        fvols.data,
        rots,
        imgs,
        coefs,
        use_ctf,
        sw,
        g,
        float(fvols.pad),
        sel[view_order(rots[0, sel])],
        *table,
        cross,
        pp,
        xx,
    )
    if select is not None:
        cross, pp, xx = cross[:, sel], pp[:, sel], xx[sel]
    if not posed:
        cross, pp = cross[0], pp[0]
    return cross, pp, xx


def squared_distances(fvols, rotations, images_f, **kw):
    """(n, K) weighted squared Fourier distances |X - CTF P_k|^2 (see distance_terms)."""
    cross, pp, xx = distance_terms(fvols, rotations, images_f, **kw)
    return xx[:, None] - 2.0 * cross + pp


def backproject(
    images_f,
    rotations,
    member_weights,
    ctf_coefs=None,
    *,
    pad=2,
    rmax=None,
    shell_weights=None,
    groups=None,
    image_index=None,
    n_threads=None,
    grid=None,
    comm=None,
    value_max=None,
):
    """Insert images (times CTF times shell weight) into K Fourier accumulators, with the CTF^2
    times shell weight in K weight accumulators (the adjoint of ``project``).

    member_weights: (m, K) insertion weight of entry e into map k (one-hot for a hard assignment,
    fuzzy memberships, or smear probabilities). Entry e uses image ``image_index[e]`` (default e)
    and rotation ``rotations[e]``. Returns (data (K, Np, Np, Np//2+1) complex128,
    weights (K, Np, Np, Np//2+1) float32) on the half grid of ``volumes_to_fourier``.
    grid: a smaller Np (same frequency spacing, the central part of the grid) for maps limited
    to rmax < grid / (2 pad) - 1 (coarse runs); samples beyond it are dropped.
    comm: a parallel.Comm whose ranks each insert their own entries: the result is the sum over
    all ranks' entries, on every rank (every rank must call), with the same bits for any split
    (FixedPointSums). Without it the sums are this call's entries alone. value_max: each
    image's component_max, when the caller keeps it (it does not change between calls)."""
    imgs = np.ascontiguousarray(images_f, np.complex64)
    box = imgs.shape[1]
    rots = np.ascontiguousarray(rotations, np.float64).reshape(-1, 3, 3)
    m = rots.shape[0]
    memb = np.ascontiguousarray(member_weights, np.float64)
    if memb.ndim == 1:
        memb = memb[:, None]
    if memb.shape[0] != m:
        raise ValueError(f"member_weights has {memb.shape[0]} rows for {m} entries")
    idx = np.arange(m) if image_index is None else np.ascontiguousarray(image_index, np.int64)
    coefs, use_ctf = _coefs(ctf_coefs, imgs.shape[0])
    sw, g = _shell_weights(box, shell_weights, groups, imgs.shape[0])
    npad = padded_size(box, pad)
    scale = npad / box
    npad = npad if grid is None else int(grid)
    k = memb.shape[1]
    rows, cols = np.nonzero(memb)
    pimg = idx[rows]
    sums = FixedPointSums.for_entries(
        (k, npad, npad, npad // 2 + 1),
        (component_max(imgs) if value_max is None else np.asarray(value_max))[pimg],
        memb[rows, cols],
        coefs[pimg],
        use_ctf=use_ctf,
        shell_max=np.abs(sw).max(axis=1)[g[pimg]],
        spacing=scale,
        box=box,
        comm=comm,
    )
    insert_into(
        sums,
        imgs,
        idx,
        rots,
        member_weights=memb,
        ctf_coefs=ctf_coefs,
        shell_weights=shell_weights,
        groups=groups,
        rmax=rmax,
        scale=scale,
        n_threads=n_threads,
    )
    return sums.finish(comm)


SLAB_MAP_BYTES = 16 * 2**20  # a map's accumulators above this are written in SLABS_FOR_CACHE
SLABS_FOR_CACHE = 4  # z-slabs, each task's writes then stay in a cache-sized part of the grid;
# smaller maps are faster in one (every slab runs through all the entries' pixels; figures in
# bench/README.md, "Every search-mode run at the coarse limit")


def _cache_slabs(map_bytes):
    """z-slabs per map for cache locality alone (the thread count may ask for more)."""
    return SLABS_FOR_CACHE if map_bytes > SLAB_MAP_BYTES else 1


def insert_into(
    sums,
    images_f,
    image_index,
    rotations,
    *,
    member_weights,
    ctf_coefs,
    shell_weights,
    groups,
    rmax,
    scale,
    n_threads=None,
):
    """Add the back-projection of entries into the fixed-point accumulators ``sums``
    (FixedPointSums of K maps, scales set for these entries): entry e is image
    ``images_f[image_index[e]]`` at ``rotations[e]``, inserted into map k with weight
    ``member_weights[e, k]`` (times its image's CTF row and its group's shell weights, as
    ``backproject``). scale: padded-grid units per image frequency (Np / box, also when the
    grid is cropped). Successive calls over consecutive chunks of entries add up to what one
    call over all of them makes (the sums are integer)."""
    imgs = np.ascontiguousarray(images_f, np.complex64)
    box = imgs.shape[1]
    memb = np.ascontiguousarray(member_weights, np.float64)
    if memb.ndim == 1:
        memb = memb[:, None]
    k = memb.shape[1]
    rots = np.ascontiguousarray(rotations, np.float64).reshape(-1, 3, 3)
    # the (entry, map) pairs with a non-zero weight, grouped by map and, within a map, in
    # viewing-direction order (view_order): successive slices then add into the same part of the
    # grid and find it in cache (measured: 12,000 entries of 64 px into 10 maps at pad 2, one
    # thread: 207 us an entry in entry order, 172 in this order). The sums are integer, so the
    # order does not change a bit of them.
    cols, rows = np.nonzero(memb.T)
    rank = np.empty(rots.shape[0], np.int64)
    rank[view_order(rots)] = np.arange(rots.shape[0])
    by = np.lexsort((rank[rows], cols))
    cols, rows = cols[by], rows[by]
    mptr = np.searchsorted(cols, np.arange(k + 1)).astype(np.int64)
    coefs, use_ctf = _coefs(ctf_coefs, imgs.shape[0])
    sw, g = _shell_weights(box, shell_weights, groups, imgs.shape[0])
    nt = max(1, n_threads or numba.get_num_threads())
    n_slabs = int(
        min(16, max(-(-2 * nt // k), _cache_slabs(sums.data[0].nbytes + sums.weights[0].nbytes)))
    )
    _backproject_kernel(
        imgs,
        np.ascontiguousarray(image_index, np.int64),
        rots,
        coefs,
        use_ctf,
        mptr,
        rows.astype(np.int64),
        np.ascontiguousarray(memb[rows, cols]),
        n_slabs,
        sw,
        g,
        float(scale),
        *pixel_table(box, 0.0, rmax),
        sums.data_scale,
        sums.weight_scale,
        sums.data,
        sums.weights,
    )
