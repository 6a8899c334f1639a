"""The Scipion protocol ProtSort3DDepth, run by pyworkflow under plain pytest (the repository's
root conftest.py sets the Scipion environment).

- TestSort3DDepthRun: a simulated set of 3 conformations x 400 particles (48 px) is written as a
  RELION STAR file, turned into a Scipion SetOfParticles (ALIGN_PROJ + CTF), imported with
  ProtImportParticles, sorted with 2 MPI ranks, and the outputs are checked (class count, sizes,
  purity against the true labels, extra attributes incl. each particle's posterior and each
  class's estimated purity, volumes); then the run is "continued" after
  an interruption and must not redo the conversion or the sorting.
- TestSort3DDepthValidate: one readable _validate message per bad input.
- TestSort3DDepthForm: the form opens in a real Tk window under Xvfb (skipped, with the reason,
  when Xvfb is not installed) and shows the reversed flags as positive questions.
"""

import json
import os
import shutil
import subprocess
import time
import uuid

import mrcfile
import numpy as np
import pytest
from pyworkflow.tests import BaseTest, setupTestProject

from sort3ddepth import convert
from sort3ddepth.engine import fourier
from sort3ddepth.engine.simulate import load_demo_map, make_conformations, simulate_particles
from sort3ddepth.engine.star_io import write_star
from sort3ddepth.protocols.protocol_sort3d_depth import ATTR_POSTERIOR, ATTR_PURITY

BOX = 48
N_PER_CLASS = 400
PIXEL_SIZE = 5.0 * 64 / BOX


def _data_folder(tag):
    root = os.environ.get("SCIPION_TESTS_OUTPUT") or os.environ.get("TMPDIR", "/tmp")
    folder = os.path.join(root, f"sort3ddepth_{tag}_{uuid.uuid4().hex[:8]}")
    os.makedirs(folder)
    return folder


def _simulated_set(folder, n_per_class=N_PER_CLASS, seed=2):
    """particles.star + .mrcs of 3 conformations and the matching Scipion sqlite set; every
    particle keeps its true class (1-based) as _rlnClassNumber."""
    rng = np.random.default_rng(seed)
    vol = fourier.resize_volume(load_demo_map(64), BOX)
    maps = make_conformations(vol, 3, rng, radius=8)
    ps = simulate_particles(maps, n_per_class, PIXEL_SIZE, rng, snr=2.0)
    star, _ = write_star(ps, os.path.join(folder, "particles.star"))
    sqlite = convert.star_to_scipion(star, os.path.join(folder, "particles.sqlite"))
    return sqlite, ps


def _sphere_mask(path, box, radius):
    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    mask = np.clip((radius + 2 - r) / 4.0, 0.0, 1.0).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(mask)
        m.voxel_size = PIXEL_SIZE
    return path


def _import_particles(test, sqlite, label):
    from pwem.protocols import ProtImportParticles

    prot = test.newProtocol(
        ProtImportParticles,
        objLabel=label,
        importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
        sqliteFile=sqlite,
        samplingRate=PIXEL_SIZE,
        voltage=300.0,
        sphericalAberration=2.7,
        amplitudeContrast=0.1,
        magnification=10000,
    )
    test.launchProtocol(prot)
    return prot


def _import_mask(test, path, label):
    from pwem.protocols import ProtImportMask

    prot = test.newProtocol(ProtImportMask, objLabel=label, maskPath=path, samplingRate=PIXEL_SIZE)
    test.launchProtocol(prot)
    return prot


# s; a sorting run of the test set takes ~30 s on 2 busy cores
SORT_TIMEOUT = float(os.environ.get("SORT3DDEPTH_TEST_SORT_TIMEOUT", 300))
DEAD_GRACE = 10.0  # s a run may show active in run.db after its process ended (the last write)


def _run_db_status(test, prot):
    """(status, active, PID) of the run as its own run.db says now (read afresh, nothing
    stored): the PID is the one the running protocol wrote, not the launcher's."""
    import pyworkflow.protocol as pwprot

    run = pwprot.getProtocolFromDb(test.proj.path, prot.getDbPath(), prot.getObjId())
    try:
        return run.getStatus(), run.isActive(), run.getPid()
    finally:
        run.getProject().closeMapper()
        run.closeMappers()


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _launch_with_timeout(test, prot, timeout=SORT_TIMEOUT):
    """Launch and wait like BaseTest.launchProtocol, but stop the run (its whole process tree:
    mpirun and the engine ranks) and fail instead of waiting forever if it hangs. The wait
    reads the run's own run.db each second instead of Project._updateProtocol: that stamps the
    protocol with run.db's time taken AFTER reading it, so a run that ends in between looks up
    to date for good, and its vanished PID then marks it failed ("Process N not found running";
    seen on a loaded machine). A run whose process is gone while run.db still says active for
    DEAD_GRACE seconds is reported as died."""
    test.proj.launchProtocol(prot, wait=False)
    t0, gone_since = time.time(), None
    while True:
        time.sleep(1.0)
        if time.time() - t0 > timeout:
            test.proj.stopProtocol(prot)
            test.printLastLogLines(prot)
            raise AssertionError(
                f"{prot.getRunName()} did not finish in {timeout:.0f} s and was stopped; see "
                f"{prot.getLogPaths()[0]}"
            )
        try:
            status, active, pid = _run_db_status(test, prot)
        except Exception:  # run.db locked or mid-write: read it again next second
            continue
        if not active:
            break
        if pid in (None, 0) or _pid_alive(pid):
            gone_since = None
        elif gone_since is None:
            gone_since = time.time()
        elif time.time() - gone_since > DEAD_GRACE:
            raise AssertionError(
                f"{prot.getRunName()}: its process {pid} is gone and run.db still "
                f"says {status}; see {prot.getLogPaths()[0]}"
            )
    prot.lastUpdateTimeStamp.set(None)  # the final state from run.db, whatever its time stamp
    test.proj._updateProtocol(prot)
    if not prot.isFinished():
        test.printLastLogLines(prot)
        raise AssertionError(
            f"{prot.getRunName()} ended with status {prot.getStatus()}: {prot.getErrorMessage()}"
        )
    return prot


@pytest.mark.slow
class TestSort3DDepthRun(BaseTest):
    """End to end: import -> sort (2 MPI ranks) -> outputs; then continue after an interruption."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.folder = _data_folder("run")
        cls.sqlite, cls.truth = _simulated_set(cls.folder)
        cls.protImport = _import_particles(cls, cls.sqlite, "simulated particles")
        cls.protMask = _import_mask(
            cls, _sphere_mask(os.path.join(cls.folder, "mask.mrc"), BOX, 20), "sphere mask"
        )
        cls.protSort = None
        cls.sortError = None

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    @classmethod
    def _sorted(cls):
        """The finished sorting run (launched by the first test that needs it)."""
        if cls.sortError:
            raise AssertionError(f"the sorting run failed before: {cls.sortError}")
        if cls.protSort is None:
            from sort3ddepth.protocols import ProtSort3DDepth

            prot = cls.newProtocol(
                ProtSort3DDepth,
                objLabel="sort3d depth 2 mpi",
                imgPerGrp=N_PER_CLASS,
                depthOrder=1,
                seed=1,
                numberOfMpi=2,
            )
            prot.inputParticles.set(cls.protImport)
            prot.inputParticles.setExtended("outputParticles")
            prot.mask3D.set(cls.protMask)
            prot.mask3D.setExtended("outputMask")
            t0 = time.time()
            try:
                _launch_with_timeout(cls, prot)
            except AssertionError as e:
                cls.sortError = str(e)  # the later tests fail at once, not re-run it
                raise
            print(f"sort3d depth protocol run: {time.time() - t0:.1f} s")
            cls.protSort = prot
        return cls.protSort

    def test_imported_input(self):
        parts = self.protImport.outputParticles
        self.assertEqual(parts.getSize(), 3 * N_PER_CLASS)
        self.assertTrue(parts.hasCTF())
        self.assertTrue(parts.hasAlignmentProj())
        self.assertEqual(parts.getXDim(), BOX)

    def test_run_and_outputs(self):
        prot = self._sorted()
        n = self.protImport.outputParticles.getSize()
        summary = self._engine_summary(prot)
        classes = prot.outputClasses
        sizes = self._check_class_sizes(classes, summary, n)
        purities, majority = self._check_classes(prot, classes, summary, sizes)

        # purity against the true labels: a wrong angle/origin convention gives mixed clusters
        pure = {m for m, p in zip(majority, purities) if p >= 0.9}
        self.assertGreaterEqual(len(pure), 2, f"purities {purities}, majorities {majority}")
        self.assertGreaterEqual(np.mean(purities), 0.85)
        self._check_volumes(prot, summary)
        self._check_info(prot, summary)

    def _engine_summary(self, prot):
        """The engine ran under mpirun with 2 ranks and with the mask; its summary.json."""
        with open(prot._getExtraPath("sort3d", "log.txt")) as f:
            log = f.read()
        self.assertIn("2 MPI rank(s)", log)
        with open(prot._getExtraPath("sort3d", "summary.json")) as f:
            summary = json.load(f)
        self.assertIn("mask3D", open(prot._getExtraPath("sort3d", "command.txt")).read())
        return summary

    def _check_class_sizes(self, classes, summary, n):
        """One class per summary cluster, the sizes adding up to the input; {class id: size}."""
        self.assertEqual(classes.getSize(), len(summary["clusters"]))
        self.assertGreaterEqual(classes.getSize(), 2)  # >= 2 clusters (+ the unaccounted set)
        sizes = {cls.getObjId(): cls.getSize() for cls in classes}
        self.assertEqual(sum(sizes.values()), n, "class sizes must add up to the input")
        for c in summary["clusters"]:
            self.assertEqual(sizes[c["id"] + 1], c["size"])
        return sizes

    def _check_classes(self, prot, classes, summary, sizes):
        """Every class and particle against the summary and the posteriors file; returns the
        purity and the majority true class of each regular class."""
        n = sum(sizes.values())
        # every particle's posterior over the final clusters, rows in STAR row order
        post = np.load(prot._getExtraPath("sort3d", summary["posteriors"]))
        n_regular = sum(1 for c in summary["clusters"] if not c["unaccounted"])
        self.assertEqual(post.shape, (n, n_regular))
        rows = {
            int(i): r
            for r, i in enumerate(convert.read_ids(prot._getExtraPath("particle_ids.txt")))
        }
        # the unaccounted set (when the engine left particles unaccounted) is the last class,
        # labelled so
        unaccounted_ids = [c["id"] + 1 for c in summary["clusters"] if c["unaccounted"]]
        self.assertIn(unaccounted_ids, ([], [max(sizes)]))
        seen = {"ids": set(), "posteriors": {}}
        purities, majority = [], []
        for cls in classes.iterItems(orderBy="id"):
            cid = cls.getObjId()
            entry = summary["clusters"][cid - 1]
            unaccounted = cid in unaccounted_ids
            self._check_class(cls, entry, unaccounted)
            true = self._check_members(cls, entry, unaccounted, post=post, rows=rows, seen=seen)
            counts = np.bincount(true, minlength=4)[1:]
            if not unaccounted:
                purities.append(counts.max() / counts.sum())
                majority.append(int(counts.argmax()))
                print(f"class {cid}: {cls.getSize()} particles, true classes {counts}")
        self.assertEqual(len(seen["ids"]), n)
        for cid, values in sorted(seen["posteriors"].items()):  # for the log: the engine's figures
            print(
                f"class {cid}: estimated purity {getattr(classes[cid], ATTR_PURITY).get()}, "
                f"member posteriors mean {np.mean(values):.4f} min {np.min(values):.4f}"
            )
        return purities, majority

    def _check_class(self, cls, entry, unaccounted):
        """A class's flags, label, generation, map and estimated purity (none for the
        unaccounted set) are the summary's."""
        cid = cls.getObjId()
        self.assertEqual(bool(cls._sort3d_unaccounted.get()), unaccounted)
        self.assertEqual(
            cls.getObjLabel(), "unaccounted" if unaccounted else f"cluster {cid - 1:03d}"
        )
        self.assertEqual(cls._sort3d_generation.get(), entry["generation"])
        rep = cls.getRepresentative()
        if entry.get("map"):
            self.assertTrue(os.path.exists(rep.getFileName()), rep.getFileName())
            self.assertAlmostEqual(rep.getSamplingRate(), PIXEL_SIZE, places=4)
        purity = getattr(cls, ATTR_PURITY).get()
        if unaccounted:
            self.assertIsNone(purity)
        else:
            self.assertIsNotNone(entry.get("estimated_purity"), entry)
            self.assertEqual(purity, entry["estimated_purity"])
            self.assertTrue(0.0 <= purity <= 1.0, purity)

    def _check_members(self, cls, entry, unaccounted, *, post, rows, seen):
        """Each particle of a class carries its posterior of the class (unaccounted: of its most
        probable cluster), cluster, generation, CTF and transform; returns their true classes
        (``seen`` collects the ids and posteriors over all classes)."""
        cid = cls.getObjId()
        true = []
        for p in cls.iterItems():
            r = rows[p.getObjId()]
            value = getattr(p, ATTR_POSTERIOR).get()
            self.assertTrue(0.0 <= value <= 1.0, value)
            self.assertAlmostEqual(
                value, float(post[r, cid - 1] if not unaccounted else post[r].max()), places=6
            )
            seen["posteriors"].setdefault(cid, []).append(value)
            self.assertEqual(p._sort3d_cluster.get(), cid - 1)
            self.assertEqual(p._sort3d_generation.get(), entry["generation"])
            self.assertTrue(p.hasCTF() and p.hasTransform())
            true.append(p._rlnClassNumber.get())
            seen["ids"].add(p.getObjId())
        return true

    def _check_volumes(self, prot, summary):
        """One volume per map, sampling rate, size and estimated purity set."""
        vols = prot.outputVolumes
        n_maps = sum(1 for c in summary["clusters"] if c.get("map"))
        self.assertEqual(vols.getSize(), n_maps)
        self.assertAlmostEqual(vols.getSamplingRate(), PIXEL_SIZE, places=4)
        for v in vols:
            self.assertAlmostEqual(v.getSamplingRate(), PIXEL_SIZE, places=4)
            self.assertEqual(tuple(v.getDim()), (BOX, BOX, BOX))
            with mrcfile.open(v.getFileName(), permissive=True) as m:
                self.assertAlmostEqual(float(m.voxel_size.x), PIXEL_SIZE, places=3)
                self.assertEqual(m.data.shape, (BOX, BOX, BOX))
        for v in vols:
            entry = summary["clusters"][v.getObjId() - 1]
            self.assertEqual(getattr(v, ATTR_PURITY).get(), entry.get("estimated_purity"))

    def _check_info(self, prot, summary):
        """The protocol's summary, methods and citations."""
        self.assertTrue(any("stable cluster" in s for s in prot.summary()))
        purities = ", ".join(
            f"{c['estimated_purity']:.3f}" for c in summary["clusters"] if not c["unaccounted"]
        )
        self.assertIn(
            f"Estimated purity per cluster (target {summary['min_purity']:g}): {purities}.",
            prot.summary(),
        )
        self.assertTrue(prot.methods())
        self.assertEqual(set(prot.getCitations()), {"Huang2019sort3d", "Moriya2017"})

    def _continue(self, prot, unfinished):
        """Mark the given steps unfinished (as an interruption leaves them) and continue."""
        from pyworkflow.protocol.constants import MODE_RESUME, STATUS_FAILED
        from pyworkflow.protocol.protocol import StepSet

        steps = StepSet(filename=prot.getStepsFile())
        marked = [step.clone() for step in steps if step.funcName.get() in unfinished]
        self.assertEqual(len(marked), len(unfinished))
        for step in marked:  # not while iterating: an update ends the iteration
            step.setStatus(STATUS_FAILED)
            steps.update(step)
        steps.write()
        steps.close()
        with open(prot.getLogPaths()[0]) as f:
            offset = len(f.read())
        prot.runMode.set(MODE_RESUME)
        t0 = time.time()
        _launch_with_timeout(self, prot)
        self.assertTrue(prot.isFinished())
        with open(prot.getLogPaths()[0]) as f:
            log = f.read()[offset:]
        return prot, log, time.time() - t0

    def test_zz_a_continue_skips_finished_work(self):
        """Continue after an interruption that left every step unfinished but the results of
        the conversion and the sorting on disk: neither is redone."""
        prot = self._sorted()
        summary_file = prot._getExtraPath("sort3d", "summary.json")
        star = prot._getExtraPath("particles.star")
        before = (os.path.getmtime(summary_file), os.path.getmtime(star))
        prot, log, elapsed = self._continue(
            prot, ("convertInputStep", "runSortStep", "createOutputStep")
        )
        self.assertIn("Input already converted", log)
        self.assertIn("The sorting has finished before", log)
        self.assertNotIn("Running command", log)
        self.assertEqual(before, (os.path.getmtime(summary_file), os.path.getmtime(star)))
        with open(summary_file) as f:
            self.assertEqual(prot.outputClasses.getSize(), len(json.load(f)["clusters"]))
        print(f"continue without work took {elapsed:.1f} s")

    def test_zz_b_continue_after_interrupted_sorting(self):
        """The sorting was killed half-way (its folder has log.txt but no summary.json): continue
        keeps the converted input and the engine resumes its run (finished units loaded)."""
        prot = self._sorted()
        sort_dir = prot._getExtraPath("sort3d")
        star = prot._getExtraPath("particles.star")
        star_time = os.path.getmtime(star)
        os.remove(os.path.join(sort_dir, "summary.json"))
        for fn in os.listdir(sort_dir):
            if fn.startswith("vol_cluster"):
                os.remove(os.path.join(sort_dir, fn))
        prot, log, elapsed = self._continue(prot, ("runSortStep", "createOutputStep"))
        self.assertIn("Resuming the interrupted sorting", log)
        with open(os.path.join(sort_dir, "log.txt")) as f:
            self.assertIn("resume: gen000 loaded from an earlier run", f.read())
        self.assertIn("Running command", log)
        self.assertEqual(star_time, os.path.getmtime(star))
        with open(os.path.join(sort_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(prot.outputClasses.getSize(), len(summary["clusters"]))
        self.assertEqual(sum(c.getSize() for c in prot.outputClasses), 3 * N_PER_CLASS)
        print(f"continue with a new sorting took {elapsed:.1f} s")


class TestSort3DDepthValidate(BaseTest):
    """Each bad input gives a readable message before anything runs."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.folder = _data_folder("validate")
        cls.sqlite, _ = _simulated_set(cls.folder, n_per_class=20)
        cls.protImport = _import_particles(cls, cls.sqlite, "small set")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    def _prot(self, parts=None, **kwargs):
        from sort3ddepth.protocols import ProtSort3DDepth

        prot = self.newProtocol(ProtSort3DDepth, **kwargs)
        if parts is None:
            prot.inputParticles.set(self.protImport)
            prot.inputParticles.setExtended("outputParticles")
        else:
            prot.inputParticles.set(parts)
        return prot

    def _modified_set(self, name, alignment=None, ctf=True):
        """A copy of the small set without alignment and/or CTF (a set object, not imported)."""
        from pwem.constants import ALIGN_NONE
        from pwem.objects import SetOfParticles

        fn = os.path.join(self.folder, name + ".sqlite")
        shutil.copy(self.sqlite, fn)
        parts = SetOfParticles(filename=fn)
        parts.loadAllProperties()
        if alignment is not None:
            parts.setAlignment(ALIGN_NONE)
        if not ctf:
            parts.setHasCTF(False)
        parts.write()
        return parts

    def test_good_input_is_valid(self):
        self.assertEqual(self._prot(imgPerGrp=20).validate(), [])

    def test_no_alignment(self):
        errors = self._prot(
            self._modified_set("noalign", alignment="none"), imgPerGrp=20
        ).validate()
        self.assertTrue(any("no 3D alignment" in e for e in errors), errors)

    def test_no_ctf(self):
        errors = self._prot(self._modified_set("noctf", ctf=False), imgPerGrp=20).validate()
        self.assertTrue(any("have no CTF" in e for e in errors), errors)
        self.assertFalse(any("3D alignment" in e for e in errors), errors)

    def test_radius_too_large(self):
        errors = self._prot(radius=BOX // 2).validate()
        self.assertEqual(
            [
                "Estimated particle radius [Pixels] (radius) 24: must be smaller than "
                "half the box (48 px images: at most 23)."
            ],
            errors,
        )
        self.assertEqual(self._prot(radius=BOX // 2 - 1).validate(), [])

    def test_group_size_larger_than_the_set(self):
        errors = self._prot(imgPerGrp=100).validate()
        self.assertEqual(
            [
                "Number of images per group (imgPerGrp) 100: larger than the number "
                "of particles (60)."
            ],
            errors,
        )
        errors = self._prot(imgPerGrp=40).validate()
        self.assertEqual(
            [
                "Number of images per group (imgPerGrp) 40: gives 1 group for 60 "
                "particles; need at least 2 (use at most 30, or -1 for search mode)."
            ],
            errors,
        )
        errors = self._prot(imgPerGrp=2).validate()
        self.assertEqual(
            [
                "Number of images per group (imgPerGrp) 2: too small, 30 groups for 60 "
                "particles (at most 29)."
            ],
            errors,
        )

    def test_bad_symmetry(self):
        errors = self._prot(symmetry="x7").validate()
        self.assertEqual(len(errors), 1, errors)  # named once
        self.assertTrue(errors[0].startswith("Point-group symmetry (symmetry) x7: unknown"), errors)

    def test_meridien_folder_missing(self):
        from sort3ddepth.protocols.protocol_sort3d_depth import INPUT_MERIDIEN

        missing = os.path.join(self.folder, "no_such_meridien_run")
        errors = self._prot(inputType=INPUT_MERIDIEN, refinementDir=missing).validate()
        self.assertEqual([f"Meridien refinement directory {missing} does not exist."], errors)
        errors = self._prot(inputType=INPUT_MERIDIEN, refinementDir="").validate()
        self.assertIn("Meridien refinement directory: no folder given.", errors)

    def test_meridien_folder_check_and_engine_arguments(self):
        from sort3ddepth.protocols.protocol_sort3d_depth import INPUT_MERIDIEN

        errors = self._prot(inputType=INPUT_MERIDIEN, refinementDir=self.folder).validate()
        self.assertTrue(len(errors) == 1 and "main000/Tracker_000.json" in errors[0], errors)
        refine = os.path.join(self.folder, "Refine3D_fake")
        os.makedirs(os.path.join(refine, "main000"), exist_ok=True)
        open(os.path.join(refine, "main000", "Tracker_000.json"), "w").close()
        prot = self._prot(inputType=INPUT_MERIDIEN, refinementDir=refine)
        self.assertEqual(prot.validate(), [])
        prot.nsmear.set(1)
        prot.computeOnTheFly.set(True)
        args = prot._engineArguments().split()
        self.assertEqual(args[:2], ["--refinement_dir", refine])
        for a in ("--niter_for_sorting", "--nsmear", "--compute_on_the_fly", "--output_dir"):
            self.assertIn(a, args)
        self.assertNotIn("--instack", args)

    def _outputs_of(self, summary, posteriors=None):
        """createOutputStep on a hand-made engine folder (no engine run): the small set in three
        classes of 20 STAR rows, the last one the unaccounted set; returns the output classes
        read back from their sqlite file."""
        from pwem.objects import SetOfClasses3D

        prot = self._prot(imgPerGrp=20)
        self.proj.saveProtocol(prot)
        os.makedirs(prot._getSortDir())
        ids = [p.getObjId() for p in self.protImport.outputParticles]
        self.assertEqual(len(ids), 60)
        with open(prot._getIdsFile(), "w") as f:
            f.write("\n".join(str(i) for i in ids) + "\n")
        for c in summary["clusters"]:
            with open(prot._getSortDir(c["file"]), "w") as f:
                f.write("\n".join(str(r) for r in range(20 * c["id"], 20 * c["id"] + 20)))
        if posteriors is not None:
            np.save(prot._getSortDir("posteriors.npy"), posteriors)
        with open(prot._getSummaryFile(), "w") as f:
            json.dump(summary, f)
        prot.createOutputStep()
        classes = SetOfClasses3D(filename=prot.outputClasses.getFileName())
        return classes, {i: r for r, i in enumerate(ids)}, prot

    def _fake_summary(self, **extra):
        entry = lambda i, **kw: dict(
            {
                "id": i,
                "file": f"Cluster_{i:03d}.txt",  # noqa: E731
                "size": 20,
                "generation": 0,
                "unaccounted": False,
            },
            **kw,
        )
        return dict(
            {
                "n_particles": 60,
                "pixel_size": PIXEL_SIZE,
                "generations": [{"generation": 0, "n_images": 60}],
                "clusters": [
                    entry(0, **extra.pop("c0", {})),
                    entry(1, **extra.pop("c1", {})),
                    entry(2, unaccounted=True),
                ],
            },
            **extra,
        )

    def test_outputs_carry_posteriors_and_purity(self):
        """Each particle of outputClasses carries its posterior of its class (posteriors.npy
        row = its STAR row), the unaccounted ones that of their most probable cluster; each class
        the estimated purity of summary.json; the protocol's summary names them."""
        rng = np.random.default_rng(3)
        post = rng.dirichlet([1.0, 1.0], size=60).astype(np.float32)
        summary = self._fake_summary(
            c0={"estimated_purity": 0.97},
            c1={"estimated_purity": 0.9512},
            min_purity=0.95,
            posteriors="posteriors.npy",
        )
        classes, row, prot = self._outputs_of(summary, post)
        self.assertEqual(classes.getSize(), 3)
        for cls in classes.iterItems(orderBy="id"):
            k = cls.getObjId() - 1
            self.assertEqual(
                getattr(cls, ATTR_PURITY).get(), summary["clusters"][k].get("estimated_purity")
            )
            self.assertEqual(cls.getSize(), 20)
            for p in cls.iterItems():
                r = row[p.getObjId()]
                self.assertEqual(r // 20, k)
                expected = post[r, k] if k < 2 else post[r].max()
                self.assertAlmostEqual(getattr(p, ATTR_POSTERIOR).get(), float(expected), places=6)
        self.assertIsNone(getattr(classes[3], ATTR_PURITY).get())
        self.assertIn("Estimated purity per cluster (target 0.95): 0.970, 0.951.", prot.summary())

    def test_outputs_of_an_older_engine(self):
        """A summary without posteriors or purity (older engine): no posterior attribute, no
        purity, no purity line in the summary; no error. A posteriors file of the wrong shape is
        left out the same way (with a warning)."""
        classes, _, prot = self._outputs_of(self._fake_summary())
        self.assertEqual(sum(c.getSize() for c in classes), 60)
        for cls in classes:
            self.assertIsNone(getattr(cls, ATTR_PURITY).get())
            for p in cls.iterItems():
                self.assertFalse(hasattr(p, ATTR_POSTERIOR))
                self.assertEqual(p._sort3d_cluster.get(), cls.getObjId() - 1)
        self.assertFalse(any("purity" in line for line in prot.summary()), prot.summary())
        classes, _, _ = self._outputs_of(
            self._fake_summary(posteriors="posteriors.npy"), np.ones((60, 3), np.float32)
        )
        self.assertFalse(hasattr(next(iter(classes[1].iterItems())), ATTR_POSTERIOR))

    def test_unreadable_summary_gives_one_line(self):
        """A summary of a newer schema, or one without a field the protocol needs: one line in
        the protocol's summary and methods, and createOutputStep fails with that line."""
        from sort3ddepth.engine.results import SCHEMA_VERSION

        newer = self._fake_summary(schema_version=SCHEMA_VERSION + 1)
        missing = self._fake_summary()
        del missing["clusters"][1]["generation"]
        for summary, words in (
            (newer, f"newer sort3ddepth (schema_version {SCHEMA_VERSION + 1}"),
            (missing, "clusters[1] has no field 'generation'"),
        ):
            with self.assertRaises(RuntimeError) as e:
                self._outputs_of(summary)
            self.assertIn(words, str(e.exception))
            self.assertEqual(len(str(e.exception).splitlines()), 1)
            prot = self._prot(imgPerGrp=20)
            os.makedirs(prot._getSortDir(), exist_ok=True)
            with open(prot._getSummaryFile(), "w") as f:
                json.dump(summary, f)
            for lines in (prot.summary(), prot._methods()):
                self.assertEqual(len(lines), 1, lines)
                self.assertTrue(
                    lines[0].startswith("Cannot read the results: ") and words in lines[0], lines
                )

    def test_mask_of_another_size(self):
        protMask = _import_mask(
            self, _sphere_mask(os.path.join(self.folder, "m32.mrc"), 32, 10), "32 px mask"
        )
        prot = self._prot(imgPerGrp=20)
        prot.focus.set(protMask)
        prot.focus.setExtended("outputMask")
        errors = prot.validate()
        self.assertTrue(
            any(
                e.startswith("Focus 3D mask") and "32x32x32" in e and "must be 48 x 48 x 48" in e
                for e in errors
            ),
            errors,
        )

    def test_warnings(self):
        text = " ".join(self._prot(imgPerGrp=-1, numberOfMpi=1).warnings())
        self.assertIn("single process", text)
        self.assertIn("search mode", text)
        self.assertIn("Only 60 particles", text)

    def test_engine_arguments(self):
        """Reversed questions become the engine's --not_... flags."""
        prot = self._prot(
            imgPerGrp=20,
            doUnaccounted=False,
            useBackgroundNoise=False,
            freezeGroups=False,
            useUmat=True,
            seed=7,
        )
        args = prot._engineArguments().split()
        for flag in (
            "--not_include_unaccounted",
            "--notapplybckgnoise",
            "--not_freeze_groups",
            "--use_umat",
        ):
            self.assertIn(flag, args)
        self.assertEqual(args[args.index("--seed") + 1], "7")
        args = self._prot(imgPerGrp=20)._engineArguments().split()
        for flag in (
            "--not_include_unaccounted",
            "--notapplybckgnoise",
            "--not_freeze_groups",
            "--use_umat",
            "--seed",
            "--mask3D",
            "--focus",
        ):
            self.assertNotIn(flag, args)
        # every option is one the engine's command line knows
        from sort3ddepth.engine.cli import build_parser

        known = {s for a in build_parser()._actions for s in a.option_strings}
        self.assertTrue({a for a in args if a.startswith("--")} <= known)

    def test_min_purity(self):
        """The form's purity target goes to the engine as --min_purity; its default is the
        engine's; out of 0.5-1 it is refused by name."""
        from sort3ddepth.engine.cli import build_parser
        from sort3ddepth.engine.membership import DEFAULT_MIN_PURITY
        from sort3ddepth.protocols.protocol_sort3d_depth import INPUT_MERIDIEN

        prot = self._prot(imgPerGrp=20)
        self.assertEqual(prot.minPurity.get(), DEFAULT_MIN_PURITY)
        args = prot._engineArguments().split()
        self.assertEqual(args.count("--min_purity"), 1)
        self.assertEqual(float(args[args.index("--min_purity") + 1]), DEFAULT_MIN_PURITY)
        prot = self._prot(imgPerGrp=20, minPurity=0.9)
        args = prot._engineArguments().split()
        self.assertEqual(args[args.index("--min_purity") + 1], "0.9")
        # the engine reads it back as given (parse the options the protocol builds)
        parsed = build_parser().parse_args(args)
        self.assertEqual(parsed.min_purity, 0.9)
        for ok in (0.5, 0.9, 1.0):
            self.assertEqual(self._prot(imgPerGrp=20, minPurity=ok).validate(), [], ok)
        for bad in (0.4, 1.2):
            self.assertEqual(
                self._prot(imgPerGrp=20, minPurity=bad).validate(),
                [f"Purity target per cluster (minPurity) {bad:g}: must be between 0.5 and 1."],
            )
        # meridien input is checked too (before its own checks)
        errors = self._prot(inputType=INPUT_MERIDIEN, refinementDir="", minPurity=0.2).validate()
        self.assertIn(
            "Purity target per cluster (minPurity) 0.2: must be between 0.5 and 1.", errors
        )
        args = (
            self._prot(inputType=INPUT_MERIDIEN, refinementDir=self.folder, minPurity=0.75)
            ._engineArguments()
            .split()
        )
        self.assertEqual(args[args.index("--min_purity") + 1], "0.75")


class TestSort3DDepthForm(BaseTest):
    """The protocol form in a real Tk window on a virtual X display."""

    @classmethod
    def setUpClass(cls):
        from sort3ddepth.tests.xdisplay import xvfb_display

        cls.display = xvfb_display()
        if cls.display is None:
            return
        setupTestProject(cls)
        cls.old_display = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = cls.display

    @classmethod
    def tearDownClass(cls):
        # the shared X server stays up (see tests/xdisplay.py); only DISPLAY is restored
        if cls.display is not None:
            if cls.old_display is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = cls.old_display

    def setUp(self):
        if self.display is None:
            self.skipTest(
                "Xvfb is not installed or did not start (apt-get install xvfb): the "
                "GUI form test needs a virtual X display"
            )

    def _open_form(self, prot):
        import pyworkflow.gui.project  # noqa: F401  (import before gui.form: circular imports)
        from pyworkflow.gui.form import FormWindow

        w = FormWindow("Protocol Run: ProtSort3DDepth", prot, lambda *a: None)
        w.adjustSize()
        w.root.deiconify()
        t0 = time.time()
        while time.time() - t0 < 0.8:
            w.root.update()
            time.sleep(0.02)
        return w

    def test_form_opens_with_positive_questions(self):
        from pyworkflow.protocol.constants import LEVEL_ADVANCED

        from sort3ddepth.protocols import ProtSort3DDepth
        from sort3ddepth.protocols.protocol_sort3d_depth import INPUT_MERIDIEN

        prot = self.newProtocol(ProtSort3DDepth)
        prot.expertLevel.set(LEVEL_ADVANCED)
        w = self._open_form(prot)
        try:
            widgets = w.widgetDict

            def label(name):
                return widgets[name].label.cget("text")

            def shown(name):
                return widgets[name].label.winfo_manager() == "grid"

            expected = {
                "doUnaccounted": "Do unaccounted reconstruction",
                "useBackgroundNoise": "Use background noise",
                "freezeGroups": "Freeze groups",
            }
            for name, text in expected.items():
                self.assertEqual(label(name), text)
                self.assertTrue(shown(name), name)
                # asked in the positive: 'Yes' by default
                self.assertTrue(getattr(prot, name).get())
            all_labels = " ".join(label(n) for n in widgets if hasattr(widgets[n], "label"))
            self.assertNotIn("not_", all_labels)
            # the input chooser shows only what applies
            self.assertTrue(shown("inputParticles"))
            self.assertFalse(shown("refinementDir"))
            self.assertFalse(shown("nsmear"))
            self.assertTrue(shown("mask3D") and shown("focus"))
            self.assertIn("numberOfMpi", widgets)
            widgets["inputType"].set(INPUT_MERIDIEN)
            w.root.update()
            self.assertTrue(shown("refinementDir"))
            self.assertFalse(shown("inputParticles"))
            self.assertFalse(shown("nxinit"))
            w.root.update()
            self.assertTrue(w.root.winfo_viewable())
            self.assertGreater(w.root.winfo_width(), 300)
        finally:
            w.root.destroy()


def test_protocol_in_the_gui_tree():
    """protocols.conf puts the protocol under Protocols SPA > 3D > Classify."""
    import pwem
    import pyworkflow
    import pyworkflow.gui.project  # noqa: F401  (import order of pyworkflow.gui)
    from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig

    trees = ProtocolTreeConfig.load(
        pyworkflow.Config.getDomain(),
        os.path.join(os.path.dirname(pwem.__file__), "protocols.conf"),
    )
    found = []
    for section in trees["Protocols SPA"].childs:
        for group in section.childs:
            for item in group.childs:
                if str(item.value) == "ProtSort3DDepth":
                    found.append((str(section.text), str(group.text)))
    assert found == [("3D", "Classify")]


@pytest.mark.slow
def test_batch_script_example():
    """examples/batch_sort3d_depth.py (README): project, import from STAR, MPI run, sizes."""
    import re
    import sys

    script = os.path.join(
        os.path.dirname(__file__), "..", "..", "examples", "batch_sort3d_depth.py"
    )
    name = f"batch_{uuid.uuid4().hex[:8]}"
    import psutil

    proc = subprocess.Popen(
        [
            sys.executable,
            script,
            "--demo",
            "--n_per_class",
            "250",
            "--img_per_grp",
            "250",
            "--depth_order",
            "1",
            "--seed",
            "1",
            "--mpi",
            "2",
            "--project",
            name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = proc.communicate(timeout=SORT_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        # the whole tree: the script, the protocol run, mpirun and the engine ranks
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        out, err = proc.communicate()
        raise AssertionError(
            f"the batch script did not finish in {SORT_TIMEOUT + 60:.0f} s: {out[-2000:]}"
        ) from None
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "sorted in" in out and "with 2 MPI processes" in out, out
    sizes = [
        int(m.group(1))
        for m in re.finditer(r"^\d+\s+(?:cluster \d+|unaccounted)\s+(\d+)", out, re.M)
    ]
    assert len(sizes) >= 2, out
    assert sum(sizes) == 750, out
    assert f"total 750 of 750 particles in {len(sizes)} classes" in out, out


def test_summary_says_when_poses_were_searched_around():
    """The protocol's summary names the pose neighbourhood (--pose_sigma_deg) and the origins'
    refinement (--pose_sigma_px) when the engine used them, and says nothing of them for the
    given poses alone."""
    from sort3ddepth.engine.results import Summary
    from sort3ddepth.protocols.protocol_sort3d_depth import _summaryLines

    s = Summary(n_particles=10, generations=[], clusters=[], pose_sigma_deg=2.5)
    assert _summaryLines(s)[-1] == (
        "Each image's pose refined against its half's consensus map, and scored at it and at "
        "neighbours turned by 2.5 deg (orientations unchanged)."
    )
    s.pose_sigma_deg = 0.0
    assert not any("neighbours" in line for line in _summaryLines(s))
    s.pose_sigma_px = 0.5
    assert _summaryLines(s)[-1] == (
        "Each image's origin refined in shifts of 0.5 px (origins unchanged)."
    )
    s.half_sets = "input"
    assert _summaryLines(s)[-1] == (
        "Half sets: the refinement's own (each image scored against the other's)."
    )
