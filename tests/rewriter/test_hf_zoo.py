"""Hugging Face models in their default configuration go through optimize and come back as themselves."""

import pytest
import torch
from torch import nn

import einfx
from einfx import EinsumLinear, Policy, Structure

from _hf_zoo import ZOO


def _linears(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def _main(out):
    return out[next(iter(out.keys()))]


@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_optimize_returns_the_users_model(entry):
    model = entry.build()
    assert getattr(model.config, "use_cache", True) and model.config.return_dict  # the defaults
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), example_kwargs=entry.inputs(full=False))
    assert type(out) is type(model) and out.config.model_type == model.config.model_type
    assert out.config.einfx["modules"] and not hasattr(model.config, "einfx")  # the original is untouched
    rows = out.einfx_report.rows
    assert {r.name for r in rows} == _linears(model) and len(rows) == len(_linears(model))
    kept = {r.name: r.reason for r in rows if not r.structured}
    assert all(reason.startswith("tied or shared weight") for reason in kept.values()), kept
    assert set(kept) <= {"lm_head"}
    layers = [m for m in out.modules() if isinstance(m, EinsumLinear)]
    assert len(layers) == len(rows) - len(kept) and not any(isinstance(m, EinsumLinear) for m in model.modules())
    assert out.eval() is out and not out.training and out.train().training and not out.eval().training
    # the whole tokenizer output at another batch and sequence length, by keyword
    call = entry.inputs(batch=3, length=5, seed=1, full=True)
    with torch.no_grad():
        ref, got = model(**call), out(**call)
    assert type(got) is type(ref) and list(got.keys()) == list(ref.keys())
    assert _main(got).shape == _main(ref).shape and torch.isfinite(_main(got)).all()


@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_dense_structure_is_exact(entry):
    model = entry.build()
    out = einfx.optimize(model, Policy(default=Structure.dense()), example_kwargs=entry.inputs(full=False))
    call = entry.inputs(batch=3, length=6, seed=3, full=True)
    with torch.no_grad():
        ref, got = _main(model(**call)), _main(out(**call))
    assert float((ref - got).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("entry", [z for z in ZOO if z.generative], ids=lambda z: z.name)
def test_generate_keeps_working(entry):
    model = entry.build()
    prompt = {k: v for k, v in entry.inputs(batch=2, length=6, seed=2, full=True).items()
              if not k.startswith("decoder_")}
    greedy = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    dense = einfx.optimize(model, Policy(default=Structure.dense()), example_kwargs=entry.inputs(full=False))
    assert any(isinstance(m, EinsumLinear) for m in dense.modules())
    ref = model.generate(**prompt, **greedy)
    assert torch.equal(dense.generate(**prompt, **greedy), ref)  # the same tokens, exactly
    structured = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), example_kwargs=entry.inputs(full=False))
    cached = structured.generate(**prompt, **greedy)
    assert cached.shape == ref.shape
    # the KV cache path and the no-cache path agree on the structured model too
    assert torch.equal(structured.generate(**prompt, **greedy, use_cache=False), cached)


@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_save_and_load_round_trip(entry, tmp_path):
    model = entry.build()
    out = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), example_kwargs=entry.inputs(full=False))
    call = entry.inputs(batch=2, length=7, seed=4, full=True)
    for folder in (einfx.save(out, tmp_path / "saved"), tmp_path / "pretrained"):
        if folder == tmp_path / "pretrained":
            out.save_pretrained(folder)  # the model's own method writes a folder einfx.load reads
        back = einfx.load(folder)
        assert type(back) is type(model) and not back.training
        with torch.no_grad():
            assert torch.equal(_main(back(**call)), _main(out(**call)))
        assert {n: type(m) for n, m in back.named_modules()} == {n: type(m) for n, m in out.named_modules()}
