"""Test doubles for the per-model converter of `einfx convert` (same signature as pipeline.convert_one).

They are module-level functions so that spawned worker processes (``-j N``) can import them. They build the
model with the real spec code (so spec, zoo and weights errors are the real ones) and check the policy file
with a minimal reader, but write a fake model.onnx instead of running optimize and export.
"""

import os
import signal

import yaml

from einfx.cli.pipeline import count_params
from einfx.zoo import build_model
from einfx.errors import PolicyError

POLICY_KEYS = {"default", "rules", "exclude", "min_features", "init", "budget", "fallback"}


def read_policy(path):
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"policy {path!r}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or set(data) - POLICY_KEYS:
        raise PolicyError(f"policy {path!r}: unknown keys {sorted(set(data or {}) - POLICY_KEYS)}; "
                          f"valid: {sorted(POLICY_KEYS)}")
    return data


def fake_convert(spec, policy, out_dir, dtype, tokens):
    """Halve the params and keep 40 % of the FLOPs (numbers derived from the real model's size)."""
    read_policy(policy)
    built = build_model(spec, tokens)
    params = count_params(built.module)
    with open(os.path.join(out_dir, "model.onnx"), "wb") as fh:
        fh.write(f"fake onnx of {spec.canonical} dtype={dtype} tokens={tokens}\n".encode())
    return {"params": {"before": params, "after": params // 2},
            "flops": {"before": 10 * params, "after": 4 * params},
            "export": {"max_rel_error": 1e-6, "op_counts": {"MatMul": 2}}}


def crashing_convert(spec, policy, out_dir, dtype, tokens):
    """Like `fake_convert`, but the process kills itself (as the OOM killer would) for models named *crash*."""
    if "crash" in spec.canonical:
        with open(os.path.join(out_dir, "model.onnx"), "wb") as fh:
            fh.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_convert(spec, policy, out_dir, dtype, tokens)
