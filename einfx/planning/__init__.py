"""Cost model, device profiles, calibration and contraction planning of structured layers (SPEC §4)."""

from einfx.planning import workspace
from einfx.planning.calibrate import calibrate
from einfx.planning.costmodel import PrimCost, copy_cost, gemm_cost, view_cost
from einfx.planning.plan import Plan, Step, execute
from einfx.planning.planner import ORDERS_ALL, all_plans, dense_cost, plan_for, plan_layer
from einfx.planning.profile import (PROFILE_VERSION, DeviceProfile, cache_dir, default_profile, flops_only_profile,
                                    load_profile, save_profile)

__all__ = ["workspace", "calibrate", "PrimCost", "gemm_cost", "copy_cost", "view_cost", "Plan", "Step", "execute",
           "plan_layer", "plan_for", "all_plans", "dense_cost", "ORDERS_ALL", "DeviceProfile", "PROFILE_VERSION",
           "default_profile", "flops_only_profile", "load_profile", "save_profile", "cache_dir"]
