"""loramux.ops: the grouped torch reference against a per-token dense oracle, over a pool and slot
table packed by hand here exactly as docs/internals.md lays them out."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.errors import LoraFormatError
from loramux.ops import BatchMeta, lora_apply, lora_expand, lora_shrink

NUM_MODULES = 19


def pack_pool(adapters, num_layers, dtype, max_slots=8, device="cpu"):
    """adapters: list (one per slot) of {(module_id, layer): (A [r,Hi], B [Ho,r], scale [Ho] | None)}.
    Returns (pool uint8, table int64 [max_slots, L, 19, 4]) on `device`, parts 16-byte aligned."""
    parts, offset = [], 0
    placed = []
    for adapter in adapters:
        for key, (a, b, scale) in adapter.items():
            addrs = []
            for t in (a, b, scale):
                if t is None:
                    addrs.append(None)
                    continue
                raw = t.to(dtype).contiguous().view(-1).view(torch.uint8)
                parts.append((offset, raw))
                addrs.append(offset)
                offset += (raw.numel() + 15) // 16 * 16
            placed.append((len(placed), key, addrs, a.shape[0]))
    pool = torch.zeros(max(offset, 16), dtype=torch.uint8)
    for off, raw in parts:
        pool[off : off + raw.numel()] = raw
    pool = pool.to(device)
    base = pool.data_ptr()
    table = torch.zeros(max_slots, num_layers, NUM_MODULES, 4, dtype=torch.int64)
    i = 0
    for slot, adapter in enumerate(adapters):
        for key in adapter:
            _, (mid, layer), (a, b, s), rank = placed[i]
            table[slot, layer, mid] = torch.tensor([base + a, base + b, base + s if s is not None else 0, rank])
            i += 1
    return pool, table.to(device)


def dense_oracle(x, y, adapters, slot_of_token, layer, module_ids, out_sizes, dtype):
    """Per-token loop: the definition the grouped reference must reproduce."""
    out = y.clone().float()
    col = 0
    for mid, ho in zip(module_ids, out_sizes):
        for t, slot in enumerate(slot_of_token.tolist()):
            if slot < 0 or (mid, layer) not in adapters[slot]:
                continue
            a, b, scale = adapters[slot][(mid, layer)]
            a, b = a.to(dtype).float(), b.to(dtype).float()
            v = out[t, col : col + ho] + b @ (a @ x[t].float())
            if scale is not None:
                v = scale.to(dtype).float() * v
            out[t, col : col + ho] = v
        col += ho
    return out


def make_adapter(gen, entries, dora=False):
    adapter = {}
    for (mid, layer), (rank, hi, ho) in entries.items():
        a = torch.randn(rank, hi, generator=gen)
        b = torch.randn(ho, rank, generator=gen)
        scale = torch.rand(ho, generator=gen) + 0.5 if dora else None
        adapter[(mid, layer)] = (a, b, scale)
    return adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_batch_multi_slice_matches_dense_oracle(dtype):
    gen = torch.Generator().manual_seed(0)
    hi, q, kv, layer = 32, 32, 16, 1
    adapters = [
        make_adapter(gen, {(1, 1): (4, hi, q), (2, 1): (4, hi, kv), (3, 1): (4, hi, kv)}),
        make_adapter(gen, {(1, 1): (16, hi, q), (3, 1): (8, hi, kv)}),  # no attn_k: that slice untouched
        make_adapter(gen, {(1, 0): (2, hi, q)}),  # only layer 0: nothing at layer 1
        make_adapter(gen, {(1, 1): (8, hi, q), (2, 1): (8, hi, kv), (3, 1): (8, hi, kv)}, dora=True),
    ]
    pool, table = pack_pool(adapters, num_layers=2, dtype=dtype)
    # interleaved and contiguous groups, and no-adapter tokens
    slot_of_token = torch.tensor([0, 0, 1, -1, 1, 2, 3, 3, 0, -1], dtype=torch.int32)
    x = torch.randn(len(slot_of_token), hi, generator=gen).to(dtype)
    y = torch.randn(len(slot_of_token), q + 2 * kv, generator=gen).to(dtype)
    meta = BatchMeta(table=table, pool=pool, dtype=dtype, slot_of_token=slot_of_token, max_rank=16)
    expected = dense_oracle(x, y, adapters, slot_of_token, layer, [1, 2, 3], [q, kv, kv], dtype)
    before = y.clone()
    lora_apply(x, y, meta, layer, [1, 2, 3], [q, kv, kv])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    untouched = (slot_of_token == -1) | (slot_of_token == 2)
    assert torch.equal(y[untouched], before[untouched])


def test_shrink_zero_past_rank_and_for_no_adapter_tokens():
    gen = torch.Generator().manual_seed(1)
    adapters = [make_adapter(gen, {(4, 0): (3, 8, 8)})]
    pool, table = pack_pool(adapters, num_layers=1, dtype=torch.float32)
    slot_of_token = torch.tensor([0, -1, 0], dtype=torch.int32)
    x = torch.randn(3, 8, generator=gen)
    u = lora_shrink(x, BatchMeta(table, pool, torch.float32, slot_of_token, 8), 0, [4])
    assert u.shape == (1, 3, 8) and u.dtype == torch.float32
    a = adapters[0][(4, 0)][0]
    torch.testing.assert_close(u[0, 0, :3], a @ x[0])
    assert torch.count_nonzero(u[0, :, 3:]) == 0 and torch.count_nonzero(u[0, 1]) == 0


def test_expand_adds_in_place():
    gen = torch.Generator().manual_seed(2)
    adapters = [make_adapter(gen, {(6, 0): (2, 4, 6)})]
    pool, table = pack_pool(adapters, num_layers=1, dtype=torch.float32)
    meta = BatchMeta(table, pool, torch.float32, torch.tensor([0], dtype=torch.int32), 4)
    u = torch.zeros(1, 1, 4)
    u[0, 0, :2] = torch.tensor([1.0, -2.0])
    y = torch.ones(1, 6)
    lora_expand(u, y, meta, 0, [6], [6])
    b = adapters[0][(6, 0)][1]
    torch.testing.assert_close(y[0], 1 + b @ torch.tensor([1.0, -2.0]))


def test_bad_inputs_raise_typed_errors_and_leave_y_alone():
    gen = torch.Generator().manual_seed(3)
    adapters = [make_adapter(gen, {(1, 0): (2, 4, 4)})]
    pool, table = pack_pool(adapters, num_layers=1, dtype=torch.float32)
    meta = BatchMeta(table, pool, torch.float32, torch.tensor([0, 0], dtype=torch.int32), 4)
    y = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="slot_of_token") as err:
        lora_shrink(torch.zeros(3, 4), meta, 0, [1])
    assert not isinstance(err.value, LoraFormatError)  # shapes are arguments, not adapter data
    with pytest.raises(ValueError, match="layer 5"):
        lora_shrink(torch.zeros(2, 4), meta, 5, [1])
    with pytest.raises(ValueError, match="out_sizes"):
        lora_apply(torch.ones(2, 4), y, meta, 0, [1], [3])
    bad = table.clone()
    bad[0, 0, 1, 0] = 16  # an address below the pool
    with pytest.raises(ValueError, match="outside the pool"):
        lora_apply(torch.ones(2, 4), y, BatchMeta(bad, pool, torch.float32, meta.slot_of_token, 4), 0, [1], [4])
    assert torch.count_nonzero(y) == 0


@settings(max_examples=25, deadline=None)
@given(
    slots=st.lists(st.integers(-1, 2), min_size=1, max_size=24),
    ranks=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_any_token_assignment_matches_oracle(slots, ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    hi, ho = 12, 10
    adapters = [make_adapter(gen, {(5, 0): (r, hi, ho)}) for r in ranks]
    pool, table = pack_pool(adapters, num_layers=1, dtype=torch.float32)
    slot_of_token = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(len(slots), hi, generator=gen)
    y = torch.randn(len(slots), ho, generator=gen)
    expected = dense_oracle(x, y, adapters, slot_of_token, 0, [5], [ho], torch.float32)
    lora_apply(x, y, BatchMeta(table, pool, torch.float32, slot_of_token, 8), 0, [5], [ho])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_cuda_dispatch_matches_the_cpu_reference(dtype, tokens):
    """On CUDA, ops take loramux.ops.kernels where they support the case (fp32 stays on the reference):
    either way the result equals the CPU reference."""
    gen = torch.Generator().manual_seed(tokens)
    hi, q, kv = 64, 64, 32
    adapters = [
        make_adapter(gen, {(1, 0): (8, hi, q), (2, 0): (8, hi, kv), (3, 0): (8, hi, kv)}),
        make_adapter(gen, {(1, 0): (16, hi, q), (3, 0): (4, hi, kv)}),
        make_adapter(gen, {(1, 0): (8, hi, q), (2, 0): (8, hi, kv), (3, 0): (8, hi, kv)}, dora=True),
    ]
    slot_of_token = torch.randint(-1, 3, (tokens,), generator=gen, dtype=torch.int32)
    x = torch.randn(tokens, hi, generator=gen).to(dtype)
    y = torch.randn(tokens, q + 2 * kv, generator=gen).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        pool, table = pack_pool(adapters, 1, dtype, device=device)
        meta = BatchMeta(table, pool, dtype, slot_of_token.to(device), 16)
        out = y.clone().to(device)
        lora_apply(x.to(device), out, meta, 0, [1, 2, 3], [q, kv, kv])
        results.append(out.float().cpu())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol * results[0].abs().max().item())
