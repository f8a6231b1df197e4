"""`einfx.calibrate`: the device's cost-model constants and, with ``runtime=``, a model's layers tuned there.

    einfx.calibrate()                                        # the device profile (einfx.planning.calibrate)
    einfx.calibrate(runtime="openvino", model=m, tokens=1024)  # and every distinct layer signature of m timed
                                                             # in OpenVINO at 1024 rows, cached for to_onnx
"""

from __future__ import annotations

import copy

from torch import nn

from einfx.errors import ExportError
from einfx.export.runtimes import check_runtime
from einfx.export.tune import TuningCache, tune_model
from einfx.planning.calibrate import calibrate as calibrate_profile
from einfx.planning.profile import DeviceProfile

__all__ = ["calibrate"]


def calibrate(device="cpu", *, save: bool = True, path=None, runtime: str | None = None,
              model: nn.Module | None = None, tokens: int = 512, threads: int = 0,
              stale: str = "refuse") -> DeviceProfile:
    """Measure ``device``'s cost-model constants (and store them unless ``save=False``); return the profile.

    With ``runtime`` (``"onnxruntime"`` or ``"openvino"``) and ``model``, also time every distinct layer
    signature of ``model`` at ``tokens`` rows in that runtime (the cost model's best plans against dense,
    `einfx.export.tune`) and store the winners in the runtime's tuning cache, where a later
    ``to_onnx(..., runtime=...)`` finds them; ``model`` is not modified.

    Raises:
        ExportError: ``runtime`` without ``model``, or an unknown or missing runtime.
        TuningCacheError: the runtime's cache was measured elsewhere (``stale="ignore"`` replaces it).
    """
    if runtime is None and model is not None:
        raise ExportError("calibrate(model=...) tunes the model's layers in a runtime: give runtime='onnxruntime' "
                          "or runtime='openvino'")
    if runtime is not None:
        check_runtime(runtime)
        if model is None:
            raise ExportError(f"calibrate(runtime={runtime!r}) tunes a model's layers there: pass model=")
    profile = calibrate_profile(device, save=save, path=path)
    if runtime is not None:
        cache = TuningCache(runtime, threads, stale=stale)
        tune_model(copy.deepcopy(model), runtime, tokens, threads=threads, cache=cache, save=save)
    return profile
