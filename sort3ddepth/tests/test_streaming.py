"""Images streamed from the stacks chunk by chunk: the chunk size changes no bit of any result,
several stacks in one STAR sort like one, and a run whose full-box stack exceeds the memory cap
sorts to the clusters of an unlimited run within that cap."""

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from sort3ddepth.engine import cli, fourier, memory
from sort3ddepth.engine import particles as particles_mod
from sort3ddepth.engine.ctf import ctf_coefficients
from sort3ddepth.engine.meridien import SmearSet
from sort3ddepth.engine.preprocess import fourier_chunk, normalise_images
from sort3ddepth.engine.reconstruction import backproject_smeared_streamed, backproject_streamed
from sort3ddepth.engine.smearing import LocalSmears
from sort3ddepth.engine.star_io import read_star
from sort3ddepth.tests.sorting_data import make_star

N_PER_CLASS, BOX, NX = 1000, 64, 32
# K = 2 given, sorted at 32 px, two boxes a layer: ~35 s a run on 2 cores
RUN_ARGS = [
    "--img_per_grp",
    str(N_PER_CLASS),
    "--nxinit",
    str(NX),
    "--depth_order",
    "1",
    "--seed",
    "2",
]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """2 x 1000 particles of 64 px in one stack, and the same particles split over two stacks
    (odd and even images in different files) in a second STAR."""
    folder = tmp_path_factory.mktemp("stream")
    star, truth = make_star(folder, n_per_class=N_PER_CLASS, n_classes=2, box=BOX, snr=3.0, seed=3)
    two = folder / "two"
    two.mkdir()
    imgs = mrcfile.read(folder / "particles.mrcs")
    for name, part in (("odd.mrcs", imgs[1::2]), ("even.mrcs", imgs[0::2])):
        with mrcfile.new(two / name) as m:
            m.set_data(np.ascontiguousarray(part, np.float32))
            m.voxel_size = 5.0
    out, i = [], 0
    for ln in Path(star).read_text().splitlines():
        tokens = ln.split()
        at = [j for j, t in enumerate(tokens) if "@" in t and t.endswith("particles.mrcs")]
        if at:  # a particle row: image i goes to even.mrcs or odd.mrcs
            tokens[at[0]] = f"{i // 2 + 1:06d}@{'even' if i % 2 == 0 else 'odd'}.mrcs"
            ln = " ".join(tokens)
            i += 1
        out.append(ln)
    assert i == len(truth)
    (two / "particles.star").write_text("\n".join(out) + "\n")
    return folder, Path(star), two / "particles.star", truth


def test_two_stacks_read_like_one(small):
    _, star1, star2, _ = small
    p1, p2 = read_star(star1), read_star(star2)
    assert len(p2.images.files) == 2
    np.testing.assert_array_equal(p1.load_images(), p2.load_images())
    np.testing.assert_array_equal(p1.angles, p2.angles)


def test_chunks_give_each_image_the_same_bits(small):
    """Normalising, transforming, shifting and cropping a chunk gives every image the bits it
    gets in one batch, for any chunk size (including a chunk of one image)."""
    _, star, _, _ = small
    p = read_star(star)
    imgs = p.load_images(np.arange(300))
    shifts = p.shifts[:300]
    for background in (False, True):
        whole = fourier_chunk(imgs, shifts, 15, 32, background=background)
        for chunk in (1, 7, 50):
            parts = np.concatenate(
                [
                    fourier_chunk(
                        imgs[a : a + chunk], shifts[a : a + chunk], 15, 32, background=background
                    )
                    for a in range(0, len(imgs), chunk)
                ]
            )
            assert np.array_equal(whole, parts), (background, chunk)
    one = normalise_images(imgs[:1], 15)
    assert np.array_equal(one, normalise_images(imgs[:5], 15)[:1])


def test_streamed_backprojection_has_the_bits_of_one_call(small):
    _, star, _, _ = small
    p = read_star(star)
    box = p.box
    sel = np.arange(0, len(p), 10)
    rng = np.random.default_rng(2)
    memb = np.zeros((len(sel), 3))
    memb[np.arange(len(sel)), rng.integers(0, 3, len(sel))] = rng.uniform(0.2, 1.0, len(sel))
    memb[::5] = 0.0  # some images in no map
    coefs = ctf_coefficients(p.ctf.subset(sel), box, p.pixel_size)
    f = fourier_chunk(p.load_images(sel), p.shifts[sel], box // 2 - 2, box)
    want = fourier.backproject(f, p.rotations[sel], memb, coefs, pad=2)

    def make(a, b):
        return fourier_chunk(p.load_images(sel[a:b]), p.shifts[sel[a:b]], box // 2 - 2, box)

    for chunk in (1, 11, len(sel)):
        got = backproject_streamed(
            make, len(sel), p.rotations[sel], memb, ctf_coefs=coefs, box=box, pad=2, chunk=chunk
        )
        assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1]), chunk
    assert np.abs(want[0]).max() > 0


def test_streamed_smeared_backprojection_has_the_bits_of_local_smears(small):
    """Meridien mode's final maps: the smear entries of each chunk's particles, inserted chunk
    by chunk, sum to the bits of LocalSmears over all particles at once."""
    _, star, _, _ = small
    p = read_star(star)
    box, n = p.box, 40
    rng = np.random.default_rng(5)
    cnt = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)
    parent = np.repeat(np.arange(n), cnt)
    e = len(parent)
    rots = p.rotations[parent] @ np.array(
        [[1, 0, 0], [0, np.cos(0.05), -np.sin(0.05)], [0, np.sin(0.05), np.cos(0.05)]]
    )
    smears = SmearSet(
        offsets,
        parent,
        rots,
        p.shifts[parent] + rng.normal(0, 0.7, (e, 2)),
        rng.uniform(0.1, 1.0, e),
        np.zeros(e, np.int64),
        np.zeros(e, np.int64),
        np.zeros(e, np.int64),
    )
    norm = rng.uniform(0.8, 1.2, n)
    coefs = ctf_coefficients(p.ctf.subset(np.arange(n)), box, p.pixel_size)
    groups = rng.integers(0, 2, n)
    shell_w = rng.uniform(0.5, 2.0, (2, box // 2 + 2))
    memb = np.zeros((n, 2))
    memb[np.arange(n), rng.integers(0, 2, n)] = 1.0
    base = fourier_chunk(p.load_images(np.arange(n)), None, 15, box, background=True)
    sm = LocalSmears.build(smears, base, box, norm, coefs=coefs, groups=groups, n_precompute=0)
    npad = fourier.padded_size(box, 2)
    want = sm.backproject(np.arange(n), memb, 2, npad, rmax=None, shell_w=shell_w)

    def make(a, b):
        return fourier_chunk(p.load_images(np.arange(a, b)), None, 15, box, background=True)

    for chunk in (3, n):
        got = backproject_smeared_streamed(
            make,
            smears,
            norm,
            coefs,
            groups=groups,
            member_weights=memb,
            box=box,
            pad=2,
            shell_w=shell_w,
            chunk=chunk,
        )
        assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1]), chunk


def _results(out):
    """Every result of a run: cluster files' text, maps' voxels, the summary without times."""
    res = {}
    for f in sorted(Path(out).rglob("*")):
        rel = str(f.relative_to(out))
        if f.suffix == ".txt" and f.name not in ("log.txt", "command.txt"):
            res[rel] = f.read_text()
        elif f.suffix == ".mrc":
            res[rel] = mrcfile.read(f).tobytes()
        elif f.suffix == ".npy":
            res[rel] = np.load(f).tobytes()
    s = json.loads((Path(out) / "summary.json").read_text())
    for k in ("wall_seconds", "pose_seconds", "generations"):
        s.pop(k, None)
    res["summary"] = json.dumps(s, sort_keys=True)
    return res


@pytest.fixture(scope="module")
def free_run(small):
    """The reference: one stack, the default chunk size, no memory cap."""
    folder, star, _, _ = small
    out = folder / "free"
    code, _, text = _run_with_peak(["--instack", star, "--output_dir", out] + RUN_ARGS, folder)
    assert code == 0, text[-3000:]
    return out


@pytest.mark.slow
def test_chunk_size_and_stack_files_change_no_result(small, free_run, tmp_path, monkeypatch):
    """The same sort from two stacks (odd and even images in different files) read 13 images at
    a time: identical clusters, maps (every voxel), posteriors and summary as the one-stack run
    read with the default chunk (1,024 images of 64 px)."""
    _, _, star2, truth = small
    assert 13 < particles_mod.chunk_images(BOX) < 2 * N_PER_CLASS  # the reference: 2 chunks
    monkeypatch.setattr(particles_mod, "CHUNK_BYTES", 13 * 4 * BOX * BOX)
    assert particles_mod.chunk_images(BOX) == 13
    out = tmp_path / "two_stacks"
    assert cli.run(["--instack", str(star2), "--output_dir", str(out)] + RUN_ARGS) == 0
    a, b = _results(free_run), _results(out)
    assert any(k.endswith(".mrc") for k in a) and "Cluster_001.txt" in a
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    # and the sort is a real one: two clusters, each of one true class
    for name in ("Cluster_000.txt", "Cluster_001.txt"):
        idx = np.array(a[name].split(), int)
        assert np.bincount(truth[idx]).max() / len(idx) > 0.95


# the child reports its own peak (VmHWM, reset at exec): getrusage's ru_maxrss of a child also
# counts the parent's pages it held between fork and exec (a big pytest process)
_CHILD = (
    "import sys\nfrom sort3ddepth.engine.cli import run\ncode = run(sys.argv[1:])\n"
    "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
    "print('VmHWM', hwm, flush=True)\nsys.exit(code)\n"
)


def _run_with_peak(args, cwd):
    """Run sort3d-depth in a child process; (exit code, its peak resident memory in bytes,
    its output)."""
    cmd = [sys.executable, "-c", _CHILD] + [str(a) for a in args]
    res = subprocess.run(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900
    )
    kb = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("VmHWM ")]
    return res.returncode, int(kb[-1]) * 1024 if kb else None, res.stdout + res.stderr


@pytest.mark.slow
def test_run_under_a_memory_cap_smaller_than_the_stack_in_memory(small, free_run, tmp_path):
    """2 x 1000 images of 64 px sorted at 32 px: holding the images at the full box as before
    streaming (40 bytes a pixel at the pre-processing peak, on top of the fixed part) would
    exceed the --memory_per_node cap the run is given; the streamed run is accepted, stays
    under the cap (measured max RSS) and gives the clusters and maps of the run without a
    cap."""
    folder, star, _, _ = small
    n = 2 * N_PER_CLASS
    cap = 1.1 * memory.bytes_per_rank(n, BOX, 1, NX)
    full_box_layout = memory.BASE_BYTES + n * BOX * BOX * 40
    assert cap < full_box_layout, (cap, full_box_layout)
    out = tmp_path / "capped"
    code, peak, text = _run_with_peak(
        [
            "--instack",
            star,
            "--output_dir",
            out,
            "--memory_per_node",
            cap / memory.GB,
            "--overhead",
            0,
        ]
        + RUN_ARGS,
        folder,
    )
    assert code == 0, text[-3000:]
    assert peak <= cap, f"peak {peak / 2**20:.0f} MiB over the cap {cap / 2**20:.0f} MiB"
    a, b = _results(free_run), _results(out)
    a.pop("summary"), b.pop("summary")
    assert a == b
