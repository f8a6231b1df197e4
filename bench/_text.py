"""Sentences for calibration and evaluation, from text installed on every machine (nothing downloaded).

- calibration / training: the Python standard library's docstrings (modules, classes, functions, methods) and
  the comments of its sources, one sentence each;
- held-out: the project descriptions in the metadata of the installed Python packages (PyPI long
  descriptions): English prose from another source.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import io
import random
import re
import sys
import tokenize

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


def _documented(module) -> list:
    """The module, its classes and functions, and the methods and properties its own classes define."""
    out = [module]
    for _, value in inspect.getmembers(module):
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        out.append(value)
        if inspect.isclass(value) and getattr(value, "__module__", None) == module.__name__:
            out += [m for _, m in inspect.getmembers(value)
                    if inspect.isfunction(m) or inspect.ismethoddescriptor(m) or isinstance(m, property)]
    return out


def _comments(module) -> list[str]:
    """The module source's comment blocks (consecutive ``#`` lines joined), as text."""
    try:
        path = inspect.getsourcefile(module)
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (TypeError, OSError, UnicodeDecodeError):
        return []
    blocks, block = [], []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                block.append(token.string.lstrip("#").strip())
            elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and block:
                blocks.append(" ".join(block))
                block = []
    except (tokenize.TokenError, SyntaxError):
        pass
    return blocks


@functools.cache
def _stdlib_text() -> tuple[str, ...]:
    """Every distinct sentence of the standard library's docstrings and source comments, in discovery order
    (read once per process: the calibration pool and the held-out filter share it)."""
    seen: dict[str, None] = {}
    for name in _STDLIB:
        try:
            module = importlib.import_module(name)
        except Exception:  # some modules do not import on every platform
            continue
        texts = [inspect.getdoc(obj) or "" for obj in _documented(module)] + _comments(module)
        for text in texts:
            for sentence in _clean(text):
                seen.setdefault(sentence)
    return tuple(seen)


def stdlib_sentences(limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct sentences from the standard library's docstrings and source comments."""
    sentences = list(_stdlib_text())
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


def package_sentences(limit: int, seed: int = 0) -> list[str]:
    """Up to ``limit`` distinct sentences from installed packages' project descriptions, none of them also a
    standard-library sentence."""
    stdlib = set(_stdlib_text())
    seen: dict[str, None] = {}
    for dist in importlib.metadata.distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        for sentence in _clean(re.sub(r"[`#*>\[\]()|_=-]+", " ", str(body))):
            if sentence not in stdlib:
                seen.setdefault(sentence)
    sentences = list(seen)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


if __name__ == "__main__":
    a, b = stdlib_sentences(2000), package_sentences(600)
    print(len(a), len(b))
    print(*a[:3], sep="\n")
    print(*b[:3], sep="\n")
