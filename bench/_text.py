"""Sentences for calibration and evaluation, from text installed on every machine (nothing downloaded).

- calibration / training: docstrings of the Python standard library (``pydoc``-style, one sentence each);
- held-out: the project descriptions in the metadata of the installed Python packages (PyPI long
  descriptions): English prose from another source.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import random
import re
import sys

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_STDLIB = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in {
    "antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "lib2to3", "ensurepip", "venv"})


def _clean(text: str) -> list[str]:
    out = []
    for part in _SENTENCE.split(" ".join(text.split())):
        letters = sum(ch.isalpha() for ch in part)
        if 40 <= len(part) <= 240 and letters >= 0.7 * len(part) and part[0].isupper() and "http" not in part:
            out.append(part)
    return out


def stdlib_sentences(limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct sentences from standard-library docstrings (modules, classes, functions)."""
    seen: dict[str, None] = {}
    for name in _STDLIB:
        try:
            module = importlib.import_module(name)
        except Exception:  # some modules do not import on every platform
            continue
        objects = [module] + [v for _, v in inspect.getmembers(module) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objects:
            for sentence in _clean(inspect.getdoc(obj) or ""):
                seen.setdefault(sentence)
    sentences = list(seen)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


def package_sentences(limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct sentences from installed packages' project descriptions."""
    seen: dict[str, None] = {}
    for dist in importlib.metadata.distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        for sentence in _clean(re.sub(r"[`#*>\[\]()|_=-]+", " ", str(body))):
            seen.setdefault(sentence)
    sentences = list(seen)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


if __name__ == "__main__":
    a, b = stdlib_sentences(2000), package_sentences(600)
    print(len(a), len(b))
    print(*a[:3], sep="\n")
    print(*b[:3], sep="\n")
