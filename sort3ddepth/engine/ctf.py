"""Contrast transfer function on the rfft grid, in RELION's convention.

CTF(s) = sin(chi) * exp(-B s^2 / 4), with
chi = pi*lambda*dz(theta)*s^2 - (pi/2)*Cs*lambda^3*s^4 + phase_shift + arctan(Q / sqrt(1 - Q^2)),
dz(theta) = (dU + dV)/2 + (dU - dV)/2 * cos(2 (theta - defocus_angle)), theta measured from the
image x axis (columns). Underfocus is positive defocus, so CTF(0) = +Q and the first lobe is
positive: images are "white particle on dark" like RELION's.

For the kernels the parameters are folded into a few per-particle coefficients in grid units
(k = integer frequency index on a box of size N), so chi needs no atan2 per pixel:
chi = a*k^2 + bx*(kx^2 - ky^2) + bxy*(2 kx ky) - c*k^4 + ph and envelope exp(-e*k^2).
"""

import numpy as np
from numba import njit, prange

N_COEF = 6


def electron_wavelength(kv):
    """Relativistic electron wavelength in Å for an accelerating voltage in kV."""
    volts = np.asarray(kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def ctf_coefficients(ctf, box, pixel_size):
    """(n, 6) float64 coefficients (a, bx, bxy, c, phase, envelope) for a box of `box` pixels
    of size `pixel_size` Å (after any Fourier cropping, pass the cropped box and pixel size)."""
    lam = electron_wavelength(ctf.voltage)
    inv = 1.0 / (box * pixel_size)  # Å^-1 per frequency index
    du = np.asarray(ctf.defocus_u, np.float64)
    dv = np.asarray(ctf.defocus_v, np.float64)
    ang = np.deg2rad(np.asarray(ctf.defocus_angle, np.float64))
    q = np.clip(np.asarray(ctf.amplitude_contrast, np.float64), 0.0, 0.999)
    a = np.pi * lam * 0.5 * (du + dv) * inv**2
    half = np.pi * lam * 0.5 * (du - dv) * inv**2
    c = 0.5 * np.pi * np.asarray(ctf.cs, np.float64) * 1e7 * lam**3 * inv**4
    phase = np.deg2rad(np.asarray(ctf.phase_shift, np.float64)) + np.arctan(q / np.sqrt(1 - q * q))
    bf = np.zeros_like(a) if ctf.bfactor is None else np.asarray(ctf.bfactor, np.float64)
    env = bf / 4.0 * inv**2
    coef = np.stack([a, half * np.cos(2 * ang), half * np.sin(2 * ang), c, phase, env], axis=1)
    return np.ascontiguousarray(coef)


@njit(inline="always", fastmath=True)
def ctf_value(coef, kx, ky):
    """CTF at integer-grid frequency (kx, ky) from one row of ctf_coefficients."""
    k2 = kx * kx + ky * ky
    chi = (
        coef[0] * k2
        + coef[1] * (kx * kx - ky * ky)
        + coef[2] * (2.0 * kx * ky)
        - coef[3] * k2 * k2
        + coef[4]
    )
    val = np.sin(chi)
    if coef[5] != 0.0:
        val *= np.exp(-coef[5] * k2)
    return val


@njit(parallel=True, fastmath=True, cache=True)
def _ctf_images(coefs, box, out):
    half = box // 2
    for i in prange(coefs.shape[0]):
        for iy in range(box):
            ky = iy if iy <= (box - 1) // 2 else iy - box
            for ix in range(half + 1):
                out[i, iy, ix] = ctf_value(coefs[i], float(ix), float(ky))


def ctf_images(ctf, box, pixel_size):
    """(n, box, box//2+1) float32 CTF images on numpy's rfft2 grid (rows = ky in fft order)."""
    coefs = ctf_coefficients(ctf, box, pixel_size)
    out = np.empty((coefs.shape[0], box, box // 2 + 1), np.float32)
    _ctf_images(coefs, box, out)
    return out
