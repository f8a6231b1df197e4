import json
import os
import subprocess
import sys

import pytest

from einfx.cli import outputs
from einfx.cli.outputs import ModelResult
from einfx.errors import EinfxError, ExportError

OPTIONS = {"spec": "torchvision:resnet18", "policy_sha256": "ab", "dtype": "float32", "tokens": 128}
REPORT = {"params": {"before": 1000, "after": 250}, "flops": {"before": 4000, "after": 3000}}


def _staged(out_dir, slug="m", payload=b"onnx bytes"):
    staging = outputs.staging_dir(str(out_dir), slug)
    with open(os.path.join(staging, outputs.ONNX_NAME), "wb") as fh:
        fh.write(payload)
    return staging


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_finalize_and_publish_make_a_complete_directory(tmp_path):
    staging = _staged(tmp_path)
    report = outputs.finalize_report(staging, REPORT, "torchvision:resnet18", "m", OPTIONS, 1.5)
    assert report["onnx"] == {"file": "model.onnx", "size": 10, "sha256": outputs.file_digest(
        os.path.join(staging, "model.onnx"))[1]}
    final = tmp_path / "m"
    outputs.publish(staging, str(final))
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert sorted(os.listdir(final)) == ["model.onnx", "report.json"]
    found, reason = outputs.check_complete(str(final), OPTIONS)
    assert reason == "complete" and found["params"] == {"before": 1000, "after": 250} and found["status"] == "ok"


def test_publish_replaces_a_previous_directory(tmp_path):
    for payload in (b"first", b"second!"):
        staging = _staged(tmp_path, payload=payload)
        outputs.finalize_report(staging, REPORT, "s", "m", OPTIONS, 0.0)
        outputs.publish(staging, str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.onnx").read_bytes() == b"second!"
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no .old-* or .tmp-* left


@pytest.mark.parametrize("report, error, message", [
    ({"params": {"before": 1, "after": 1}}, EinfxError, "integer flops.before and flops.after"),
    ({"params": {"before": 1.5, "after": 1}, "flops": REPORT["flops"]}, EinfxError, "integer params.before"),
])
def test_finalize_rejects_incomplete_reports(tmp_path, report, error, message):
    with pytest.raises(error, match=message):
        outputs.finalize_report(_staged(tmp_path), report, "s", "m", OPTIONS, 0.0)


def test_finalize_requires_the_onnx_file(tmp_path):
    staging = outputs.staging_dir(str(tmp_path), "m")
    with pytest.raises(ExportError, match="wrote no model.onnx"):
        outputs.finalize_report(staging, REPORT, "torchvision:resnet18", "m", OPTIONS, 0.0)


def _complete(tmp_path):
    staging = _staged(tmp_path)
    outputs.finalize_report(staging, REPORT, "torchvision:resnet18", "m", OPTIONS, 0.0)
    outputs.publish(staging, str(tmp_path / "m"))
    return tmp_path / "m"


def test_check_complete_reasons(tmp_path):
    assert outputs.check_complete(str(tmp_path / "absent"), OPTIONS) == (None, "no output directory")
    final = _complete(tmp_path)
    assert outputs.check_complete(str(final), {**OPTIONS, "dtype": "float16"})[1].startswith("made with other options")
    (final / "model.onnx").write_bytes(b"onnx bytez")  # same size, other content
    assert outputs.check_complete(str(final), OPTIONS) == (None, "model.onnx size/sha256 differ from report.json")
    (final / "model.onnx").unlink()
    assert outputs.check_complete(str(final), OPTIONS) == (None, "model.onnx missing")
    report = json.loads((final / "report.json").read_text())
    (final / "report.json").write_text(json.dumps({**report, "status": "failed"}))
    assert outputs.check_complete(str(final), OPTIONS) == (None, "report.json does not record success")
    (final / "report.json").write_text('{"truncated')
    assert outputs.check_complete(str(final), OPTIONS) == (None, "report.json unreadable (JSONDecodeError)")


def test_clean_stale_removes_only_dead_local_leftovers(tmp_path):
    host, dead = outputs.host_tag(), _dead_pid()
    names = {
        f".tmp-{host}-{dead}-m": True,                 # a dead process on this host
        f".old-{host}-{dead}-m": True,
        f".tmp-{host}-{os.getpid()}-m": False,         # this (live) process
        f".tmp-otherhost-{dead}-m": False,             # another host: may be a running shard
        "m": False,                                    # a published model
    }
    for name in names:
        os.makedirs(tmp_path / name)
    (tmp_path / f".tmp-{host}-{dead}-summary.json").write_text("{")
    removed = outputs.clean_stale(str(tmp_path))
    assert sorted(removed) == sorted([n for n, stale in names.items() if stale] + [f".tmp-{host}-{dead}-summary.json"])
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, stale in names.items() if not stale)


def test_write_json_atomic_leaves_no_temporary_file(tmp_path):
    outputs.write_json_atomic(str(tmp_path / "a.json"), {"x": (1, 2)})
    assert os.listdir(tmp_path) == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}


def test_savings_and_summary_files(tmp_path):
    results = [
        ModelResult("torchvision:resnet18", "torchvision-resnet18", "ok", 2.0, None, 1000, 250, 4000, 3000, 1e-6),
        ModelResult("hf:gpt2", "hf-gpt2", "skipped", 0.1, None, 200, 100, 800, 200),
        ModelResult("zoo9:x", "", "failed", 0.0, "ModelSpecError: unknown zoo 'zoo9'"),
    ]
    assert results[0].params_saving == 0.75 and results[0].flops_saving == 0.25 and results[2].flops_saving is None
    paths = outputs.write_summary(str(tmp_path), results, {"dtype": "float32"}, shard=(2, 3))
    assert paths == {e: str(tmp_path / f"summary.shard-2-of-3.{e}") for e in ("json", "md", "png")}
    data = json.loads((tmp_path / "summary.shard-2-of-3.json").read_text())
    assert data["counts"] == {"ok": 1, "skipped": 1, "failed": 1}
    assert [m["status"] for m in data["models"]] == ["ok", "skipped", "failed"]
    assert data["models"][0]["params_saving"] == 0.75 and data["models"][1]["flops_saving"] == 0.75
    md = (tmp_path / "summary.shard-2-of-3.md").read_text()
    assert "1 converted, 1 already complete (skipped), 1 failed." in md
    assert ("| `torchvision:resnet18` | ok | 1.00k → 250 | 75.0 % | 4.00k → 3.00k | 25.0 % | 1.00e-06 "
            "| not measured (no --data) | 2.0 |") in md
    assert "- `zoo9:x`: ModelSpecError: unknown zoo 'zoo9'" in md
    assert (tmp_path / "summary.shard-2-of-3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs.summary_paths(str(tmp_path))["json"] == str(tmp_path / "summary.json")
