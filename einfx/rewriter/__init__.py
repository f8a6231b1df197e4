"""Rewriting models: trace, detect every linear computation, structure it by policy, explain the decisions.

Files: policy.py (Policy, Rule, Budget), trace.py (front ends), detect.py (candidates), decide.py (policy
decisions), budget.py (pure budget planner), spectrum.py (projection error per rank), attention.py
(nn.MultiheadAttention decomposition), substitute.py (the pass), report.py (explain rows), optimize.py.
"""

from einfx.rewriter.budget import BudgetPlan, LayerOptions, Option, plan_budget
from einfx.rewriter.detect import Candidate, detect
from einfx.rewriter.optimize import explain, optimize, optimize_with_report
from einfx.rewriter.policy import Budget, Policy, Rule
from einfx.rewriter.report import Report, Row
from einfx.rewriter.trace import FRONTENDS, Capture, capture

__all__ = [
    "Policy", "Rule", "Budget", "optimize", "explain", "optimize_with_report", "Report", "Row", "Candidate",
    "detect", "capture", "Capture", "FRONTENDS", "plan_budget", "LayerOptions", "Option", "BudgetPlan",
]
