"""The sorting driver: generations of depth clustering, then final maps, ANOVA and the summary.

Output layout (names as in SPHIRE's document, maps as MRC):
  log.txt, command.txt, summary.json (written last: its presence means the run finished)
  Cluster_###.txt / vol_cluster###.mrc   final clusters over all generations (0-based indices);
  Cluster_###.star                       the input STAR's rows of each cluster (for RELION);
                                         with unaccounted included (default) the last one is the
                                         final unaccounted set (flagged in summary.json)
  Core_set.txt / volume_core.mrc         unaccounted images of the last generation
  generation_###/Cluster_###.txt, Core_set.txt, vol_cluster###.mrc, anova.txt (the clusters
                                         found in that generation)
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import anova, fourier, output, results
from .ctf import ctf_coefficients
from .depth import (
    MIN_CLUSTER_SIZE,
    SortContext,
    could_hold_a_group,
    final_assignment,
    found_again,
    grown_clusters,
    merge_moved,
    not_tiny,
    policy_of,
    run_generation,
    split_check,
    two_states,
)
from .geometry import pose_neighbours
from .membership import purity_curve
from .meridien import check_smearing
from .mgskmeans import ClusterMaps
from .parallel import fault_point
from .pose_smears import pose_smears
from .preprocess import (
    input_halves,
    meridien_noise_weights,
    prepare,
    prepare_meridien,
    sorting_halves,
)
from .realign import refine_poses
from .reconstruction import fsc, reconstruct, resolution_shell, soft_sphere_mask
from .star_io import write_star_rows
from .symmetry import parse_symmetry

MIN_NEXT_GENERATION = 100
HALVES_WARNING_P = 1e-4  # the clusters' shares of the input's half 2 differ beyond chance...
HALVES_WARNING_SHARE = 0.1  # ... and one cluster's share is this far from all clusters': a
# state is independent of a refinement's halves, and the clusters that followed RELION's halves
# in the two RELION-pose cells were 0.13 and 0.32 off (bench/README.md, "How far RELION's poses
# are"); a report, no cluster is dropped for it


def final_maps(particles, clusters, comm, *, rng, sym, meridien=None, apply_noise=True):
    """Full-size maps of each index set: exact shifts, CTF, Wiener-filtered with the set's own
    half-map FSC. Returns maps, the FSC-0.143 resolution (Å) and the half-map FSC curve of each
    set. The images stream through chunk by chunk (particles.iter_chunks): at the full box, one
    chunk and the two half-map accumulators of one set are held at a time (FINAL_SETS_AT_ONCE).

    Meridien mode (``meridien`` a MeridienRefinement): the half-map FSC uses meridien's half sets,
    and every particle is inserted through its smear entries (as the sorting maps, with the norm
    factors and, unless turned off, the background-noise rows in data and weights alike), the
    slices built on the fly chunk by chunk."""
    from .reconstruction import FINAL_SETS_AT_ONCE

    box, apix = particles.box, particles.pixel_size
    sl = comm.local_slice(len(particles))
    idx = np.arange(len(particles))[sl]
    maps, res, curves = [], [], []
    if meridien is None:
        halves = sorting_halves(particles, rng)
    else:  # meridien's own, always (as prepare_meridien)
        halves = np.asarray(particles.half_set, np.int64)
    ins = _FinalInsertion(particles, meridien, apply_noise)
    mask = soft_sphere_mask(box, box // 2 - 4, edge=3)
    value_max = ins.value_max(idx, clusters)
    for start in range(0, len(clusters), FINAL_SETS_AT_ONCE):
        batch = clusters[start : start + FINAL_SETS_AT_ONCE]
        lab = np.full(len(particles), -1)
        for j, c in enumerate(batch):
            lab[c] = j
        sel = idx[lab[idx] >= 0]
        memb = np.zeros((len(sel), 2 * len(batch)))
        memb[np.arange(len(sel)), 2 * lab[sel] + halves[sel]] = 1.0
        data, w = ins.backproject(sel, memb, value_max[sel], comm)
        for j in range(len(batch)):
            h = reconstruct(data[2 * j : 2 * j + 2], w[2 * j : 2 * j + 2], box, symmetry=sym)
            curve = fsc(h[0] * mask, h[1] * mask)
            full = np.clip(2 * curve / (1 + np.abs(curve)), 0.0, 0.999)
            shell = resolution_shell(curve, 0.143)
            res.append(box * apix / max(shell, 1))
            curves.append(curve)
            m = reconstruct(
                data[2 * j] + data[2 * j + 1], w[2 * j] + w[2 * j + 1], box, fsc=full, symmetry=sym
            )[0]
            maps.append(m * soft_sphere_mask(box, box // 2 - 2, edge=2))
        del data, w
    return maps, res, curves


class _FinalInsertion:
    """How the final maps insert the images, the one place that differs between the modes:
    stack mode shifts each image and inserts it once; meridien mode normalises on the
    background and inserts it through its smear entries with the norm factors and the
    background-noise rows (as the sorting maps did, so the final maps show what was sorted)."""

    def __init__(self, particles, meridien, apply_noise):
        from .particles import chunk_images

        box = particles.box
        self.particles, self.meridien = particles, meridien
        self.pad = 2 if box <= 160 else 1
        self.chunk = chunk_images(box)
        self.radius = box // 2 - 2 if meridien is None else meridien.radius
        self.shifts = particles.shifts if meridien is None else None
        if meridien is not None:
            self.noise = apply_noise and meridien.bckgnoise is not None
            self.shell_w = meridien_noise_weights(meridien.bckgnoise, box // 2 + 2, self.noise)
            self.norm_factors = meridien.norm_factors

    def images(self, sel):
        """A function (a, b) -> the Fourier images of sel[a:b] at the full box."""
        from .preprocess import fourier_chunk

        p, shifts = self.particles, self.shifts
        return lambda a, b: fourier_chunk(
            p.load_images(sel[a:b]),
            None if shifts is None else shifts[sel[a:b]],
            self.radius,
            p.box,
            background=self.meridien is not None,
        )

    def value_max(self, idx, clusters):
        """Every image's largest Fourier component (the fixed-point bounds of the exact sums),
        measured once for the images of any set."""
        from .reconstruction import chunk_ranges

        n = len(self.particles)
        in_any = np.zeros(n, bool)
        for c in clusters:
            in_any[c] = True
        every = idx[in_any[idx]]
        value_max = np.zeros(n)
        for a, b in chunk_ranges(len(every), self.chunk):
            value_max[every[a:b]] = fourier.component_max(self.images(every)(a, b))
        return value_max

    def backproject(self, sel, memb, value_max, comm):
        """(data, weights) of the half maps of a batch of sets (``memb``: one column per set
        and half) from the local images ``sel``, summed over the ranks."""
        from .reconstruction import backproject_smeared_streamed, backproject_streamed

        p, box = self.particles, self.particles.box
        coefs = ctf_coefficients(p.ctf.subset(sel), box, p.pixel_size)
        if self.meridien is None:
            return backproject_streamed(
                self.images(sel),
                len(sel),
                p.rotations[sel],
                memb,
                ctf_coefs=coefs,
                box=box,
                pad=self.pad,
                chunk=self.chunk,
                value_max=value_max,
                comm=comm,
            )
        groups = p.group[sel] if self.noise else np.zeros(len(sel), np.int64)
        return backproject_smeared_streamed(
            self.images(sel),
            self.meridien.smears.subset(sel),
            self.norm_factors[sel],
            coefs,
            groups=groups,
            member_weights=memb,
            box=box,
            pad=self.pad,
            shell_w=self.shell_w,
            chunk=self.chunk,
            base_max=value_max,
            comm=comm,
        )


def _box_stats(x):
    """Five-number summary (Tukey whiskers at 1.5 IQR) for box plots drawn from the summary."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    inside = x[(x >= lo) & (x <= hi)]
    return {
        "whislo": float(inside.min()),
        "q1": float(q1),
        "med": float(med),
        "q3": float(q3),
        "whishi": float(inside.max()),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def _anova_lines(particles, clusters, names, smear_counts=None):
    """ANOVA of defocus (one value per cluster and defocus, as SPHIRE), smearing (meridien mode:
    the number of smear entries of each particle, before any --nsmear), norm and, when the
    input gives them, the refinement's half sets."""
    lines, tables = [], {}
    if len(clusters) < 2:
        return ["ANOVA analysis is skipped: fewer than two clusters"], tables
    clusters = clusters[:30]
    lab = np.full(len(particles), -1)
    for k, c in enumerate(clusters):
        lab[c] = k
    defocus = 0.5 * (particles.ctf.defocus_u + particles.ctf.defocus_v)
    variables = {"defocus": anova.unique_per_cluster(defocus, lab)}
    if smear_counts is not None:
        counts = np.asarray(smear_counts, np.float64)
        variables["smearing"] = {k: counts[lab == k] for k in range(len(clusters))}
    if particles.norm is not None and np.ptp(particles.norm) > 0:
        variables["norm"] = {k: particles.norm[lab == k] for k in range(len(clusters))}
    if particles.half_set is not None and np.ptp(particles.half_set) > 0:
        # the refinement's half sets (rlnRandomSubset; mean = share of half 2): each half's
        # particles were aligned to that half's own map, and clusters that follow the halves
        # are no states (bench/README.md, "The RELION-pose cell")
        half = np.asarray(particles.half_set, np.float64)
        variables["half set"] = {k: half[lab == k] for k in range(len(clusters))}
    for var, groups in variables.items():
        named = {names[k]: v for k, v in groups.items()}
        res = anova.one_way_anova(named)
        lines += anova.format_anova(var, res)
        tables[var] = {
            "F": res.F,
            "p": res.p,
            "reason": res.reason,
            "groups": [
                {
                    "name": g.name,
                    "n": g.n,
                    "mean": g.mean,
                    "std": g.std,
                    "box": _box_stats(named[g.name]),
                }
                for g in res.groups
            ],
            "pairs": [{"a": p.a, "b": p.b, "F": p.F, "p": p.p} for p in res.pairs],
        }
    if "half set" in tables:
        lines += _halves_warning(tables["half set"])
    return lines, tables


def _halves_warning(table):
    """A warning line when the clusters follow the input's half sets (the ANOVA's table of
    rlnRandomSubset), else none: such clusters come from how each half was aligned, not from the
    structure."""
    groups = table["groups"]
    share = sum(g["n"] * g["mean"] for g in groups) / max(sum(g["n"] for g in groups), 1)
    means = [g["mean"] for g in groups]
    off = max(abs(m - share) for m in means)
    if not (table["p"] < HALVES_WARNING_P and off >= HALVES_WARNING_SHARE):
        return []
    return [
        f"WARNING: the clusters follow the input's half sets (rlnRandomSubset): shares of half 2 "
        f"from {min(means):.2f} to {max(means):.2f} against {share:.2f} in all clusters (ANOVA "
        f"significance {100 * table['p']:.2g} %). A state does not depend on a refinement's "
        f"random halves; each half's images were aligned to that half's own map, so such "
        f"clusters may follow the poses rather than the structure: check the refinement (its "
        f"two half maps agree? its resolution?) before trusting them."
    ]


def _log_check_smearing(ref, nx, log):
    """--check_smearing: the smearing of every meridien iteration and the memory its slices
    would take at the sorting size (informational; SPHIRE's smearing_all.txt rows)."""
    log(
        f"check_smearing: {'iteration':>9} {'smears/particle':>15} {'orientations':>12} "
        f"{'max':>5} {f'GB at {nx} px':>12}"
    )
    for r in check_smearing(ref.folder, nx):
        log(
            f"check_smearing: {r['iteration']:>9} {r['mean_per_particle']:>15.2f} "
            f"{r['mean_orientations']:>12.2f} {r['max_per_particle']:>5} "
            f"{r['bytes'] / 1024**3:>12.3f}"
        )


def _write_membership(out_dir, particles, *, memb, n_clusters, export, summary):
    """Every particle's answer: posteriors.npy (n, clusters) in input order, all_particles.star
    (every input row with rlnClassNumber = its most probable cluster, 1-based, and
    rlnMaxValueProbDistribution = that posterior) and the purity-vs-accounted curve (set in the
    summary)."""
    n = len(particles)
    if n_clusters == 0:
        return
    post = np.ones((n, 1)) if memb is None else memb.posterior
    assert post.shape == (n, n_clusters), (post.shape, n, n_clusters)
    output.write_npy(out_dir / "posteriors.npy", post.astype(np.float32))
    best = np.argmax(post, axis=1)
    if export:
        write_star_rows(
            particles,
            np.arange(n),
            out_dir / "all_particles.star",
            columns={
                "rlnClassNumber": best + 1,
                "rlnMaxValueProbDistribution": post[np.arange(n), best],
            },
        )
        summary.all_particles = "all_particles.star"
    t, acc, pur = purity_curve(post)
    summary.posteriors = "posteriors.npy"
    summary.purity_curve = results.PurityCurve(
        threshold=[round(float(v), 3) for v in t],
        accounted=[round(float(v), 4) for v in acc],
        estimated_purity=[None if not np.isfinite(v) else round(float(v), 4) for v in pur],
    )


@dataclass
class GenerationRun:
    """What one generation found: its clusters (with their reproducibility figures) and the
    images it left unaccounted (the next generation's input)."""

    generation: int
    n_images: int
    clusters: list
    unaccounted: np.ndarray
    stats: list
    seconds: float


@dataclass
class Found:
    """The clusters of all generations (and, after the final assignment, the final ones):
    final_id maps each generation cluster to its final cluster (None: emptied)."""

    generations: list
    clusters: list
    stats: list
    gen_of: list
    unaccounted: np.ndarray = None
    final_id: list = None
    memb: object = None


def run_sorting(particles, opts, *, comm, out_dir, log, checkpoints=None):
    """Sort `particles` with `opts` (options.SortOptions completed by for_input); writes the
    outputs in out_dir (rank 0) and returns the results.Summary (rank 0; None elsewhere).
    checkpoints: checkpoint.Checkpoints to resume from and save to, or None.

    Meridien mode: ``opts.meridien`` is the MeridienRefinement and ``particles`` its particles;
    its symmetry and radius (the user's when given) are used, the sorting maps are smeared, and
    the cluster files hold meridien particle ids."""
    t_start = time.time()
    rng = np.random.default_rng(opts.seed)
    ref = opts.meridien
    search, k0, work = opts.group_sizes(len(particles))
    assert opts.k_initial == k0, "options.for_input sets k_initial"
    sym = parse_symmetry(ref.symmetry if ref is not None else opts.sym)
    log(
        f"{len(particles)} particles of {particles.box} px at {particles.pixel_size:.3f} Å/px; "
        f"symmetry {sym.symbol}; {f'search mode (initial K {k0})' if search else f'K = {k0}'}; "
        f"depth order {opts.depth_order} ({2**opts.depth_order} boxes in layer 0)"
    )
    data = _preprocess(particles, opts, comm, rng, log=log)
    t_pose = time.time()
    maps, pose_sigma, origin_sigma = sorting_maps(data, opts, comm, sym=sym, log=log)
    pose_seconds = time.time() - t_pose
    log(
        f"given poses checked in {pose_seconds:.1f} s (pose sigma {pose_sigma:g} deg, "
        f"origin sigma {origin_sigma:.3g} px)"
    )
    ctx = SortContext(
        data,
        maps,
        rng,
        log,
        search,
        opts.frozen,
        work,
        opts.nstep,
        opts.depth_order,
        init_k=k0,
        use_umat=bool(opts.use_umat),
        checkpoints=checkpoints,
        min_purity=opts.min_purity,
    )
    found = run_generations(
        ctx, n=len(particles), k0=k0, work=work, comm=comm, checkpoints=checkpoints
    )
    found = merge_twins(ctx, found)
    found = assign_final(ctx, found)
    found = grow_final(ctx, found)
    summary = write_results(
        particles,
        opts,
        found,
        comm=comm,
        out_dir=Path(out_dir),
        log=log,
        sym=sym,
        sorting_size=data.nx,
    )
    if summary is not None:
        summary.wall_seconds = round(time.time() - t_start, 1)
        summary.pose_sigma_deg, summary.pose_sigma_px = pose_sigma, origin_sigma
        summary.pose_seconds = round(pose_seconds, 1)
        given = ref is not None or input_halves(particles) is not None
        summary.half_sets = "input" if given else "random"
        output.write_json(Path(out_dir) / results.SUMMARY_FILE, summary.to_dict())
    return summary


def sorting_maps(data, opts, comm, *, sym, log):
    """The maps builder every score of the run goes through (mgskmeans.ClusterMaps): the
    images' poses refined where they fit better moved (refine_poses: origins, then angles, at
    the given or estimated sigma), and with pose errors each image scored over a neighbourhood
    of its pose (and smeared into the maps). data is changed in place (refined poses, smears).
    Returns (maps, pose sigma in degrees, origin sigma in pixels)."""
    symmetry = sym if sym.order > 1 else None
    given_rots = data.rots.copy()
    point_maps = ClusterMaps(data, comm, symmetry=symmetry)
    pose_sigma, origin_sigma = refine_poses(
        point_maps, comm, log, sigma_deg=opts.pose_sigma_deg, sigma_px=opts.pose_sigma_px
    )
    data.smears = (
        pose_smears(point_maps, comm, given_rots, sigma_deg=pose_sigma, log=log) or data.smears
    )
    turns = pose_neighbours(pose_sigma)
    if turns is not None:
        log(
            f"pose errors: each image scored at its refined pose and {len(turns)} neighbours "
            f"turned {pose_sigma:g} deg, weighed by their likelihood and a Gaussian prior of "
            f"that width about the given pose (--pose_sigma_deg); the stored orientations are "
            f"unchanged"
        )
    maps = ClusterMaps(data, comm, symmetry=symmetry, pose_turns=turns, given_rots=given_rots)
    return maps, pose_sigma, origin_sigma


def _preprocess(particles, opts, comm, rng, *, log):
    """The sorting-size data of every rank's particles (meridien mode: smeared)."""
    t = time.time()
    if opts.meridien is not None:
        data = prepare_meridien(opts.meridien, comm, opts, log=log)
        if opts.check_smearing and comm.is_root:
            _log_check_smearing(opts.meridien, data.nx, log)
    else:
        data = prepare(particles, comm, opts, rng, log=log)
    log(
        f"pre-processing done in {time.time() - t:.1f} s "
        f"({len(np.unique(data.orientation_groups))} orientation groups)"
    )
    return data


def run_generations(ctx, *, n, k0, work, comm, checkpoints):
    """Generation after generation on what the previous one left unaccounted, until one finds
    nothing or too few images are left for another (K = pool / work below 2; in search mode
    a pool that could hold a group is still searched, at K = 2). Returns the Found clusters."""
    found = Found(generations=[], clusters=[], stats=[], gen_of=[])
    subset, gen, k = np.arange(n), 0, k0
    while True:
        run = _one_generation(
            ctx, gen, subset, k, earlier=found.clusters, comm=comm, checkpoints=checkpoints
        )
        found.generations.append(run)
        found.clusters += run.clusters
        found.stats += run.stats
        found.gen_of += [gen] * len(run.clusters)
        pool = run.unaccounted
        if not run.clusters:
            break
        k = int(round(len(pool) / work))
        if k < 2 and ctx.search and could_hold_a_group(pool, found.clusters):
            k = 2  # the pool is kept out of the clusters as a possible group: look for it
        if k < 2 or len(pool) < max(MIN_NEXT_GENERATION, 2 * MIN_CLUSTER_SIZE):
            break
        subset, gen = pool, gen + 1
    found.unaccounted = found.generations[-1].unaccounted
    found.final_id = list(range(len(found.clusters)))
    return found


def _one_generation(ctx, gen, subset, k, *, earlier, comm, checkpoints):
    """One generation on `subset` with K = k (loaded from its checkpoint when done before),
    then the post-filter: clusters not more than 1 / kept_ratio of the largest go back to the
    pool (SPHIRE: 1 / 3, which dropped minority states; see depth.policy)."""
    t = time.time()
    ctx.log(f"generation {gen}: {len(subset)} images, K = {k}")
    fault_point(f"generation{gen}", comm)
    done = checkpoints.load(f"gen{gen:03d}", ctx.rng) if checkpoints else None
    if done is not None:
        part = done["partition"]
    else:
        part = run_generation(ctx, gen, subset, k, earlier=earlier)
        if checkpoints:
            checkpoints.save(f"gen{gen:03d}", ctx.rng, partition=part)
    stats = list(part.stats) + [{}] * (len(part.clusters) - len(part.stats))
    pairs = list(zip(part.clusters, stats))
    if pairs:  # sizes as reproduced: the member check keeps an unsure group's surest images
        size = np.array([st.get("reproduced_size", len(c)) for c, st in pairs])
        big = not_tiny(size, size.max(), ratio=policy_of(ctx).kept_ratio)
        pairs = [p for p, keep in zip(pairs, big) if keep]
    clusters = [c for c, _ in pairs]
    stats = [st for _, st in pairs]
    pool = np.setdiff1d(subset, np.concatenate(clusters) if clusters else [])
    fallback = gen == 0 and not clusters
    if fallback:
        ctx.log(
            "no reproducible structural groups were found: the data set is reported as one "
            "homogeneous cluster"
        )
        clusters, pool, stats = [subset.copy()], np.zeros(0, np.int64), [{}]
    if policy_of(ctx).split_check and ctx.search and clusters:  # K given: never
        # groups were checked as reproduced (layers.py); checked again: those the member
        # check grew with images no check has seen, at least as many as the smallest cluster
        # (fewer cannot be a part of their own: bench/README.md, "Only the clusters that grew
        # by a cluster"), and the whole set when none reproduced
        least = policy_of(ctx).min_cluster_size
        grown = [
            fallback or len(c) - st.get("reproduced_size", len(c)) >= least
            for c, st in zip(clusters, stats)
        ]
        clusters, stats, left = split_check(ctx, clusters, stats, tag=f"gen {gen}: ", only=grown)
        pool = np.union1d(pool, left)
    ctx.log(
        f"generation {gen} done in {time.time() - t:.1f} s: {len(clusters)} clusters "
        f"({', '.join(str(len(c)) for c in clusters)}), unaccounted {len(pool)}"
    )
    return GenerationRun(gen, int(len(subset)), clusters, pool, stats, time.time() - t)


def _no_group_missing(ctx, found):
    """True when the unaccounted images cannot be a state that no cluster stands for: the last
    generation found no reproducible group in them, or the user gave K (--img_per_grp) and
    every one of the K groups was found."""
    if not found.generations[-1].clusters:
        return True
    return not ctx.search and len(found.clusters) >= ctx.init_k


def merge_twins(ctx, found):
    """The clusters of all generations with any two whose maps are one map moved merged
    (depth.merge_moved); the generations' records keep their clusters, final_id follows."""
    if len(found.clusters) < 2:
        return found
    t = time.time()
    clusters, into = merge_moved(ctx, found.clusters)
    if len(clusters) == len(found.clusters):
        return found
    sizes = ", ".join(str(len(c)) for c in clusters)
    ctx.log(
        f"{len(found.clusters) - len(clusters)} cluster(s) merged with one whose map is the same "
        f"map moved (pose errors), in {time.time() - t:.1f} s: clusters ({sizes})"
    )
    return _merged(found, clusters, into)


def _merged(found, clusters, into):
    """found with its clusters replaced by the merged `clusters`; into: the merged index of
    each cluster of found."""
    first = [into.index(k) for k in range(len(clusters))]
    return dataclasses.replace(
        found,
        clusters=clusters,
        stats=[_merged_stats(found.stats, into, k) for k in range(len(clusters))],
        gen_of=[found.gen_of[i] for i in first],
        final_id=[into[i] for i in found.final_id],
    )


def _merge_pair(found, j, i):
    """found with cluster j merged into cluster i."""
    into = [i - (i > j) if k == j else k - (k > j) for k in range(len(found.clusters))]
    clusters = [c for k, c in enumerate(found.clusters) if k != j]
    clusters[into[i]] = np.union1d(found.clusters[i], found.clusters[j])
    return _merged(found, clusters, into)


def _merged_stats(stats, into, k):
    """Stats of merged cluster k: those of its first part, less an estimated purity that was
    the part's against its twin (the final assignment estimates it again)."""
    parts = [i for i, j in enumerate(into) if j == k]
    if len(parts) == 1:
        return stats[parts[0]]
    return {key: v for key, v in stats[parts[0]].items() if key != "estimated_purity"}


def grow_final(ctx, found):
    """The final clusters grown over every image where the unaccounted images hold no group of
    their own (depth.grown_clusters), and the final assignment made again over the grown
    clusters. After the found-again merges: a state's two clusters compete for its images and
    the growth scrambles them (a-k4-uneq-3500-snr05: 3,820 images of state 0 -> 274). A state
    that no cluster stands for goes whole to a neighbour's cluster (o-k8-eq-snr05: 78 -> 639
    images, half of them the central state's): each cluster that took in at least
    min_cluster_size unaccounted images is checked for two states (depth.two_states, the
    held-out gain), and where one holds two the clusters are kept as they were."""
    if len(found.clusters) < 2:
        return found
    pool_searched = _no_group_missing(ctx, found)
    clusters, pool = grown_clusters(ctx, found.clusters, found.unaccounted, pool_searched)
    if clusters is found.clusters:
        return found
    least = policy_of(ctx).min_cluster_size
    check = [np.intersect1d(c, found.unaccounted).size >= least for c in clusters]
    if policy_of(ctx).split_check and any(check):
        t = time.time()
        two = two_states(ctx, clusters, check)
        if two is not None:
            ctx.log(
                f"grown cluster {two} holds two states (checked in {time.time() - t:.1f} s): "
                f"the clusters are kept as they were before the growth"
            )
            return found
    grown = dataclasses.replace(found, clusters=clusters, unaccounted=pool)
    return assign_final(ctx, grown, merge=False)


def assign_final(ctx, found, *, merge=True):
    """The final assignment over the clusters of all generations (membership posteriors); a
    cluster it leaves below the minimum size goes to the unaccounted set (final_id None). A
    state found twice (depth.found_again) is merged into one cluster and the assignment made
    again, while more than two clusters are left (one cluster is not the final assignment's to
    decide: the generations found groups); merge False: no such merge (the clusters were just
    split or grown)."""
    if len(found.clusters) < 2:
        return found
    t = time.time()
    tried = set()
    while True:
        checked, unaccounted, memb = final_assignment(
            ctx, found.clusters, found.unaccounted, pool_searched=_no_group_missing(ctx, found)
        )
        everyone = np.union1d(np.concatenate(found.clusters), found.unaccounted)
        pair = (
            found_again(ctx, found.clusters, memb, everyone, tried=tried)
            if merge and len(checked) > 2
            else None
        )
        if pair is None:
            break
        j, i = pair
        ctx.log(
            f"cluster {j} ({len(found.clusters[j])}) merged with cluster {i} "
            f"({len(found.clusters[i])}): their images split in no reproducible way that "
            f"follows the two clusters (one state found again by a later generation); the "
            f"final assignment again"
        )
        found = _merge_pair(found, j, i)
    kept = [i for i, c in enumerate(checked) if len(c) >= MIN_CLUSTER_SIZE]
    if len(kept) < len(checked):
        unaccounted = np.union1d(
            unaccounted, np.concatenate([c for i, c in enumerate(checked) if i not in kept])
        )
    post = memb.posterior[:, kept]  # a dropped cluster's share to the others
    memb.posterior = post / np.maximum(post.sum(axis=1, keepdims=True), 1e-300)
    ctx.log(f"final assignment done in {time.time() - t:.1f} s")
    return dataclasses.replace(
        found,
        clusters=[checked[i] for i in kept],
        unaccounted=unaccounted,
        memb=memb,
        final_id=[None if i is None or i not in kept else kept.index(i) for i in found.final_id],
        gen_of=[found.gen_of[i] for i in kept],
        stats=[
            {**found.stats[i], "estimated_purity": round(float(memb.estimated_purity[i]), 4)}
            for i in kept
        ],
    )


def write_results(particles, opts, found, *, comm, out_dir, log, sym, sorting_size):
    """Final maps (every rank), then (root) the cluster files, maps, ANOVA, membership and the
    Summary (returned; None on the other ranks; summary.json is written by the caller)."""
    t = time.time()
    ref, unaccounted = opts.meridien, found.unaccounted
    sets = list(found.clusters)
    core_ok = len(unaccounted) > 0 and len(unaccounted) >= (
        opts.num_core_set if opts.num_core_set > 0 else max(100, MIN_CLUSTER_SIZE)
    )
    if core_ok:
        sets.append(unaccounted)
    vols, res, curves = final_maps(
        particles,
        sets,
        comm,
        rng=np.random.default_rng(opts.seed + 1),
        sym=sym if sym.order > 1 else None,
        meridien=ref,
        apply_noise=opts.apply_noise,
    )
    log(f"final maps done in {time.time() - t:.1f} s")
    names = [f"Cluster_{i:03d}" for i in range(len(found.clusters))]
    smear_counts = None if ref is None else ref.smear_counts
    anova_lines, anova_tables = _anova_lines(particles, found.clusters, names, smear_counts)
    for line in anova_lines:
        log(line)
    if not comm.is_root:
        return None
    # what a cluster file lists: STAR rows, or meridien particle ids (as SPHIRE writes them)
    ids = np.arange(len(particles)) if ref is None else np.asarray(ref.particle_ids, np.int64)
    w = _Writer(out_dir, particles, ids, smear_counts, opts.include_unaccounted)
    summary = results.Summary(
        n_particles=len(particles),
        box=particles.box,
        pixel_size=particles.pixel_size,
        sorting_size=sorting_size,
        seed=opts.seed,
        mode=opts.mode,
        anova=anova_tables,
        input="meridien" if ref is not None else "stack",
        min_purity=opts.min_purity,
        cluster_file_ids=(
            "meridien particle ids (main000/indexes_000.txt)"
            if ref is not None
            else "0-based particle indices (input STAR row order)"
        ),
        generations=w.generations(found, vols),
        clusters=[],
    )
    summary.clusters = w.final_clusters(found, vols=vols, res=res, curves=curves, core_ok=core_ok)
    output.write_text(out_dir / "anova.txt", "\n".join(anova_lines) + "\n")
    _write_membership(
        out_dir,
        particles,
        memb=found.memb,
        n_clusters=len(found.clusters),
        export=w.export,
        summary=summary,
    )
    _log_table(summary, log)
    return summary


def _log_table(summary, log):
    """The final clusters, one line each, and the accounted total."""
    log(f"{'cluster':>8} {'size':>7} {'generation':>10} {'resolution':>10}")
    for c in summary.clusters:
        res = "-" if c.resolution_A is None else c.resolution_A
        log(
            f"{c.id:>8} {c.size:>7} {c.generation:>10} {f'{res} Å':>10}"
            f"{'   unaccounted' if c.unaccounted else ''}"
        )
    acc = sum(c.size for c in summary.regular)
    log(f"total {summary.n_particles}, accounted {acc}, unaccounted {summary.n_particles - acc}")


@dataclass
class _Writer:
    """Writes the cluster files and maps of the root rank and describes them for the summary."""

    out_dir: Path
    particles: object
    ids: np.ndarray  # what a cluster file lists for each particle
    smear_counts: object
    include_unaccounted: bool

    @property
    def export(self):
        """Whether the input STAR's rows can be written back (stack mode)."""
        return self.particles.source.get("particles_table") is not None

    def generations(self, found, vols):
        """generation_###/: each generation's clusters, maps, ANOVA and core set."""
        gens, first = [], 0  # first: index of the generation's first cluster among all found
        for g in found.generations:
            fids = found.final_id[first : first + len(g.clusters)]
            gens.append(self._generation(g, fids, vols))
            first += len(g.clusters)
        return gens

    def _generation(self, g, final_ids, vols):
        gdir = self.out_dir / f"generation_{g.generation:03d}"
        entries = []
        for j, (c, fid) in enumerate(zip(g.clusters, final_ids)):
            output.write_selection(gdir / f"Cluster_{j:03d}.txt", self.ids[c])
            entry = results.GenerationCluster.from_dict(
                {
                    "file": f"{gdir.name}/Cluster_{j:03d}.txt",
                    "size": int(len(c)),
                    "final_id": fid,
                    **g.stats[j],
                }
            )
            if fid is not None:  # the generation's map is that of the final cluster it became
                output.write_map(
                    gdir / f"vol_cluster{j:03d}.mrc", vols[fid], self.particles.pixel_size
                )
                entry.map = f"{gdir.name}/vol_cluster{j:03d}.mrc"
            entries.append(entry)
        names = [f"Cluster_{j:03d}" for j in range(len(g.clusters))]
        lines, tables = _anova_lines(self.particles, list(g.clusters), names, self.smear_counts)
        output.write_text(gdir / "anova.txt", "\n".join(lines) + "\n")
        if self.include_unaccounted and len(g.unaccounted):
            output.write_selection(
                gdir / f"Cluster_{len(g.clusters):03d}.txt", self.ids[g.unaccounted]
            )
        output.write_selection(gdir / "Core_set.txt", self.ids[g.unaccounted])
        return results.Generation(
            generation=g.generation,
            n_images=g.n_images,
            cluster_sizes=[len(c) for c in g.clusters],
            clusters=entries,
            n_unaccounted=len(g.unaccounted),
            core_set=f"{gdir.name}/Core_set.txt",
            stats=g.stats,
            anova=tables,
            seconds=round(g.seconds, 1),
        )

    def final_clusters(self, found, *, vols, res, curves, core_ok):
        """Cluster_###.txt/.star and vol_cluster###.mrc of each final cluster, then the
        unaccounted set (last cluster file) and Core_set.txt / volume_core.mrc."""
        out, apix, entries = self.out_dir, self.particles.pixel_size, []
        for i, c in enumerate(found.clusters):
            output.write_selection(out / f"Cluster_{i:03d}.txt", self.ids[c])
            if self.export:  # the input STAR's rows of this cluster, for relion_refine
                write_star_rows(
                    self.particles, c, out / f"Cluster_{i:03d}.star", class_number=i + 1
                )
            output.write_map(out / f"vol_cluster{i:03d}.mrc", vols[i], apix)
            entries.append(
                results.Cluster.from_dict(
                    {
                        "id": i,
                        "file": f"Cluster_{i:03d}.txt",
                        "map": f"vol_cluster{i:03d}.mrc",
                        "size": int(len(c)),
                        "generation": found.gen_of[i],
                        "unaccounted": False,
                        "resolution_A": round(float(res[i]), 2),
                        "fsc": [round(float(v), 4) for v in curves[i]],
                        **found.stats[i],
                    }
                )
            )
        unacc, nf = found.unaccounted, len(found.clusters)
        if self.include_unaccounted and len(unacc):
            output.write_selection(out / f"Cluster_{nf:03d}.txt", self.ids[unacc])
            if self.export:
                write_star_rows(
                    self.particles, unacc, out / f"Cluster_{nf:03d}.star", class_number=nf + 1
                )
            entry = results.Cluster(
                id=nf,
                file=f"Cluster_{nf:03d}.txt",
                size=int(len(unacc)),
                generation=found.generations[-1].generation,
                unaccounted=True,
            )
            if core_ok:
                entry.map = "volume_core.mrc"
                entry.resolution_A = round(float(res[-1]), 2)
                entry.fsc = [round(float(v), 4) for v in curves[-1]]
            entries.append(entry)
        output.write_selection(out / "Core_set.txt", self.ids[unacc])
        if core_ok:
            output.write_map(out / "volume_core.mrc", vols[-1], apix)
        return entries
