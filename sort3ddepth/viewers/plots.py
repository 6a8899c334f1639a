"""Figures of a sort3d-depth run, drawn from its summary.json only (never from log text).

Pure matplotlib (no pyplot state, no pyworkflow): every function takes the run's summary, a
``sort3ddepth.engine.results.Summary`` (or its JSON dict, read through the same schema), plus
the output folder where maps are read, and returns a ``matplotlib.figure.Figure``, so the
same code serves the Scipion viewer (which passes the figure of a pwem plotter as ``fig``), the
command line and the tests, on a machine without a display.

    python -m sort3ddepth.viewers.plots OUTPUT_DIR PNG_DIR     # every figure as a PNG

Artists that stand for a cluster carry a gid (``box:``, ``bar:``, ``repro:``, ``edge:``,
``slice:``, ``fsc:``, ``purity:``) so that what a figure shows can be checked without looking at
pixels.
"""

import argparse
import math
import os
import sys

import numpy as np
from matplotlib.figure import Figure

from ..engine.results import SUMMARY_FILE, Summary, SummaryError, read_summary

#: p value below which a nuisance variable is flagged (the clusters differ in it)
ALPHA = 0.01
#: the FSC threshold the engine reports resolutions at
FSC_THRESHOLD = 0.143
#: the Jaccard floor (%) of the engine's acceptance of a reproduced cluster
JACCARD_FLOOR = 50.0
UNACCOUNTED_COLOR = "0.65"
FLAG_COLOR = "#c0392b"
PLANES = ("xy", "xz", "yz")


# ------------------------------------------------------------------------------------ reading
def load_summary(out_dir):
    """The Summary of an engine output folder (summary.json is written last); SummaryError
    (one line) when it cannot be read."""
    return read_summary(os.path.join(out_dir, SUMMARY_FILE))


def as_summary(summary):
    """A Summary from a Summary or a summary.json dict (SummaryError when it is not one)."""
    return summary if isinstance(summary, Summary) else Summary.from_dict(summary)


def _finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x, spec=".3g"):
    return format(x, spec) if _finite(x) else "n/a"


def final_clusters(summary):
    """Final clusters (results.Cluster), the unaccounted set (when output) last."""
    return list(as_summary(summary).clusters)


def cluster_label(c):
    """Short name of a final cluster."""
    return c.label


def _final_label(final_id):
    """'-> 3', or '-> none' for a generation cluster the final member check emptied."""
    return "-> none" if final_id is None else f"-> {int(final_id)}"


def cluster_color(final_id, unaccounted=False):
    """One colour per final cluster, the same in every figure."""
    if unaccounted or final_id is None:
        return UNACCOUNTED_COLOR
    import matplotlib

    return matplotlib.colormaps["tab10"](int(final_id) % 10)


def generation_clusters(summary, g):
    """[(name, results.GenerationCluster)] of generation g (the schema gives older summaries
    their final_id by order)."""
    gen = as_summary(summary).generations[g]
    return [(f"Cluster_{j:03d}", e) for j, e in enumerate(gen.clusters)]


def anova_tables(summary, generation=None):
    """{variable: table} of the final clusters (generation None) or of one generation."""
    summary = as_summary(summary)
    if generation is None:
        return dict(summary.anova or {})
    gens = summary.generations
    if not 0 <= generation < len(gens):
        return {}
    return dict(gens[generation].anova or {})


def significant_pairs(table, alpha=ALPHA):
    """Pairs of clusters whose pair-wise test is significant, most significant first."""
    pairs = [p for p in table.get("pairs") or [] if _finite(p.get("p")) and p["p"] < alpha]
    return sorted(pairs, key=lambda p: p["p"])


def is_flagged(table, alpha=ALPHA):
    """True when the clusters differ in this (nuisance) variable: overall p < alpha."""
    p = table.get("p")
    return _finite(p) and p < alpha


def flagged_clusters(table, alpha=ALPHA):
    """Names of the clusters that take part in a significant pair, by number of such pairs."""
    count = {}
    for p in significant_pairs(table, alpha):
        for name in (p["a"], p["b"]):
            count[name] = count.get(name, 0) + 1
    return sorted(count, key=lambda n: (-count[n], n))


def _new_figure(fig, size):
    """Draw into the given figure (a viewer's plotter) or a fresh pyplot-free one."""
    if fig is None:
        fig = Figure(figsize=size)
    else:
        fig.clear()
        fig.set_size_inches(*size, forward=True)
    fig.set_layout_engine("constrained")
    return fig


def _empty(fig, message):
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def _where(generation):
    return "final clusters" if generation is None else f"generation {generation}"


# ------------------------------------------------------------------------------------ ANOVA
def _anova_title(var, table, alpha):
    if _finite(table.get("F")) and _finite(table.get("p")):
        title = f"{var}: F = {table['F']:.3g}, p = {table['p']:.3g}"
    else:
        title = f"{var}: no F test ({table.get('reason') or 'too few values'})"
    return title


def _box_stats(group):
    """A matplotlib bxp dict from the engine's precomputed box statistics (None: no values)."""
    box = group.get("box")
    if not box:
        return None
    stats = {k: box[k] for k in ("whislo", "q1", "med", "q3", "whishi")}
    stats["mean"] = box.get("mean", group.get("mean"))
    stats["fliers"] = [
        v
        for v in (box.get("min"), box.get("max"))
        if _finite(v) and not box["whislo"] <= v <= box["whishi"]
    ]
    stats["label"] = f"{group['name']}\nn={group.get('n', '?')}"
    return stats


def _draw_anova(ax, var, table, alpha):
    groups = [g for g in table.get("groups") or []]
    stats = [(g, _box_stats(g)) for g in groups]
    stats = [(g, s) for g, s in stats if s is not None]
    flagged = is_flagged(table, alpha)
    odd = set(flagged_clusters(table, alpha))
    if stats:
        art = ax.bxp(
            [s for _, s in stats],
            showmeans=True,
            patch_artist=True,
            meanprops=dict(
                marker="D", markerfacecolor="white", markeredgecolor="black", markersize=5
            ),
        )
        for (g, _), patch in zip(stats, art["boxes"]):
            patch.set_gid(f"box:{g['name']}")
            patch.set_facecolor("#f5b7b1" if g["name"] in odd else "#aed6f1")
            patch.set_edgecolor(FLAG_COLOR if g["name"] in odd else "black")
        ax.tick_params(axis="x", labelsize=8)
    else:
        ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center")
    ax.set_title(
        _anova_title(var, table, alpha),
        color=FLAG_COLOR if flagged else "black",
        fontsize=10,
        fontweight="bold" if flagged else "normal",
    )
    ax.set_ylabel(var + (" (Å)" if var == "defocus" else ""))
    ax.grid(axis="y", alpha=0.3)
    if flagged:
        pairs = significant_pairs(table, alpha)
        who = ", ".join(f"{p['a']} vs {p['b']}" for p in pairs[:4])
        if len(pairs) > 4:
            who += ", ..."
        note = f"! clusters differ in {var} (p < {alpha:g}){((': ' + who) if who else '')}"
        ax.text(
            0.01,
            0.99,
            note,
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=8,
            color=FLAG_COLOR,
            gid=f"flag:{var}",
            bbox=dict(boxstyle="round", facecolor="#fdedec", edgecolor=FLAG_COLOR),
        )


def plot_anova(summary, variables=None, generation=None, *, alpha=ALPHA, fig=None):
    """Box plots of each ANOVA variable per cluster (from the engine's box statistics), F and
    p in the title, flagged in red when a cluster differs in that nuisance variable."""
    tables = anova_tables(summary, generation)
    names = [v for v in (variables or tables) if v in tables]
    ngroups = max([len(tables[v].get("groups") or []) for v in names] + [1])
    fig = _new_figure(fig, (max(5.0, 1.2 + 0.9 * ngroups), 3.6 * max(1, len(names))))
    if not names:
        return _empty(
            fig, f"No ANOVA in this run ({_where(generation)}): it needs at least two clusters."
        )
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, var in zip(axes, names):
        _draw_anova(ax, var, tables[var], alpha)
    fig.suptitle(f"ANOVA per cluster, {_where(generation)}")
    return fig


def anova_text_lines(summary, generation=None, alpha=ALPHA):
    """The ANOVA tables as plain text: F/p, per-cluster N/mean/std, pair-wise tests."""
    tables = anova_tables(summary, generation)
    if not tables:
        return [f"No ANOVA in this run ({_where(generation)}): it needs at least two clusters."]
    lines = []
    for var, t in tables.items():
        flag = is_flagged(t, alpha)
        if flag:
            note = f"   <-- the clusters differ in {var} (p < {alpha:g})"
        elif t.get("reason"):
            note = f"   ({t['reason']})"
        else:
            note = f"   (not significant at p < {alpha:g})"
        lines.append(
            f"ANOVA of {var} ({_where(generation)}): F = {_fmt(t.get('F'), '.4g')}, "
            f"p = {_fmt(t.get('p'), '.4g')}{note}"
        )
        lines.append(f"  {'cluster':<14} {'N':>7} {'mean':>14} {'std':>14}")
        for g in t.get("groups") or []:
            lines.append(
                f"  {g['name']!s:<14} {g.get('n', '?')!s:>7} "
                f"{_fmt(g.get('mean'), '.6g'):>14} {_fmt(g.get('std'), '.6g'):>14}"
            )
        pairs = t.get("pairs") or []
        if pairs:
            lines.append("  pair-wise tests:")
        for p in pairs:
            sig = _finite(p.get("p")) and p["p"] < alpha
            lines.append(
                f"  {p['a']!s:<14} vs {p['b']!s:<14} F = {_fmt(p.get('F'), '.4g'):<10} "
                f"p = {_fmt(p.get('p'), '.4g'):<10}{'  <-- differ' if sig else ''}"
            )
        lines.append("")
    return lines


def plot_anova_table(summary, generation=None, alpha=ALPHA, fig=None):
    """The ANOVA text tables as a figure; significant lines in red."""
    lines = anova_text_lines(summary, generation, alpha)
    fig = _new_figure(fig, (8.5, 0.4 + 0.16 * len(lines)))
    fig.set_layout_engine(None)
    n = max(len(lines), 1)
    for i, line in enumerate(lines):
        red = "<--" in line
        fig.text(
            0.02,
            1 - (i + 0.8) / (n + 0.5),
            line,
            family="monospace",
            fontsize=8,
            color=FLAG_COLOR if red else "black",
            va="center",
            fontweight="bold" if red and line.startswith("ANOVA") else "normal",
        )
    return fig


# ------------------------------------------------------------------------------------ generations
def plot_generation_sizes(summary, fig=None):
    """Stacked bars per generation: each cluster's size and the unaccounted images."""
    summary = as_summary(summary)
    gens = summary.generations or []
    fig = _new_figure(fig, (max(4.5, 1.8 + 1.5 * len(gens)), 4.5))
    if not gens:
        return _empty(fig, "No generation in this summary.")
    ax = fig.add_subplot(1, 1, 1)
    top = 0
    for g, gen in enumerate(gens):
        n = gen.n_images or 1
        segments = [
            (
                name,
                int(e.size),
                cluster_color(e.final_id),
                f"{name} {_final_label(e.final_id)}: {int(e.size)}",
            )
            for name, e in generation_clusters(summary, g)
        ]
        unacc = int(gen.n_unaccounted or 0)
        if unacc:
            segments.append(("unaccounted", unacc, UNACCOUNTED_COLOR, f"unaccounted: {unacc}"))
        bottom = 0
        for name, size, color, text in segments:
            ax.bar(
                g,
                size,
                bottom=bottom,
                width=0.5,
                color=color,
                edgecolor="white",
                hatch="//" if name == "unaccounted" else None,
                gid=f"bar:{g}:{name}",
            )
            if size >= 0.06 * n:  # label inside, else beside the bar
                ax.text(g, bottom + size / 2, text, ha="center", va="center", fontsize=7)
            else:
                ax.text(g + 0.27, bottom + size / 2, text, ha="left", va="center", fontsize=7)
            bottom += size
        ax.text(g, bottom, f"{gen.n_images} images", ha="center", va="bottom", fontsize=8)
        top = max(top, bottom)
    ax.set_xticks(range(len(gens)), [f"generation {gen.generation}" for g, gen in enumerate(gens)])
    ax.set_ylim(0, top * 1.08 + 1)
    ax.set_ylabel("particles")
    ax.set_xlim(-0.6, len(gens) - 0.1)
    ax.set_title("Cluster sizes per generation (cluster -> final id)", fontsize=10)
    return fig


def plot_reproducibility(summary, fig=None):
    """Jaccard reproducibility of each cluster of each generation against the random
    expectation (mean +- 2 std): a real cluster stands far above its random band."""
    summary = as_summary(summary)
    rows = []
    for g in range(len(summary.generations or [])):
        for name, e in generation_clusters(summary, g):
            if _finite(e.jaccard):
                rows.append((g, name, e))
    fig = _new_figure(fig, (max(4.5, 1.5 + 0.8 * len(rows)), 4.5))
    if not rows:
        return _empty(
            fig,
            "No reproducibility figures in this summary (a single homogeneous "
            "cluster, or an older run).",
        )
    ax = fig.add_subplot(1, 1, 1)
    for x, (g, name, e) in enumerate(rows):
        ok = True
        if _finite(e.random_mean):
            std = e.random_std if _finite(e.random_std) else 0.0
            ok = e.jaccard > e.random_mean + 2 * std
            ax.errorbar(
                x + 0.18,
                e.random_mean,
                yerr=2 * std,
                fmt="o",
                color="black",
                ms=4,
                capsize=4,
                gid=f"random:{g}:{name}",
                label="random (mean ± 2 std)" if x == 0 else None,
            )
        ax.bar(
            x - 0.1,
            e.jaccard,
            width=0.45,
            color=cluster_color(e.final_id),
            edgecolor=FLAG_COLOR if not ok else "black",
            linewidth=2 if not ok else 0.5,
            gid=f"repro:{g}:{name}",
            label="Jaccard" if x == 0 else None,
        )
        ax.text(x - 0.1, e.jaccard + 1, f"{e.jaccard:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.axhline(JACCARD_FLOOR, ls="--", color="0.5", lw=0.8, label=f"floor {JACCARD_FLOOR:g} %")
    ax.set_xticks(
        range(len(rows)),
        [f"gen {g}\n{name}\n{_final_label(e.final_id)}" for g, name, e in rows],
        fontsize=8,
    )
    ax.set_ylim(0, 110)
    ax.set_ylabel("reproducibility (Jaccard, %)")
    ax.set_title("Reproducibility vs random expectation", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _node(ax, xy, text, color, *, gid):
    return ax.text(
        *xy,
        text,
        ha="center",
        va="center",
        fontsize=8,
        gid=gid,
        zorder=3,
        bbox=dict(boxstyle="round,pad=0.4", facecolor=color, edgecolor="black"),
    )


def _edge(ax, source, target, gid):
    """An arrow between two node boxes, clipped at their outlines."""
    ax.annotate(
        "",
        xy=target.get_position(),
        xytext=source.get_position(),
        gid=gid,
        arrowprops=dict(
            arrowstyle="-|>",
            color="0.3",
            shrinkA=1,
            shrinkB=1,
            patchA=source.get_bbox_patch(),
            patchB=target.get_bbox_patch(),
        ),
    )


def plot_generation_tree(summary, fig=None):
    """Which generation produced which final cluster; each generation's unaccounted images
    feed the next generation, the last one's are the unaccounted set."""
    summary = as_summary(summary)
    gens = summary.generations or []
    finals = final_clusters(summary)
    fig = _new_figure(fig, (7.5, 1.0 + 0.7 * max(len(finals), len(gens), 2)))
    if not gens and not finals:
        return _empty(fig, "Nothing to draw: the summary has no generations or clusters.")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    n = max(len(finals), 1)
    ys = {i: 1 - (i + 0.5) / n for i in range(len(finals))}
    by_id = {int(c.id): i for i, c in enumerate(finals)}
    gen_y = {}
    for g in range(len(gens)):
        rows = [
            by_id[e.final_id] for name, e in generation_clusters(summary, g) if e.final_id in by_id
        ]
        rows += [
            i
            for i, c in enumerate(finals)
            if c.generation == g and not c.unaccounted and i not in rows
        ]
        gen_y[g] = (
            float(np.mean([ys[i] for i in rows])) if rows else (gen_y.get(g - 1, 1.0) - 0.5 / n)
        )
    gen_nodes = {}
    for g, gen in enumerate(gens):
        gen_nodes[g] = _node(
            ax,
            (0.15, gen_y[g]),
            f"generation {gen.generation}\n{gen.n_images} images",
            "#fcf3cf",
            gid=f"node:gen{g}",
        )
    for g, gen in enumerate(gens[:-1]):
        _edge(ax, gen_nodes[g], gen_nodes[g + 1], f"edge:gen{g}:gen{g + 1}")
        ax.text(
            0.17,
            (gen_y[g] + gen_y[g + 1]) / 2,
            f"unaccounted {gen.n_unaccounted}",
            fontsize=7,
            color="0.3",
            va="center",
        )
    for i, c in enumerate(finals):
        res = c.resolution_A
        purity = c.estimated_purity
        text = (
            f"{cluster_label(c)}\n{int(c.size)} particles"
            f"{f', {res:.1f} Å' if _finite(res) else ''}"
            f"{f', purity {purity:.3f}' if _finite(purity) else ''}"
        )
        color = cluster_color(c.id, c.unaccounted)
        node = _node(ax, (0.8, ys[i]), text, color, gid=f"node:final{i}")
        g = len(gens) - 1 if c.unaccounted else c.generation
        if g in gen_nodes:
            _edge(ax, gen_nodes[g], node, f"edge:gen{g}:{cluster_label(c)}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Generation -> final cluster", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------ maps
def central_slices(path):
    """Central xy, xz, yz sections of an MRC map (data are z, y, x)."""
    import mrcfile

    with mrcfile.open(path, permissive=True) as m:
        v = np.asarray(m.data, dtype=np.float32)
    nz, ny, nx = v.shape
    return {"xy": v[nz // 2], "xz": v[:, ny // 2, :], "yz": v[:, :, nx // 2]}


def map_rows(summary, out_dir, generation=None, with_generations=True):
    """[(label, final map path or None, generation map path or None)], one per final cluster
    with a map; generation=g keeps the clusters of generation g only."""
    summary = as_summary(summary)
    gen_maps = {}
    for g in range(len(summary.generations or [])):
        for name, e in generation_clusters(summary, g):
            if e.map:
                gen_maps[e.final_id] = (g, name, os.path.join(out_dir, e.map))
    rows = []
    for c in final_clusters(summary):
        if generation is not None and (c.unaccounted or c.generation != generation):
            continue
        final = os.path.join(out_dir, c.map) if c.map else None
        final = final if final and os.path.exists(final) else None
        gm = gen_maps.get(c.id) if with_generations and not c.unaccounted else None
        gpath = gm[2] if gm and os.path.exists(gm[2]) else None
        if final or gpath:
            label = cluster_label(c)
            if gm:
                label += f"\n(gen {gm[0]} {gm[1]})"
            rows.append((label, final, gpath))
    return rows


def _draw_slices(axes, path, label, kind):
    sl = central_slices(path)
    values = np.concatenate([s.ravel() for s in sl.values()])
    lo, hi = np.percentile(values, [1, 99.8])
    for ax, plane in zip(axes, PLANES):
        ax.imshow(
            sl[plane],
            cmap="gray",
            origin="lower",
            vmin=lo,
            vmax=hi,
            gid=f"slice:{kind}:{label.splitlines()[0]}:{plane}",
        )
        ax.set_xticks([])
        ax.set_yticks([])


def plot_map_slices(summary, out_dir, generation=None, *, with_generations=True, fig=None):
    """Central xy/xz/yz slices of every final cluster map and, beside it, the map of the
    generation cluster it came from; drawn with matplotlib (no ChimeraX needed)."""
    rows = map_rows(summary, out_dir, generation, with_generations)
    ncols = 6 if any(r[2] for r in rows) else 3
    fig = _new_figure(fig, (1.7 * ncols + 0.8, 0.6 + 1.75 * max(len(rows), 1)))
    if not rows:
        return _empty(fig, f"No cluster maps on disk in {out_dir}.")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (label, final, gpath) in enumerate(rows):
        for kind, path, cols in (
            ("final", final, axes[r, :3]),
            ("generation", gpath, axes[r, 3:6]),
        ):
            if path is None:
                for ax in cols:
                    ax.set_axis_off()
                continue
            _draw_slices(cols, path, label, kind)
            for ax, plane in zip(cols, PLANES):
                if r == 0:
                    ax.set_title(f"{kind} {plane}", fontsize=8)
        axes[r, 0].set_ylabel(label, fontsize=8)
    which = "all generations" if generation is None else f"generation {generation}"
    fig.suptitle(f"Central slices of the cluster maps ({which})", fontsize=10)
    return fig


def plot_fsc(summary, fig=None):
    """Half-map FSC of each cluster map against spatial frequency, with the 0.143 line."""
    summary = as_summary(summary)
    clusters = [c for c in final_clusters(summary) if c.fsc]
    fig = _new_figure(fig, (6.5, 4.5))
    if not clusters:
        return _empty(fig, "No FSC curves in this summary (older run, or no maps).")
    ax = fig.add_subplot(1, 1, 1)
    box, apix = summary.box, summary.pixel_size
    scale = 1.0 / (box * apix) if _finite(box) and _finite(apix) and box * apix > 0 else None
    for c in clusters:
        f = np.asarray(c.fsc, float)
        x = np.arange(len(f)) * (scale if scale else 1.0 / (2 * (len(f) - 1 or 1)))
        res = c.resolution_A
        label = f"{cluster_label(c)}{((f': {res:.1f} Å') if _finite(res) else '')}"
        color = cluster_color(c.id, c.unaccounted)
        ax.plot(
            x,
            f,
            color=color,
            lw=1.5,
            ls="--" if c.unaccounted else "-",
            label=label,
            gid=f"fsc:{cluster_label(c)}",
        )
        if _finite(res) and res > 0 and scale:
            ax.axvline(1.0 / res, color=color, lw=0.6, ls=":")
    ax.axhline(FSC_THRESHOLD, color="black", lw=0.8, ls="--", gid="fsc-threshold")
    ax.text(ax.get_xlim()[1], FSC_THRESHOLD, " 0.143", va="bottom", ha="right", fontsize=8)
    ax.set_xlabel("spatial frequency (1/Å)" if scale else "spatial frequency (1/pixel)")
    ax.set_ylabel("FSC (half maps)")
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("FSC per cluster", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------ purity
#: thresholds on the posterior marked along the purity curve
CURVE_MARKS = (0.5, 0.8, 0.9, 0.95, 0.99)
NOT_AVAILABLE = (
    "Estimated purity not available: this summary has no purity curve (a run of an "
    "older engine, or no clusters)."
)


def purity_curve(summary):
    """(thresholds, accounted fraction, estimated purity) arrays of summary.purity_curve
    (a purity the engine left null is nan), or None when the summary has none."""
    summary = as_summary(summary)
    curve = summary.purity_curve
    if not curve or not curve.accounted:
        return None

    def arr(values):
        return np.array([np.nan if v is None else v for v in values or []], float)

    acc, pur = arr(curve.accounted), arr(curve.estimated_purity)
    thr = arr(curve.threshold)
    if len(pur) != len(acc):
        return None
    if len(thr) != len(acc):
        thr = np.full(len(acc), np.nan)
    return thr, acc, pur


def operating_point(summary):
    """(accounted fraction, estimated purity) of the run's own clusters: their total size over
    all particles, and the size-weighted mean of their estimated purities (None when a cluster
    has none)."""
    summary = as_summary(summary)
    regular = [c for c in final_clusters(summary) if not c.unaccounted]
    n = summary.n_particles
    if not regular or not _finite(n) or n <= 0:
        return None, None
    sizes = np.array([int(c.size) for c in regular], float)
    accounted = float(sizes.sum() / n)
    purities = [c.estimated_purity for c in regular]
    if sizes.sum() <= 0 or not all(_finite(p) for p in purities):
        return accounted, None
    return accounted, float(np.dot(sizes, purities) / sizes.sum())


def plot_purity_curve(summary, fig=None):
    """The trade-off between the particles kept and their purity: for each threshold on the
    posterior, the fraction of particles whose most probable cluster reaches it (x) against the
    mean posterior of those (estimated purity, y); the run's own clusters (at its purity target)
    as a point; beside it each cluster's estimated purity."""
    summary = as_summary(summary)
    fig = _new_figure(fig, (10.0, 4.4))
    curve = purity_curve(summary)
    if curve is None:
        return _empty(fig, NOT_AVAILABLE)
    target = summary.min_purity
    target = target if _finite(target) else None
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _draw_purity_curve(ax, summary, curve, target)
    _draw_cluster_purities(bx, summary, target)
    return fig


def _draw_purity_curve(ax, summary, curve, target):
    """The curve, its marks at CURVE_MARKS, the purity target and the run's own point."""
    thr, acc, pur = curve
    ax.plot(
        acc,
        pur,
        "-",
        color="black",
        lw=1.5,
        gid="purity-curve",
        label="all particles, most probable cluster",
    )
    for t in CURVE_MARKS:
        i = int(np.argmin(np.abs(thr - t))) if np.any(np.isfinite(thr)) else None
        if i is None or abs(thr[i] - t) > 1e-6 or not np.isfinite(pur[i]):
            continue
        ax.plot(acc[i], pur[i], "o", color="0.4", ms=3, gid=f"purity-mark:{t:g}")
        ax.annotate(
            f"p ≥ {t:g}",
            (acc[i], pur[i]),
            textcoords="offset points",
            xytext=(-4, -10),
            ha="right",
            fontsize=7,
            color="0.3",
        )
    if target is not None:
        ax.axhline(
            target,
            ls="--",
            color=FLAG_COLOR,
            lw=0.8,
            gid="purity-target",
            label=f"purity target {target:g}",
        )
    x, y = operating_point(summary)
    if x is not None:
        ax.plot(
            x,
            y if y is not None else (target if target is not None else np.nan),
            "*",
            color=FLAG_COLOR,
            ms=13,
            gid="purity-operating-point",
            zorder=4,
            label=f"this run: {100 * x:.0f} % accounted"
            + (f", purity {y:.3f}" if y is not None else ""),
        )
    ax.set_xlabel("fraction of particles accounted")
    ax.set_ylabel("estimated purity (mean posterior)")
    ax.set_xlim(0, 1.02)
    low = (
        np.nanmin(np.concatenate([pur, [target if target is not None else 1.0]]))
        if np.any(np.isfinite(pur))
        else 0.5
    )
    ax.set_ylim(max(0.0, min(low, 0.9) - 0.03), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Purity vs particles accounted", fontsize=10)


def _draw_cluster_purities(bx, summary, target):
    """One bar per cluster at its estimated purity."""
    regular = [c for c in final_clusters(summary) if not c.unaccounted]
    rows = [c for c in regular if _finite(c.estimated_purity)]
    if not rows:
        bx.set_axis_off()
        bx.text(
            0.5,
            0.5,
            "no estimated purity per cluster",
            ha="center",
            va="center",
            transform=bx.transAxes,
        )
    else:
        for i, c in enumerate(rows):
            bx.bar(
                i,
                c.estimated_purity,
                width=0.6,
                color=cluster_color(c.id),
                edgecolor="black",
                lw=0.5,
                gid=f"purity:{cluster_label(c)}",
            )
            bx.text(
                i,
                c.estimated_purity,
                f"{c.estimated_purity:.3f}\nn={int(c.size)}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        if target is not None:
            bx.axhline(target, ls="--", color=FLAG_COLOR, lw=0.8)
        bx.set_xticks(range(len(rows)), [cluster_label(c) for c in rows], fontsize=8)
        values = [c.estimated_purity for c in rows] + ([target] if target else [])
        bx.set_ylim(max(0.0, min(min(values), 0.9) - 0.05), 1.035)
        bx.set_ylabel("estimated purity")
        bx.grid(axis="y", alpha=0.3)
    bx.set_title("Estimated purity per cluster", fontsize=10)


# ------------------------------------------------------------------------------------ command line
#: file name -> figure function; what `python -m sort3ddepth.viewers.plots` writes
FIGURES = {
    "anova_boxplots.png": lambda s, d: plot_anova(s),
    "anova_table.png": lambda s, d: plot_anova_table(s),
    "generation_sizes.png": lambda s, d: plot_generation_sizes(s),
    "reproducibility.png": lambda s, d: plot_reproducibility(s),
    "generation_tree.png": lambda s, d: plot_generation_tree(s),
    "map_slices.png": lambda s, d: plot_map_slices(s, d),
    "fsc.png": lambda s, d: plot_fsc(s),
    "purity_curve.png": lambda s, d: plot_purity_curve(s),
}


def write_all(out_dir, png_dir, dpi=100):
    """Every figure of a run as a PNG in png_dir; returns the paths written."""
    summary = load_summary(out_dir)
    os.makedirs(png_dir, exist_ok=True)
    written = []
    for name, make in FIGURES.items():
        path = os.path.join(png_dir, name)
        make(summary, out_dir).savefig(path, dpi=dpi)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sort3ddepth.viewers.plots",
        description="Write every viewer figure of a sort3d-depth output folder as PNG files.",
    )
    parser.add_argument("output_dir", help="the engine's output folder (holds summary.json)")
    parser.add_argument("png_dir", help="folder for the PNG files")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        written = write_all(args.output_dir, args.png_dir, args.dpi)
    except (SummaryError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
