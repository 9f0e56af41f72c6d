"""Interpretability analyses of MoE routing (SPEC §4): ``analyze(run_dir)`` and ``report(run_dir)``.

Core statistics live in :mod:`moecnn.analysis.stats` and work on plain numpy arrays; output schema:
docs/analysis_schema.md.
"""
# load the HTML module first: importing a submodule later would rebind the package attribute ``report`` (the
# function below) to the module ``moecnn.analysis.report``
from . import report as _report_html  # noqa: F401
from .run import (add_cli, analyze, brief, compute_accuracy, compute_routing, headline, load_routing, report,
                  save_routing)

__all__ = ["analyze", "report", "add_cli", "brief", "headline", "load_routing", "save_routing", "compute_routing",
           "compute_accuracy"]
