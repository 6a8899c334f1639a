"""Tests of the meridien refinement reader (engine/meridien.py) and writer (meridien_writer.py)."""
import json
import os
import shutil

import numpy as np
import pytest

from sort3ddepth.engine import fourier
from sort3ddepth.engine.geometry import euler_to_matrix
from sort3ddepth.engine.meridien import (SmearSet, check_smearing, read_meridien, read_smears,
                                         smearing_statistics, unhash_smear)
from sort3ddepth.engine.meridien_writer import write_meridien
from sort3ddepth.engine.particles import ParticleDataError
from sort3ddepth.engine.simulate import load_demo_map, simulate_particles
from sort3ddepth.engine.star_io import read_star, write_star

N, BOX = 60, 32


def _angle_between(a, b):
    """Rotation angle (degrees) of a @ b.T for stacks of rotation matrices."""
    tr = np.einsum('nij,nij->n', a, b)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


@pytest.fixture(scope='module')
def simulated():
    rng = np.random.default_rng(5)
    vol = fourier.resize_volume(load_demo_map(64), BOX)
    ps = simulate_particles(vol[None], N, 10.0, rng, snr=1.0)
    ps.group = np.arange(N) % 3
    ps.norm = rng.uniform(0.8, 1.2, N)
    ps.half_set = rng.integers(0, 2, N)
    return ps


@pytest.fixture(scope='module')
def base(simulated, tmp_path_factory):
    root = tmp_path_factory.mktemp('meridien')
    ids = np.random.default_rng(3).permutation(90)[:N]      # a shuffled subset with holes
    info = write_meridien(root / 'Refine3D', simulated, iteration=2, last_iteration=3, ids=ids,
                          seed=7)
    return root, info


@pytest.fixture
def folder(base, tmp_path):
    root, info = base
    dst = tmp_path / 'Refine3D'
    shutil.copytree(root / 'Refine3D', dst)
    return dst


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------

def _compare(a, b, images=True):
    assert np.all(_angle_between(a.rotations, b.rotations) < 1e-4)
    np.testing.assert_allclose(a.shifts, b.shifts, atol=1e-5)
    for k in ('defocus_u', 'defocus_v', 'defocus_angle', 'voltage', 'cs', 'amplitude_contrast',
              'phase_shift'):
        np.testing.assert_allclose(getattr(a.ctf, k), getattr(b.ctf, k), rtol=1e-9, atol=1e-9,
                                   err_msg=k)
    np.testing.assert_array_equal(a.group, b.group)
    np.testing.assert_array_equal(a.half_set, b.half_set)
    np.testing.assert_allclose(a.norm, b.norm, atol=1e-6)
    np.testing.assert_array_equal(a.class_label, b.class_label)
    np.testing.assert_array_equal(a.micrograph, b.micrograph)
    assert a.pixel_size == pytest.approx(b.pixel_size)
    if images:
        np.testing.assert_array_equal(a.load_images(), b.load_images())


def test_round_trip_meridien_and_star(simulated, base, tmp_path):
    root, info = base
    ref = read_meridien(root / 'Refine3D')
    np.testing.assert_array_equal(ref.particle_ids, info['ids'])      # indexes_000 order kept
    assert not np.array_equal(np.sort(ref.particle_ids), np.arange(N))
    _compare(ref.particles, simulated)
    star, _ = write_star(simulated, tmp_path / 'p.star')
    from_star = read_star(star)
    _compare(ref.particles, from_star)
    # the exported STAR rows follow the meridien particles, not the stack rows
    rows = ref.particles.source['particles_table']
    assert len(rows) == N
    assert rows[0].rlnImageName.split('@')[0] == '%06d' % (info['ids'][0] + 1)
    # what the sorter needs besides the particles
    assert ref.iteration == 2 and ref.last_iteration == 3
    assert ref.radius == BOX // 2 - 2 and ref.symmetry == 'c1' and ref.mask3d is None
    np.testing.assert_allclose(ref.fsc, info['fsc'], atol=1e-6)
    np.testing.assert_allclose(ref.bckgnoise, info['bckgnoise'], rtol=1e-6)
    np.testing.assert_allclose(ref.avgnorm, info['avgvaradj'])
    np.testing.assert_allclose(ref.norm_factors,
                               np.asarray(info['avgvaradj'])[simulated.half_set] / simulated.norm,
                               rtol=1e-5)
    np.testing.assert_allclose(ref.previous_shifts, info['previous_shifts'], atol=1e-5)
    assert ref.fsc_index(0.143) == np.flatnonzero(info['fsc'] < 0.143)[0] - 1


def test_smears_decoded(simulated, base):
    root, info = base
    ref = read_meridien(root / 'Refine3D')
    sm = ref.smears
    assert sm.n_particles == N
    np.testing.assert_array_equal(sm.counts(), [len(h) for h, _ in info['smears']])
    np.testing.assert_allclose(np.add.reduceat(sm.weight, sm.offsets[:-1]), 1.0)
    assert (sm.counts() >= 3).all() and sm.counts().mean() > 3
    # each particle's entries are contiguous, by decreasing probability, the best one first
    assert np.all(np.diff(sm.parent) >= 0)
    same = sm.parent[1:] == sm.parent[:-1]
    assert np.all(sm.weight[1:][same] <= sm.weight[:-1][same])
    # decode the writer's hashes independently: direction refang[iang], psi0 + ipsi*delta,
    # shift round(previous) + rshifts[ishift]
    for i in (0, 17, N - 1):
        h, p = info['smears'][i]
        sl = slice(sm.offsets[i], sm.offsets[i + 1])
        iang, ipsi, ishift = h // 10 ** 8, (h // 1000) % 10 ** 5, h % 1000
        ra = info['refang'][iang]
        rot = euler_to_matrix(ra[:, 0], ra[:, 1], ra[:, 2] + ipsi * 3.75)
        assert np.all(_angle_between(sm.rotation[sl], rot) < 1e-4)
        prev = info['previous_shifts'][i]
        rounded = np.sign(prev) * np.floor(np.abs(prev) + 0.5)
        np.testing.assert_allclose(sm.shift[sl], rounded + info['rshifts'][ishift], atol=1e-5)
        np.testing.assert_allclose(sm.weight[sl], p / p.sum(), atol=1e-12)
    # the most probable entry is the true pose (shift up to half a grid step, ts = 0.25)
    best = sm.offsets[:-1]
    assert np.all(_angle_between(sm.rotation[best], simulated.rotations) < 1e-4)
    assert np.abs(sm.shift[best] - simulated.shifts).max() <= 0.125 + 1e-5
    assert np.abs(unhash_smear(np.array([123 * 10 ** 8 + 45 * 1000 + 6]))
                  - np.array([[123], [45], [6]])).max() == 0


def test_smear_entries_reconstruct_like_params(base):
    """How the sorter consumes a SmearSet: one inserted slice per entry (image of its parent,
    shifted by the entry's shift, at the entry's rotation, weighted by its probability). The
    smeared map matches the map from the exact parameters; flipped shift signs do not."""
    from sort3ddepth.engine.ctf import ctf_coefficients
    from sort3ddepth.engine.reconstruction import reconstruct
    root, _ = base
    ref = read_meridien(root / 'Refine3D')
    p, sm = ref.particles, ref.smears
    f = fourier.images_to_fourier(p.load_images())
    coefs = ctf_coefficients(p.ctf, p.box, p.pixel_size)

    def rec(images_f, rots, w, c):
        return reconstruct(*fourier.backproject(images_f, rots, w[:, None], c), p.box)[0]
    exact = rec(fourier.shift_images(f, p.shifts), p.rotations, np.ones(len(p)), coefs)
    smeared = rec(fourier.shift_images(f[sm.parent], sm.shift), sm.rotation, sm.weight,
                  coefs[sm.parent])
    flipped = rec(fourier.shift_images(f[sm.parent], -sm.shift), sm.rotation, sm.weight,
                  coefs[sm.parent])
    assert np.corrcoef(exact.ravel(), smeared.ravel())[0, 1] > 0.8
    assert np.corrcoef(exact.ravel(), flipped.ravel())[0, 1] < 0.5


def test_nsmear_truncation(base):
    root, _ = base
    full = read_meridien(root / 'Refine3D').smears
    one = full.truncate(1)
    assert one.n_entries == N and np.all(one.weight == 1.0)
    np.testing.assert_array_equal(one.rotation, full.rotation[full.offsets[:-1]])
    three = full.truncate(3)
    np.testing.assert_array_equal(three.counts(), np.minimum(full.counts(), 3))
    np.testing.assert_allclose(np.add.reduceat(three.weight, three.offsets[:-1]), 1.0)
    for i in (0, 5, N - 1):
        w = full.weight[full.offsets[i]:full.offsets[i] + 3]
        np.testing.assert_allclose(three.weight[three.offsets[i]:three.offsets[i + 1]],
                                   w / w.sum())
    assert full.truncate(-1) is full
    with pytest.raises(ValueError):
        full.truncate(0)
    ref2 = read_meridien(root / 'Refine3D', nsmear=2)
    assert ref2.smears.counts().max() == 2
    np.testing.assert_array_equal(ref2.smear_counts, full.counts())
    sub = full.subset([4, 2])
    np.testing.assert_array_equal(sub.counts(), full.counts()[[4, 2]])
    assert sub.parent[0] == 0 and sub.parent[-1] == 1
    single = SmearSet.single(np.eye(3)[None].repeat(4, 0), np.zeros((4, 2)))
    assert single.n_entries == 4 and single.counts().tolist() == [1] * 4


def test_check_smearing_memory(base):
    root, _ = base
    rows = check_smearing(root / 'Refine3D', 24)
    assert [r['iteration'] for r in rows] == [2, 3]
    sm = read_smears(root / 'Refine3D', 2)
    st = smearing_statistics(sm, 24)
    assert rows[0]['n_entries'] == sm.n_entries
    assert st['bytes'] == sm.n_entries * 24 * 13 * 8
    assert st['mean_per_particle'] == pytest.approx(sm.n_entries / N)
    assert st['mean_orientations'] <= st['mean_per_particle']


# ---------------------------------------------------------------------------------------------
# iteration choice, options
# ---------------------------------------------------------------------------------------------

def test_iteration_choice(folder, simulated):
    ref = read_meridien(folder)                           # -1: best (2) from the last Tracker (3)
    assert ref.iteration == 2 and ref.last_iteration == 3
    other = read_meridien(folder, niter_for_sorting=3)
    assert other.iteration == 3
    assert _angle_between(other.particles.rotations, simulated.rotations).max() > 0.01
    with pytest.raises(ParticleDataError, match='Tracker_005.json'):
        read_meridien(folder, niter_for_sorting=5)
    t = folder / 'main003' / 'Tracker_003.json'
    d = json.loads(t.read_text())
    d['constants']['best'] = 1
    t.write_text(json.dumps(d))
    assert read_meridien(folder).iteration == 1


def test_user_options_override_tracker(folder):
    t = folder / 'main002' / 'Tracker_002.json'
    d = json.loads(t.read_text())
    d['constants'].update(sym='c5', mask3D='Refine3D/mask.mrc', radius=11)
    d['constants'].pop('stack')
    t.write_text(json.dumps(d))
    (folder / 'mask.mrc').write_bytes(b'')            # only its existence is checked here
    ref = read_meridien(folder)
    assert ref.symmetry == 'c5' and ref.radius == 11
    assert ref.mask3d == str(folder / 'mask.mrc')
    assert ref.stack_path == str(folder / 'particles.star')         # rule 4: R/particles.star
    ref = read_meridien(folder, sym='d2', radius=9, mask3d='/my/mask.mrc')
    assert (ref.symmetry, ref.radius, ref.mask3d) == ('d2', 9, '/my/mask.mrc')


def test_stack_rules(folder, tmp_path):
    os.rename(folder / 'particles.star', folder / 'data.star')
    t = folder / 'main002' / 'Tracker_002.json'
    d = json.loads(t.read_text())
    d['constants']['stack'] = 'bdb:Refine3D#data'                 # rule 3: DIR/NAME.star
    t.write_text(json.dumps(d))
    assert read_meridien(folder).stack_path == str(folder / 'data.star')
    d['constants']['stack'] = 'bdb:Refine3D#nothing'
    t.write_text(json.dumps(d))
    with pytest.raises(ParticleDataError, match=r'Tracker_002\.json.*constants\.stack'):
        read_meridien(folder)
    assert read_meridien(folder, stack=folder / 'data.star').iteration == 2   # rule 1


# ---------------------------------------------------------------------------------------------
# conventions, independent of our writer
# ---------------------------------------------------------------------------------------------

def _spider_matrix(phi, theta, psi):
    """The SPIDER/EMAN2 'spider' Euler matrix, written out term by term as in the SPIDER manual
    (rotation of the coordinate frame by phi about z, theta about the new y, psi about z)."""
    p, t, s = np.deg2rad([phi, theta, psi])
    cp, sp, ct, st, cs, ss = np.cos(p), np.sin(p), np.cos(t), np.sin(t), np.cos(s), np.sin(s)
    return np.array([[cs * ct * cp - ss * sp, cs * ct * sp + ss * cp, -cs * st],
                     [-ss * ct * cp - cs * sp, -ss * ct * sp + cs * cp, ss * st],
                     [st * cp, st * sp, ct]])


def test_sphire_euler_and_shift_convention(folder):
    lines = (folder / 'main002' / 'params_002.txt').read_text().splitlines()
    known = [(30.0, 60.0, 120.0, 1.5, -2.25), (300.5, 170.25, 10.0, -0.75, 0.5)]
    for k, (phi, theta, psi, sx, sy) in enumerate(known):
        lines[k] = '  %14.6f' * 8 % (phi, theta, psi, sx, sy, 0.5, 1.0, 1.0)
    (folder / 'main002' / 'params_002.txt').write_text('\n'.join(lines) + '\n')
    ref = read_meridien(folder)
    for k, (phi, theta, psi, sx, sy) in enumerate(known):
        np.testing.assert_allclose(ref.particles.rotations[k], _spider_matrix(phi, theta, psi),
                                   atol=1e-12)
        # SPHIRE's projection direction (sin t cos p, sin t sin p, cos t) is our viewing direction
        t, p = np.deg2rad(theta), np.deg2rad(phi)
        np.testing.assert_allclose(ref.particles.rotations[k][2],
                                   [np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)],
                                   atol=1e-12)
        # (sx, sy) = -(tx, ty) re-centres the image: RELION's origin, same sign, pixels
        np.testing.assert_allclose(ref.particles.shifts[k], [sx, sy])


# ---------------------------------------------------------------------------------------------
# missing or malformed files name the file
# ---------------------------------------------------------------------------------------------

def _edit(path, fn):
    path.write_text(fn(path.read_text()))


def _json_edit(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _first_line(text, new):
    lines = text.splitlines()
    lines[0] = new
    return '\n'.join(lines) + '\n'


def _drop_key(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


CASES = {
    'no_indexes': ('main000/indexes_000.txt', lambda p: p.unlink(), 'indexes_000.txt: missing'),
    'bad_index': ('main000/indexes_000.txt', lambda p: _edit(p, lambda t: _first_line(t, '3.5')),
                  r'indexes_000.txt: value 3.5 on data line 1'),
    'dup_index': ('main000/indexes_000.txt',
                  lambda p: _edit(p, lambda t: t + t.splitlines()[0] + '\n'),
                  'indexes_000.txt: particle id'),
    'no_chunk': ('main000/chunk_1_000.txt', lambda p: p.unlink(), 'chunk_1_000.txt: missing'),
    'chunk_unknown_id': ('main000/chunk_0_000.txt',
                         lambda p: _edit(p, lambda t: _first_line(t, '100000')),
                         'chunk_0_000.txt: particle id 100000 on data line 1'),
    'groups_short': ('main000/particle_groups_1.txt',
                     lambda p: _edit(p, lambda t: '\n'.join(t.splitlines()[1:]) + '\n'),
                     'particle_groups_1.txt: .* particle groups for'),
    'no_params': ('main002/params_002.txt', lambda p: p.unlink(), 'params_002.txt: missing'),
    'params_columns': ('main002/params_002.txt',
                       lambda p: _edit(p, lambda t: _first_line(t, '1 2 3 4 5')),
                       'params_002.txt: line 1 has 5 values'),
    'params_text': ('main002/params_002.txt',
                    lambda p: _edit(p, lambda t: _first_line(t, '1 2 x 4 5 6 7 8')),
                    r"params_002.txt: non-numeric value 'x' on line 1"),
    'params_rows': ('main002/params_002.txt',
                    lambda p: _edit(p, lambda t: '\n'.join(t.splitlines()[:-1]) + '\n'),
                    'params_002.txt: 59 parameter rows'),
    'params_norm': ('main002/params_002.txt',
                    lambda p: _edit(p, lambda t: _first_line(t, '1 2 3 4 5 6 7 0')),
                    'params_002.txt: norm'),
    'no_prev_params': ('main001/params_001.txt', lambda p: p.unlink(), 'params_001.txt: missing'),
    'no_driver': ('main002/driver_002.txt', lambda p: p.unlink(), 'driver_002.txt: missing'),
    'no_refang': ('main002/refang.txt', lambda p: p.unlink(), 'refang.txt: missing'),
    'bad_rshifts': ('main002/rshifts.txt', lambda p: _edit(p, lambda t: _first_line(t, '0.5')),
                    'rshifts.txt: line 1 has 1 values'),
    'no_smear_file': ('main002/oldparamstructure/oldparamstructure_1_000_002.json',
                      lambda p: p.unlink(), 'oldparamstructure_1_000_002.json: missing'),
    'smear_json': ('main002/oldparamstructure/oldparamstructure_0_001_002.json',
                   lambda p: _edit(p, lambda t: t[:-5]),
                   'oldparamstructure_0_001_002.json: malformed JSON'),
    'smear_hash': ('main002/oldparamstructure/oldparamstructure_0_000_002.json',
                   lambda p: _json_edit(p, lambda d: d[0][2].__setitem__(0, [10 ** 12, 0.5])),
                   'oldparamstructure_0_000_002.json: entry 0: hash 1000000000000 refers to '
                   'direction'),
    'smear_order': ('main002/oldparamstructure/oldparamstructure_0_000_002.json',
                    lambda p: _json_edit(p, lambda d: d[1].__setitem__(0, 7)),
                    'oldparamstructure_0_000_002.json: entry 1 has local index 7'),
    'smear_count': ('main002/oldparamstructure/oldparamstructure_1_001_002.json',
                    lambda p: _json_edit(p, lambda d: d.pop()),
                    'oldparamstructure_1_001_002.json: the smear files of chunk 1'),
    'tracker_json': ('main002/Tracker_002.json', lambda p: _edit(p, lambda t: t[:20]),
                     'Tracker_002.json: malformed JSON'),
    'tracker_key': ('main002/Tracker_002.json',
                    lambda p: _json_edit(p, lambda d: _drop_key(d, 'constants', 'nnxo')),
                    'Tracker_002.json: missing key constants.nnxo'),
    'tracker_avg': ('main002/Tracker_002.json',
                    lambda p: _json_edit(p, lambda d: d.__setitem__('avgvaradj', [1.0])),
                    'Tracker_002.json: missing or bad key avgvaradj'),
    'tracker_best': ('main003/Tracker_003.json',
                     lambda p: _json_edit(p, lambda d: d['constants'].__setitem__('best', 7)),
                     'Tracker_003.json: constants.best is 7'),
    'tracker_nnxo': ('main002/Tracker_002.json',
                     lambda p: _json_edit(p, lambda d: d['constants'].__setitem__('nnxo', 40)),
                     'particles.star: images are 32 pixels but'),
    'tracker_mask': ('main002/Tracker_002.json',
                     lambda p: _json_edit(p, lambda d: d['constants'].__setitem__('mask3D',
                                                                                  'nomask.hdf')),
                     "Tracker_002.json: constants.mask3D 'nomask.hdf' not found"),
    'bckgnoise_rows': ('main002/bckgnoise.mrc',
                       lambda p: (p.unlink(), (p.parent / 'bckgnoise.txt').write_text('1 1 1\n')),
                       'main002/bckgnoise.txt: has 1 particle group rows'),
    'no_star': ('particles.star', lambda p: p.unlink(), 'Tracker_002.json: constants.stack'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_files_are_named(folder, case):
    rel, change, pattern = CASES[case]
    change(folder / rel)
    with pytest.raises(ParticleDataError, match=pattern) as e:
        read_meridien(folder)
    assert str(folder) in str(e.value)


def test_background_noise_search_and_absence(folder):
    (folder / 'main002' / 'bckgnoise.mrc').unlink()
    ref = read_meridien(folder)                            # the newest earlier one is used
    assert ref.bckgnoise_path == str(folder / 'main001' / 'bckgnoise.mrc')
    for it in (0, 1, 2, 3):
        p = folder / ('main%03d' % it) / 'bckgnoise.mrc'
        if p.exists():
            p.unlink()
    with pytest.raises(ParticleDataError, match=r'main002/bckgnoise.mrc: missing background'):
        read_meridien(folder)
    (folder / 'main001' / 'bckgnoise.hdf').write_bytes(b'\x89HDF')
    with pytest.raises(ParticleDataError, match=r'main001/bckgnoise.hdf: EMAN2 HDF'):
        read_meridien(folder)
    ref = read_meridien(folder, require_bckgnoise=False)
    assert ref.bckgnoise is None and ref.bckgnoise_path is None


def test_missing_folder(tmp_path):
    with pytest.raises(ParticleDataError, match='does not exist'):
        read_meridien(tmp_path / 'nothing')
    (tmp_path / 'R' / 'main000').mkdir(parents=True)
    with pytest.raises(ParticleDataError, match='Tracker_000.json'):
        read_meridien(tmp_path / 'R')
