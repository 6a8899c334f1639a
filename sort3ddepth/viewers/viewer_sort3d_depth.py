"""Scipion viewer of a sort3d depth run: ANOVA, generations, maps and classes.

Everything comes from the engine's summary.json (the protocol's ``_getSortDir("summary.json")``)
and the maps next to it; the figures are those of ``sort3ddepth.viewers.plots``, drawn into the
figure of a pwem plotter so that Scipion shows them in its usual plot windows. The maps and the
classes open in whatever viewer Scipion is configured with for volumes and 3D classes.
"""

import os

import pyworkflow.utils as pwutils
import pyworkflow.viewer as pwviewer
from pwem.viewers import EmProtocolViewer
from pwem.viewers.plotter import EmPlotter
from pyworkflow.protocol import params

from ..engine.results import SummaryError
from ..protocols import ProtSort3DDepth
from ..protocols.protocol_sort3d_depth import ATTR_POSTERIOR
from . import plots

ALL = "all"


class Sort3DDepthViewer(EmProtocolViewer):
    """Decide whether a cluster is a structural state or sorted by a nuisance (defocus, norm,
    smear): ANOVA box plots and tables, cluster sizes and reproducibility per generation, the
    generation tree, central slices and FSC of the cluster maps, the estimated purity of the
    clusters against the particles they keep, and the output classes."""

    _label = "viewer sort3d depth"
    _targets = [ProtSort3DDepth]
    _environments = [pwviewer.DESKTOP_TKINTER, pwviewer.WEB_DJANGO]

    # -------------------------------------------------------------------------------- data
    def _summaryFile(self):
        return self.protocol._getSortDir("summary.json")

    def _outputDir(self):
        return self.protocol._getSortDir()

    def _readSummary(self):
        """(results.Summary or None, why not: one line)."""
        if not os.path.exists(self._summaryFile()):
            return None, (
                f"The sorting has not finished: {self._summaryFile()} does not exist yet."
            )
        try:
            return plots.load_summary(self._outputDir()), None
        except SummaryError as e:
            return None, f"Cannot read the results: {e}"

    def _summary(self):
        """The run's results.Summary, or None (not finished, or unreadable)."""
        return self._readSummary()[0]

    def _generationChoices(self, summary):
        n = len(summary.generations) if summary is not None else 0
        return [f"generation {g}" for g in range(n)]

    # -------------------------------------------------------------------------------- form
    def _defineParams(self, form):
        summary = self._summary()
        gens = self._generationChoices(summary)
        variables = list(summary.anova or {}) if summary is not None else []
        variables = variables or ["defocus"]

        form.addSection(label="ANOVA")
        form.addParam(
            "anovaClusters",
            params.EnumParam,
            default=0,
            choices=["final clusters"] + gens,
            label="Clusters of",
            help="The final clusters (all generations), or the clusters of one generation.",
        )
        form.addParam(
            "anovaVariable",
            params.EnumParam,
            default=0,
            choices=[ALL] + variables,
            display=params.EnumParam.DISPLAY_HLIST,
            label="Variable",
            help="Nuisance variables tested by one-way ANOVA across the clusters. A "
            f"significant difference (p < {plots.ALPHA:g}) means a cluster may be sorted by "
            "that variable rather than by structure.",
        )
        form.addParam(
            "showAnovaPlots",
            params.LabelParam,
            label="Box plots per cluster",
            help="Box plots (quartiles, Tukey whiskers, mean as a diamond) per "
            "cluster; F and p in the title, in red with the differing pairs when "
            f"p < {plots.ALPHA:g}.",
        )
        form.addParam(
            "showAnovaTables",
            params.LabelParam,
            label="ANOVA tables (F, p, N / mean / std, pair-wise tests)",
        )

        form.addSection(label="Generations")
        form.addParam(
            "showGenerationSizes",
            params.LabelParam,
            label="Cluster sizes per generation",
            help="Stacked bars: each cluster of a generation and its unaccounted "
            "images, which go on to the next generation.",
        )
        form.addParam(
            "showReproducibility",
            params.LabelParam,
            label="Reproducibility vs random expectation",
            help="Jaccard index (%) of each cluster between independent runs, next "
            "to what random partitions of the same sizes give (mean +- 2 std).",
        )
        form.addParam(
            "showGenerationTree", params.LabelParam, label="Generation -> final cluster tree"
        )

        form.addSection(label="Maps")
        form.addParam(
            "mapsClusters",
            params.EnumParam,
            default=0,
            choices=[ALL] + gens,
            label="Clusters of",
            help="Which final clusters to show: all of them, or those produced by one generation.",
        )
        form.addParam(
            "withGenerationMaps",
            params.BooleanParam,
            default=True,
            label="Show the generation maps beside the final maps?",
        )
        form.addParam(
            "showMapSlices",
            params.LabelParam,
            label="Central slices (xy, xz, yz)",
            help="Drawn with matplotlib: works without ChimeraX.",
        )
        form.addParam("showFsc", params.LabelParam, label="FSC curves per cluster")
        form.addParam(
            "showMapsExternal",
            params.LabelParam,
            label="Open the maps in the volume viewer",
            help="outputVolumes in the viewer Scipion is configured with for volumes "
            "(e.g. ChimeraX).",
        )

        form.addSection(label="Purity")
        form.addParam(
            "showPurityCurve",
            params.LabelParam,
            label="Estimated purity vs particles accounted",
            help="Every particle has a posterior probability over the final clusters. "
            "The curve: for each threshold on it, the fraction of particles whose "
            "most probable cluster reaches it (x) and their mean posterior, the "
            "estimated purity (y); a stricter threshold keeps fewer, purer "
            "particles. The star is this run (its purity target is the dashed "
            "line); the bars give each cluster's estimated purity. The posteriors "
            f"are stored on the particles of the output classes ({ATTR_POSTERIOR}), so another "
            "point of the curve can be selected from them.",
        )

        form.addSection(label="Classes")
        form.addParam(
            "showClasses",
            params.LabelParam,
            label="Open the output classes",
            help="outputClasses (SetOfClasses3D) in Scipion's standard set viewer.",
        )

    def _getVisualizeDict(self):
        return {
            "showAnovaPlots": self._showAnovaPlots,
            "showAnovaTables": self._showAnovaTables,
            "showGenerationSizes": self._showGenerationSizes,
            "showReproducibility": self._showReproducibility,
            "showGenerationTree": self._showGenerationTree,
            "showMapSlices": self._showMapSlices,
            "showFsc": self._showFsc,
            "showPurityCurve": self._showPurityCurve,
            "showMapsExternal": self._showMapsExternal,
            "showClasses": self._showClasses,
        }

    # -------------------------------------------------------------------------------- choices
    def _selectedGeneration(self, paramName):
        """None for all/final clusters, else the generation chosen in that enum."""
        value = getattr(self, paramName).get() or 0
        return None if value == 0 else value - 1

    def _selectedVariables(self):
        text = self.getEnumText("anovaVariable")
        return None if text in (None, ALL) else [text]

    # -------------------------------------------------------------------------------- views
    def _notFinished(self):
        """The one line saying why there is nothing to show."""
        return [self.errorMessage(self._readSummary()[1], "No results")]

    def _plotView(self, draw, title):
        """A pwem plotter whose figure is drawn by one of the plots functions."""
        summary = self._summary()
        if summary is None:
            return self._notFinished()
        plotter = EmPlotter(windowTitle=title)
        plotter.tightLayoutOn = False  # the figures use matplotlib's constrained layout
        draw(summary, plotter.getFigure())
        return [plotter]

    def _showAnovaPlots(self, paramName=None):
        gen = self._selectedGeneration("anovaClusters")
        return self._plotView(
            lambda s, fig: plots.plot_anova(s, self._selectedVariables(), gen, fig=fig),
            "sort3d depth: ANOVA box plots",
        )

    def _anovaTextFile(self, generation):
        """The ANOVA tables as a text file for Scipion's text viewer (written from the
        summary, so the text and the plots always agree)."""
        summary = self._summary()
        lines = plots.anova_text_lines(summary, generation)
        which = "final" if generation is None else f"gen{generation}"
        fn = self._getPath(f"sort3d_anova_{self.protocol.getObjId()}_{which}.txt")
        pwutils.makePath(os.path.dirname(os.path.abspath(fn)))
        with open(fn, "w") as f:
            f.write("\n".join(lines) + "\n")
        return fn

    def _showAnovaTables(self, paramName=None):
        if self._summary() is None:
            return self._notFinished()
        gen = self._selectedGeneration("anovaClusters")
        return [self.textView([self._anovaTextFile(gen)], "sort3d depth: ANOVA tables")]

    def _showGenerationSizes(self, paramName=None):
        return self._plotView(
            lambda s, fig: plots.plot_generation_sizes(s, fig=fig),
            "sort3d depth: cluster sizes per generation",
        )

    def _showReproducibility(self, paramName=None):
        return self._plotView(
            lambda s, fig: plots.plot_reproducibility(s, fig=fig), "sort3d depth: reproducibility"
        )

    def _showGenerationTree(self, paramName=None):
        return self._plotView(
            lambda s, fig: plots.plot_generation_tree(s, fig=fig), "sort3d depth: generation tree"
        )

    def _showMapSlices(self, paramName=None):
        gen = self._selectedGeneration("mapsClusters")
        return self._plotView(
            lambda s, fig: plots.plot_map_slices(
                s, self._outputDir(), gen, with_generations=bool(self.withGenerationMaps), fig=fig
            ),
            "sort3d depth: map slices",
        )

    def _showFsc(self, paramName=None):
        return self._plotView(lambda s, fig: plots.plot_fsc(s, fig=fig), "sort3d depth: FSC")

    def _showPurityCurve(self, paramName=None):
        return self._plotView(
            lambda s, fig: plots.plot_purity_curve(s, fig=fig), "sort3d depth: estimated purity"
        )

    def _output(self, name):
        obj = getattr(self.protocol, name, None)
        return obj if obj is not None and obj.getSize() else None

    def _delegate(self, obj, skip=()):
        """Views of obj from the first viewer Scipion offers for it (the user's preferred
        viewers come first), skipping viewer names in `skip`."""
        import pyworkflow

        domain = pyworkflow.Config.getDomain()
        errors = []
        for viewerClass in domain.findViewers(obj, pwviewer.DESKTOP_TKINTER):
            if viewerClass is type(self) or viewerClass.__name__ in skip:
                continue
            try:
                viewer = viewerClass(
                    project=self.getProject(), protocol=self.protocol, parent=self.formWindow
                )
                views = viewer._visualize(obj)
            except Exception as e:  # a viewer that is not installed: try the next one
                errors.append(f"{viewerClass.__name__}: {e}")
                continue
            if views:
                return views
        why = "\n".join(errors)
        return [self.errorMessage(f"No viewer could open {obj.getNameId()}.\n{why}", "No viewer")]

    def _showMapsExternal(self, paramName=None):
        vols = self._output("outputVolumes")
        if vols is None:
            return [self.warnMessage("This run has no output maps (outputVolumes).", "No maps")]
        return self._delegate(vols)

    def _showClasses(self, paramName=None):
        classes = self._output("outputClasses")
        if classes is None:
            return [
                self.warnMessage("This run has no output classes (outputClasses).", "No classes")
            ]
        # the set viewer, not a map viewer: classes carry particles and representatives
        return self._delegate(classes, skip=("ChimeraViewer", "ChimeraOldViewer"))
