"""Structured einsum layers: the θ space, sizes, costs, taxonomy, init, projection and the nn.Module."""

from einfx.structures.layer import Cost, EinsumLinear
from einfx.structures.param_groups import param_groups
from einfx.structures.sizes import ORDERS, Sizes
from einfx.structures.structure import KINDS, Structure
from einfx.structures.taxonomy import Taxonomy, taxonomy

__all__ = ["Structure", "KINDS", "Sizes", "ORDERS", "EinsumLinear", "Cost", "Taxonomy", "taxonomy", "param_groups"]
