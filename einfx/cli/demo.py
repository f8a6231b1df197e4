"""``einfx demo``: optimize + explain a GPT-2-small-shaped model (built from a config, random weights) in its
default configuration (KV cache on, ModelOutput returns).

Default policy: BTT for every projection (Conv1D layers and the LM head), projected from the dense weights.
Nothing is excluded silently: the LM head is tied to the token embedding, so it is kept and its row says why.
Prints the explain table, the weights and FLOPs saved, and the output error against the dense model; shows
that the optimized model is still a ``GPT2LMHeadModel`` that generates with its KV cache, saves it with
``einfx.save`` and loads it back; then exports both the dense and the optimized model to ONNX
(``out/demo/dense.onnx``, ``out/demo/optimized.onnx``, dynamic batch and sequence), verifies each against
torch in onnxruntime and prints their onnxruntime latency side by side.
"""

from __future__ import annotations

import time

import torch

from einfx.rewriter.optimize import optimize_with_report
from einfx.rewriter.policy import Policy
from einfx.structures.structure import Structure

__all__ = ["demo_model", "demo_policy", "run_demo"]

DEMO_TOKENS = 32
LATENCY_TOKENS = 512
DEMO_OUT = "out/demo"


def demo_model(quick: bool = False):
    """GPT2LMHeadModel with GPT-2 small's shape (12 layers, d = 768, 12 heads); 2 layers when ``quick``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2 if quick else 12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(config).eval()


def demo_policy() -> Policy:
    """BTT (rank 1) for every projection, initialized by projection from the dense weights."""
    return Policy(default=Structure.btt(rank=1), init="project")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _generate_and_save(model, optimized, ids, out_dir: str, new_tokens: int = 12) -> None:
    """Greedy generation with both models (the optimized one is still the user's class, KV cache and all),
    then an einfx.save / einfx.load round trip of the optimized model."""
    import os

    from einfx.rewriter.saved import load, save

    prompt = ids[:, :8]
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=model.config.eos_token_id)
    print(f"\n{type(optimized).__name__}.generate, greedy, {new_tokens} new tokens after an 8-token prompt:")
    for label, m in (("dense", model), ("optimized", optimized)):
        start = time.perf_counter()
        tokens = m.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy)
        ms = (time.perf_counter() - start) * 1e3
        print(f"  {label:9s} {tokens[0, prompt.shape[1]:].tolist()}  ({ms:.0f} ms)")
    os.makedirs(out_dir, exist_ok=True)
    folder = save(optimized, os.path.join(out_dir, "optimized-model"))
    back = load(folder)
    with torch.no_grad():
        same = torch.equal(back(ids).logits, optimized(ids).logits)
    print(f"  einfx.save -> {folder}; einfx.load gives a {type(back).__name__} with "
          f"{'identical' if same else 'DIFFERENT'} logits")


def run_demo(quick: bool = False, tokens: int = DEMO_TOKENS, out_dir: str = DEMO_OUT,
             latency_tokens: int = LATENCY_TOKENS, onnx: bool = True) -> int:
    """Build the demo model, optimize it with the default policy, print the table and the saving, then export
    both models to ONNX in ``out_dir`` and print their onnxruntime latency on ``latency_tokens`` tokens."""
    torch.manual_seed(0)
    model = demo_model(quick)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    start = time.perf_counter()
    optimized, report = optimize_with_report(model, demo_policy(), (ids,), verify=True)
    seconds = time.perf_counter() - start
    print(report.table())
    print()
    print(report.summary())
    before, after = _count(model), _count(optimized)
    print(f"  whole model parameters: {before:,} -> {after:,} ({before / after:.2f}x fewer; embeddings and the "
          "tied LM head stay dense)")
    print(f"  optimize + verify took {seconds:.1f} s on {tokens} tokens of random ids")
    print("  (random weights have a flat spectrum, so a rank-1 projection keeps little of them: an output error "
          "near 1 is expected here;\n   fidelity to an original model is measured on real data, not on random "
          "weights)")
    _generate_and_save(model, optimized, ids, out_dir)
    if onnx:
        from einfx.export.compare import demo_latency

        long_ids = torch.randint(0, model.config.vocab_size, (1, latency_tokens))
        print(f"\nONNX export to {out_dir}/ and onnxruntime latency, batch 1 x {latency_tokens} tokens, float32:")
        table, _ = demo_latency(model, optimized, (long_ids,), out_dir, rounds=3, repeats=3)
        print(table)
    return 0
