"""Interpretability analyses of MoE routing (SPEC §4): ``analyze(run_dir)`` and ``report(run_dir)``.

Layout: :mod:`~moecnn.analysis.rundir` reads and writes a run directory's files, :mod:`~moecnn.analysis.compute`
runs a model for routing and accuracy (``load_for_analysis`` loads a classification run through ``moecnn.train``),
:mod:`~moecnn.analysis.stats` holds the statistics on plain numpy arrays, :mod:`~moecnn.analysis.analyze`
orchestrates them, :mod:`~moecnn.analysis.html_report` writes the HTML and :mod:`~moecnn.analysis.cli` registers
the verbs. "Explain the experts" (issue 15):
:mod:`~moecnn.analysis.attributes` (pixel attributes), :mod:`~moecnn.analysis.attribution` (Grad-CAM / Integrated
Gradients of the gates and forced-expert contributions, with captum), :mod:`~moecnn.analysis.dynamics` (routing
over training), :mod:`~moecnn.analysis.flow` (layer-to-layer flow) and :mod:`~moecnn.analysis.explain` (their part
of ``analyze``, with Benjamini–Hochberg over all tests). Output schema: docs/analysis_schema.md.
"""
from .analyze import analyze, brief, headline, report
from .attributes import image_attributes
from .cli import add_cli
from .compute import compute_accuracy, compute_routing
from .dynamics import routing_dynamics
from .flow import layer_flow
from .rundir import load_routing, read_concepts, read_probe_routing, save_routing

__all__ = ["analyze", "report", "add_cli", "brief", "headline", "load_routing", "save_routing", "compute_routing",
           "compute_accuracy", "image_attributes", "routing_dynamics", "layer_flow", "read_concepts",
           "read_probe_routing"]
