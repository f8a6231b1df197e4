"""Graph passes over `torch.fx.GraphModule` (one file per pass) and the pipeline that runs them."""

from einfx.passes.base import Pass, PassResult, pass_name, run_passes

__all__ = ["PassResult", "Pass", "run_passes", "pass_name"]
