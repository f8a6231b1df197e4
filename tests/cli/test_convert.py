"""`einfx convert` batch behaviour with a test double for the per-model converter (see cli_fakes.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from cli_fakes import crashing_convert, fake_convert
from safetensors.torch import save_model

from einfx.cli.main import main
from einfx.zoo import build_model, parse_spec

TINY_GPT = "hf:gpt2?n_embd=32&n_head=2&n_layer=1&n_positions=64&vocab_size=100"  # canonical order
TINY_BERT = ("hf:bert?hidden_size=32&intermediate_size=64&max_position_embeddings=64&num_attention_heads=2"
             "&num_hidden_layers=1&vocab_size=100")
TV = "torchvision:resnet18?num_classes=10"
GOOD_POLICY = "default: btt:rank=1\nmin_features: 16\nexclude: [lm_head]\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD_POLICY)
    return str(path)


@pytest.fixture
def local_weights(tmp_path):
    built = build_model(parse_spec(TINY_GPT), tokens=8)
    path = tmp_path / "tiny.safetensors"
    save_model(built.module, str(path))
    return f"{path}@{TINY_GPT}"


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _published(out):
    return sorted(n for n in os.listdir(out) if not n.startswith("summary"))


def _counting(calls):
    def convert(spec, policy, out_dir, dtype, tokens):
        calls.append(spec.canonical)
        return fake_convert(spec, policy, out_dir, dtype, tokens)
    return convert


def test_failures_are_isolated_and_reported(tmp_path, policy, local_weights):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    bad_policy = tmp_path / "bad.yaml"
    bad_policy.write_text("default: btt\ncolour: blue\n")
    listing = tmp_path / "models.txt"
    listing.write_text(f"# a batch\n{TINY_BERT} policy=bad.yaml\ntorchvision:resnet_nope\n\n{TV}  # a comment\n")
    out = tmp_path / "out"
    code = main(["convert", TINY_GPT, "zoo9:thing", f"{corrupt}@{TINY_GPT}", local_weights, "--list", str(listing),
                 "--policy", policy, "--out", str(out), "--tokens", "16"], convert_fn=fake_convert)
    assert code == 1
    models = {m["spec"]: m for m in _summary(out)["models"]}
    ok = [TINY_GPT, parse_spec(local_weights).canonical, TV]
    assert sorted(s for s, m in models.items() if m["status"] == "ok") == sorted(ok)
    errors = {s: m["error"] for s, m in models.items() if m["status"] == "failed"}
    assert errors["zoo9:thing"] == ("ModelSpecError: model spec 'zoo9:thing': unknown zoo 'zoo9'; "
                                    "valid zoos: torchvision, timm, hf")
    assert "unknown torchvision model 'resnet_nope'; close matches: resnet" in errors["torchvision:resnet_nope"]
    assert errors[parse_spec(f"{corrupt}@{TINY_GPT}").canonical].startswith(f"ModelSpecError: weights file '{corrupt}' is corrupt")
    assert errors[TINY_BERT].startswith("PolicyError: policy") and "unknown keys ['colour']" in errors[TINY_BERT]
    # Exactly the converted models have a directory, each complete; nothing else is left behind.
    assert _published(out) == sorted(parse_spec(s).slug for s in ok)
    for spec in ok:
        report = json.loads((out / parse_spec(spec).slug / "report.json").read_text())
        assert report["status"] == "ok" and report["spec"] == spec
        assert report["options"]["tokens"] == 16 and report["options"]["dtype"] == "float32"
        assert report["params"]["after"] == report["params"]["before"] // 2
    md = (out / "summary.md").read_text()
    assert "3 converted, 0 already complete (skipped), 4 failed." in md
    assert "- `zoo9:thing`: ModelSpecError" in md
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_all_good_exits_zero_and_resume_skips_complete_outputs(tmp_path, policy):
    out, calls = tmp_path / "out", []
    args = ["convert", TINY_GPT, TINY_BERT, "--policy", policy, "--out", str(out), "--tokens", "16"]
    assert main(args, convert_fn=_counting(calls)) == 0
    assert sorted(calls) == sorted([TINY_GPT, TINY_BERT])
    first = _summary(out)["models"]

    calls.clear()
    assert main(args + ["--resume"], convert_fn=_counting(calls)) == 0
    assert calls == []
    again = _summary(out)["models"]
    assert [m["status"] for m in again] == ["skipped", "skipped"]
    assert [m["params_after"] for m in again] == [m["params_after"] for m in first]

    # A damaged output, or other options, make --resume convert again; without --resume everything is redone.
    (out / parse_spec(TINY_GPT).slug / "model.onnx").write_bytes(b"damaged")
    assert main(args + ["--resume"], convert_fn=_counting(calls)) == 0
    assert calls == [TINY_GPT]
    calls.clear()
    assert main(args[:-1] + ["8", "--resume"], convert_fn=_counting(calls)) == 0
    assert sorted(calls) == sorted([TINY_GPT, TINY_BERT])
    calls.clear()
    assert main(args[:-1] + ["8"], convert_fn=_counting(calls)) == 0
    assert len(calls) == 2


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from einfx.cli.convert import RunOptions, collect_tasks, run_batch, select_tasks

    out, policy, started = sys.argv[1:4]

    def convert(spec, policy, out_dir, dtype, tokens):
        with open(os.path.join(out_dir, "model.onnx"), "wb") as fh:
            fh.write(b"half an onnx file")
            fh.flush()
            if "n_layer=2" in spec.canonical:
                open(started, "w").close()
                time.sleep(300)
        return {"params": {"before": 10, "after": 5}, "flops": {"before": 10, "after": 4}}

    tasks = select_tasks(collect_tasks(sys.argv[4:], policy))
    run_batch(tasks, RunOptions(out, tokens=16), convert_fn=convert, progress=False)
""")


def test_resume_after_kill_minus_nine(tmp_path, policy):
    specs = [f"hf:gpt2?n_embd=32&n_head=2&n_layer={n}&n_positions=64&vocab_size=100" for n in (1, 2, 3)]
    out, started = tmp_path / "out", tmp_path / "started"
    script = tmp_path / "batch.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(out), policy, str(started), *specs], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the batch did not reach the second model"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    slugs = [parse_spec(s).slug for s in specs]
    leftovers = os.listdir(out)
    # The first model is published, the killed one exists only as a staging directory, the third not at all.
    assert slugs[0] in leftovers and slugs[1] not in leftovers and slugs[2] not in leftovers
    stale = [n for n in leftovers if n.startswith(".tmp-")]
    assert len(stale) == 1 and stale[0].endswith(f"-{proc.pid}-{slugs[1]}")
    assert (out / stale[0] / "model.onnx").read_bytes() == b"half an onnx file"
    assert not any(n.startswith("summary") for n in leftovers)

    calls = []
    code = main(["convert", *specs, "--policy", policy, "--out", str(out), "--resume", "--tokens", "16"],
                convert_fn=_counting(calls))
    assert code == 0
    assert sorted(calls) == sorted(specs[1:])
    assert [m["status"] for m in _summary(out)["models"]] == ["skipped", "ok", "ok"]
    assert _published(out) == sorted(slugs)  # the stale staging directory is gone
    for slug in slugs[1:]:
        assert (out / slug / "model.onnx").read_bytes().startswith(b"fake onnx of")


def test_shards_together_convert_each_model_once(tmp_path, policy):
    specs = [f"hf:gpt2?n_embd=32&n_head=2&n_layer={n}&n_positions=64&vocab_size=100" for n in range(1, 6)]
    listing = tmp_path / "models.txt"
    listing.write_text("\n".join(specs + specs[:2]) + "\n")  # duplicates are converted once
    out, calls = tmp_path / "out", []
    for k in (1, 2, 3):
        assert main(["convert", "--list", str(listing), "--policy", policy, "--out", str(out), "--shard", f"{k}/3",
                     "--tokens", "16"], convert_fn=_counting(calls)) == 0
        assert len(_summary_shard(out, k)["models"]) == len(sorted(specs)[k - 1::3])
    assert sorted(calls) == sorted(specs)
    # The final, unsharded --resume run converts nothing and writes the summary of the whole batch.
    calls.clear()
    assert main(["convert", "--list", str(listing), "--policy", policy, "--out", str(out), "--resume",
                 "--tokens", "16"], convert_fn=_counting(calls)) == 0
    assert calls == [] and [m["status"] for m in _summary(out)["models"]] == ["skipped"] * 5


def _summary_shard(out, k):
    return json.loads((out / f"summary.shard-{k}-of-3.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--shard", "4/3"], "--shard '4/3': need 1 <= K <= N"),
    (["--tokens", "0"], "--tokens 0: must be >= 1"),
    (["-j", "0"], "-j 0: must be >= 1"),
    (["--policy", "/no/such/policy.yaml"], "--policy '/no/such/policy.yaml': no such file"),
    (["--list", "/no/such/list.txt"], "--list '/no/such/list.txt': cannot read"),
])
def test_usage_errors_exit_two_and_write_nothing(tmp_path, policy, capsys, args, message):
    out = tmp_path / "out"
    code = main(["convert", TINY_GPT, "--policy", policy, "--out", str(out), *args], convert_fn=fake_convert)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_list_line_names_file_and_line(tmp_path, policy, capsys):
    listing = tmp_path / "models.txt"
    listing.write_text(f"{TINY_GPT}\n{TV} polcy=x.yaml\n")
    assert main(["convert", "--list", str(listing), "--policy", policy, "--out", str(tmp_path / "o")]) == 2
    assert f"{listing}:2: unexpected 'polcy=x.yaml'" in capsys.readouterr().err


def test_no_models_is_a_usage_error(tmp_path, policy, capsys):
    assert main(["convert", "--policy", policy, "--out", str(tmp_path / "o")]) == 2
    assert "no models given" in capsys.readouterr().err


def test_plain_log_lines_when_not_a_terminal(tmp_path, policy, capsys):
    main(["convert", TINY_GPT, "zoo9:x", "--policy", policy, "--out", str(tmp_path / "o"), "--tokens", "8"],
         convert_fn=fake_convert)
    captured = capsys.readouterr()
    # the progress lines (a library may warn on the same stream: transformers about this tiny GPT-2's config)
    lines = [line for line in captured.err.strip().splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert len(lines) == 2
    assert lines[0].startswith(f"[1/2] ok      {TINY_GPT} (") and "params -50.0 %, FLOPs -60.0 %" in lines[0]
    assert lines[1].startswith("[2/2] failed  zoo9:x: ModelSpecError: model spec 'zoo9:x': unknown zoo")
    assert captured.out.startswith("einfx convert: 1 converted, 0 skipped (already complete), 1 failed; summary:")


def test_explain_prints_each_model_and_isolates_failures(tmp_path, policy, capsys):
    class Report:
        def __init__(self, spec):
            self.spec = spec

        def __str__(self):
            return f"table for {self.spec.canonical}"

        def to_json(self):
            return json.dumps({"rows": [self.spec.name]})

    def explain(spec, policy_path, tokens):
        assert policy_path == policy and tokens == 128
        return Report(spec)

    code = main(["explain", TINY_GPT, "zoo9:x", "--policy", policy], explain_fn=explain)
    captured = capsys.readouterr()
    assert code == 1
    assert f"== {TINY_GPT}\ntable for {TINY_GPT}" in captured.out
    assert "einfx explain: zoo9:x: ModelSpecError" in captured.err
    assert main(["explain", TINY_GPT, "--policy", policy, "--json"], explain_fn=explain) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": ["gpt2"]}


@pytest.mark.slow
def test_parallel_workers_isolate_a_crashing_model(tmp_path, policy, local_weights):
    crash = tmp_path / "crash.safetensors"
    crash.write_bytes((tmp_path / "tiny.safetensors").read_bytes())
    out = tmp_path / "out"
    code = main(["convert", f"{crash}@{TINY_GPT}", local_weights, "--policy", policy, "--out", str(out),
                 "-j", "2", "--tokens", "16"], convert_fn=crashing_convert)
    assert code == 1
    models = {m["spec"]: m for m in _summary(out)["models"]}
    crashed = models[parse_spec(f"{crash}@{TINY_GPT}").canonical]
    assert crashed["status"] == "failed" and crashed["error"].startswith("WorkerDied: the worker process ended "
                                                                          "with exit code -9")
    assert models[parse_spec(local_weights).canonical]["status"] == "ok"
    assert _published(out) == [parse_spec(local_weights).slug]  # nor a staging directory of the dead worker
    # In parallel mode too, --resume settles complete models (and unparsable specs) without a worker.
    code = main(["convert", local_weights, "zoo9:x", "--policy", policy, "--out", str(out), "-j", "2", "--tokens", "16",
                 "--resume"], convert_fn=crashing_convert)
    assert code == 1 and [m["status"] for m in _summary(out)["models"]] == ["skipped", "failed"]


def test_progress_bar_on_request(tmp_path, policy, capsys):
    from einfx.cli.convert import RunOptions, collect_tasks, run_batch, select_tasks

    tasks = select_tasks(collect_tasks([TINY_GPT, "zoo9:x"], policy))
    batch = run_batch(tasks, RunOptions(str(tmp_path / "o"), tokens=8), convert_fn=fake_convert, progress=True)
    err = capsys.readouterr().err
    assert batch.exit_code == 1 and [r.status for r in batch.results] == ["ok", "failed"]
    assert "2/2" in err and "[2/2] failed  zoo9:x: ModelSpecError" in err
