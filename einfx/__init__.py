"""einfx: structured einsum linear layers as a compiler pass for PyTorch models.

See README.md for the three entry points (Python, command line, ONNX deployment).
"""

from einfx import errors, export, moe
from einfx.moe import aux_loss
from einfx.export.calibrate import calibrate
from einfx.rewriter import Policy, Rule, explain, optimize
from einfx.rewriter.distill import DistillReport, distill
from einfx.rewriter.fidelity import Fidelity, fidelity
from einfx.rewriter.saved import load, save
from einfx.layers import Cost, EinsumLinear, param_groups
from einfx.structures import Structure, Taxonomy, taxonomy

__version__ = "0.1.0"

__all__ = [
    "Structure", "EinsumLinear", "Cost", "Taxonomy", "taxonomy", "param_groups",
    "Policy", "Rule", "optimize", "explain", "save", "load", "fidelity", "Fidelity",
    "distill", "DistillReport",
    "aux_loss", "calibrate",
    "errors", "export", "moe",
]
