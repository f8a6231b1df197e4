"""Deterministic sharding of a model list over N machines (a scheduler job array).

The list is reduced to its sorted unique entries; entry ``i`` (0-based) belongs to shard ``i mod N + 1``.
No hashing, no randomness and no dependence on the host: every machine that reads the same list computes
the same partition, so shards 1..N together cover each model exactly once. Round-robin over the sorted
list also spreads the large models of one family over the shards.
"""

from __future__ import annotations

import re
from typing import Sequence, TypeVar

__all__ = ["parse_shard", "shard"]

T = TypeVar("T")
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"K/N"`` (1 <= K <= N) into ``(K, N)``.

    Raises:
        ValueError: not of the form K/N with 1 <= K <= N.
    """
    match = _SHARD.match(text or "")
    if not match:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 3/8 (shard K of N, counted from 1)")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"--shard {text!r}: need 1 <= K <= N, got K={k}, N={n}")
    return k, n


def shard(items: Sequence[T], k: int, n: int, key=str) -> list[T]:
    """The items of shard ``k`` of ``n``: sorted unique items (by ``key``), every n-th from index k-1.

    Args:
        items: the full list (duplicates by ``key`` are dropped, keeping the first).
        k: shard number, 1..n.
        n: number of shards.
        key: the text an item is sorted and de-duplicated by.
    """
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"shard {k}/{n}: need 1 <= K <= N")
    unique: dict[str, T] = {}
    for item in items:
        unique.setdefault(key(item), item)
    ordered = [unique[name] for name in sorted(unique)]
    return ordered[k - 1::n]
