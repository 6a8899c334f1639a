"""What every part of the depth search shares: the SortContext (data, maps, the one random
generator, the log, the mode, the policy) and the checkpoints of finished units."""

from dataclasses import dataclass, field

import numpy as np

from ..membership import DEFAULT_MIN_PURITY
from .policy import POLICY, DepthPolicy


@dataclass
class SortContext:
    data: object  # preprocess.SortingData
    maps: object  # mgskmeans.ClusterMaps
    rng: np.random.Generator
    log: object
    search: bool  # search mode (img_per_grp not given)
    frozen: bool  # freeze mode (img_per_grp given, groups not unfrozen)
    img_per_grp: int  # user value, or the working size in search mode
    nstep: int
    depth_order: int
    init_k: int = 7
    use_umat: bool = False
    timings: dict = field(default_factory=dict)
    checkpoints: object = None  # checkpoint.Checkpoints (resume), or None
    min_purity: float = DEFAULT_MIN_PURITY  # membership: estimated purity target per cluster
    policy: DepthPolicy = POLICY  # every threshold of the depth search


def load(ctx, key):
    """A finished unit's payload (and the generator as it was then), or None."""
    return ctx.checkpoints.load(key, ctx.rng) if ctx.checkpoints and key else None


def save(ctx, key, **payload):
    if ctx.checkpoints and key:
        ctx.checkpoints.save(key, ctx.rng, **payload)
