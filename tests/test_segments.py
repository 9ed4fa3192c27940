"""The token segments the CUDA kernels share across a step (cuda/lora_segments.cu): built on the
device from slot_of_token, they list every adapter token exactly once, slot by slot, in work items
of one slot; the kernels give bit-identical rows whatever the token order; StepBatch builds them once
per token count and every apply of the step reads them, graph replays included."""

import random
from dataclasses import replace

import pytest
import torch

from kernel_fixtures import captured, oracle_apply, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from loramux import _core
    from loramux.ops import kernels
    from loramux.ops.step_batch import StepBatch

from test_kernels import QKV, _case  # noqa: E402

DEV = "cuda"


def _decode(seg, T, num_slots):
    """(items [(slot, [tokens])], header) read back from a segments buffer."""
    seg = seg.cpu().tolist()
    m = (len(seg) - 4 - T - num_slots) // 19  # 3 item arrays, then 8 x 2 fused counters an item
    n = seg[0]
    slot, begin, count = seg[4:4 + m], seg[4 + m:4 + 2 * m], seg[4 + 2 * m:4 + 3 * m]
    token_idx = seg[4 + 3 * m:4 + 3 * m + T]
    return [(slot[i], token_idx[begin[i]:begin[i] + count[i]]) for i in range(n)], seg[:4]


@pytest.mark.parametrize("T,num_slots,frac_none", [(1, 1, 0.0), (7, 3, 0.3), (64, 1, 0.0), (64, 200, 0.1),
                                                   (65, 2, 0.5), (2048, 8, 0.1), (3000, 1500, 0.0), (5, 4, 1.0)])
def test_segments_list_every_adapter_token_once_by_slot(T, num_slots, frac_none):
    rng = random.Random(T * 31 + num_slots)
    slots = [(-1 if rng.random() < frac_none else rng.randrange(num_slots)) for _ in range(T)]
    if T > 3:
        slots[0], slots[1] = num_slots + 5, -7  # out of range and negative: no adapter
    sot = torch.tensor(slots, dtype=torch.int32, device=DEV)
    seg = kernels.segments(sot, num_slots)
    assert seg.numel() == _core.segments_len(T, num_slots)
    items, hdr = _decode(seg, T, num_slots)
    chunk = 8 if T <= 256 else 64  # small items up to 256 tokens (rust/src/cuda/plan.rs)
    valid = {t: s for t, s in enumerate(slots) if 0 <= s < num_slots}
    seen = []
    for slot, toks in items:
        assert 1 <= len(toks) <= chunk
        assert all(valid[t] == slot for t in toks)
        seen += toks
    assert sorted(seen) == sorted(valid)  # each adapter token exactly once
    by_slot = {}
    for slot, toks in items:
        by_slot.setdefault(slot, 0)
        by_slot[slot] += 1
    # a slot's items are as few as the chunk allows, and the slots come in ascending order
    for slot, n in by_slot.items():
        assert n == -(-sum(1 for s in valid.values() if s == slot) // chunk)
    assert [s for s, _ in items] == sorted(s for s, _ in items)
    assert hdr[1] == len(valid) and hdr[2] == len(set(valid.values()))


@pytest.mark.parametrize("T", [8, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_order_does_not_change_a_row(T, dtype):
    """Interleaved tokens give the rows of the same tokens in contiguous runs, bit for bit."""
    ad, slots, x, y0, sot = _case(900 + T, dtype, T, QKV, ranks=[8, 16, 64, 0, 32], contiguous=True)
    mids, sizes = [1, 2, 3], [576, 192, 192]
    y_sorted = y0.clone()
    kernels.lora_apply(x, y_sorted, ad.meta(sot), 1, mids, sizes)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T)).to(DEV)
    y_perm = y0[perm].clone()
    kernels.lora_apply(x[perm].contiguous(), y_perm, ad.meta(sot[perm].contiguous()), 1, mids, sizes)
    torch.cuda.synchronize()
    assert torch.equal(y_perm, y_sorted[perm])
    want = oracle_apply(ad, x, y0, slots, 1, mids, sizes)
    assert rel_err(y_sorted, want, y0) < 2e-2


def test_step_batch_builds_segments_once_and_every_layer_reads_them():
    dtype, T = torch.bfloat16, 24
    ad, slots, x, y0, sot = _case(31, dtype, T, QKV, ranks=[8, 16, 4])
    step = StepBatch(dtype, ad.max_rank)
    step.set(slots, ad.table, ad.pool)
    meta = step.meta_for(x)
    assert meta is step.meta_for(x) and meta.segments is not None
    assert meta.segments.numel() == _core.segments_len(T, ad.table.shape[0])
    mids, sizes = [1, 2, 3], [576, 192, 192]
    y_step, y_own = y0.clone(), y0.clone()
    kernels.lora_apply(x, y_step, meta, 1, mids, sizes)
    kernels.lora_apply(x, y_own, ad.meta(sot), 1, mids, sizes)  # builds its own segments
    assert torch.equal(y_step, y_own)
    with pytest.raises(Exception, match="segments"):
        kernels.lora_apply(x, y_step, replace(meta, segments=meta.segments[:-1]), 1, mids, sizes)


@pytest.mark.parametrize("T", [48, 600])
def test_graph_with_step_segments_replays_new_mappings(T):
    """The segments built inside the capture (once) are rebuilt from the static slots on every replay;
    at 600 tokens the pipelined prefill shrink's completion counts in them are left zeroed by each
    apply for the next one and the next replay."""
    dtype = torch.bfloat16
    widths = [(1, 1024, 1024), (2, 1024, 256), (3, 1024, 256)]
    ad, _, x, y0, sot = _case(7, dtype, T, widths, ranks=[16, 8, 32, 4, 64, 16], num_slots=6)
    mids, sizes = [1], [1024]
    static_x, static_y, static_sot = x.clone(), y0.clone(), sot.clone()

    def step():
        meta = replace(ad.meta(static_sot), segments=kernels.segments(static_sot, ad.table.shape[0]))
        for _ in range(2):  # two applies of the step read the one segments buffer
            kernels.lora_apply(static_x, static_y, meta, 1, mids, sizes)

    g = captured(step)
    rng = random.Random(3)
    for distinct in (1, 6, 3):
        new = [rng.randrange(distinct) if rng.random() > 0.2 else -1 for _ in range(T)]
        static_sot.copy_(torch.tensor(new, dtype=torch.int32))
        static_y.copy_(y0)
        g.replay()
        torch.cuda.synchronize()
        once = oracle_apply(ad, static_x, y0, new, 1, [1], [1024])
        twice = oracle_apply(ad, static_x, once.to(dtype).to(DEV), new, 1, [1], [1024])
        assert rel_err(static_y[:, :1024], twice[:, :1024], y0[:, :1024]) < 3e-2, distinct


ODD = [(1, 203, 333), (2, 203, 77)]  # widths no 16-byte copy fits: the register-staged tile kernels


@pytest.mark.parametrize("T,ranks,widths", [(128, [64], QKV), (200, [16, 0, 32], QKV), (256, [16] * 8, QKV),
                                            (256, [64] * 20, QKV), (128, [16] * 12, QKV), (96, [8, 64], ODD), (250, [16, 4, 64], ODD),
                                            (512, [16] * 48, QKV), (400, [64, 16, 32] * 12, QKV), (300, [16, 4] * 14, ODD),
                                            (256, [64] * 40, QKV), (128, [16] * 20, QKV), (512, [16] * 80, QKV),
                                            (400, [64, 16, 32] * 20, QKV), (300, [16, 4] * 24, ODD)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mid_size_batch_cut_by_its_adapter_count(T, ranks, widths, dtype):
    """A batch of 65..512 tokens whose adapters the host counted (BatchMeta.adapters, as StepBatch
    sets it) stays on small items where they average 8 tokens or fewer, else is cut into 64-token tiles;
    either way every adapter token is listed once and the apply matches the float64 oracle, with the
    segments built by the caller or by lora_apply itself."""
    ad, slots, x, y0, sot = _case(4000 + T + len(ranks), dtype, T, widths, ranks, num_slots=max(8, len(ranks)))
    adapters = len({s for s in slots if s >= 0})
    small = _core.small_items(T, adapters)
    assert small == (T <= 8 * adapters)
    seg = kernels.segments(sot, ad.table.shape[0], adapters)
    assert seg.numel() == _core.segments_len(T, ad.table.shape[0], adapters)
    by_t = _core.small_items(T, None)
    assert (seg.numel() == _core.segments_len(T, ad.table.shape[0])) == (small == by_t)
    items, _ = _decode(seg, T, ad.table.shape[0])
    assert max(len(toks) for _, toks in items) <= (8 if small else 64)
    assert sorted(t for _, toks in items for t in toks) == [t for t, s in enumerate(slots) if s >= 0]
    mids, sizes = [w[0] for w in widths], [w[2] for w in widths]
    want = oracle_apply(ad, x, y0, slots, 1, mids, sizes)
    for meta in (replace(ad.meta(sot), adapters=adapters, segments=seg), replace(ad.meta(sot), adapters=adapters)):
        y = y0.clone()
        kernels.lora_apply(x, y, meta, 1, mids, sizes)
        torch.cuda.synchronize()
        assert rel_err(y, want, y0) < 2e-2
    if small == by_t:
        return
    # segments cut for an unknown count do not pass for a batch whose count cuts it otherwise
    with pytest.raises(Exception, match="adapters="):
        kernels.lora_apply(x, y0.clone(), replace(ad.meta(sot), adapters=adapters,
                                                  segments=kernels.segments(sot, ad.table.shape[0])), 1, mids, sizes)


@pytest.mark.parametrize("T,ranks,tile_tokens", [(16, [64], 8), (64, [64], 8), (40, [16, 64], 8), (64, [16, 8, 33], 8),
                                                 (20, [8, 16], 8), (64, [16] * 8, 8), (32, [16, 64, 0, 33] * 2, 3),
                                                 (64, [64, 8] * 6, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_batch_of_few_adapters_cut_into_tiles(monkeypatch, T, ranks, tile_tokens, dtype):
    """A decode batch (16..64 tokens) whose counted adapters average more than 8 tokens (or than
    LORAMUX_DECODE_TILE_TOKENS) is cut into 64-token tiles and takes the pipelined tensor-core
    kernels (never the fused decode kernel, whose segments are small items; LORAMUX_DECODE_TILES=0
    keeps it on small items): every adapter token listed once, the apply equal to the float64
    oracle; a batch with no count stays on small items."""
    monkeypatch.delenv("LORAMUX_DECODE_TILES", raising=False)
    if tile_tokens != 8:
        monkeypatch.setenv("LORAMUX_DECODE_TILE_TOKENS", str(tile_tokens))
    ad, slots, x, y0, sot = _case(5000 + T + len(ranks), dtype, T, QKV, ranks, num_slots=max(8, len(ranks)))
    adapters = len({s for s in slots if s >= 0})
    small = _core.small_items(T, adapters)
    assert small == (T <= tile_tokens * adapters) and _core.small_items(T, None)
    assert _core.plan_fused(T, 576, 576, 3, ad.table.shape[0], 64, adapters=adapters) is None or small
    seg = kernels.segments(sot, ad.table.shape[0], adapters)
    items, _ = _decode(seg, T, ad.table.shape[0])
    assert max(len(toks) for _, toks in items) <= (8 if small else 64)
    assert sorted(t for _, toks in items for t in toks) == [t for t, s in enumerate(slots) if s >= 0]
    mids, sizes = [w[0] for w in QKV], [w[2] for w in QKV]
    want = oracle_apply(ad, x, y0, slots, 1, mids, sizes)
    for meta in (replace(ad.meta(sot), adapters=adapters, segments=seg), replace(ad.meta(sot), adapters=adapters),
                 ad.meta(sot)):
        y = y0.clone()
        kernels.lora_apply(x, y, meta, 1, mids, sizes)
        torch.cuda.synchronize()
        assert rel_err(y, want, y0) < 2e-2


@pytest.mark.parametrize("T,ranks,dora", [(16, [64, 16, 8], 0), (17, [16] * 8, 0), (32, [16, 64, 8, 33] * 4, 0), (64, [64] * 32, 0),
                                          (48, [16, 0, 33, 64] * 6, 3), (64, [8, 16] * 20, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_batch_of_many_adapters_on_pipelined_small_items(monkeypatch, T, ranks, dora, dtype):
    """LORAMUX_PIPE_SMALL_DECODE=1 (A/B): a decode batch of 16..64 tokens over many adapters (small
    items) takes the pipelined tensor-core kernels instead of the fused decode kernel, with a split
    planned on the host (the pipelined shrink's grid is its ksplit), equal to the float64 oracle
    over q|k|v, mixed and odd ranks, DoRA; in a graph too, replayed with another mix."""
    monkeypatch.setenv("LORAMUX_PIPE_SMALL_DECODE", "1")
    ad, slots, x, y0, sot = _case(7000 + T + len(ranks), dtype, T, QKV, ranks, num_slots=len(ranks),
                                  dora_every=dora, max_rank=64)
    adapters = len({s for s in slots if s >= 0})
    assert _core.small_items(T, adapters) and _core.small_items(T, None)
    num_slots = ad.table.shape[0]
    assert _core.plan_fused(T, 576, 576, 3, num_slots, 64, adapters=adapters) is None
    assert _core.plan_shrink(T, 576, 3, num_slots, max_rank=64, adapters=adapters)[3] == 0  # no device split
    mids, sizes = [w[0] for w in QKV], [w[2] for w in QKV]
    want = oracle_apply(ad, x, y0, slots, 1, mids, sizes)
    y = y0.clone()
    kernels.lora_apply(x, y, replace(ad.meta(sot), adapters=adapters), 1, mids, sizes)
    torch.cuda.synchronize()
    assert rel_err(y, want, y0) < 2e-2
    # a captured graph (no count: T decides, small items) replayed with the slots shuffled
    sot_static = sot.clone()
    y_static = y0.clone()
    meta = ad.meta(sot_static)
    graph = captured(lambda: kernels.lora_apply(x, y_static, meta, 1, mids, sizes))
    order = list(range(T))
    random.Random(T).shuffle(order)
    slots2 = [slots[i] for i in order]
    sot_static.copy_(torch.tensor(slots2, dtype=sot.dtype, device=DEV))
    y_static.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y_static, oracle_apply(ad, x, y0, slots2, 1, mids, sizes), y0) < 2e-2


def test_step_batch_counts_its_adapters_and_a_static_batch_does_not():
    dtype, rows, seq = torch.bfloat16, 2, 100  # prefill: 200 tokens of two adapters, 100 each
    ad, _, _, _, _ = _case(77, dtype, 8, QKV, ranks=[16, 64])
    x = torch.randn(rows * seq, 576, dtype=dtype, device=DEV)
    step = StepBatch(dtype, ad.max_rank)
    step.set([0, 1], ad.table, ad.pool)
    meta = step.meta_for(x)
    assert meta.adapters == 2 and not _core.small_items(rows * seq, 2)
    assert meta.segments.numel() == _core.segments_len(rows * seq, ad.table.shape[0], 2)
    y0 = 0.1 * torch.randn(rows * seq, 960, dtype=dtype, device=DEV)
    y = y0.clone()
    kernels.lora_apply(x, y, meta, 1, [1, 2, 3], [576, 192, 192])
    slots = [0] * seq + [1] * seq
    assert rel_err(y, oracle_apply(ad, x, y0, slots, 1, [1, 2, 3], [576, 192, 192]), y0) < 2e-2
    step.set_static(torch.tensor([0, 1], dtype=torch.int32, device=DEV), ad.table, ad.pool)
    assert step.meta_for(x).adapters is None
