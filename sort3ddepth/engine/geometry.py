"""Rotations in RELION's convention (rlnAngleRot, rlnAngleTilt, rlnAnglePsi, degrees).

RELION composes the three ZYZ Euler angles into A = R_z(psi) @ R_y(tilt) @ R_z(rot), where
R_z(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]] (a rotation of the coordinate frame)
and R_y(b) = [[cos b, 0, -sin b], [0, 1, 0], [sin b, 0, cos b]].
A maps map coordinates to image-frame coordinates: a 2D image (Fourier) point (x, y) lies in the
map at A.T @ (x, y, 0). The projection direction (the image z axis in the map) is A.T @ (0,0,1),
i.e. the third row of A: (sin t cos r, sin t sin r, cos t). relion_project / relion_reconstruct
prove this in tests/test_relion_conventions.py.
"""

import numpy as np


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    z, o = np.zeros_like(a), np.ones_like(a)
    return np.stack(
        [np.stack([c, s, z], -1), np.stack([-s, c, z], -1), np.stack([z, z, o], -1)], -2
    )


def _ry(b):
    c, s = np.cos(b), np.sin(b)
    z, o = np.zeros_like(b), np.ones_like(b)
    return np.stack(
        [np.stack([c, z, -s], -1), np.stack([z, o, z], -1), np.stack([s, z, c], -1)], -2
    )


def euler_to_matrix(rot, tilt, psi):
    """(..., 3, 3) rotation matrices from RELION Euler angles in degrees (arrays broadcast)."""
    rot, tilt, psi = (np.deg2rad(np.asarray(a, dtype=np.float64)) for a in (rot, tilt, psi))
    rot, tilt, psi = np.broadcast_arrays(rot, tilt, psi)
    return _rz(psi) @ _ry(tilt) @ _rz(rot)


def matrix_to_euler(mats):
    """RELION Euler angles (rot, tilt, psi) in degrees, shape (..., 3), from rotation matrices.

    At tilt = 0 or 180 only rot + psi (or rot - psi) is defined; psi is then set to 0.
    """
    m = np.asarray(mats, dtype=np.float64)
    tilt = np.arccos(np.clip(m[..., 2, 2], -1.0, 1.0))
    sin_t = np.sin(tilt)
    regular = sin_t > 1e-6
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]), 0.0)
    # Degenerate poles: A = R_z(psi) R_y(0 or pi) R_z(rot); put everything in rot.
    rot_pole = np.where(
        m[..., 2, 2] > 0,
        np.arctan2(m[..., 0, 1], m[..., 0, 0]),
        np.arctan2(-m[..., 0, 1], -m[..., 0, 0]),
    )
    rot = np.where(regular, rot, rot_pole)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def projection_directions(mats):
    """Unit viewing directions in map coordinates, (..., 3): the third row of each matrix."""
    return np.asarray(mats)[..., 2, :]


def pose_neighbours(sigma_deg):
    """The six turns of sigma_deg degrees about +-x, +-y, +-z, (6, 3, 3), that make a given pose's
    neighbourhood (pose @ turn); None for sigma_deg 0 (the given pose alone)."""
    if not sigma_deg:
        return None
    return np.array(
        [axis_turn(sign * float(sigma_deg), axis) for axis in range(3) for sign in (1.0, -1.0)]
    )


def axis_turn(deg, axis):
    """The rotation (3, 3) by deg degrees about coordinate axis 0, 1 or 2 (x, y, z)."""
    a = np.radians(float(deg))
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    t = np.eye(3)
    t[i, i] = t[j, j] = c
    t[i, j], t[j, i] = -s, s
    return t


def angle_between(a, b):
    """Angle (degrees) of the rotation between each pair of rotations (..., 3, 3)."""
    cos = (np.einsum("...ij,...ij->...", a, b) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def random_rotations(n, rng):
    """n rotation matrices uniformly distributed on SO(3) (Haar), from unit quaternions."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
