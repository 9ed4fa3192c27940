"""How a step's tokens are cut into work items (rust/src/cuda/plan/items.rs small_items): batches below 16
tokens in small items, past 512 tokens in 64-token tiles, and in between by the adapter count where
the host knows it (StepBatch counts it into BatchMeta.adapters): small items where the adapters
average 8 tokens or fewer, else tiles; without a count small items up to 256 tokens. CPU only: the planner and the
segments' length, which tells a launch how its segments were cut."""

from __future__ import annotations

import pytest
import torch

from loramux import _core
from loramux.ops.step_batch import StepBatch


@pytest.fixture(autouse=True)
def _built_in_rule(monkeypatch):
    for v in ("LORAMUX_SMALL_ITEMS_MAX_T", "LORAMUX_ITEMS_BY_ADAPTERS", "LORAMUX_SHRINK_TARGET_BLOCKS", "LORAMUX_DECODE_TILES"):
        monkeypatch.delenv(v, raising=False)


def test_the_adapter_count_decides_between_16_and_512_tokens_only(monkeypatch):
    for t in (1, 8, 15):
        assert _core.small_items(t, None) and _core.small_items(t, 1)
    for t in (513, 1024, 2048):
        assert not _core.small_items(t, None) and not _core.small_items(t, 10_000)
    for t in range(16, 513):
        assert _core.small_items(t, None) == (t <= 256)
        for n in (1, 2, 3, 8, 9, 15, 16, 17, 31, 32, 33, 64, 128):
            assert _core.small_items(t, n) == (t <= 8 * n), (t, n)
    monkeypatch.setenv("LORAMUX_DECODE_TILES", "0")  # the A/B switch: decode batches on small items
    assert all(_core.small_items(t, 1) for t in range(1, 65)) and not _core.small_items(65, 1)


def test_the_two_layouts_never_share_a_length():
    for t in range(16, 513, 3):
        for slots in (1, 7, 64, 255, 256, 300, 512, 4096):
            for n in (1, 2, 8, 64, 128):
                same = _core.small_items(t, n) == _core.small_items(t, None)
                assert (_core.segments_len(t, slots, n) == _core.segments_len(t, slots)) == same, (t, slots, n)


def test_a_tiled_mid_size_batch_plans_as_prefill(monkeypatch):
    # rank 16 at 256 tokens: small items (their split in 256-element granules) without a
    # count; one adapter: the tile path, whose split steps 64 at a time and whose partials are summed
    # before the expand where it splits
    small = _core.plan_shrink(256, 14336, 1, 8, max_rank=16)
    tiled = _core.plan_shrink(256, 14336, 1, 8, max_rank=16, adapters=1)
    assert small != tiled and small[1] % 256 == 0 and tiled[1] % 64 == 0
    assert not small[2] and tiled[2] == (tiled[0] > 1)
    # 512 tokens of 128 adapters: small items, where T alone gives tiles
    assert _core.plan_shrink(512, 14336, 1, 256, max_rank=16, adapters=128)[1] % 256 == 0
    assert not _core.plan_shrink(512, 14336, 1, 256, max_rank=16, adapters=128)[2]
    monkeypatch.setenv("LORAMUX_ITEMS_BY_ADAPTERS", "0")  # the A/B switch: T alone decides
    assert _core.small_items(256, 1) and _core.plan_shrink(256, 14336, 1, 8, max_rank=16, adapters=1) == small
    assert not _core.small_items(512, 128)


def test_step_batch_counts_the_adapters_of_its_rows():
    table = torch.zeros(4, 1, 19, 4, dtype=torch.int64)
    step = StepBatch(torch.float32, 16)
    step.set([2, -1, 2, 0], table, torch.zeros(8, dtype=torch.uint8))
    assert step.meta_for(torch.zeros(4 * 50, 8)).adapters == 2
    step.set_static(torch.tensor([0, 1], dtype=torch.int32), table, torch.zeros(8, dtype=torch.uint8))
    assert step.meta_for(torch.zeros(2, 8)).adapters is None  # a captured graph serves any mix
