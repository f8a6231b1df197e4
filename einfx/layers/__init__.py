"""The nn.Modules of structured layers: `EinsumLinear` and its BTT-MoE subclass, and their optimizer groups.

Built on `einfx.structures` (the math) and `einfx.planning` (the contraction plans); used by the rewriter and
passes above it. Importing this package registers BTT-MoE with `EinsumLinear` (``einfx.moe.layer``).
"""

from einfx.layers.linear import INITS, Cost, EinsumLinear, check_weight
from einfx.layers.param_groups import param_groups
from einfx.moe.layer import BTTMoELinear

__all__ = ["EinsumLinear", "BTTMoELinear", "Cost", "INITS", "check_weight", "param_groups"]
