"""RELION itself proves (or disproves) the engine's conventions: Euler angles, origin sign and units,
CTF formula, sign, astigmatism angle, wavelength and Cs units, and the STAR files both ways.

* Writer proof: particles made by ``simulate_particles`` and written by ``write_star`` (origins in
  Å with an optics table, RELION 3.1 style; and in pixels, 3.0 style) are reconstructed by
  ``relion_reconstruct --ctf``; the map must agree with the true map.
* Reader proof: ``relion_project --ctf`` (with shifts and astigmatism, clean and with white noise)
  makes the data; ``read_star`` + ``reconstruct_particles`` must give the map back, and our
  projections at the same poses must match RELION's images.
* CTF proof: ``relion_project --ctf`` of a delta map gives images whose Fourier transform is the
  CTF itself (times the phase ramp of the origin); it must equal ``ctf.ctf_images``.

Each proof also runs deliberately wrong variants (negated origins, transposed rotations, defocus
angle + 90 or mirrored, ...) and asserts that they score much worse, so these tests can fail.

FSC alone does not see a wrong astigmatism angle at this resolution: a CTF error mostly scales a
shell down (sum CTF*CTF' / sum CTF^2 < 1), and the FSC is blind to a per-shell scale. So the map
checks also use the per-shell gain Re<F_rec, F_true> / |F_true|^2, which must be ~1.

The tests are skipped when RELION is not installed (Debian/Ubuntu: ``apt-get install relion``).
Only the non-MPI RELION programs are used.
"""

import copy
import os
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from sort3ddepth.engine import fourier
from sort3ddepth.engine.ctf import ctf_images
from sort3ddepth.engine.geometry import matrix_to_euler, random_rotations
from sort3ddepth.engine.particles import CTFParams, ParticleSet
from sort3ddepth.engine.reconstruction import fsc
from sort3ddepth.engine.simulate import load_demo_map, reconstruct_particles, simulate_particles
from sort3ddepth.engine.star_io import read_star, write_star

BOX = 64
PIXEL = 5.0  # Å/px of the shipped map
N_IMAGES = 4000
HI = int(0.7 * BOX // 2)  # shell 22 = 0.7 Nyquist
GAIN_SHELLS = slice(14, HI + 1)  # where a CTF error shows as a loss of amplitude

_MISSING = [p for p in ("relion_reconstruct", "relion_project") if shutil.which(p) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason="RELION not installed: apt-get install relion (missing {})".format(", ".join(_MISSING)),
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _relion(program, *args, cwd):
    """Run one non-MPI RELION program; fail with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [program, *map(str, args)],
        cwd=str(cwd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, f"{program} failed ({res.returncode}):\n{res.stdout[-3000:]}"
    return res.stdout


def _write_map(path, vol, pixel_size):
    with mrcfile.new(str(path), overwrite=True) as m:
        m.set_data(np.asarray(vol, np.float32))
        m.voxel_size = pixel_size
    return path


def _shell_sums(rec, ref):
    """Per-shell FSC and gain Re<F_rec, F_ref>/|F_ref|^2 (shells of the box grid)."""
    f1 = np.fft.rfftn(np.asarray(rec, np.float64))
    f2 = np.fft.rfftn(np.asarray(ref, np.float64))
    n = ref.shape[0]
    ky = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r = np.sqrt(ky[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    sh = np.rint(r).astype(np.int64).ravel()
    m = n // 2 + 1
    num = np.bincount(sh, (f1 * np.conj(f2)).real.ravel(), m)[:m]
    den = np.bincount(sh, (np.abs(f2) ** 2).ravel(), m)[:m]
    return fsc(rec, ref), num / den


def _map_scores(rec, ref):
    """(min FSC over shells 1..0.7 Nyquist, min gain over GAIN_SHELLS, max gain over them)."""
    curve, gain = _shell_sums(rec, ref)
    g = gain[GAIN_SHELLS]
    return float(curve[1 : HI + 1].min()), float(g.min()), float(g.max())


def _assert_good_map(rec, ref, what):
    curve, gain = _shell_sums(rec, ref)
    fmin, gmin, gmax = _map_scores(rec, ref)
    msg = f"{what}: FSC {np.round(curve, 3)} gain {np.round(gain, 3)}"
    assert fmin >= 0.9, msg  # the criterion
    assert 0.93 <= gmin and gmax <= 1.07, msg  # no amplitude lost to a CTF mismatch
    return fmin, gmin


def _assert_bad_map(rec, ref, what, good):
    """A wrong variant must lose a lot: FSC or gain far below the correct run's figures."""
    fmin, gmin, _ = _map_scores(rec, ref)
    assert fmin < 0.5 or gmin < 0.85, (
        "{} scores too well: FSC min {:.3f} gain min {:.3f} (correct: "
        "FSC {:.3f}, gain {:.3f}) -- the check cannot tell".format(what, fmin, gmin, *good)
    )
    return fmin, gmin


def _poses(
    n,
    rng,
    pixel_size,
    defocus=(9000.0, 25000.0),
    astig=(3000.0, 5000.0),
    max_shift=6.0,
    optics=((300.0, 2.7, 0.1),),
    phase=0.0,
    bfactor=None,
):
    """A ParticleSet of blank images with random poses, origins of several pixels in every
    direction and strongly astigmatic CTFs (dU - dV in `astig`, azimuth uniform in [0, 180))."""
    rots = random_rotations(n, rng)
    dmean = rng.uniform(*defocus, n)
    dast = rng.uniform(*astig, n)
    opt = np.asarray(optics, np.float64)[np.arange(n) % len(optics)]
    ctf = CTFParams(
        dmean + dast / 2,
        dmean - dast / 2,
        rng.uniform(0.0, 180.0, n),
        opt[:, 0],
        opt[:, 1],
        opt[:, 2],
        rng.uniform(0.0, phase, n) if phase else np.zeros(n),
        None if bfactor is None else rng.uniform(0.0, bfactor, n),
    )
    shifts = rng.uniform(-max_shift, max_shift, (n, 2))
    return ParticleSet(
        np.zeros((n, BOX, BOX), np.float32), matrix_to_euler(rots), shifts, ctf, float(pixel_size)
    )


def _our_images(fvol, particles, idx, shift_sign=1.0, rotations=None):
    """Our images of the map at the particles' poses: projection x CTF, moved by -origin (what
    simulate_particles does)."""
    rots = particles.rotations[idx] if rotations is None else rotations[idx]
    p = fourier.project(fvol, rots)[:, 0]
    p *= ctf_images(particles.ctf.subset(idx), BOX, particles.pixel_size)
    p = fourier.shift_images(p, -shift_sign * particles.shifts[idx])
    return fourier.fourier_to_images(p, BOX)


def _image_corr(a, b):
    a = a - a.mean(axis=(1, 2), keepdims=True)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    return (a * b).sum((1, 2)) / np.sqrt((a * a).sum((1, 2)) * (b * b).sum((1, 2)))


def _fourier_corr(fa, fb, band):
    a, b = fa[:, band], fb[:, band]
    return (a * np.conj(b)).sum(1).real / np.sqrt((np.abs(a) ** 2).sum(1) * (np.abs(b) ** 2).sum(1))


def _band(rmin, rmax):
    ky, kx = fourier.frequency_grid(BOX)
    r2 = kx**2 + ky**2
    return (r2 >= rmin**2) & (r2 <= rmax**2)


def _with(particles, angles=None, shifts=None, defocus_angle=None):
    """A copy of the particle metadata with one thing changed (a deliberately wrong variant)."""
    p = copy.copy(particles)
    p.ctf = particles.ctf.subset(np.arange(len(particles)))
    if angles is not None:
        p.angles = angles
    if shifts is not None:
        p.shifts = shifts
    if defocus_angle is not None:
        p.ctf.defocus_angle = defocus_angle
    return p


def _transposed_angles(particles):
    """Euler angles of the inverse rotations: what a transposed Euler matrix would mean."""
    return matrix_to_euler(np.swapaxes(particles.rotations, 1, 2))


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ribosome():
    return load_demo_map(BOX)


@pytest.fixture(scope="module")
def work(tmp_path_factory, ribosome):
    d = tmp_path_factory.mktemp("relion")
    _write_map(d / "map.mrc", ribosome, PIXEL)
    return d


@pytest.fixture(scope="module")
def simulated(ribosome):
    """Our simulator's particles: SNR 10, defocus 1-2.5 µm, dU - dV up to 8000 Å (mean 4000),
    origins up to 6 px."""
    rng = np.random.default_rng(11)
    return simulate_particles(
        ribosome,
        N_IMAGES,
        PIXEL,
        rng,
        snr=10.0,
        defocus=(10000.0, 25000.0),
        astigmatism=8000.0,
        max_shift=6.0,
    )


@pytest.fixture(scope="module")
def relion_of_simulated(simulated, work):
    """style -> (folder, relion_reconstruct --ctf map) of the simulated particles written by
    write_star in that style (computed once per style)."""
    done = {}

    def get(style):
        if style not in done:
            sub = work / ("writer" + style)
            sub.mkdir()
            star, _ = write_star(simulated, sub / "particles.star", style=style)
            _relion("relion_reconstruct", "--i", star, "--o", "rec.mrc", "--ctf", cwd=sub)
            with mrcfile.open(str(sub / "rec.mrc")) as m:
                assert np.isclose(float(m.voxel_size.x), PIXEL)  # pixel size understood
                done[style] = sub, np.array(m.data)
        return done[style]

    return get


@pytest.fixture(scope="module")
def projected(work):
    """relion_project --ctf at poses written by write_star (3.1 style): (input ParticleSet,
    read_star of the clean projections, read_star of the noisy projections, noise sigma)."""
    poses = _poses(N_IMAGES, np.random.default_rng(12), PIXEL)
    star, _ = write_star(poses, work / "poses.star", style="3.1")
    _relion("relion_project", "--i", "map.mrc", "--o", "proj", "--ang", star, "--ctf", cwd=work)
    clean = read_star(work / "proj.star")
    sigma = 0.35 * float(clean.load_images(np.arange(500)).std())  # SNR ~ 8
    _relion(
        "relion_project",
        "--i",
        "map.mrc",
        "--o",
        "proj_noisy",
        "--ang",
        star,
        "--ctf",
        "--add_noise",
        "--white_noise",
        f"{sigma:.6f}",
        cwd=work,
    )
    noisy = read_star(work / "proj_noisy.star")
    return poses, clean, noisy, sigma


# ---------------------------------------------------------------------------------------------
# 1. writer proof: relion_reconstruct of our simulated particles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["3.1", "3.0"])
def test_relion_reconstruct_of_simulated_particles(style, simulated, ribosome, relion_of_simulated):
    """rlnOriginX/YAngst with an optics table (3.1) and rlnOriginX/Y in pixels with per-particle
    optics (3.0, pixel size from rlnDetectorPixelSize/rlnMagnification, no --angpix given)."""
    sub, rec = relion_of_simulated(style)
    good = _assert_good_map(rec, ribosome, f"relion_reconstruct of write_star {style}")

    if style == "3.0":
        # origins in Å put into the pixel columns (a units mix-up) must break it
        wrong = _with(simulated, shifts=simulated.shifts * PIXEL)
        star, _ = write_star(wrong, sub / "wrong_units.star", style=style)
        _relion("relion_reconstruct", "--i", star, "--o", "wrong_units.mrc", "--ctf", cwd=sub)
        bad = _assert_bad_map(
            mrcfile.read(str(sub / "wrong_units.mrc")), ribosome, "origin in Å in rlnOriginX", good
        )
        print(
            "3.0 correct (FSC min, gain min):",
            np.round(good, 3),
            "Å in pixel columns:",
            np.round(bad, 3),
        )
    else:
        print("3.1 correct (FSC min, gain min):", np.round(good, 3))


def test_relion_reconstruct_rejects_wrong_conventions(
    simulated, ribosome, work, relion_of_simulated
):
    """The same particles with a negated origin, transposed rotations or the astigmatism azimuth
    turned by 90 degrees, written for RELION: its reconstruction must be much worse."""
    sub = work / "writer_wrong"
    sub.mkdir()
    good = _assert_good_map(relion_of_simulated("3.1")[1], ribosome, "correct")
    variants = {
        "negated origin": _with(simulated, shifts=-simulated.shifts),
        "transposed rotation": _with(simulated, angles=_transposed_angles(simulated)),
        "defocus angle + 90": _with(simulated, defocus_angle=simulated.ctf.defocus_angle + 90.0),
    }
    scores = {}
    for k, (name, wrong) in enumerate(variants.items()):
        star, stack = write_star(wrong, sub / f"v{k}.star", style="3.1")
        _relion("relion_reconstruct", "--i", star, "--o", f"v{k}.mrc", "--ctf", cwd=sub)
        os.unlink(stack)
        scores[name] = _assert_bad_map(mrcfile.read(str(sub / f"v{k}.mrc")), ribosome, name, good)
    print(
        "correct (FSC min, gain min):",
        np.round(good, 3),
        "wrong:",
        {k: np.round(v, 3) for k, v in scores.items()},
    )


# ---------------------------------------------------------------------------------------------
# 2. reader proof: relion_project makes the data
# ---------------------------------------------------------------------------------------------


def test_relion_project_star_is_read_back(projected):
    """relion_project reads our 3.1 STAR (optics table, origins in Å) and writes a 3.1 STAR +
    .mrcs; read_star gets the same poses, origins (pixels) and CTF back."""
    poses, clean, noisy, _ = projected
    for out in (clean, noisy):
        assert out.source["style"] == "3.1" and out.pixel_size == PIXEL and out.box == BOX
        np.testing.assert_allclose(out.angles, poses.angles, atol=1e-5)  # RELION prints %.6f
        np.testing.assert_allclose(out.shifts, poses.shifts, atol=1e-5)
        for f in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast"):
            np.testing.assert_allclose(getattr(out.ctf, f), getattr(poses.ctf, f), atol=1e-5)


def test_our_projections_match_relion_project(projected, ribosome):
    """Our projection x CTF moved by -origin equals RELION's image (correlation >= 0.99 for every
    image); negated origins, transposed rotations or rot/psi swapped do not."""
    poses, clean, _, _ = projected
    idx = np.arange(400)
    relion = clean.load_images(idx)
    fvol = fourier.volumes_to_fourier(ribosome)
    c = _image_corr(_our_images(fvol, clean, idx), relion)
    assert c.min() >= 0.99, c.min()
    wrong = {
        "negated origin": _image_corr(_our_images(fvol, clean, idx, shift_sign=-1.0), relion),
        "transposed rotation": _image_corr(
            _our_images(fvol, clean, idx, rotations=np.swapaxes(clean.rotations, 1, 2)), relion
        ),
        "rot and psi swapped": _image_corr(
            _our_images(fvol, _with(clean, angles=clean.angles[:, ::-1].copy()), idx), relion
        ),
    }
    for name, w in wrong.items():
        assert w.mean() < 0.5, (name, w.mean())
    print(
        f"image correlation min {c.min():.5f} mean {c.mean():.5f}; wrong (mean):",
        {k: round(float(v.mean()), 3) for k, v in wrong.items()},
    )


@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "white_noise"])
def test_reconstruction_of_relion_projections(projected, ribosome, noisy):
    """read_star + reconstruct_particles of RELION's images gives the map back."""
    poses, clean, noisy_set, sigma = projected
    parts = noisy_set if noisy else clean
    if noisy:
        d = parts.load_images(np.arange(200)) - clean.load_images(np.arange(200))
        assert abs(d.std() / sigma - 1.0) < 0.02  # --white_noise is the pixel sigma
    good = _assert_good_map(
        reconstruct_particles(parts)[0], ribosome, "reconstruction of relion_project images"
    )
    print("%s: correct (FSC min, gain min):" % ("noisy" if noisy else "clean"), np.round(good, 3))
    if noisy:
        variants = {
            "negated origin": _with(parts, shifts=-parts.shifts),
            "transposed rotation": _with(parts, angles=_transposed_angles(parts)),
            "defocus angle + 90": _with(parts, defocus_angle=parts.ctf.defocus_angle + 90.0),
            "defocus angle mirrored": _with(parts, defocus_angle=-parts.ctf.defocus_angle),
        }
        scores = {
            name: _assert_bad_map(reconstruct_particles(w)[0], ribosome, name, good)
            for name, w in variants.items()
        }
        print("wrong:", {k: np.round(v, 3) for k, v in scores.items()})


# ---------------------------------------------------------------------------------------------
# 3. the CTF itself: relion_project --ctf of a delta map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["3.1", "3.0"])
def test_ctf_matches_relion(style, tmp_path):
    """A delta at the map centre projects to a flat spectrum, so RELION's --ctf image is the CTF
    (times the phase ramp of the origin). At 1.5 Å/px with two optics groups (300 kV, Cs 2.7 mm,
    Q 0.1 / 200 kV, Cs 2.0 mm, Q 0.07), phase shifts and B-factors, strong astigmatism: our
    ctf_images must equal it -- same sign (CTF(0) = +Q: white particles), same azimuth, same
    wavelength and Cs units. 3.0 style: per-particle optics, origins in pixels."""
    pixel = 1.5
    n = 300
    poses = _poses(
        n,
        np.random.default_rng(13),
        pixel,
        defocus=(6000.0, 20000.0),
        optics=((300.0, 2.7, 0.1), (200.0, 2.0, 0.07)),
        phase=60.0,
        bfactor=80.0,
    )
    delta = np.zeros((BOX,) * 3, np.float32)
    delta[BOX // 2, BOX // 2, BOX // 2] = 1.0
    _write_map(tmp_path / "delta.mrc", delta, pixel)
    star, _ = write_star(poses, tmp_path / "poses.star", style=style)
    _relion(
        "relion_project", "--i", "delta.mrc", "--o", "psf", "--ang", star, "--ctf", cwd=tmp_path
    )
    out = read_star(tmp_path / "psf.star")
    assert out.pixel_size == pixel
    np.testing.assert_allclose(out.shifts, poses.shifts, atol=1e-5)  # 3.0 pixels -> 3.1 Å -> px
    measured = fourier.images_to_fourier(out.load_images())
    band = _band(0, BOX // 2 - 2)

    def ours(ctf=None, shift_sign=1.0, sign=1.0):
        c = ctf_images(poses.ctf if ctf is None else ctf, BOX, pixel).astype(np.complex64)
        return fourier.shift_images(sign * c, -shift_sign * poses.shifts)

    expected = ours()
    c = _fourier_corr(measured, expected, band)
    assert c.min() >= 0.99, c.min()
    assert np.abs(measured[:, band] - expected[:, band]).max() < 1e-3 * np.abs(expected).max()
    # DC term: +Q (amplitude contrast, with the phase shift), not -Q: RELION's particles are white
    q = poses.ctf.amplitude_contrast
    dc = np.sin(np.deg2rad(poses.ctf.phase_shift) + np.arctan(q / np.sqrt(1 - q * q)))
    np.testing.assert_allclose(measured[:, 0, 0].real, dc, atol=1e-4)

    def changed(**kw):
        ctf = poses.ctf.subset(np.arange(n))
        for k, v in kw.items():
            setattr(ctf, k, v)
        return ctf

    wrong = {
        "CTF sign flipped": ours(sign=-1.0),
        "defocus angle + 90": ours(changed(defocus_angle=poses.ctf.defocus_angle + 90.0)),
        "defocus angle mirrored": ours(changed(defocus_angle=-poses.ctf.defocus_angle)),
        "negated origin": ours(shift_sign=-1.0),
        "Cs in m, not mm (no Cs)": ours(changed(cs=poses.ctf.cs * 1e-3)),
        "phase shift sign": ours(changed(phase_shift=-poses.ctf.phase_shift)),
        "all at 300 kV": ours(changed(voltage=np.full(n, 300.0))),
    }
    scores = {}
    for name, w in wrong.items():
        cw = _fourier_corr(measured, w, band)
        scores[name] = round(float(cw.mean()), 3)
        assert cw.mean() < 0.9, (name, cw.mean())
    print(f"CTF correlation min {c.min():.7f}; wrong (mean):", scores)


# ---------------------------------------------------------------------------------------------
# symmetry groups: our operators symmetrise a map as relion_reconstruct --sym does
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asymmetric_set(tmp_path_factory):
    from sort3ddepth.engine.simulate import simulate_particles as sim

    work = tmp_path_factory.mktemp("relion_sym")
    vol = fourier.resize_volume(load_demo_map(BOX), 32).astype(np.float64)
    vol /= vol.std()
    ps = sim(vol, 1500, PIXEL * BOX / 32, np.random.default_rng(4), snr=1000.0)
    star, _ = write_star(ps, work / "asym.star")
    return work, star, vol


@pytest.mark.parametrize("symbol", ["C4", "D3", "T", "O", "I"])
def test_symmetry_groups_match_relion(asymmetric_set, symbol):
    from sort3ddepth.engine.reconstruction import symmetrize_map
    from sort3ddepth.engine.symmetry import parse_symmetry

    work, star, vol = asymmetric_set
    out = work / (f"sym_{symbol}.mrc")
    _relion("relion_reconstruct", "--i", star, "--o", out, "--ctf", "--sym", symbol, cwd=work)
    rel = mrcfile.read(str(out)).astype(np.float64)
    c = np.arange(32) - 16
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    inside = xx**2 + yy**2 + zz**2 < 13**2
    ours = symmetrize_map(vol, parse_symmetry(symbol.lower()).matrices)
    good = np.corrcoef(rel[inside], ours[inside])[0, 1]
    plain = np.corrcoef(rel[inside], vol[inside])[0, 1]
    assert good >= 0.98 and plain < 0.7, (symbol, good, plain)
