"""The options of one sorting run, built once and never written to afterwards.

`SortOptions` holds every option of SPHIRE's sp_sort3d_depth.py under its SPHIRE name, with its
default and unit (field metadata), plus ours (`min_purity`, `pose_sigma_deg`, `pose_sigma_px`,
`seed`, `force`, `shift_rounding`) and the values derived once the input is read (`for_input`).
The command line (`cli`) and the Scipion protocol both build one; `validate` is the one set of
rules both report with.

Pure Python (no numpy at import): the protocol imports it while Scipion discovers plugins.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

#: --min_purity default (the engine's membership.DEFAULT_MIN_PURITY; a test checks they agree)
DEFAULT_MIN_PURITY = 0.98
#: search mode starts with 7 groups (SPHIRE)
INIT_K_STACK = 7
#: fixed-K mode: at most this many groups (n // img_per_grp)
MAX_GROUPS = 29
#: --pose_sigma_deg at most: the neighbourhood is one turn each way per axis, a local search
#: for small errors, not a new alignment
MAX_POSE_SIGMA_DEG = 10.0
#: --pose_sigma_px at most (original pixels): sub-pixel to few-pixel origin errors, a local search
MAX_POSE_SIGMA_PX = 5.0


def _opt(default, text, *, unit="", argtype=None, choices=None, sphire=True):
    """A user option: its default, help text, unit and whether SPHIRE has it."""
    meta = {"help": text, "unit": unit, "argtype": argtype, "choices": choices, "sphire": sphire}
    return field(default=default, metadata=meta)


def _derived(text):
    """A value the run derives from the input (not an option of the command line)."""
    return field(default=None, compare=False, repr=False, metadata={"derived": text})


@dataclass(frozen=True)
class SortOptions:
    """Every option of a run (SPHIRE's names and defaults) and the values derived from them."""

    refinement_dir: str = _opt("", "meridien 3D refinement directory (meridien mode)")
    instack: str = _opt(
        "",
        "input particles: a RELION STAR file (stack mode); with --refinement_dir, optionally "
        "the refinement's particle stack (.hdf or STAR) when constants.stack cannot be found",
    )
    output_dir: str = _opt("", "output directory (default sort3d_DATE_TIME)")
    niter_for_sorting: int = _opt(
        -1, "meridien iteration to import (-1: the best one); meridien mode only"
    )
    nxinit: int = _opt(-1, "sorting image size (-1: chosen from the FSC)", unit="px")
    mask3D: str = _opt("", "3D mask used in the comparison")
    focus: str = _opt("", "binary 3D mask for focused clustering")
    radius: int = _opt(-1, "particle radius (-1: box/2 - 2)", unit="px")
    sym: str = _opt("c1", "point-group symmetry (c<n>, d<n>, t, o, i)")
    img_per_grp: int = _opt(
        -1,
        "expected group size; default -1 = search mode (the number of groups is found)",
        unit="images",
    )
    nstep: int = _opt(5, "steps to decrease the minimum group size")
    memory_per_node: float = _opt(-1.0, "memory per node", unit="GB")
    overhead: float = _opt(5.0, "overhead memory per node", unit="GB")
    depth_order: int = _opt(2, "2^depth_order initial independent MGSK-means boxes")
    orientation_groups: int = _opt(20, "orientation groups per asymmetric unit")
    not_include_unaccounted: bool = _opt(
        False, "do not output the unaccounted images as a last cluster"
    )
    nsmear: float = _opt(
        -1,
        "smears per particle (meridien mode; -1 = all). n >= 1 keeps each particle's n most "
        "probable entries, rescaled to its stored total, in the sorting AND the final maps "
        "(SPHIRE 1.4.2: any n > 0 = the best entry only, unrescaled, final maps only)",
        argtype=float,
    )
    shift_rounding: str = _opt(
        "even",
        "meridien mode: rounding of the previous shifts to meridien's integer pre-shift: "
        "even = Python 3 round (SPHIRE >= 1.4, default), away = Python 2 (SPHIRE <= 1.3)",
        choices=("even", "away"),
        sphire=False,
    )
    notapplybckgnoise: bool = _opt(False, "turn off background-noise weighting")
    check_smearing: bool = _opt(False, "log the smearing of the refinement")
    num_core_set: int = _opt(
        -1, "reconstruct the unaccounted core set only with at least this many images"
    )
    compute_on_the_fly: bool = _opt(False, "compute smeared slices on the fly")
    use_umat: bool = _opt(False, "fuzzy membership in the maps")
    not_freeze_groups: bool = _opt(
        False, "remove small groups during within-box comparison (general mode)"
    )
    min_purity: float = _opt(
        DEFAULT_MIN_PURITY,
        "estimated purity target per cluster (0.5-1): members enter a cluster in decreasing "
        "posterior while the mean posterior of its members stays at or above this; the rest "
        "is unaccounted (not in SPHIRE)",
        sphire=False,
    )
    pose_sigma_deg: float = _opt(
        -1.0,
        "typical angular error of the given orientations, per axis (0-10; default -1: "
        "estimated from the data, as the width of the Gaussian pose error that best explains "
        "how each image's fit to a consensus map changes around its given pose): each image's "
        "pose is first refined in turns of this much, then of half that, against the "
        "consensus map of its random half, and it is scored at that pose and at the pose "
        "turned by this much about the three axes, the best score counting; the stored "
        "orientations never change (0: the given poses alone; not in SPHIRE)",
        unit="deg",
        sphire=False,
    )
    pose_sigma_px: float = _opt(
        -1.0,
        "typical error of the given origins, per axis (0-5; default -1: estimated from the "
        "data, as for --pose_sigma_deg): each image is first moved in shifts of this much, "
        "then of half that, with its pose's refinement; the stored origins never change (0: "
        "the given origins; not in SPHIRE)",
        unit="px",
        sphire=False,
    )
    seed: int | None = _opt(
        None, "random seed (default: drawn and logged)", argtype=int, sphire=False
    )
    force: bool = _opt(
        False,
        "discard the results of an earlier run in --output_dir instead of resuming it",
        sphire=False,
    )

    # derived once the input is read (for_input); never options of the command line
    n_particles: int | None = _derived("number of input particles")
    k_initial: int | None = _derived("initial number of groups (search mode: 7)")
    meridien: Any = _derived("meridien.MeridienRefinement in meridien mode, else None")
    mask_map: Any = _derived("--mask3D (or meridien's mask) as a box^3 array, or None")
    focus_map: Any = _derived("--focus as a box^3 array, or None")
    smear_precompute: int | None = _derived("smeared slices precomputed per rank (meridien)")

    # ------------------------------------------------------------------------ building
    @classmethod
    def option_fields(cls):
        """The user options (dataclass fields), in command-line order."""
        return [f for f in dataclasses.fields(cls) if "derived" not in f.metadata]

    @classmethod
    def from_argv(cls, argv=None):
        """From a command line (argv None: sys.argv[1:]); argparse exits on a malformed one."""
        return cls.from_namespace(build_parser().parse_args(argv))

    @classmethod
    def from_namespace(cls, ns):
        """From an argparse Namespace (or any object with the options' names)."""
        return cls(**{f.name: getattr(ns, f.name) for f in cls.option_fields()})

    def for_input(
        self, *, n_particles, meridien=None, mask_map=None, focus_map=None, smear_precompute=None
    ):
        """A copy with the values derived from the input read (the only way they are set)."""
        return dataclasses.replace(
            self,
            n_particles=int(n_particles),
            k_initial=self.group_sizes(n_particles)[1],
            meridien=meridien,
            mask_map=mask_map,
            focus_map=focus_map,
            smear_precompute=smear_precompute,
        )

    def to_argv(self, names=None):
        """The command line that gives back these options: the named ones in that order (a
        False flag, an empty path or no seed left out), or every one not at its default."""
        by_name = {f.name: f for f in self.option_fields()}
        if names is None:
            names = [k for k, f in by_name.items() if getattr(self, k) != f.default]
        argv = []
        for k in names:
            value = getattr(self, k)
            if isinstance(by_name[k].default, bool):
                argv += [f"--{k}"] if value else []
            elif value is not None and value != "":
                argv += [f"--{k}", str(value)]
        return argv

    def record(self, exclude=("output_dir", "seed", "force")):
        """The options that identify a run (run_options.json), input paths made absolute."""
        rec = {f.name: getattr(self, f.name) for f in self.option_fields()}
        rec = {k: v for k, v in rec.items() if k not in exclude}
        for k in ("instack", "refinement_dir", "mask3D", "focus"):
            if rec.get(k):
                rec[k] = os.path.abspath(rec[k])
        return rec

    # ------------------------------------------------------------------------ derived values
    @property
    def search(self):
        """Search mode: the number of groups is found (no --img_per_grp)."""
        return self.img_per_grp <= 1

    @property
    def frozen(self):
        """Freeze groups in the within-box comparison (fixed K only)."""
        return not self.search and not self.not_freeze_groups

    @property
    def mode(self):
        return "search" if self.search else ("freeze" if self.frozen else "general")

    @property
    def apply_noise(self):
        return not self.notapplybckgnoise

    @property
    def include_unaccounted(self):
        return not self.not_include_unaccounted

    def group_sizes(self, n_particles):
        """(search mode, initial K, working group size) for n particles."""
        if self.search:
            return True, INIT_K_STACK, max(n_particles // INIT_K_STACK, 1)
        return False, n_particles // self.img_per_grp, self.img_per_grp


def build_parser():
    """The argparse parser of SortOptions' fields (names, defaults, help and units in one
    place: options.py)."""
    p = argparse.ArgumentParser(
        prog="sort3d-depth",
        description="Reproducible 3D clustering (SORT3D_DEPTH) of particles whose orientations "
        "and CTF are known; the orientations are not changed.",
    )
    for f in SortOptions.option_fields():
        meta, text = f.metadata, f.metadata["help"]
        text += f" [{meta['unit']}]" if meta["unit"] else ""
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", action="store_true", help=text)
        else:
            kind = meta["argtype"] or type(f.default)
            p.add_argument(
                f"--{f.name}", type=kind, default=f.default, help=text, choices=meta["choices"]
            )
    return p


@dataclass(frozen=True)
class DataSummary:
    """What the checks need to know of the input: its particle count and box (px)."""

    n_particles: int
    box: int


def _cli_name(option):
    return f"--{option}"


def validate(options, data=None, *, name: Callable[[str], str] = _cli_name, check_input=True):
    """Every problem of these options as one line naming the option; [] when all is well.

    data: a DataSummary for the checks that need the particles (None: only the others).
    name: how an option is named in the messages (the protocol gives its form labels).
    check_input: check --instack / --refinement_dir (the protocol checks its own input form).
    """
    from .symmetry import parse_symmetry

    o, problems = options, []

    def bad(option, value, text):
        problems.append(f"{name(option)} {value}: {text}")

    if check_input:
        problems += _input_problems(o, name)
    if o.refinement_dir:
        if o.niter_for_sorting != -1 and o.niter_for_sorting < 1:
            bad("niter_for_sorting", o.niter_for_sorting, "must be -1 (the best iteration) or >= 1")
        if o.nsmear != -1 and (o.nsmear < 1 or o.nsmear != int(o.nsmear)):
            bad("nsmear", f"{o.nsmear:g}", "must be -1 (all smears) or a whole number >= 1")
    try:
        parse_symmetry(o.sym)
    except ValueError as e:
        bad("sym", o.sym, str(e))
    for option, low, unit in (
        ("depth_order", 1, ""),
        ("nstep", 1, ""),
        ("orientation_groups", 1, ""),
        ("overhead", 0, " GB"),
    ):
        if getattr(o, option) < low:
            bad(option, getattr(o, option), f"must be at least {low}{unit}")
    if not 0.5 <= o.min_purity <= 1.0:
        bad("min_purity", f"{o.min_purity:g}", "must be between 0.5 and 1")
    if o.pose_sigma_deg != -1 and not 0.0 <= o.pose_sigma_deg <= MAX_POSE_SIGMA_DEG:
        bad(
            "pose_sigma_deg",
            f"{o.pose_sigma_deg:g}",
            f"must be between 0 and {MAX_POSE_SIGMA_DEG:g} (or -1: estimated from the data)",
        )
    if o.pose_sigma_px != -1 and not 0.0 <= o.pose_sigma_px <= MAX_POSE_SIGMA_PX:
        bad(
            "pose_sigma_px",
            f"{o.pose_sigma_px:g}",
            f"must be between 0 and {MAX_POSE_SIGMA_PX:g} (or -1: estimated from the data)",
        )
    if o.img_per_grp != -1 and o.img_per_grp <= 1:
        bad("img_per_grp", o.img_per_grp, "must be > 1 (or -1 for search mode)")
    if data is not None:
        problems += _data_problems(o, data, name)
    return problems


def _input_problems(o, name):
    """Stack mode needs --instack, meridien mode an existing --refinement_dir."""
    if not o.instack and not o.refinement_dir:
        return [
            f"give {name('instack')} (stack mode) or {name('refinement_dir')} (meridien mode; "
            f"{name('instack')} may then name the particle stack, .hdf or STAR)"
        ]
    if o.refinement_dir and not os.path.isdir(o.refinement_dir):
        return [
            f"{name('refinement_dir')} {o.refinement_dir}: meridien refinement folder does not "
            f"exist"
        ]
    return []


def _data_problems(o, data, name):
    """The checks against the particle count and box."""
    n, box, problems = data.n_particles, data.box, []
    if n < 2:
        what = "refinement_dir" if o.refinement_dir else "instack"
        value = o.refinement_dir or o.instack
        problems.append(f"{name(what)} {value}: {n} particle(s); need more")
    if o.img_per_grp > 1:
        k = n // o.img_per_grp
        if o.img_per_grp > n:
            problems.append(
                f"{name('img_per_grp')} {o.img_per_grp}: larger than the number of particles ({n})"
            )
        elif k < 2:
            problems.append(
                f"{name('img_per_grp')} {o.img_per_grp}: gives {k} group for {n} particles; "
                f"need at least 2 (use at most {n // 2}, or -1 for search mode)"
            )
        elif k > MAX_GROUPS:
            problems.append(
                f"{name('img_per_grp')} {o.img_per_grp}: too small, {k} groups for {n} "
                f"particles (at most {MAX_GROUPS})"
            )
    if o.radius >= box // 2 or (o.radius > 0 and 2 * o.radius + 2 > box):
        problems.append(
            f"{name('radius')} {o.radius}: must be smaller than half the box ({box} px images: "
            f"at most {(box - 2) // 2})"
        )
    if o.nxinit > box:
        problems.append(f"{name('nxinit')} {o.nxinit}: larger than the image size {box}")
    return problems
