"""The results schema: summary.json as dataclasses, written by the engine, read by the protocol
and the viewer.

`Summary` holds the run (`Cluster` per final cluster, the unaccounted set last when output;
`Generation` per generation, each with its `GenerationCluster`s; the `PurityCurve`). Keys the
schema does not name are kept in `extra` and written back, so a reader never drops them.
`read_summary` turns a missing field, a file that is not a summary or one of a newer schema
into one `SummaryError` line, never a KeyError.

Pure Python (no numpy at import): the protocol imports it while Scipion discovers plugins.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

#: the version of the layout below; a reader refuses a newer one
SCHEMA_VERSION = 1
SUMMARY_FILE = "summary.json"


class SummaryError(ValueError):
    """A summary that cannot be read: one line saying why."""


def _required():
    """A field every summary has (SummaryError when it is missing)."""
    return field(default=None, metadata={"required": True})


def _optional(default=None):
    """A field written only when it has a value (older summaries may lack it)."""
    return field(default=default, metadata={"omit_none": True})


def _to_dict(obj):
    """The JSON object of a schema dataclass: fields in order, then its extra keys."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("omit_none"):
            continue
        if dataclasses.is_dataclass(value):
            value = _to_dict(value)
        elif isinstance(value, list):
            value = [_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    out.update(obj.extra)
    return out


def _from_dict(cls, d, what, **convert):
    """Build cls from a JSON object: SummaryError naming `what` for a missing field; keys the
    schema does not know go to `extra`; convert: field -> function applied to its value."""
    if not isinstance(d, dict):
        raise SummaryError(f"{what} is a {type(d).__name__}, not an object")
    names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
    required = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required")]
    for name in required:
        if name not in d:
            raise SummaryError(f"{what} has no field '{name}'")
    values = {k: d[k] for k in names if k in d}
    for k, fn in convert.items():
        if k in values:
            values[k] = fn(values[k])
    return cls(**values, extra={k: v for k, v in d.items() if k not in names})


def _list(what, fn):
    """Convert a JSON list item by item (SummaryError when it is not a list)."""

    def convert(values):
        if not isinstance(values, list):
            raise SummaryError(f"{what} is not a list")
        return [fn(v, f"{what}[{i}]") for i, v in enumerate(values)]

    return convert


@dataclass
class Cluster:
    """A final cluster (Cluster_###.txt, vol_cluster###.mrc) or the unaccounted set."""

    id: int = _required()
    file: str = _required()
    map: str | None = _optional()
    size: int = _required()
    generation: int = _required()
    unaccounted: bool = False
    resolution_A: float | None = _optional()  # noqa: N815 (the file's name)
    fsc: list | None = _optional()  # half-map FSC, shell i at i / (box * pixel_size) 1/Å
    jaccard: float | None = _optional()  # reproducibility (%) between boxes
    random_mean: float | None = _optional()  # ... expected by chance (%)
    random_std: float | None = _optional()
    reproduced_size: int | None = _optional()  # size when reproduced (before the member check)
    estimated_purity: float | None = _optional()  # mean posterior of its members
    extra: dict = field(default_factory=dict)

    @property
    def label(self):
        return "unaccounted" if self.unaccounted else f"Cluster_{int(self.id):03d}"

    @classmethod
    def from_dict(cls, d, what="cluster"):
        return _from_dict(cls, d, what)


@dataclass
class GenerationCluster:
    """A cluster found in one generation (generation_###/Cluster_###.txt)."""

    file: str | None = _optional()
    size: int = _required()
    final_id: int | None = None  # the final cluster it became (None: emptied by the final check)
    jaccard: float | None = _optional()
    random_mean: float | None = _optional()
    random_std: float | None = _optional()
    reproduced_size: int | None = _optional()
    estimated_purity: float | None = _optional()
    map: str | None = _optional()
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, what="generation cluster"):
        return _from_dict(cls, d, what)


@dataclass
class Generation:
    """One generation: its clusters, what it left unaccounted, its ANOVA tables."""

    generation: int = _required()
    n_images: int = _required()
    cluster_sizes: list = field(default_factory=list)
    clusters: list = field(default_factory=list)  # GenerationCluster
    n_unaccounted: int = 0
    core_set: str | None = _optional()
    stats: list = field(default_factory=list)  # the clusters' reproducibility figures
    anova: dict = field(default_factory=dict)  # variable -> table, as in Summary.anova
    seconds: float | None = _optional()
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, what="generation"):
        gen = _from_dict(
            cls, d, what, clusters=_list(f"{what} clusters", GenerationCluster.from_dict)
        )
        if "clusters" not in d:  # an older summary: sizes and stats only
            stats = list(gen.stats) + [{}] * len(gen.cluster_sizes)
            gen.clusters = [
                GenerationCluster.from_dict(dict(stats[j], size=s))
                for j, s in enumerate(gen.cluster_sizes)
            ]
        return gen


@dataclass
class PurityCurve:
    """For each threshold on the posterior: the fraction of particles whose most probable
    cluster reaches it and their mean posterior (None where no particle does)."""

    threshold: list = field(default_factory=list)
    accounted: list = field(default_factory=list)
    estimated_purity: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, what="purity_curve"):
        return _from_dict(cls, d, what)


@dataclass
class Summary:
    """summary.json: the run, its final clusters and its generations."""

    schema_version: int = SCHEMA_VERSION
    n_particles: int = _required()
    box: int | None = None
    pixel_size: float | None = None  # Å
    sorting_size: int | None = None  # px
    seed: int | None = None
    mode: str | None = None  # search, freeze or general
    generations: list = _required()  # Generation
    clusters: list = _required()  # Cluster, the unaccounted set last when output
    anova: dict = field(default_factory=dict)  # variable -> {F, p, reason, groups, pairs}
    wall_seconds: float | None = None
    input: str | None = None  # stack or meridien
    min_purity: float | None = None
    # --pose_sigma_deg: the turn of the pose neighbourhood each image was scored over (0: the
    # given poses alone); the stored orientations are never changed
    pose_sigma_deg: float | None = _optional()
    # --pose_sigma_px: the origin error (original pixels) the poses were refined with
    pose_sigma_px: float | None = _optional()
    # seconds spent on the given poses before the sorting: their errors estimated, the poses
    # refined, the neighbours' weights (the neighbourhood's share of each score is in the rest)
    pose_seconds: float | None = _optional()
    # the two halves every image was scored across: "input" (the refinement's own,
    # rlnRandomSubset or meridien's) or "random"
    half_sets: str | None = _optional()
    cluster_file_ids: str | None = None  # what the Cluster_###.txt files list
    all_particles: str | None = _optional()  # every input row with its cluster (STAR)
    posteriors: str | None = _optional()  # posteriors.npy (particles, final clusters)
    purity_curve: PurityCurve | None = _optional()
    extra: dict = field(default_factory=dict)

    @property
    def regular(self):
        """The final clusters without the unaccounted set."""
        return [c for c in self.clusters if not c.unaccounted]

    @property
    def unaccounted(self):
        """The unaccounted set's entry, or None when it is not output."""
        return next((c for c in self.clusters if c.unaccounted), None)

    def generation_final_ids(self, g):
        """final_id of each cluster of generation g (older summaries: in order)."""
        return [c.final_id for c in self.generations[g].clusters]

    def to_dict(self):
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d):
        """A Summary from the parsed JSON; SummaryError (one line) when it cannot be one."""
        if not isinstance(d, dict):
            raise SummaryError("not a sort3d-depth summary (not a JSON object)")
        version = d.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SummaryError(
                f"written by a newer sort3ddepth (schema_version {version}; this version reads "
                f"up to {SCHEMA_VERSION}): update sort3ddepth to read it"
            )
        s = _from_dict(
            cls,
            d,
            "the summary",
            generations=_list("generations", Generation.from_dict),
            clusters=_list("clusters", Cluster.from_dict),
            purity_curve=lambda v: None if v is None else PurityCurve.from_dict(v),
        )
        _order_final_ids(s, d)
        return s


def _order_final_ids(summary, d):
    """Older summaries have no final_id: the generations' clusters became the final ones in
    order."""
    first = 0
    for g, gen in enumerate(summary.generations):
        raw = d["generations"][g].get("clusters") or []
        for j, c in enumerate(gen.clusters):
            if j >= len(raw) or "final_id" not in raw[j]:
                c.final_id = first + j
        first += len(gen.clusters)


def read_summary(path):
    """The Summary in a summary.json file; SummaryError naming the file, in one line."""
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise SummaryError(f"{path}: not a JSON file ({e})") from None
    try:
        return Summary.from_dict(d)
    except SummaryError as e:
        raise SummaryError(f"{path}: {e}") from None
