import random
from collections import Counter

import pytest

from einfx.cli.convert import Task, select_tasks
from einfx.cli.shard import parse_shard, shard

MODELS = [f"timm:model_{i:02d}" for i in range(23)] + ["torchvision:resnet18", "hf:gpt2?n_layer=2"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 25, 40])
def test_shards_cover_every_model_exactly_once(n):
    seen = Counter()
    for k in range(1, n + 1):
        seen.update(shard(MODELS + MODELS[:5], k, n))  # duplicates in the list are converted once
    assert seen == Counter(MODELS)


@pytest.mark.parametrize("n", [2, 5])
def test_partition_does_not_depend_on_input_order(n):
    shuffled = MODELS[:]
    random.Random(0).shuffle(shuffled)
    assert [shard(MODELS, k, n) for k in range(1, n + 1)] == [shard(shuffled, k, n) for k in range(1, n + 1)]


def test_shards_are_round_robin_over_the_sorted_list():
    ordered = sorted(MODELS)
    assert shard(MODELS, 2, 3) == ordered[1::3]
    sizes = [len(shard(MODELS, k, 4)) for k in range(1, 5)]
    assert max(sizes) - min(sizes) <= 1


def test_select_tasks_shards_by_canonical_key():
    tasks = [Task(key=m, spec=None, policy="p.yaml") for m in MODELS]
    picked = [t.key for k in range(1, 4) for t in select_tasks(tasks, (k, 3))]
    assert sorted(picked) == sorted(MODELS)


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("3/8", (3, 8)), (" 8 / 8 ", (8, 8))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0/3", "1 <= K <= N"), ("4/3", "1 <= K <= N"), ("1/0", "1 <= K <= N"), ("3", "expected K/N"), ("a/b", "expected K/N"),
])
def test_parse_shard_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shard(text)
