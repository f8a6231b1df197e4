"""Hugging Face models in their default configuration through einfx, as a user runs them.

For each model of the test zoo (tests/rewriter/_hf_zoo.py: small configs, random weights, KV cache on,
return_dict on), one row:

- optimize: ``einfx.optimize`` with BTT rank 2 on one example of input ids; structured / candidate layers
  (every nn.Linear and Conv1D has a row);
- same class: the result is an instance of the model's own class;
- generate: greedy generation; with ``Structure.dense()`` the tokens equal the original model's exactly, and
  the structured model's tokens with and without the KV cache agree;
- ONNX: ``einfx.export.to_onnx`` on the whole tokenizer-style input dict: dynamic axes, output names,
  parity against torch at the example and two other (batch, sequence) shapes (worst relative error);
- save/load: ``einfx.save`` then ``einfx.load``, and the model's own ``save_pretrained`` then ``einfx.load``:
  outputs identical (bit for bit).

Writes the table to bench/results/hf_zoo.md. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "rewriter"))

import einfx  # noqa: E402
from einfx import Policy, Structure  # noqa: E402
from _hf_zoo import ZOO  # noqa: E402
from _timing import machine_description, write_result  # noqa: E402


def _main_output(out):
    return out[next(iter(out.keys()))]


def _generate(entry, model, example):
    if not entry.generative:
        return "n/a (encoder)"
    prompt = {k: v for k, v in entry.inputs(batch=2, length=6, seed=2).items() if not k.startswith("decoder_")}
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    dense = einfx.optimize(model, Policy(default=Structure.dense()), example_kwargs=example)
    same = torch.equal(dense.generate(**prompt, **greedy), model.generate(**prompt, **greedy))
    structured = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), example_kwargs=example)
    cache = torch.equal(structured.generate(**prompt, **greedy), structured.generate(**prompt, **greedy,
                                                                                   use_cache=False))
    return f"dense tokens {'equal' if same else 'DIFFER'}; btt cache/no-cache {'agree' if cache else 'DIFFER'}"


def _onnx(entry, out, folder):
    example = entry.inputs(batch=2, length=8)
    r = einfx.export.to_onnx(out, example, os.path.join(folder, "m.onnx"), latency_repeats=0)
    axes = "; ".join(f"{k}: {','.join(v for _, v in sorted(d.items()))}" for k, d in r.dynamic_axes.items())
    shapes = " / ".join("x".join(map(str, c.input_shapes[0])) for c in r.checks)
    return f"{axes} -> {','.join(r.output_names)}", f"{shapes}: {r.max_rel_error:.1e}"


def _save_load(entry, out, folder):
    call = entry.inputs(batch=2, length=7, seed=4)
    with torch.no_grad():
        ref = _main_output(out(**call))
        back = einfx.load(einfx.save(out, os.path.join(folder, "saved")))
        out.save_pretrained(os.path.join(folder, "pretrained"))
        again = einfx.load(os.path.join(folder, "pretrained"))
        ok = torch.equal(_main_output(back(**call)), ref) and torch.equal(_main_output(again(**call)), ref)
    return "identical" if ok else "DIFFER"


def run(names: list[str] | None) -> str:
    rows = []
    for entry in ZOO:
        if names and entry.name not in names:
            continue
        start = time.perf_counter()
        model = entry.build()
        example = entry.inputs(full=False)
        try:
            out = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), example_kwargs=example)
            rep = out.einfx_report
            optimized = f"{len(rep.structured)}/{len(rep.rows)} structured"
            same = "yes" if type(out) is type(model) else f"no ({type(out).__name__})"
            with tempfile.TemporaryDirectory() as folder:
                generate = _generate(entry, model, example)
                axes, parity = _onnx(entry, out, folder)
                saved = _save_load(entry, out, folder)
        except Exception as exc:  # a failing model is a row, not the end of the table
            optimized, same, generate, axes, parity, saved = f"FAILED: {type(exc).__name__}: {exc}", "", "", "", "", ""
        seconds = time.perf_counter() - start
        rows.append((f"{type(model).__name__}", optimized, same, generate, axes, parity, saved, f"{seconds:.1f}"))
        print(" | ".join(rows[-1]), flush=True)
    head = ("model", "optimize (btt r2)", "same class", "generate", "ONNX inputs: dynamic axes -> outputs",
            "ONNX parity (shapes: worst rel err)", "save/load", "s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="names from the zoo (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "hf_zoo.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    table = run(args.models)
    text = (f"# Hugging Face models in their default configuration through einfx\n\n{machine_description()}; "
            f"float32 CPU, torch {torch.__version__}\n\n{table}\n")
    print("\n" + table)
    if not args.models:
        write_result(args.out, text)


if __name__ == "__main__":
    main()
