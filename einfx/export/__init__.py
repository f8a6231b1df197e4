"""ONNX export and onnxruntime deployment of einfx models.

``to_onnx`` exports with ``torch.onnx.export(dynamo=True)``, checks the graph (full ONNX checker, no Einsum
node) and verifies it in onnxruntime against torch; ``session`` opens a file on CUDA when onnxruntime-gpu
provides it, else on CPU, with io-binding runs and ``benchmark()``; ``demo_latency`` compares a dense and
an optimized model. ``to_onnx(..., runtime="onnxruntime" | "openvino")`` measures every structured layer's
plan and fold-to-dense decision in that runtime (`tune`: cached per layer signature beside the device profile)
and verifies the file there; `graph_passes` rewrites the exported graph as a whole (identical nodes merged,
sibling MatMuls fused, transpose pairs cancelled). onnxruntime and OpenVINO are imported when first used.
"""

from einfx.export.compare import compare_latency, demo_latency, latency_table
from einfx.export.onnx_export import DTYPES, ExportReport, apply_deploy_passes, cast_inputs, to_onnx
from einfx.export.graph_passes import optimize_graph
from einfx.export.ops import FORBIDDEN_OPS, check_onnx, op_counts
from einfx.export.runtimes import RUNTIMES
from einfx.export.session import Latency, Session, session
from einfx.export.tune import Tuned, TuningCache, TuningCacheError, tune_layer, tune_model
from einfx.export.verify import TOLERANCES, ParityCheck, rel_error

__all__ = [
    "to_onnx", "ExportReport", "ParityCheck", "DTYPES", "TOLERANCES", "session", "Session", "Latency",
    "op_counts", "check_onnx", "FORBIDDEN_OPS", "rel_error", "cast_inputs", "apply_deploy_passes",
    "compare_latency", "latency_table", "demo_latency", "RUNTIMES", "Tuned", "TuningCache", "TuningCacheError",
    "tune_layer", "tune_model", "optimize_graph",
]
