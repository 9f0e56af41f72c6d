"""Interpretability analyses of MoE routing (SPEC §4): ``analyze(run_dir)`` and ``report(run_dir)``.

Layout: :mod:`~moecnn.analysis.rundir` reads and writes a run directory's files, :mod:`~moecnn.analysis.compute`
runs a model for routing and accuracy, :mod:`~moecnn.analysis.stats` holds the statistics on plain numpy
arrays, :mod:`~moecnn.analysis.analyze` orchestrates them, :mod:`~moecnn.analysis.html_report` writes the HTML and
:mod:`~moecnn.analysis.cli` registers the verbs. Output schema: docs/analysis_schema.md.
"""
from .analyze import analyze, brief, headline, report
from .cli import add_cli
from .compute import compute_accuracy, compute_routing
from .rundir import load_routing, save_routing

__all__ = ["analyze", "report", "add_cli", "brief", "headline", "load_routing", "save_routing", "compute_routing",
           "compute_accuracy"]
