"""bench/lowering.py runs end to end at a tiny size and prints its tables (numbers are not asserted: timings
belong to benchmarks, not tests)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "lowering.py"


@pytest.mark.slow
def test_lowering_bench_prints_both_backend_tables():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dims", "256", "--reps", "1", "--no-spearman",
                          "--no-fold-sweep", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for backend in ("torch", "onnxruntime"):
        section = out.stdout.split(f"512 tokens, {backend}\n", 1)[1]
        rows = [line for line in section.splitlines() if re.match(r"\| 256 \| [14] \|", line)][:2]
        assert len(rows) == 2, section
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert len(cells) == 10 and all(re.match(r"^[\d.]+", c) for c in cells), row
