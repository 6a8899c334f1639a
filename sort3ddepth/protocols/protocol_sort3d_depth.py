"""ProtSort3DDepth: SORT3D_DEPTH reproducible 3D clustering as a Scipion protocol.

Steps (each one skipped on "Continue" when it already finished with the same arguments, and
each one also skips its own work when its results are already on disk):
  1. convertInputStep: the (enabled) input particles -> extra/particles.star + particles.mrcs
     (RELION 3.1 conventions, see sort3ddepth.convert) and extra/particle_ids.txt (their object
     ids in STAR row order, to map the engine's 0-based indices back to particles).
  2. runSortStep: `python -m sort3ddepth.engine.cli ...` through runJob with numberOfMpi, so the
     plugin's MPICH mpirun (or hosts.conf / the queue template) launches it; output in
     extra/sort3d/ (summary.json, written last, marks a finished engine run).
  3. createOutputStep: outputClasses (SetOfClasses3D) and outputVolumes (SetOfVolumes). Every
     particle of outputClasses carries its posterior (ATTR_POSTERIOR, from posteriors.npy) and
     every class / volume its estimated purity (ATTR_PURITY, from summary.json).
"""

import json
import os
import shlex
import shutil

import pyworkflow.utils as pwutils
from pwem.constants import ALIGN_PROJ
from pwem.objects import SetOfClasses3D, SetOfVolumes, Volume
from pwem.protocols import ProtClassify3D
from pyworkflow.object import Boolean, Float, Integer
from pyworkflow.protocol import params
from pyworkflow.protocol.constants import LEVEL_ADVANCED

from .. import convert
from ..engine.options import DEFAULT_MIN_PURITY, DataSummary, SortOptions, validate
from ..engine.results import SummaryError, read_summary

INPUT_PARTICLES = 0
INPUT_MERIDIEN = 1

#: extra attributes stored on every particle of the output classes
ATTR_CLUSTER = "_sort3d_cluster"
ATTR_GENERATION = "_sort3d_generation"
#: the particle's posterior probability of the class it is in (for the unaccounted class: of its
#: most probable cluster), from the engine's posteriors.npy. The name RELION's classifications
#: use in Scipion (the relion plugin stores rlnMaxValueProbDistribution under it), so that
#: exports to RELION carry it, as the engine's all_particles.star does.
ATTR_POSTERIOR = "_rlnMaxValueProbDistribution"
#: a class's (and its volume's) estimated purity: the mean posterior of its members; none for the
#: unaccounted class and for runs of an engine without posteriors
ATTR_PURITY = "_sort3d_estimatedPurity"
#: form parameter -> (the engine's option, True when the form asks the reversed question)
FORM_OPTIONS = {
    "refinementDir": ("refinement_dir", False),
    "niterForSorting": ("niter_for_sorting", False),
    "nxinit": ("nxinit", False),
    "radius": ("radius", False),
    "symmetry": ("sym", False),
    "imgPerGrp": ("img_per_grp", False),
    "minPurity": ("min_purity", False),
    "poseSigmaDeg": ("pose_sigma_deg", False),
    "poseSigmaPx": ("pose_sigma_px", False),
    "memoryPerNode": ("memory_per_node", False),
    "overhead": ("overhead", False),
    "depthOrder": ("depth_order", False),
    "nsmear": ("nsmear", False),
    "orientationGroups": ("orientation_groups", False),
    "doUnaccounted": ("not_include_unaccounted", True),
    "useBackgroundNoise": ("notapplybckgnoise", True),
    "checkSmearing": ("check_smearing", False),
    "numCoreSet": ("num_core_set", False),
    "computeOnTheFly": ("compute_on_the_fly", False),
    "nstep": ("nstep", False),
    "freezeGroups": ("not_freeze_groups", True),
    "useUmat": ("use_umat", False),
    "seed": ("seed", False),
}
#: the engine's options in the order the protocol passes them (engine_args.txt)
_MERIDIEN_ARGS = [
    "refinement_dir",
    "niter_for_sorting",
    "nsmear",
    "check_smearing",
    "compute_on_the_fly",
]
_STACK_ARGS = ["instack", "nxinit"]
_COMMON_ARGS = [
    "output_dir",
    "radius",
    "sym",
    "img_per_grp",
    "nstep",
    "memory_per_node",
    "overhead",
    "depth_order",
    "orientation_groups",
    "num_core_set",
    "min_purity",
    "mask3D",
    "focus",
    "not_include_unaccounted",
    "notapplybckgnoise",
    "not_freeze_groups",
    "use_umat",
    "seed",
]

#: what a meridien refinement folder must hold for the form's check (the engine checks the rest)
MERIDIEN_TRACKER = os.path.join("main000", "Tracker_000.json")


class ProtSort3DDepth(ProtClassify3D):
    """Reproducible 3D clustering (SORT3D_DEPTH) of particles whose 3D orientations and CTF are
    known; the orientations are not changed. Independent runs of K-means with a minimum group
    size (MGSK-means) are compared two by two and only the reproduced groups are kept, generation
    after generation; the particles that are never reproduced form the unaccounted set (the last
    class). After SPHIRE's sp_sort3d_depth.py."""

    _label = "sort3d depth"
    _possibleOutputs = {"outputClasses": SetOfClasses3D, "outputVolumes": SetOfVolumes}

    # -------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam(
            "inputType",
            params.EnumParam,
            default=INPUT_PARTICLES,
            choices=["particles", "meridien refinement"],
            display=params.EnumParam.DISPLAY_HLIST,
            label="Input from",
            help="*particles*: a set of particles with 3D alignment (projection "
            "alignment, e.g. from a 3D refinement) and CTF; sorting from a stack "
            "uses only the orientation parameters, which is useful for data "
            "refined, say, with RELION.\n"
            "*meridien refinement*: a completed meridien 3D refinement folder "
            "(uses all meridien information, i.e. smear, normalisations and "
            "such). The folder is read as SPHIRE wrote it, with the particle "
            "stack it names (an EMAN2 .hdf stack is read directly; a bdb: stack "
            "must be converted once: e2proc2d.py bdb:DIR#NAME DIR/NAME.hdf). "
            "Outputs: the "
            "cluster maps (SetOfVolumes) and the engine's Cluster_###.txt files of "
            "meridien particle ids.",
        )
        form.addParam(
            "inputParticles",
            params.PointerParam,
            pointerClass="SetOfParticles",
            pointerCondition="hasAlignmentProj and hasCTF",
            important=True,
            condition=f"inputType == {INPUT_PARTICLES}",
            label="Input images stack",
            help="Particles to sort, with 3D alignment (ALIGN_PROJ) and CTF. They are "
            "written once as a RELION STAR file with one MRC stack (disabled "
            "particles are left out). Sorting switches to stack mode.",
        )
        form.addParam(
            "refinementDir",
            params.PathParam,
            condition=f"inputType == {INPUT_MERIDIEN}",
            label="Meridien refinement directory",
            help="A string denotes meridien 3D refinement directory. Sorting switches "
            "to meridien iteration mode when specified.",
        )
        form.addParam(
            "niterForSorting",
            params.IntParam,
            default=-1,
            condition=f"inputType == {INPUT_MERIDIEN}",
            label="Iteration ID of 3D refinement for importing data",
            help="By default, the program uses the iteration at which refinement "
            "achieved the best resolution. Option is valid only for meridien "
            "iteration mode.",
        )
        form.addParam(
            "nxinit",
            params.IntParam,
            default=-1,
            condition=f"inputType == {INPUT_PARTICLES}",
            label="Initial image size",
            help="Image size used for MGSKmeans in case of starting sorting from a "
            "data stack. By default (-1), the program determines window size. "
            "Option is valid only for stack mode.",
        )
        form.addParam(
            "mask3D",
            params.PointerParam,
            pointerClass="VolumeMask",
            allowsNull=True,
            label="3D mask",
            help="The global 3D mask for clustering (a mask of the particles' box "
            "size). Imported from 3D refinement unless user wishes a different "
            "one in meridien iteration mode. Default: none (a soft sphere of the "
            "particle radius).",
        )
        form.addParam(
            "focus",
            params.PointerParam,
            pointerClass="VolumeMask",
            allowsNull=True,
            label="Focus 3D mask",
            help="A binary 3D mask for focused clustering (same box size as the "
            "particles). Default: none.",
        )
        form.addParam(
            "radius",
            params.IntParam,
            default=-1,
            label="Estimated particle radius [Pixels]",
            help="An integer value that is smaller than half of the box size. "
            "Imported from refinement unless user wishes a different one in "
            "meridien iteration mode. -1: half the box size minus 2.",
        )
        form.addParam(
            "symmetry",
            params.StringParam,
            default="c1",
            label="Point-group symmetry",
            help="Point group symmetry of the macromolecular structure (c<n>, d<n>, "
            "t, o, i). Imported from refinement unless the user wishes a "
            "different one in meridien iteration mode. Require specification in "
            "stack mode.",
        )
        form.addParam(
            "imgPerGrp",
            params.IntParam,
            default=-1,
            label="Number of images per group",
            help="User expected group size in integer. By default (-1) sorting is set "
            "on search mode (the number of groups is found). The only sorting "
            "parameter the user has to determine.",
        )
        form.addParam(
            "minPurity",
            params.FloatParam,
            default=DEFAULT_MIN_PURITY,
            label="Purity target per cluster",
            help="Estimated purity each output cluster must keep (0.5-1). Every "
            "particle gets a posterior probability over the final clusters; a "
            "cluster takes its particles in decreasing posterior while the mean "
            "posterior of its members (its estimated purity) stays at or above "
            "this target, and the rest go to the unaccounted set. Higher: purer "
            "clusters, fewer particles kept; lower: more particles, more of them "
            "wrongly assigned. The posterior of every particle is stored anyway "
            f"(attribute {ATTR_POSTERIOR} of the particles of the output classes), and the "
            "viewer shows purity against the fraction of particles kept, so a "
            "different trade-off can be chosen afterwards without sorting again.",
        )
        form.addParam(
            "poseSigmaDeg",
            params.FloatParam,
            default=-1.0,
            label="Pose error [deg]",
            help="Typical angular error of the particles' orientations, per axis (0-10 "
            "degrees; a consensus refinement of a mixture leaves 1-3). -1 (default): "
            "estimated from the data, as the width of the Gaussian error that best explains "
            "how each particle's fit to a consensus map changes around its orientation "
            "(exact orientations give 0). Each particle's "
            "orientation is first refined in turns of this much, then of half that, "
            "against the consensus map of its random half; it is compared with the "
            "cluster maps at that orientation and turned by this much about the three "
            "axes, and the best match counts. The particles' stored orientations are "
            "never changed. 0: the given orientations only.",
        )
        form.addParam(
            "poseSigmaPx",
            params.FloatParam,
            default=-1.0,
            label="Origin error [px]",
            help="Typical error of the particles' origins (shifts), per axis, in pixels of "
            "the input images (0-5). -1 (default): estimated from the data, as for the pose "
            "error. Each particle is first moved in shifts of this much, then of half "
            "that, along with its orientation's refinement. The stored origins are never "
            "changed. 0: the given origins only.",
        )
        form.addParam(
            "memoryPerNode",
            params.FloatParam,
            default=-1.0,
            label="Memory per node [GB]",
            help="User provided information about memory per node in GB (NOT per "
            "CPU). It will be used to evaluate the number of CPUs per node from "
            "user-provided MPI setting. By default (-1), it uses 2GB * (number of "
            "CPUs per node).",
        )
        form.addParam(
            "overhead",
            params.FloatParam,
            default=5.0,
            label="Overhead memory per node [GB]",
            help="User provided information about overhead memory usage per node in "
            "GB (NOT per CPU). By default, it is estimated as 5.0 GB per node.",
        )

        form.addSection(label="Advanced")
        form.addParam(
            "depthOrder",
            params.IntParam,
            default=2,
            validators=[params.GE(1)],
            expertLevel=LEVEL_ADVANCED,
            label="Depth order",
            help="An integer value defines the number of initial independent "
            "MGSKmeans runs (2^depth_order). The default value of 2 is a good "
            "choice.",
        )
        form.addParam(
            "nsmear",
            params.FloatParam,
            default=-1.0,
            condition=f"inputType == {INPUT_MERIDIEN}",
            expertLevel=LEVEL_ADVANCED,
            label="Number of smears for sorting",
            help="Fill it with 1 if user does not want to use all smears (-1: all). "
            "Meridien mode only. n >= 1 keeps each particle's n most probable "
            "smear entries (rescaled to its stored total) in the sorting and in "
            "the final maps; SPHIRE 1.4.2 instead uses the best entry only, "
            "unrescaled, and only in the final maps.",
        )
        form.addParam(
            "orientationGroups",
            params.IntParam,
            default=20,
            validators=[params.GE(1)],
            expertLevel=LEVEL_ADVANCED,
            label="Number of orientation groups",
            help="Number of orientation groups in an asymmetric unit. The data "
            "orientation parameters are cast into them, to prevent sorting by "
            "angle (e.g. top views in one group and side views in another).",
        )
        form.addParam(
            "doUnaccounted",
            params.BooleanParam,
            default=True,
            expertLevel=LEVEL_ADVANCED,
            label="Do unaccounted reconstruction",
            help="Yes (default): the unaccounted images are output as the last "
            "cluster (and its map reconstructed) in each generation and in the "
            "final result; here it becomes the last class, labelled "
            "'unaccounted'. No: do not reconstruct unaccounted elements "
            "(command line: --not_include_unaccounted; question reversed).",
        )
        form.addParam(
            "useBackgroundNoise",
            params.BooleanParam,
            default=True,
            expertLevel=LEVEL_ADVANCED,
            label="Use background noise",
            help="Yes (default): weight the data by the background noise power "
            "spectrum. No: turn off background noise weighting (command line: "
            "--notapplybckgnoise; question reversed).",
        )
        form.addParam(
            "checkSmearing",
            params.BooleanParam,
            default=False,
            condition=f"inputType == {INPUT_MERIDIEN}",
            expertLevel=LEVEL_ADVANCED,
            label="Check smearing",
            help="Print out the average smearing of all iterations of the meridien "
            "refinement. By default, the program will not print.",
        )
        form.addParam(
            "numCoreSet",
            params.IntParam,
            default=-1,
            expertLevel=LEVEL_ADVANCED,
            label="Number of core set images",
            help="Map will not be reconstructed if the number of core set images is "
            "less than this number. By default (-1), the program will choose the "
            "maximum number between minimum group size and 100.",
        )
        form.addParam(
            "computeOnTheFly",
            params.BooleanParam,
            default=False,
            condition=f"inputType == {INPUT_MERIDIEN}",
            expertLevel=LEVEL_ADVANCED,
            label="Compute on the fly",
            help="Controls the number of pre-calculated smearing images to avoid "
            "memory overflow. By default, the program calculates smearing images "
            "for 3D reconstruction prior to constrained K-means.",
        )
        form.addParam(
            "nstep",
            params.IntParam,
            default=5,
            validators=[params.GE(1)],
            expertLevel=LEVEL_ADVANCED,
            label="Number of steps to decrease minimum group size",
            help="Controls group size constrained K-means clustering: the minimum "
            "group size is decreased in this many steps, which selects out faked "
            "groups when the initial number of groups is set too large. "
            "Default 5.",
        )
        form.addParam(
            "freezeGroups",
            params.BooleanParam,
            default=True,
            expertLevel=LEVEL_ADVANCED,
            label="Freeze groups",
            help="Yes (default): freezing groups means not removing small groups "
            "during within-box comparison. No: remove small groups during within "
            "box comparison, the strategy before v1.2 (command line: "
            "--not_freeze_groups; question reversed). Used when the number of "
            "images per group is given (not in search mode).",
        )
        form.addParam(
            "useUmat",
            params.BooleanParam,
            default=False,
            expertLevel=LEVEL_ADVANCED,
            label="Use fuzzy membership of particle images in making maps",
            help="Apply fuzzy group membership to control sorting stability: it "
            "stabilises sorting and helps to select out true groups, at a cost "
            "in time. By default, it is false.",
        )
        form.addParam(
            "seed",
            params.IntParam,
            default=-1,
            expertLevel=LEVEL_ADVANCED,
            label="Random seed",
            help="Seed of every random choice (results do not depend on the number of "
            "MPI processes for a given seed). -1: drawn at random and written to "
            "the log.",
        )

        form.addParallelSection(threads=0, mpi=2)

    # -------------------------------------------------------------------------------- paths
    def _getSortDir(self, *p):
        return self._getExtraPath("sort3d", *p)

    def _getStar(self):
        return self._getExtraPath("particles.star")

    def _getStack(self):
        return self._getExtraPath("particles.mrcs")

    def _getIdsFile(self):
        return self._getExtraPath("particle_ids.txt")

    def _getConvertRecord(self):
        return self._getExtraPath("convert_done.json")

    def _getEngineRecord(self):
        return self._getExtraPath("engine_args.txt")

    def _getSummaryFile(self):
        return self._getSortDir("summary.json")

    # -------------------------------------------------------------------------------- steps
    def _isMeridien(self):
        return self.inputType == INPUT_MERIDIEN

    def _insertAllSteps(self):
        if not self._isMeridien():
            self._insertFunctionStep(self.convertInputStep, self._inputSignature())
        self._insertFunctionStep(self.runSortStep, self._engineArguments(), self._inputSignature())
        self._insertFunctionStep(self.createOutputStep)

    def _inputSignature(self):
        """What identifies the converted input (a change re-runs the conversion)."""
        if self._isMeridien():
            return f"meridien:{os.path.abspath(self.refinementDir.get())}"
        parts = self.inputParticles.get()
        return f"{self.inputParticles.getUniqueId()}:{parts.getFileName()}:{parts.getSize()}"

    def _maskFile(self, pointer):
        obj = pointer.get() if pointer.hasValue() else None
        if obj is None:
            return None
        return os.path.abspath(convert.clean_filename(obj.getFileName()))

    def _sortOptions(self):
        """The engine's options from the form (an empty field: the engine's default; _validate
        names it)."""
        values = {}
        for param, (option, reversed_question) in FORM_OPTIONS.items():
            value = getattr(self, param).get()
            if value is not None:
                values[option] = (not value) if reversed_question else value
        values["sym"] = values.get("sym", "c1").strip().lower()
        if values.get("seed") is not None and values["seed"] < 0:
            values["seed"] = None
        if self._isMeridien():
            values["refinement_dir"] = os.path.abspath(values.get("refinement_dir", ""))
        else:
            values.pop("refinement_dir", None)
            values["instack"] = self._getStar()
        values["output_dir"] = self._getSortDir()
        values["mask3D"] = self._maskFile(self.mask3D) or ""
        values["focus"] = self._maskFile(self.focus) or ""
        return SortOptions(**values)

    def _engineArguments(self):
        """The engine's command-line options (after `-m sort3ddepth.engine.cli`), one string."""
        first = _MERIDIEN_ARGS if self._isMeridien() else _STACK_ARGS
        args = self._sortOptions().to_argv(first + _COMMON_ARGS)
        return " ".join(shlex.quote(a) for a in args)

    def convertInputStep(self, signature):
        record = self._getConvertRecord()
        if os.path.exists(record) and all(
            os.path.exists(f) for f in (self._getStar(), self._getStack(), self._getIdsFile())
        ):
            with open(record) as f:
                done = json.load(f)
            if done.get("signature") == signature:
                self.info(
                    f"Input already converted ({done['n']} particles in "
                    f"{self._getStar()}): skipping the conversion."
                )
                return
        pwutils.cleanPath(record)
        n = convert.write_set_as_star(
            self.inputParticles.get(),
            self._getStar(),
            self._getIdsFile(),
            stack_path=self._getStack(),
        )
        with open(record + ".tmp", "w") as f:
            json.dump({"signature": signature, "n": n}, f)
        os.replace(record + ".tmp", record)
        self.info(f"Wrote {n} particles to {self._getStar()}")

    def runSortStep(self, arguments, signature):
        out = self._getSortDir()
        record = self._getEngineRecord()
        what = arguments + "\n" + signature + "\n"
        same = False
        if os.path.exists(record):
            with open(record) as f:
                same = f.read() == what
        if same and os.path.exists(self._getSummaryFile()):
            self.info(
                f"The sorting has finished before ({self._getSummaryFile()} exists): skipping it."
            )
            return
        if same and os.path.exists(out):
            # the engine resumes its own interrupted run (same options, same input)
            self.info(f"Resuming the interrupted sorting in {out}")
        elif os.path.exists(out):
            # a run with other options or input: its files must not be mixed with new ones
            self.info(f"Removing the earlier sorting output {out} (other options or input)")
            shutil.rmtree(out)
        with open(record, "w") as f:
            f.write(what)
        plugin = self.getClassPackage().Plugin
        python = plugin.getEngineCommand()[0]
        engine_args = " ".join(shlex.quote(a) for a in plugin.getEngineCommand()[1:])
        self.runJob(
            python,
            engine_args + " " + arguments,
            numberOfMpi=max(1, self.numberOfMpi.get()),
            env=plugin.getEnviron(),
        )
        if not os.path.exists(self._getSummaryFile()):
            raise RuntimeError(
                f"The sorting ended without writing {self._getSummaryFile()}; see "
                f"{self._getSortDir('log.txt')}"
            )

    def _readSummary(self):
        """The engine's results.Summary; SummaryError (one line) for a file it cannot read."""
        return read_summary(self._getSummaryFile())

    def _readPosteriors(self, summary, n_rows):
        """posteriors.npy (n_rows, final clusters) of the run, or None when the engine wrote none
        (older engine) or it does not match the summary (then a warning in the log)."""
        if not summary.posteriors:
            return None
        fn = self._getSortDir(summary.posteriors)
        n_regular = len(summary.regular)
        try:
            import numpy as np

            post = np.load(fn)
        except (OSError, ValueError) as e:
            self.warning(
                f"Cannot read the posteriors {fn} ({e}): the particles get no {ATTR_POSTERIOR}."
            )
            return None
        if post.ndim != 2 or post.shape != (n_rows, n_regular):
            self.warning(
                f"The posteriors {fn} have shape {post.shape}, not ({n_rows} particles, "
                f"{n_regular} clusters): the particles get no {ATTR_POSTERIOR}."
            )
            return None
        return post

    def _createMeridienOutputs(self, summary):
        """Meridien input has no Scipion particle set to classify: register the maps (with
        their clusters' estimated purity); the members are in the engine's Cluster_###.txt files
        (meridien particle ids) and their posteriors in posteriors.npy (rows in the same
        order)."""
        sampling = float(summary.pixel_size)
        volumes = self._createSetOfVolumes()
        volumes.setSamplingRate(sampling)
        for c in summary.clusters:
            if c.map:
                volumes.append(self._volume(c, int(c.id) + 1, sampling))
        self._defineOutputs(outputVolumes=volumes)

    def _volume(self, c, objId, sampling):
        """The Volume of a results.Cluster's map, labelled, with its estimated purity."""
        vol = Volume()
        vol.setObjId(objId)
        vol.setLocation(self._getSortDir(c.map))
        vol.setSamplingRate(sampling)
        vol.setObjLabel(_classLabel(c))
        setattr(vol, ATTR_PURITY, Float(c.estimated_purity))
        return vol

    def createOutputStep(self):
        try:
            summary = self._readSummary()
        except SummaryError as e:
            raise RuntimeError(f"Cannot register the outputs: {e}") from None
        if self._isMeridien():
            return self._createMeridienOutputs(summary)
        ids = convert.read_ids(self._getIdsFile())
        sampling = self.inputParticles.get().getSamplingRate()
        membership = {}  # particle objId -> (cluster id, generation)
        clusters = {}  # class id -> cluster entry
        for c in summary.clusters:
            with open(self._getSortDir(c.file)) as f:
                rows = [int(t) for t in f.read().split()]
            for r in rows:
                membership[int(ids[r])] = (int(c.id), int(c.generation))
            clusters[int(c.id) + 1] = c
        rowOf = {int(objId): r for r, objId in enumerate(ids)}
        post = self._readPosteriors(summary, len(ids))

        def posterior(objId, cid):
            """Its posterior of cluster cid (0-based); of its most probable cluster when cid is
            the unaccounted set (or none); None when unknown."""
            r = rowOf.get(objId)
            if r is None:
                return None
            return float(post[r, cid] if 0 <= cid < post.shape[1] else post[r].max())

        def mapFile(c):
            return self._getSortDir(c.map) if c.map else None

        def updateItem(item, row):
            cid, gen = membership.get(item.getObjId(), (-1, -1))
            item.setClassId(cid + 1)  # 0: in no cluster, not classified
            setattr(item, ATTR_CLUSTER, Integer(cid))
            setattr(item, ATTR_GENERATION, Integer(gen))
            if post is not None:  # all particles or none: a set's items share attributes
                setattr(item, ATTR_POSTERIOR, Float(posterior(item.getObjId(), cid)))

        def updateClass(cls):
            c = clusters[cls.getObjId()]
            rep = cls.getRepresentative()
            fn = mapFile(c)
            if fn:
                rep.setLocation(fn)
            rep.setSamplingRate(sampling)
            cls.setSamplingRate(sampling)
            cls.setObjLabel(_classLabel(c))
            cls._sort3d_unaccounted = Boolean(bool(c.unaccounted))
            cls._sort3d_generation = Integer(int(c.generation))
            cls._sort3d_resolution = Float(float(c.resolution_A or 0.0))
            setattr(cls, ATTR_PURITY, Float(c.estimated_purity))

        classes = self._createSetOfClasses3D(self.inputParticles)
        classes.classifyItems(updateItemCallback=updateItem, updateClassCallback=updateClass)

        volumes = self._createSetOfVolumes()
        volumes.setSamplingRate(sampling)
        for cid in sorted(clusters):
            if clusters[cid].map:
                volumes.append(self._volume(clusters[cid], cid, sampling))

        self._defineOutputs(outputClasses=classes, outputVolumes=volumes)
        self._defineSourceRelation(self.inputParticles, classes)
        self._defineSourceRelation(self.inputParticles, volumes)

    # -------------------------------------------------------------------------------- info
    def _validate(self):
        """The engine's rules (options.validate, named by the form's labels) and the checks of
        the form's own objects: the input set or folder and the masks."""
        errors = [
            f"{self._optionLabel(option)}: is empty."
            for param, (option, _) in FORM_OPTIONS.items()
            if getattr(self, param).get() is None and param not in ("refinementDir", "seed")
        ]
        data = None
        if self._isMeridien():
            errors += self._meridienFolderProblems()
        elif self.inputParticles.get() is not None:
            parts = self.inputParticles.get()
            errors += self._particleProblems(parts)
            if parts.getXDim():
                data = DataSummary(parts.getSize(), parts.getXDim())
        problems = validate(self._sortOptions(), data, name=self._optionLabel, check_input=False)
        errors += [f"{p}." for p in problems]
        if not self._isMeridien():
            errors += self._maskProblems(data.box if data else 0)
        return errors

    def _optionLabel(self, option):
        """How the messages name an engine option: the form's label and parameter name."""
        for param, (name, _) in FORM_OPTIONS.items():
            if name == option:
                return f"{self.getParam(param).label.get()} ({param})"
        return f"--{option}"

    def _meridienFolderProblems(self):
        folder = self.refinementDir.get()
        if not folder:
            return ["Meridien refinement directory: no folder given."]
        if not os.path.isdir(folder):
            return [f"Meridien refinement directory {folder} does not exist."]
        if not os.path.isfile(os.path.join(folder, MERIDIEN_TRACKER)):
            return [
                f"Meridien refinement directory {folder} has no {MERIDIEN_TRACKER}: it is "
                f"not a meridien refinement folder."
            ]
        return []

    def _particleProblems(self, parts):
        """3D alignment, CTF and MRC image files."""
        errors = []
        if parts.getAlignment() != ALIGN_PROJ:
            errors.append(
                f"The input particles have no 3D alignment (their alignment is "
                f"'{parts.getAlignment()}'). sort3d depth keeps the orientations of a "
                f"3D refinement: give particles with projection alignment "
                f"(ALIGN_PROJ), e.g. the output of a 3D auto-refine."
            )
        if not parts.hasCTF():
            errors.append(
                "The input particles have no CTF. Estimate the CTF of their "
                "micrographs (or import the particles with their CTF) first."
            )
        try:
            bad = convert.unsupported_files(parts.getUniqueValues("_filename"))
        except Exception:
            bad = []
        if bad:
            errors.append(
                f"The particle images must be MRC files (.mrc/.mrcs); these are not: "
                f"{', '.join(bad[:5])}. Convert them first (e.g. with a 'convert' or "
                f"'extract' protocol)."
            )
        return errors

    def _maskProblems(self, box):
        """Each mask must be an MRC file of the particles' box."""
        errors = []
        for label, pointer in (("3D mask", self.mask3D), ("Focus 3D mask", self.focus)):
            mask = pointer.get() if pointer.hasValue() else None
            if mask is None:
                continue
            fn = mask.getFileName()
            if not convert.is_mrc_file(fn):
                errors.append(f"{label} {fn} is not an MRC file.")
                continue
            dims = mask.getDim()
            if box and dims and tuple(dims) != (box, box, box):
                errors.append(
                    f"{label} {fn} has dimensions {'x'.join(map(str, dims))}; the "
                    f"particles are {box} px (it must be {box} x {box} x {box})."
                )
        return errors

    def _warnings(self):
        warnings = []
        if self.inputType != INPUT_PARTICLES:
            return warnings
        if (self.numberOfMpi.get() or 1) < 2:
            warnings.append(
                "The sorting will run as a single process; use several MPI "
                "processes to make it faster."
            )
        parts = self.inputParticles.get()
        if parts is not None and self.imgPerGrp.get() == -1:
            warnings.append(
                "Number of images per group is -1: search mode finds the number "
                "of groups itself and takes longer; set the expected group size if "
                "you know it."
            )
        if parts is not None and parts.getSize() < 1000:
            warnings.append(
                f"Only {parts.getSize()} particles: the groups found from so few images may not "
                f"be reliable."
            )
        return warnings

    def _summary(self):
        if os.path.exists(self._getSummaryFile()):
            try:
                return _summaryLines(self._readSummary())
            except SummaryError as e:
                return [f"Cannot read the results: {e}"]
        if self._isMeridien():
            return [f"Input: meridien refinement {self.refinementDir.get()}; output not ready yet."]
        if self.inputParticles.get() is not None:
            grp = self.imgPerGrp.get()
            mode = "search mode" if grp == -1 else f"{grp} images per group"
            return [
                f"Input: {self.inputParticles.get().getSize()} particles; {mode}.",
                "Output not ready yet.",
            ]
        return []

    def _methods(self):
        if not os.path.exists(self._getSummaryFile()):
            return []
        try:
            s = self._readSummary()
        except SummaryError as e:
            return [f"Cannot read the results: {e}"]
        grp = self.imgPerGrp.get()
        mode = "search mode" if grp == -1 else f"{grp} images per group"
        sizes = ", ".join(str(c.size) for c in s.regular)
        return [
            f"{s.n_particles} particles were sorted by reproducible 3D clustering without "
            f"re-alignment (SORT3D_DEPTH [Huang2019sort3d] of SPHIRE [Moriya2017], "
            f"re-implemented in sort3ddepth) with symmetry {self.symmetry.get()}, {mode}, "
            f"depth order {self.depthOrder.get()} and {self.orientationGroups.get()} "
            f"orientation groups. {len(s.regular)} stable cluster(s) were found (sizes "
            f"{sizes})."
        ]

    def _citations(self):
        return ["Huang2019sort3d", "Moriya2017"]


def _classLabel(c):
    """The label of a results.Cluster's class and volume."""
    return "unaccounted" if c.unaccounted else f"cluster {int(c.id):03d}"


def _summaryLines(s):
    """The protocol's summary of a finished run (a results.Summary)."""
    sizes = ", ".join(str(c.size) for c in s.regular)
    lines = [
        f"{s.n_particles} particles sorted in {s.mode or '?'} mode ({len(s.generations)} "
        f"generation(s)): {len(s.regular)} stable cluster(s) of sizes {sizes}."
    ]
    if s.unaccounted is not None:
        lines.append(f"Unaccounted particles (last class): {s.unaccounted.size}.")
    else:
        accounted = sum(c.size for c in s.regular)
        lines.append(f"Unaccounted particles (not output): {s.n_particles - accounted}.")
    res = [c.resolution_A for c in s.regular if c.resolution_A]
    if res:
        lines.append(f"Map resolutions (FSC 0.143): {', '.join(f'{r:.1f}' for r in res)} A.")
    purity = [c.estimated_purity for c in s.regular]
    if s.min_purity is not None or any(p is not None for p in purity):
        target = "-" if s.min_purity is None else f"{s.min_purity:g}"
        values = ", ".join("-" if p is None else f"{p:.3f}" for p in purity) or "-"
        lines.append(f"Estimated purity per cluster (target {target}): {values}.")
    if s.pose_sigma_deg:
        lines.append(
            f"Each image's pose refined against its half's consensus map, and scored at it "
            f"and at neighbours turned by {s.pose_sigma_deg:g} deg (orientations unchanged)."
        )
    if s.pose_sigma_px:
        lines.append(
            f"Each image's origin refined in shifts of {s.pose_sigma_px:.3g} px (origins "
            "unchanged)."
        )
    if s.half_sets == "input":
        lines.append("Half sets: the refinement's own (each image scored against the other's).")
    return lines
