"""Rewriting models: see every linear computation, structure it by policy, explain the decisions.

Files: policy.py (Policy, Rule, Budget), record.py (the recording front end: one eager run under a
TorchFunctionMode), trace.py (graph front ends: torch.fx, torch.export), detect.py (candidates in a graph),
decide.py (policy decisions), budget.py (pure budget planner), spectrum.py (projection error per rank),
attention.py (nn.MultiheadAttention decomposition), substitute.py (module-tree write-back and the graph pass),
captured.py (CapturedGraphModule), saved.py (save/load), report.py (explain rows), optimize.py;
for pretrained models: fidelity.py (outputs against the original), fit.py (sequential data-aware fitting),
search.py (search over θ under a budget with data), distill.py (recovery by distillation).
"""

from einfx.rewriter.budget import BudgetPlan, LayerOptions, Option, plan_budget
from einfx.rewriter.captured import CapturedGraphModule
from einfx.rewriter.detect import Candidate, detect
from einfx.rewriter.distill import DistillReport, distill
from einfx.rewriter.optimize import explain, optimize, optimize_with_report
from einfx.rewriter.policy import Budget, Policy, Rule
from einfx.rewriter.record import Recording, record, record_candidates
from einfx.rewriter.report import Report, Row
from einfx.rewriter.saved import load, save
from einfx.rewriter.trace import FRONTENDS, Capture, capture

__all__ = [
    "Policy", "Rule", "Budget", "optimize", "explain", "optimize_with_report", "Report", "Row", "Candidate",
    "detect", "capture", "Capture", "FRONTENDS", "plan_budget", "LayerOptions", "Option", "BudgetPlan",
    "record", "record_candidates", "Recording", "CapturedGraphModule", "save", "load", "distill", "DistillReport",
]
