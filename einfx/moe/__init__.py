"""Mixtures of experts: BTT-MoE layers (SPEC §5), their routing, cost model and projection, the standard
MoE feed-forward baseline, and `aux_loss`."""

from einfx.moe.aux import aux_loss
from einfx.moe.baseline import MoEFeedForward
from einfx.moe.cost import PATHS, choose_path, path_costs
from einfx.moe.layer import BTTMoELinear
from einfx.moe.routing import Routing, load_balancing_loss, route, scatter_weights, topk_lowest_index

__all__ = ["BTTMoELinear", "MoEFeedForward", "aux_loss", "Routing", "route", "topk_lowest_index",
           "scatter_weights", "load_balancing_loss", "choose_path", "path_costs", "PATHS"]
