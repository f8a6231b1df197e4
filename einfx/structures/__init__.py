"""The math of structured einsum layers: the θ space, sizes, costs, taxonomy, init and projection.

The bottom floor of the package: it imports nothing of einfx but `einfx.errors` (the nn.Modules built on it are
in `einfx.layers`).
"""

from einfx.structures.sizes import ORDERS, Sizes
from einfx.structures.structure import KINDS, Structure
from einfx.structures.taxonomy import Taxonomy, taxonomy

__all__ = ["Structure", "KINDS", "Sizes", "ORDERS", "Taxonomy", "taxonomy"]
