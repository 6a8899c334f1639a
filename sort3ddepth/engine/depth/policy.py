"""Every threshold of the depth search in one place, each with the reason it has its value.

The measurements behind the values are in bench/README.md ("Why the depth thresholds are what
they are"). A SortContext carries one DepthPolicy (the module's POLICY unless told otherwise);
code that gets no context (the acceptance tests of accept.py) takes it as a keyword argument.
"""

from dataclasses import dataclass, field, fields


def _rule(value, why):
    return field(default=value, metadata={"why": why})


@dataclass(frozen=True)
class DepthPolicy:
    # -- box runs ----------------------------------------------------------------------------
    box_niter: int = _rule(5, "box iterations a run gets to converge (+1 per K reset)")
    max_runs: int = _rule(
        3,
        "runs per box, each on the previous run's unaccounted pool "
        "(search mode: one run, the leftovers go to the next generation)",
    )
    run_pool_min: int = _rule(
        2, "a run's pool below this x min_cluster_size cannot hold two clusters: the box ends"
    )
    # -- MGSK-means size schedules -------------------------------------------------------------
    size_low_divisor: int = _rule(
        3,
        "lowest minimum group size: n / (K x this) (SPHIRE's bound "
        "when the FSC-derived gap is large, the usual case)",
    )
    size_high_fraction: float = _rule(
        0.9,
        "highest minimum group size: this x n / K (SPHIRE); freeze mode drafts every group at it",
    )
    nstep_long: int = _rule(
        5,
        "fewest size steps of a pair from random labels (boxes that may "
        "reset K, cuts): a long walk down lets groups form",
    )
    nstep_short: int = _rule(
        3,
        "size steps of a pair started from stable groups (also the "
        "fewest for a box with a given K): little needs to move",
    )
    # -- resolution ----------------------------------------------------------------------------
    coarse_shell_divisor: int = _rule(
        2,
        "search-mode runs score at the resolution limit / this "
        "(3-5x cheaper sweeps, same classification)",
    )
    coarse_min_shell: int = _rule(
        12,
        "... but never below this shell (98.8 % of images still "
        "classified right at 12 on bench_sort)",
    )
    # -- starts: swap and refill ---------------------------------------------------------------
    swap_explore: float = _rule(
        0.10,
        "share of a stable group swapped with the pool before the "
        "next iteration of a box that explores K",
    )
    swap_learned: float = _rule(
        0.05,
        "... of a box whose K is given or learned (groups from an "
        "earlier layer): they need less shaking",
    )
    refill_seed_fraction: float = _rule(
        0.5, "a missing group is seeded with this x n / K pool images"
    )
    refill_chunk_fraction: float = _rule(
        0.25,
        "the pool is dealt in chunks of this x n / K, "
        "re-weighting towards emptier groups per chunk",
    )
    refill_min_weight: float = _rule(
        0.05,
        "a full group still gets pool images with this weight (no group is closed to the pool)",
    )
    # -- within-box acceptance -----------------------------------------------------------------
    jaccard_floor: float = _rule(
        50.0,
        "a group must reproduce with Jaccard >= this %: a split "
        "of one real group has an arbitrary border",
    )
    size_tests_from_iteration: int = _rule(
        1,
        "SPHIRE's size tests start at this box iteration "
        "(the first one's groups are still forming)",
    )
    size_tests_min_groups: int = _rule(
        3, "... and apply to this many groups or more (two groups have no 'small class')"
    )
    close_classes_pct: float = _rule(
        50.0,
        "small and large size classes are 'close' when the "
        "small mean is >= this % of the large (SPHIRE)",
    )
    low_bound_factor: float = _rule(
        1.25,
        "a kept group exceeds this x the low size bound "
        "(SPHIRE): at the bound it was filled, not found",
    )
    largest_ratio: int = _rule(
        3,
        "a group a box keeps is more than 1 / this of the largest (SPHIRE): smaller ones "
        "are splinters of a box still exploring",
    )
    kept_ratio: int = _rule(
        10,
        "a group kept between boxes, and a generation's cluster, is more than 1 / this of the "
        "largest: a state of 10 % next to one of 50 % is kept (SPHIRE's 1 / 3 dropped it), a "
        "handful of outliers that both boxes set aside is not",
    )
    # -- search mode: rebuilding missing groups ------------------------------------------------
    merged_size: float = _rule(
        1.25, "a kept group above this x n / K is taken for a merge and rebuilt"
    )
    fragment_size: float = _rule(
        0.75,
        "a kept group below this x the median kept size is a "
        "fragment of a group whose rest is in the pool",
    )
    cut_min_factor: int = _rule(
        2, "the pool is cut into q groups only if it holds q x this x min_cluster_size images"
    )
    one_group_pool: float = _rule(0.5, "a pool of >= this x n / K images is the one missing group")
    split_min_factor: int = _rule(
        4,
        "the largest group is cut in two (a hidden group) only if "
        "it holds this x min_cluster_size images",
    )
    split_check: bool = _rule(
        True,
        "search mode checks each generation's cluster for two merged states (depth/split.py; "
        "bench/README.md, 'The split check')",
    )
    split_check_factor: int = _rule(
        4,
        "a generation's cluster is checked for two states only if it holds this x "
        "min_cluster_size images (each part must reach the purity target with min_cluster_size)",
    )
    split_starts: int = _rule(
        2,
        "random starts each run of a split-check pair chooses from at the coarse limit, by how "
        "reproducibly its groups' maps differ between the random halves (o-k4-uneq-snr03-64px: "
        "~1 run in 4 lands in an equal split along nothing, difference FSC^2 summed 1.9-2.7 "
        "against 5.0-5.1 in the states' direction); a coarse run costs ~1/6 of a full one",
    )
    two_state_starts: int = _rule(
        4,
        "random starts each run of the two-state check of a grown cluster chooses from, by their "
        "held-out likelihood gain: a run lands in a 900 + 300 blend's states' direction about one "
        "start in three; the blend's pair reproduced at 3 of 6 draws with 2 starts, 5 of 6 with "
        '4, 6 of 6 with 8 (bench/README.md, "A held-out judge of a split")',
    )
    two_state_z: float = _rule(
        3.0,
        "a grown cluster holds two states when a reproduced split gains over its one map by this "
        "many standard errors (held out; one-sided ~0.1 %): cuts of one state gained -0.06 to "
        "+0.04 nats per image (views -2.5), state splits +0.09 to +0.30 at 5-10 se",
    )
    split_kept_share: float = _rule(
        0.3,
        "a split is kept only if its parts hold this share of the cluster at the purity target "
        "(else they are corners of one state). Measured on the matrix at two seeds: one "
        "state's clusters 0.04-0.17 (bench_sort's 3,456 images 0.05-0.10), clusters larger than "
        'any state (blends) 0.22-0.47, clean splits 0.53-1.0 (bench/README.md, "Two draws '
        'of the matrix"); at 0.5 every blend was kept whole, reported ~98 % pure',
    )
    probe_tries: int = _rule(3, "K probes per box (each adds >= 1 group or ends the probing)")
    settle_growth: float = _rule(
        1.25,
        "a settle iteration may grow a whole group by this "
        "much; more means the pool's missing group was shared out",
    )
    # -- convergence of a run ------------------------------------------------------------------
    converge_gain: float = _rule(
        1.0, "converged when reproducibility rose by less than this many points"
    )
    converge_repro: float = _rule(90.0, "... or reproducibility is above this %")
    converge_rand: float = _rule(0.9, "... or (unfrozen) the rand index is above this")
    converge_sweeps: int = _rule(
        3, "... or a run of the pair took at most this many MGSK-means sweeps (nothing moved)"
    )
    refine_sweeps: int = _rule(
        4,
        "classification-EM sweeps under the membership model after each MGSK-means run "
        "(MGSK-means drifts from good partitions at low SNR; the model holds them)",
    )
    refine_stop: float = _rule(
        0.01, "... fewer sweeps when less than this fraction of the images moved"
    )
    refine_em_tol: float = _rule(
        1e-4,
        "a sweep's EM stops when no responsibility moves more than this (the sweep keeps only "
        "the most probable group: on bench_sort's K = 6 pairs the same labels as at 1e-7, "
        "1.6x sooner)",
    )
    # -- between boxes, generations ------------------------------------------------------------
    jaccard_margin_std: float = _rule(
        2.0,
        "between boxes a group's Jaccard beats random "
        "partitions' mean by this many std (and jaccard_floor)",
    )
    nuisance_dependence: float = _rule(
        0.5,
        "a reproduced group whose label its images' views (or halves) tell half-way or more "
        "from independence to certainty (less 3 sd) is no state (depth/nuisance.py: states "
        "split along their views 0.55-0.78; true states of all 16 matrix cells <= 0.0)",
    )
    twin_split_dependence: float = _rule(
        0.0,
        "two clusters are two states when a reproduced split of their union follows them: a "
        "part and a cluster tell each other more than chance does (the nuisance test's "
        "dependence, less its 3 sd, above this). On the matrix at two seeds: one state's two "
        "clusters 0.00, a state next to junk or a blend 0.09-0.31, two states' clusters "
        "0.42-0.89; a split that cuts across both clusters (views, a few images of another "
        'state) is no evidence that they differ (bench/README.md, "Does the split follow the '
        'two clusters?")',
    )
    min_cluster_size: int = _rule(20, "never report smaller clusters")
    learn_rand_index: float = _rule(
        0.85,
        "box learning: the next layer-0 boxes take the K of "
        "a box whose runs agreed above this rand index",
    )
    report_fsc: tuple = _rule(
        (0.5, 0.143),
        "difference-FSC thresholds the member check logs "
        "(how far the clusters' maps differ reliably)",
    )

    @classmethod
    def reasons(cls):
        """{threshold name: why it has its value}."""
        return {f.name: f.metadata.get("why", "") for f in fields(cls)}


POLICY = DepthPolicy()


def policy_of(ctx):
    """The context's policy; stand-in contexts (tests) without one get the defaults."""
    return getattr(ctx, "policy", POLICY)
