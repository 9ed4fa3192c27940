"""The torch lora_apply paths off the kernels, loramux.ops.stacked (decode-size batches) and
loramux.ops.per_adapter (long or lopsided ones), against the grouped reference and the per-token
dense oracle, and the reuse of what they copy out of the pool across steps: kept while the pool's
content and the batch's adapters are unchanged, rebuilt when a load writes the pool
(LoraCache.pool_version)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_helpers import PAGE, SPEC, make_adapter as cache_adapter
from test_ops import dense_oracle, make_adapter, pack_pool

from loramux import LoraCache
from loramux.ops import BatchMeta, per_adapter, reference, stacked
from loramux.ops.step_batch import StepBatch

# q, k, v of a tiny model: three slices of different widths
HI, WIDTHS, IDS = 16, [16, 8, 8], [1, 2, 3]
PATHS = pytest.mark.parametrize("path", [stacked, per_adapter], ids=["stacked", "per_adapter"])


@PATHS
@settings(max_examples=40, deadline=None)
@given(
    slots=st.lists(st.integers(-1, 3), min_size=1, max_size=40),
    ranks=st.lists(st.lists(st.integers(0, 8), min_size=3, max_size=3), min_size=4, max_size=4),
    dora=st.lists(st.booleans(), min_size=4, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_equals_reference_and_oracle(path, slots, ranks, dora, dtype, seed):
    """Any token order, no-adapter tokens, rank-0 slices (an adapter without that module), DoRA rows."""
    gen = torch.Generator().manual_seed(seed)
    adapters = [make_adapter(gen, {(mid, 0): (r, HI, ho) for mid, r, ho in zip(IDS, rs, WIDTHS) if r}, dora=d)
                for rs, d in zip(ranks, dora)]
    pool, table = pack_pool(adapters, num_layers=1, dtype=dtype)
    slot_of_token = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(len(slots), HI, generator=gen).to(dtype)
    y = torch.randn(len(slots), sum(WIDTHS), generator=gen).to(dtype)
    meta = BatchMeta(table, pool, dtype, slot_of_token, 8)
    grouped = y.clone()
    reference.expand(reference.shrink(x, meta, 0, IDS), grouped, meta, 0, IDS, WIDTHS)
    out = y.clone()
    path.apply(x, out, BatchMeta(table, pool, dtype, slot_of_token, 8), 0, IDS, WIDTHS)
    expected = dense_oracle(x, y, adapters, slot_of_token, 0, IDS, WIDTHS, dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=atol)
    torch.testing.assert_close(out.float(), grouped.float(), rtol=tol, atol=atol)
    # a token whose adapter lacks a slice (or that has none) keeps that slice exactly
    c0 = 0
    for s, ho in enumerate(WIDTHS):
        for t, slot in enumerate(slots):
            if slot < 0 or ranks[slot][s] == 0:
                assert torch.equal(out[t, c0 : c0 + ho], y[t, c0 : c0 + ho])
        c0 += ho


@PATHS
def test_weights_shared_across_token_assignments_of_the_same_adapters(path):
    """A later step's BatchMeta (other tokens, same slots) reusing the copied weights gets its own rows right."""
    gen = torch.Generator().manual_seed(5)
    adapters = [make_adapter(gen, {(mid, 0): (r, HI, ho) for mid, ho in zip(IDS, WIDTHS)}) for r in (2, 8, 4)]
    pool, table = pack_pool(adapters, num_layers=1, dtype=torch.float32)
    derived = {}
    for step in range(4):
        # steps 0-2: all three adapters in other orders; step 3: only two of them
        slot_of_token = torch.tensor([(t * (1 + step % 2) + step) % 3 if step < 3 else t % 2 for t in range(9)] + [-1], dtype=torch.int32)
        x = torch.randn(10, HI, generator=gen)
        y = torch.randn(10, sum(WIDTHS), generator=gen)
        out = y.clone()
        path.apply(x, out, BatchMeta(table, pool, torch.float32, slot_of_token, 8, derived=derived), 0, IDS, WIDTHS)
        expected = dense_oracle(x, y, adapters, slot_of_token, 0, IDS, WIDTHS, torch.float32)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(derived) == 2  # one entry per set of adapters: built at the first step, read by the next two


def test_stacked_serves_decode_sizes_and_leaves_large_or_lopsided_batches_to_per_adapter():
    gen = torch.Generator().manual_seed(6)
    pool, table = pack_pool([make_adapter(gen, {(1, 0): (8, HI, 16)}) for _ in range(8)], 1, torch.float32)

    def serves(slots):
        slots = torch.tensor(slots, dtype=torch.int32)
        return stacked.serves(BatchMeta(table, pool, torch.float32, slots, 16), slots.numel())

    assert serves([t % 8 for t in range(64)])  # a decode batch over 8 adapters
    assert serves([0] * 5 + [-1] * 3)
    assert not serves([0] * 40 + [1] * 30 + [2] * 50)  # packed prompts: per_adapter adds each run in place
    assert not serves([t % 8 for t in range(2048)])  # a long prefill: a GEMM per adapter amortizes its cost
    assert not serves([0] * 300 + list(range(1, 8)))  # one long prompt beside 7 one-token rows: padding
    assert not serves([-1] * 8)  # no adapter: nothing to stack


def test_step_batch_keeps_stacks_while_pool_version_and_slots_repeat():
    gen = torch.Generator().manual_seed(7)
    pool, table = pack_pool([make_adapter(gen, {(1, 0): (4, HI, 16)}) for _ in range(3)], 1, torch.float32)
    step = StepBatch(torch.float32, 8)
    x = torch.zeros(3, HI)
    step.set([0, 1, -1], table, pool, pool_version=4)
    first = step.meta_for(x).derived
    step.set([1, 0, 0], table, pool, pool_version=4)  # same adapters, other rows
    assert step.meta_for(x).derived is first
    step.clear()
    step.set([0, 1, 1], table, pool, pool_version=4)  # a step with no adapters in between
    assert step.meta_for(x).derived is first
    step.set([0, 1, 2], table, pool, pool_version=4)  # another adapter joined
    assert step.meta_for(x).derived is not first
    second = step.meta_for(x).derived
    step.set([0, 1, 2], table, pool, pool_version=5)  # the pool was written
    assert step.meta_for(x).derived is not second
    third = step.meta_for(x).derived
    step.set([0, 1, 2], table, pool, pool_version=None)  # no version: nothing is reused
    assert step.meta_for(x).derived is not third


@PATHS
def test_a_reload_into_the_same_slot_is_seen_through_the_cache_pool_version(path):
    """An adapter evicted and another loaded in its place (same slot, maybe the same addresses):
    the cache's pool_version changes, so the weights copied from the old one are not reused."""
    rows = [(1, 0, 8, 0), (1, 1, 8, 0)]
    one_adapter_bytes = 2 * 2 * PAGE * 4  # A and B of 2 module-layers, fp32: a few pages each
    cache = LoraCache(SPEC, dtype=torch.float32, host_cache_bytes=1 << 20, device="cpu",
                      device_cache_bytes=one_adapter_bytes * 2, page_bytes=PAGE, max_slots=1)
    step = StepBatch(torch.float32, SPEC.max_rank)
    hi, ho = SPEC.module_dims(1)
    x = torch.randn(4, hi, generator=torch.Generator().manual_seed(8))
    results = []
    for task_id in (1, 2):
        cache.put(task_id, *cache_adapter(task_id, rows))
        batch = cache.acquire([task_id])
        step.set([batch.slots[0]] * 4, cache.table, cache.pool, cache.pool_version)
        meta = step.meta_for(x)
        out = torch.zeros(4, ho)
        path.apply(x, out, meta, 0, [1], [ho])
        fresh = torch.zeros(4, ho)
        reference.expand(reference.shrink(x, meta, 0, [1]), fresh, meta, 0, [1], [ho])
        torch.testing.assert_close(out, fresh, rtol=1e-5, atol=1e-5)
        results.append(out)
        cache.release(batch)
    assert cache.stats()["loads"] == 2 and not torch.allclose(results[0], results[1])
