"""``einfx convert --data FILE``: calibration batches for a built model, read from a local file.

- ``*.safetensors``: input tensors sharing their first (example) axis; keys that are all integers ("0", "1")
  are positional inputs (tuples), other keys keyword inputs (dicts such as input_ids / attention_mask);
- any other file: UTF-8 text, one example per non-empty line, tokenized with the model's own tokenizer when it
  ships one (a local Hugging Face folder), otherwise, for text models built with random weights, mapped to
  token ids byte by byte (UTF-8 bytes modulo the vocabulary), padded with an attention mask; lines are
  batched by length (sorted), so that batches pad little.
"""

from __future__ import annotations

import inspect
import os

import torch

from einfx.errors import ModelSpecError

__all__ = ["read_data", "DataSet", "BATCH_SIZE"]

BATCH_SIZE = 8


class DataSet(list):
    """The batches read from a file, with how they were made (``source``, ``examples``, ``how``)."""

    def __init__(self, batches, source: str, examples: int, how: str):
        super().__init__(batches)
        self.source, self.examples, self.how = source, examples, how

    def describe(self) -> dict:
        return {"path": self.source, "batches": len(self), "examples": self.examples, "how": self.how}


def read_data(path: str, built, tokens: int = 128, batch_size: int = BATCH_SIZE) -> DataSet:
    """The batches of ``path`` for the model ``built`` (an `einfx.zoo.BuiltModel`); see the module docstring.

    Raises:
        ModelSpecError: a missing, empty or unreadable file, tensors of different lengths, or text for a model
            that does not read tokens.
    """
    if not os.path.isfile(path):
        raise ModelSpecError(f"--data {path!r}: no such file")
    if path.lower().endswith(".safetensors"):
        return _tensors(path, batch_size)
    return _text(path, built, tokens, batch_size)


def _tensors(path: str, batch_size: int) -> DataSet:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # the reader's errors differ by kind of damage
        raise ModelSpecError(f"--data {path!r}: not a readable safetensors file: {type(exc).__name__}: {exc}") from exc
    if not tensors:
        raise ModelSpecError(f"--data {path!r}: the file holds no tensors")
    lengths = {k: t.shape[0] if t.dim() else None for k, t in tensors.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise ModelSpecError(f"--data {path!r}: every tensor needs the same first (example) axis; got "
                             + ", ".join(f"{k}: {tuple(t.shape)}" for k, t in tensors.items()))
    n = next(iter(lengths.values()))
    positional = all(k.isdigit() for k in tensors)
    keys = sorted(tensors, key=int) if positional else list(tensors)
    batches = []
    for i in range(0, n, batch_size):
        part = {k: tensors[k][i:i + batch_size] for k in keys}
        batches.append(tuple(part[k] for k in keys) if positional else part)
    how = f"positional inputs {keys}" if positional else f"keyword inputs {keys}"
    return DataSet(batches, path, n, how)


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"--data {path!r}: not readable as UTF-8 text (one example a line) or a "
                             f".safetensors file of input tensors: {exc}") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise ModelSpecError(f"--data {path!r}: the file has no non-empty lines")
    return lines


def _by_length(lines: list[str], lengths: list[int]) -> list[str]:
    """The lines sorted by token length (stable): each batch then holds lines of similar length and pads
    little. Calibration statistics and fidelity are sums over examples, so the order changes no result."""
    return [line for _, line in sorted(zip(lengths, lines), key=lambda p: p[0])]


def _text(path: str, built, tokens: int, batch_size: int) -> DataSet:
    if built.family != "text":
        raise ModelSpecError(f"--data {path!r}: text lines need a text model, and {built.spec} reads {built.family} "
                             "inputs; give a .safetensors file of input tensors instead")
    lines = _lines(path)
    tokenizer = built.tokenizer
    batches = []
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(lines, truncation=True, max_length=tokens)["input_ids"]]
        lines = _by_length(lines, lengths)
        for i in range(0, len(lines), batch_size):
            enc = tokenizer(lines[i:i + batch_size], padding=True, truncation=True, max_length=tokens,
                            return_tensors="pt")
            batches.append(dict(enc))
        return DataSet(batches, path, len(lines), f"tokenized with the model's {type(tokenizer).__name__}")
    vocab = built.info.get("vocab_size")
    if not vocab:
        raise ModelSpecError(f"--data {path!r}: {built.spec} has no tokenizer and no vocabulary size")
    takes_mask = "attention_mask" in inspect.signature(built.module.forward).parameters
    lines = _by_length(lines, [min(len(line.encode("utf-8")), tokens) for line in lines])
    for i in range(0, len(lines), batch_size):
        rows = [list(line.encode("utf-8"))[:tokens] for line in lines[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r) % vocab
            mask[j, :len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask} if takes_mask else (ids,))
    return DataSet(batches, path, len(lines), "no tokenizer: UTF-8 bytes as token ids (modulo the vocabulary)")
