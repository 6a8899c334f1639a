"""The viewer: figures of sort3ddepth.viewers.plots and the Scipion Sort3DDepthViewer.

- Plain functions on a hand-made summary with two generations, a flagged nuisance variable, a
  NaN F test and a missing map: what each figure draws (boxes, bar segments, arrows, slice
  panels, FSC lines) is counted through the artists' gids.
- TestSort3DDepthViewer: one small ProtSort3DDepth run (the simulated set of the protocol tests,
  2 MPI ranks); every entry of the viewer's _getVisualizeDict returns its views without showing
  them, the plots are saved as PNG offscreen and checked against the run's summary.json
  (the purity curve included).
"""

import json
import math
import os
import re
import shutil
import time

import matplotlib
import mrcfile
import numpy as np
import pytest
from pyworkflow.tests import BaseTest, setupTestProject

from sort3ddepth.engine.results import SCHEMA_VERSION, GenerationCluster
from sort3ddepth.viewers import plots

BOX = 16


# ------------------------------------------------------------------------------------ helpers
def _gids(fig, prefix):
    """gids of the artists of a figure that start with prefix (one per drawn item)."""
    return [a.get_gid() for a in fig.findobj(lambda a: (a.get_gid() or "").startswith(prefix))]


def _texts(fig):
    return " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def _write_map(path, seed):
    rng = np.random.default_rng(seed)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(rng.normal(size=(BOX, BOX, BOX)).astype(np.float32))
        m.voxel_size = 4.0


def _box(mean):
    return {
        "whislo": mean - 3,
        "q1": mean - 1,
        "med": mean,
        "q3": mean + 1,
        "whishi": mean + 3,
        "mean": mean,
        "min": mean - 5,
        "max": mean + 3,
    }


def _table(names, F, p, pairs):
    return {
        "F": F,
        "p": p,
        "reason": None if math.isfinite(F) else "constant values",
        "groups": [
            {"name": n, "n": 10 + i, "mean": 100.0 * i, "std": 1.0, "box": _box(100.0 * i)}
            for i, n in enumerate(names)
        ],
        "pairs": [{"a": a, "b": b, "F": 30.0, "p": pp} for a, b, pp in pairs],
    }


def _gen_entry(g, j, fid, size, jac):
    """A generation's cluster entry (file, map, size, final id, Jaccard against random)."""
    return {
        "file": f"generation_{g:03d}/Cluster_{j:03d}.txt",
        "map": f"generation_{g:03d}/vol_cluster{j:03d}.mrc",
        "size": size,
        "final_id": fid,
        "jaccard": jac,
        "random_mean": 30.0,
        "random_std": 4.0,
    }


def _synthetic_generations(names):
    """Generation 0 found 2 clusters (defocus does not separate them), generation 1 found 1."""
    return [
        {
            "generation": 0,
            "n_images": 1000,
            "cluster_sizes": [400, 300],
            "clusters": [_gen_entry(0, 0, 0, 400, 97.0), _gen_entry(0, 1, 1, 300, 88.0)],
            "n_unaccounted": 300,
            "anova": {
                "defocus": _table(names[:2], 1.0, 0.4, [("Cluster_000", "Cluster_001", 0.4)])
            },
        },
        {
            "generation": 1,
            "n_images": 300,
            "cluster_sizes": [250],
            "clusters": [_gen_entry(1, 0, 2, 250, 70.0)],
            "n_unaccounted": 50,
            "anova": {},
        },
    ]


def _synthetic_clusters():
    """The final clusters: two with their FSC, one of an older run without, and the
    unaccounted set without a map."""
    return [
        {
            "id": 0,
            "file": "Cluster_000.txt",
            "map": "vol_cluster000.mrc",
            "size": 400,
            "generation": 0,
            "unaccounted": False,
            "resolution_A": 12.0,
            "fsc": [1.0, 0.9, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0],
        },
        {
            "id": 1,
            "file": "Cluster_001.txt",
            "map": "vol_cluster001.mrc",
            "size": 300,
            "generation": 0,
            "unaccounted": False,
            "resolution_A": 14.0,
            "fsc": [1.0, 0.8, 0.4, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
        },
        {
            "id": 2,
            "file": "Cluster_002.txt",
            "map": "vol_cluster002.mrc",
            "size": 250,
            "generation": 1,
            "unaccounted": False,
        },  # an older run: no FSC
        {"id": 3, "file": "Cluster_003.txt", "size": 50, "generation": 1, "unaccounted": True},
    ]


@pytest.fixture
def synthetic(tmp_path):
    """An output folder: generation 0 gave 2 clusters, generation 1 gave 1; the unaccounted
    set has no map; defocus differs (Cluster_002 vs the others), norm has no F test."""
    out = tmp_path / "out"
    (out / "generation_000").mkdir(parents=True)
    (out / "generation_001").mkdir()
    for i in range(3):
        _write_map(out / (f"vol_cluster{i:03d}.mrc"), i)
    for g, j in ((0, 0), (0, 1), (1, 0)):
        _write_map(out / (f"generation_{g:03d}") / (f"vol_cluster{j:03d}.mrc"), 10 + j)
    names = ["Cluster_000", "Cluster_001", "Cluster_002"]
    summary = {
        "n_particles": 1000,
        "box": BOX,
        "pixel_size": 4.0,
        "generations": _synthetic_generations(names),
        "clusters": _synthetic_clusters(),
        "anova": {
            "defocus": _table(
                names,
                25.0,
                1e-6,
                [
                    ("Cluster_000", "Cluster_001", 0.3),
                    ("Cluster_000", "Cluster_002", 1e-5),
                    ("Cluster_001", "Cluster_002", 1e-7),
                ],
            ),
            "norm": _table(names, float("nan"), float("nan"), []),
        },
    }
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f)
    return str(out)


def _with_purity(summary, seed=0):
    """The summary of a newer engine: purity target, each cluster's estimated purity and the
    purity-vs-accounted curve of 1000 particles' max posteriors (null purity where no particle
    reaches the threshold), computed as the engine does."""
    s = json.loads(json.dumps(plots.as_summary(summary).to_dict()))
    best = np.concatenate(
        [np.full(200, 0.9995), np.random.default_rng(seed).uniform(0.4, 0.999, 800)]
    )
    t = np.round(np.linspace(0.0, 1.0, 101), 3)
    s["min_purity"] = 0.95
    s["posteriors"] = "posteriors.npy"
    s["purity_curve"] = {
        "threshold": t.tolist(),
        "accounted": [round(float(np.mean(best >= x)), 4) for x in t],
        "estimated_purity": [
            round(float(best[best >= x].mean()), 4) if np.any(best >= x) else None for x in t
        ],
    }
    for c, purity in zip(s["clusters"], (0.99, 0.97, 0.96)):
        c["estimated_purity"] = purity
    return s


# ------------------------------------------------------------------------------------ plots
def test_anova_boxes_and_flag(synthetic):
    s = plots.load_summary(synthetic)
    fig = plots.plot_anova(s)
    assert len(fig.axes) == 2
    boxes = _gids(fig, "box:")
    assert sorted(boxes) == sorted([f"box:Cluster_{i:03d}" for i in range(3)] * 2)
    # defocus is flagged, with the two significant pairs named; norm is not
    assert _gids(fig, "flag:") == ["flag:defocus"]
    text = _texts(fig)
    assert "Cluster_001 vs Cluster_002" in text and "Cluster_000 vs Cluster_002" in text
    assert "Cluster_000 vs Cluster_001" not in text
    assert "no F test (constant values)" in text
    assert "p = 1e-06" in text
    # the differing cluster is named first (it is in both significant pairs)
    assert plots.flagged_clusters(s.anova["defocus"])[0] == "Cluster_002"
    # one variable, one generation
    fig = plots.plot_anova(s, ["norm"])
    assert len(_gids(fig, "box:")) == 3 and not _gids(fig, "flag:")
    fig = plots.plot_anova(s, generation=0)
    assert sorted(_gids(fig, "box:")) == ["box:Cluster_000", "box:Cluster_001"]
    assert "No ANOVA" in _texts(plots.plot_anova(s, generation=1))


def test_anova_text(synthetic):
    s = plots.load_summary(synthetic)
    lines = plots.anova_text_lines(s)
    head = [ln for ln in lines if ln.startswith("ANOVA of")]
    assert len(head) == 2 and "<-- the clusters differ in defocus" in head[0]
    assert "F = n/a, p = n/a" in head[1]
    rows = [ln.split() for ln in lines if ln.strip().startswith("Cluster_") and " vs " not in ln]
    assert [r[:2] for r in rows[:3]] == [
        ["Cluster_000", "10"],
        ["Cluster_001", "11"],
        ["Cluster_002", "12"],
    ]
    assert sum("<-- differ" in ln for ln in lines) == 2
    fig = plots.plot_anova_table(s)
    # 3 cluster rows per variable and the 3 defocus pairs, one text line each
    assert sum(1 for t in fig.texts if "Cluster_" in t.get_text()) == 9
    red = [t.get_text() for t in fig.texts if t.get_color() == plots.FLAG_COLOR]
    assert len(red) == 3 and red[0].startswith("ANOVA of defocus")


def test_generation_figures(synthetic):
    s = plots.load_summary(synthetic)
    fig = plots.plot_generation_sizes(s)
    bars = _gids(fig, "bar:")
    # clusters + unaccounted per generation
    assert sorted(bars) == [
        "bar:0:Cluster_000",
        "bar:0:Cluster_001",
        "bar:0:unaccounted",
        "bar:1:Cluster_000",
        "bar:1:unaccounted",
    ]
    heights = {p.get_gid(): p.get_height() for p in fig.axes[0].patches}
    assert heights["bar:1:Cluster_000"] == 250 and heights["bar:0:unaccounted"] == 300
    fig = plots.plot_reproducibility(s)
    assert len(_gids(fig, "repro:")) == 3 and len(set(_gids(fig, "random:"))) == 3
    bar = fig.findobj(lambda a: a.get_gid() == "repro:0:Cluster_001")[0]
    assert bar.get_height() == 88.0
    # the random band is mean +- 2 std
    from matplotlib.collections import LineCollection

    band = fig.findobj(
        lambda a: isinstance(a, LineCollection) and a.get_gid() == "random:1:Cluster_000"
    )[0]
    assert sorted(band.get_segments()[0][:, 1]) == [22.0, 38.0]
    fig = plots.plot_generation_tree(s)
    edges = sorted(_gids(fig, "edge:"))
    assert edges == [
        "edge:gen0:Cluster_000",
        "edge:gen0:Cluster_001",
        "edge:gen0:gen1",
        "edge:gen1:Cluster_002",
        "edge:gen1:unaccounted",
    ]


def test_a_generation_cluster_the_final_check_emptied(synthetic):
    """final_id None (the run's final member check left it below the minimum size): no map, no
    final cluster; the figures say so instead of failing."""
    s = plots.load_summary(synthetic)
    s.generations[1].clusters.append(
        GenerationCluster(
            file="generation_001/Cluster_001.txt", size=60, final_id=None, jaccard=55.0
        )
    )
    fig = plots.plot_generation_sizes(s)
    assert "bar:1:Cluster_001" in _gids(fig, "bar:")
    assert "Cluster_001 -> none: 60" in _texts(fig)
    fig = plots.plot_reproducibility(s)
    assert "gen 1\nCluster_001\n-> none" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    bar = fig.findobj(lambda a: a.get_gid() == "repro:1:Cluster_001")[0]
    assert bar.get_facecolor()[:3] == pytest.approx(
        matplotlib.colors.to_rgb(plots.UNACCOUNTED_COLOR)
    )
    assert len(_gids(plots.plot_generation_tree(s), "edge:")) == 5
    assert len(_gids(plots.plot_map_slices(s, synthetic), "slice:")) == 3 * 6


def test_map_slices_and_fsc(synthetic):
    s = plots.load_summary(synthetic)
    fig = plots.plot_map_slices(s, synthetic)
    # 3 final maps and 3 generation maps (the unaccounted set has none), 3 planes each
    slices = _gids(fig, "slice:")
    assert len(slices) == 3 * 6
    assert len([g for g in slices if g.startswith("slice:final:")]) == 9
    img = fig.findobj(lambda a: a.get_gid() == "slice:final:Cluster_001:xz")[0]
    with mrcfile.open(os.path.join(synthetic, "vol_cluster001.mrc")) as m:
        np.testing.assert_array_equal(img.get_array(), m.data[:, BOX // 2, :])
    fig = plots.plot_map_slices(s, synthetic, generation=1, with_generations=False)
    assert len(_gids(fig, "slice:")) == 3
    fig = plots.plot_fsc(s)
    lines = {
        ln.get_gid(): ln for ln in fig.axes[0].lines if (ln.get_gid() or "").startswith("fsc:")
    }
    assert set(lines) == {"fsc:Cluster_000", "fsc:Cluster_001"}
    x = lines["fsc:Cluster_000"].get_xdata()
    assert x[1] == pytest.approx(1 / (BOX * 4.0))
    assert _gids(fig, "fsc-threshold")
    assert "Cluster_000: 12.0 Å" in _texts(fig)


def test_purity_curve(synthetic):
    """The curve is the summary's arrays; the run's point is its clusters' share of the particles
    at their size-weighted estimated purity; one bar per cluster at its estimated purity."""
    s = _with_purity(plots.load_summary(synthetic))
    curve = s["purity_curve"]
    # the fixture has a threshold no particle reaches: a null purity, drawn as a gap
    assert curve["estimated_purity"][-1] is None and curve["accounted"][-1] == 0.0
    fig = plots.plot_purity_curve(s)
    line = fig.findobj(lambda a: a.get_gid() == "purity-curve")
    assert len(line) == 1
    np.testing.assert_array_equal(line[0].get_xdata(), curve["accounted"])
    np.testing.assert_array_equal(
        line[0].get_ydata(), [np.nan if v is None else v for v in curve["estimated_purity"]]
    )
    point = fig.findobj(lambda a: a.get_gid() == "purity-operating-point")[0]
    assert point.get_xdata()[0] == pytest.approx((400 + 300 + 250) / 1000)
    assert point.get_ydata()[0] == pytest.approx((400 * 0.99 + 300 * 0.97 + 250 * 0.96) / 950)
    target = fig.findobj(lambda a: a.get_gid() == "purity-target")[0]
    assert list(target.get_ydata()) == [0.95, 0.95]
    bars = {
        p.get_gid(): p.get_height()
        for p in fig.findobj(lambda a: (a.get_gid() or "").startswith("purity:"))
    }
    assert bars == {
        "purity:Cluster_000": 0.99,
        "purity:Cluster_001": 0.97,
        "purity:Cluster_002": 0.96,
    }  # none for the unaccounted set
    mark = fig.findobj(lambda a: a.get_gid() == "purity-mark:0.9")[0]
    i = curve["threshold"].index(0.9)
    assert (mark.get_xdata()[0], mark.get_ydata()[0]) == (
        curve["accounted"][i],
        curve["estimated_purity"][i],
    )
    assert "this run: 95 % accounted, purity 0.976" in _texts(fig)
    # the generation tree names each final cluster's estimated purity
    text = _texts(plots.plot_generation_tree(s))
    assert "Cluster_000\n400 particles, 12.0 Å, purity 0.990" in text
    assert "purity 0.960" in text and text.count("purity 0.") == 3


def test_purity_not_available(synthetic):
    """An older summary (no purity keys) gives the one-line message, not an exception; a
    summary with a curve but no per-cluster estimates still draws the curve."""
    s = plots.load_summary(synthetic)
    assert s.purity_curve is None and s.clusters[0].estimated_purity is None
    assert "purity_curve" not in s.to_dict()
    assert plots.purity_curve(s) is None
    fig = plots.plot_purity_curve(s)
    assert _texts(fig).strip() == plots.NOT_AVAILABLE
    assert not fig.findobj(lambda a: (a.get_gid() or "").startswith("purity"))
    assert "purity" not in _texts(plots.plot_generation_tree(s))
    assert plots.operating_point(s) == (pytest.approx(0.95), None)
    s = _with_purity(s)
    for c in s["clusters"]:
        c.pop("estimated_purity", None)
    del s["min_purity"]
    fig = plots.plot_purity_curve(s)
    assert len(fig.findobj(lambda a: a.get_gid() == "purity-curve")) == 1
    assert not fig.findobj(lambda a: (a.get_gid() or "").startswith("purity:"))
    assert not fig.findobj(lambda a: a.get_gid() == "purity-target")
    assert "no estimated purity per cluster" in _texts(fig)


def test_missing_fields(tmp_path):
    """A one-cluster run of an older engine: no ANOVA, no stats, no maps on disk."""
    s = {
        "n_particles": 100,
        "generations": [
            {"generation": 0, "n_images": 100, "cluster_sizes": [100], "n_unaccounted": 0}
        ],
        "clusters": [
            {"id": 0, "file": "Cluster_000.txt", "size": 100, "generation": 0, "unaccounted": False}
        ],
    }
    assert "no anova" in _texts(plots.plot_anova(s)).lower()
    assert _gids(plots.plot_generation_sizes(s), "bar:") == ["bar:0:Cluster_000"]
    assert not _gids(plots.plot_reproducibility(s), "repro:")
    assert _gids(plots.plot_generation_tree(s), "edge:") == ["edge:gen0:Cluster_000"]
    assert not _gids(plots.plot_map_slices(s, str(tmp_path)), "slice:")
    assert not _gids(plots.plot_fsc(s), "fsc:")
    assert plots.NOT_AVAILABLE in _texts(plots.plot_purity_curve(s))


def test_unreadable_summary_one_line(synthetic, tmp_path, capsys):
    """A newer schema_version, or a cluster without its size: the command line says so in one
    line (exit status 2), never a KeyError; the plot functions raise SummaryError."""
    with open(os.path.join(synthetic, "summary.json")) as f:
        good = json.load(f)
    newer = dict(good, schema_version=SCHEMA_VERSION + 1)
    missing = json.loads(json.dumps(good))
    del missing["clusters"][2]["size"]
    for s, words in (
        (newer, f"schema_version {SCHEMA_VERSION + 1}; this version reads up to {SCHEMA_VERSION}"),
        (missing, "clusters[2] has no field 'size'"),
    ):
        with open(os.path.join(synthetic, "summary.json"), "w") as f:
            json.dump(s, f)
        assert plots.main([synthetic, str(tmp_path / "png")]) == 2
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert out == "" and len(lines) == 1 and words in lines[0], err
        assert lines[0].startswith("python -m sort3ddepth.viewers.plots: error: ")
        with pytest.raises(plots.SummaryError, match=re.escape(words)):
            plots.plot_fsc(s)


def test_command_line(synthetic, tmp_path, capsys):
    plots.main([synthetic, str(tmp_path / "png")])
    written = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in written) == sorted(plots.FIGURES)
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ Scipion
@pytest.mark.slow
class TestSort3DDepthViewer(BaseTest):
    """The viewer on a real protocol run."""

    @classmethod
    def setUpClass(cls):
        from sort3ddepth.protocols import ProtSort3DDepth
        from sort3ddepth.tests.test_protocols_sort3d_depth import (
            N_PER_CLASS,
            _data_folder,
            _import_particles,
            _launch_with_timeout,
            _simulated_set,
        )

        setupTestProject(cls)
        cls.folder = _data_folder("viewer")
        cls.pngs = os.path.join(cls.folder, "png")
        os.makedirs(cls.pngs)
        sqlite, _ = _simulated_set(cls.folder)
        protImport = _import_particles(cls, sqlite, "simulated particles")
        prot = cls.newProtocol(
            ProtSort3DDepth,
            objLabel="sort3d depth for the viewer",
            imgPerGrp=N_PER_CLASS,
            depthOrder=1,
            seed=1,
            numberOfMpi=2,
        )
        prot.inputParticles.set(protImport)
        prot.inputParticles.setExtended("outputParticles")
        t0 = time.time()
        _launch_with_timeout(cls, prot)
        print(f"sort3d depth run for the viewer: {time.time() - t0:.1f} s")
        cls.prot = prot
        with open(prot._getSortDir("summary.json")) as f:
            cls.summary = json.load(f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    def _viewerClass(self):
        """The viewer as Scipion finds it for the protocol (plugin discovery)."""
        from pyworkflow import Config
        from pyworkflow.viewer import DESKTOP_TKINTER

        found = [
            v
            for v in Config.getDomain().findViewers(self.prot, DESKTOP_TKINTER)
            if v.__name__ == "Sort3DDepthViewer"
        ]
        self.assertEqual(len(found), 1)
        return found[0]

    def _viewer(self):
        v = self._viewerClass()(project=self.proj, protocol=self.prot)
        v.setProtocol(self.prot)
        return v

    def _plot(self, viewer, name):
        """The figure behind one eye button, saved as a PNG (never shown)."""
        from pwem.viewers.plotter import EmPlotter

        t0 = time.time()
        views = viewer._getVisualizeDict()[name](name)
        self.assertLess(time.time() - t0, 30, f"{name} took too long (blocked?)")
        self.assertEqual(len(views), 1, views)
        self.assertIsInstance(views[0], EmPlotter)
        png = os.path.join(self.pngs, name + ".png")
        views[0].savefig(png)
        self.assertGreater(os.path.getsize(png), 5000)
        fig = views[0].getFigure()
        views[0].close()
        return fig

    def test_viewer_is_found_for_the_protocol(self):
        cls = self._viewerClass()
        self.assertEqual(cls.getClassLabel(), "sort3ddepth - viewer sort3d depth")

    def test_form(self):
        v = self._viewer()
        n_gen = len(self.summary["generations"])
        self.assertEqual(
            v.getParam("anovaClusters").choices,
            ["final clusters"] + [f"generation {g}" for g in range(n_gen)],
        )
        self.assertEqual(v.getParam("anovaVariable").choices, ["all"] + list(self.summary["anova"]))
        self.assertEqual(
            set(v._getVisualizeDict()),
            {
                "showAnovaPlots",
                "showAnovaTables",
                "showGenerationSizes",
                "showReproducibility",
                "showGenerationTree",
                "showMapSlices",
                "showFsc",
                "showPurityCurve",
                "showMapsExternal",
                "showClasses",
            },
        )

    def test_plots_match_the_run(self):
        s = self.summary
        regular = [c for c in s["clusters"] if not c.get("unaccounted")]
        self.assertGreaterEqual(len(regular), 2)
        v = self._viewer()

        fig = self._plot(v, "showAnovaPlots")
        self.assertEqual(len(fig.axes), len(s["anova"]))
        # one box per cluster and variable
        self.assertEqual(len(_gids(fig, "box:")), len(s["anova"]) * len(regular))
        v.anovaVariable.set(1)  # the first variable only
        fig = self._plot(v, "showAnovaPlots")
        self.assertEqual(
            sorted(_gids(fig, "box:")),
            sorted("box:" + c.label for c in plots.as_summary(s).regular),
        )

        fig = self._plot(v, "showGenerationSizes")
        expected = sum(
            len(g["clusters"]) + (1 if g["n_unaccounted"] else 0) for g in s["generations"]
        )
        self.assertEqual(len(_gids(fig, "bar:")), expected)
        total = sum(
            p.get_height() for p in fig.axes[0].patches if (p.get_gid() or "").startswith("bar:0:")
        )
        self.assertEqual(total, s["generations"][0]["n_images"])

        fig = self._plot(v, "showReproducibility")
        self.assertEqual(
            len(_gids(fig, "repro:")),
            sum(1 for g in s["generations"] for e in g["clusters"] if e.get("jaccard") is not None),
        )

        fig = self._plot(v, "showGenerationTree")
        # one arrow into every final cluster, one from each generation to the next
        self.assertEqual(
            sorted(_gids(fig, "edge:")),
            sorted(
                [
                    f"edge:gen{len(s['generations']) - 1 if c.unaccounted else c.generation}:"
                    f"{plots.cluster_label(c)}"
                    for c in plots.final_clusters(s)
                ]
                + [f"edge:gen{g}:gen{g + 1}" for g in range(len(s["generations"]) - 1)]
            ),
        )

        fig = self._plot(v, "showMapSlices")
        finals = [c for c in s["clusters"] if c.get("map")]
        gen_maps = [e for g in s["generations"] for e in g["clusters"] if e.get("map")]
        self.assertEqual(len(_gids(fig, "slice:")), 3 * (len(finals) + len(gen_maps)))
        v.withGenerationMaps.set(False)
        fig = self._plot(v, "showMapSlices")
        self.assertEqual(len(_gids(fig, "slice:")), 3 * len(finals))

        fig = self._plot(v, "showFsc")
        self.assertEqual(len(_gids(fig, "fsc:")), sum(1 for c in s["clusters"] if c.get("fsc")))

        # the purity curve is the run's: its arrays, its point, one bar per cluster
        fig = self._plot(v, "showPurityCurve")
        curve = s["purity_curve"]
        self.assertEqual(len(curve["threshold"]), 101)
        line = fig.findobj(lambda a: a.get_gid() == "purity-curve")[0]
        np.testing.assert_array_equal(line.get_xdata(), curve["accounted"])
        np.testing.assert_array_equal(
            line.get_ydata(), [np.nan if y is None else y for y in curve["estimated_purity"]]
        )
        point = fig.findobj(lambda a: a.get_gid() == "purity-operating-point")[0]
        self.assertAlmostEqual(
            point.get_xdata()[0], sum(c["size"] for c in regular) / s["n_particles"]
        )
        bars = {
            p.get_gid(): p.get_height()
            for p in fig.findobj(lambda a: (a.get_gid() or "").startswith("purity:"))
        }
        self.assertEqual(
            bars, {"purity:" + c.label: c.estimated_purity for c in plots.as_summary(s).regular}
        )

    def test_anova_text_view(self):
        from pyworkflow.viewer import TextView

        v = self._viewer()
        views = v._getVisualizeDict()["showAnovaTables"]("showAnovaTables")
        self.assertEqual(len(views), 1)
        self.assertIsInstance(views[0], TextView)
        with open(views[0].getFileList()[0]) as f:
            text = f.read()
        for var, t in self.summary["anova"].items():
            self.assertIn(f"ANOVA of {var} (final clusters)", text)
            for g in t["groups"]:
                self.assertIn(g["name"], text)
            self.assertEqual(
                text.count(" vs "), sum(len(t["pairs"]) for t in self.summary["anova"].values())
            )

    def test_maps_and_classes_open_in_scipion_viewers(self):
        from pyworkflow.viewer import MessageView, View

        v = self._viewer()
        for name in ("showMapsExternal", "showClasses"):
            views = v._getVisualizeDict()[name](name)
            self.assertTrue(views, name)
            for view in views:
                self.assertIsInstance(view, View)
                self.assertNotIsInstance(view, MessageView, f"{name}: {getattr(view, '_msg', '')}")
            print(name, [type(x).__name__ for x in views])

    def test_zz_form_and_plot_window_under_xvfb(self):
        """visualize() opens the form (its mainloop is ended from inside); an eye button's plot
        opens in a Tk window without blocking."""
        from sort3ddepth.tests.xdisplay import xvfb_display

        display = xvfb_display()
        if display is None:
            self.skipTest("Xvfb is not installed or did not start (apt-get install xvfb)")
        old_display = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = display
        import pyworkflow.gui.project  # noqa: F401  (import before gui.form: circular imports)
        from matplotlib import pyplot as plt
        from pyworkflow.gui.form import FormWindow
        from pyworkflow.gui.plotter import Plotter

        seen = {}
        original_show = FormWindow.show

        def show(window, *args, **kwargs):
            def check():
                try:
                    root = window.root
                    root.update()
                    seen["viewable"] = root.winfo_viewable()
                    before = set(plt.get_fignums())
                    t0 = time.time()
                    viewer._visualizeParam("showFsc")  # what the eye button calls
                    seen["plot_seconds"] = time.time() - t0
                    new = set(plt.get_fignums()) - before
                    seen["new_figures"] = len(new)
                    for num in new:
                        fig = plt.figure(num)
                        root.update()
                        seen["fsc_lines"] = len(_gids(fig, "fsc:"))
                        seen["window"] = fig.canvas.get_tk_widget().winfo_ismapped()
                        plt.close(fig)
                finally:
                    window.root.quit()

            window.root.after(1000, check)
            window.root.after(30000, window.root.quit)  # never hang the test session
            original_show(window, *args, **kwargs)

        try:
            Plotter.setBackend("TkAgg")
            FormWindow.show = show
            viewer = self._viewerClass()(project=self.proj, protocol=self.prot)
            viewer.visualize(self.prot)
            viewer.formWindow.root.destroy()
        finally:
            FormWindow.show = original_show
            Plotter.setBackend("Agg")
            # the shared X server stays up (see tests/xdisplay.py)
            if old_display is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = old_display
        self.assertTrue(seen.get("viewable"), seen)
        self.assertEqual(seen.get("new_figures"), 1, seen)
        self.assertTrue(seen.get("window"), seen)
        self.assertEqual(
            seen.get("fsc_lines"), sum(1 for c in self.summary["clusters"] if c.get("fsc"))
        )
        self.assertLess(seen["plot_seconds"], 10)
