"""The benchmarks' text: standard-library docstrings (methods included) and source comments for calibration,
package descriptions held out, the two sets disjoint."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from _text import _comments, _documented, package_sentences, stdlib_sentences  # noqa: E402


def test_stdlib_text_includes_method_docstrings_and_comments():
    import json

    assert json.JSONDecoder.decode in _documented(json.decoder)
    comments = _comments(sys.modules["json.decoder"]) + _comments(__import__("textwrap"))
    assert comments and all(isinstance(c, str) and c for c in comments)
    sentences = stdlib_sentences(100_000)
    assert len(sentences) == len(set(sentences)) > 5_000
    assert stdlib_sentences(50) == sentences[:50]  # the order is fixed by the seed


def test_held_out_sentences_never_appear_in_the_calibration_text():
    held_out = package_sentences(400)
    assert held_out and not set(held_out) & set(stdlib_sentences(100_000))
