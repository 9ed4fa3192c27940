"""The fused decode kernel (cuda/lora_fused.cu: shrink and expand of a lora_apply in one launch,
blocks taking roles by ticket, expand blocks waiting on per-item completion counters) against the
float64 oracle and against the two-kernel path it replaces: mixed and odd ranks, rank-0 entries,
no-adapter rows, DoRA scales, several slices, odd widths, fp16 and bf16; rows bit for bit the same
as the two-kernel path at the same split and whatever the token order; its workspace left zeroed
after every launch, so graph replays need no memset."""

import random
from dataclasses import replace

import pytest
import torch

from kernel_fixtures import captured, oracle_apply, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from loramux import _core
    from loramux.ops import kernels

from test_kernels import QKV, TOL, _case  # noqa: E402

DEV = "cuda"
KNOBS = ("LORAMUX_EXPAND_DECODE", "LORAMUX_EXPAND_OPT", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_SHRINK_TARGET_BLOCKS",
         "LORAMUX_TUNING", "LORAMUX_DECODE_FUSED", "LORAMUX_FUSED_EXPAND_BLOCKS", "LORAMUX_FUSED_PDL",
         "LORAMUX_FUSED_BLOCKS_PER_SM", "LORAMUX_FUSED_STAGE_A", "LORAMUX_DECODE_DEVICE_SPLIT", "LORAMUX_FUSED_PAST_DECODE")
#: launch forms of the fused kernel that must give the same rows: the default (a programmatic
#: dependent; the shrink's A in registers, 4 blocks an SM up to rank 32, 3 above), a plain launch,
#: 3 and 5 blocks an SM, the shrink's A staged in shared memory (5 blocks an SM where shared memory
#: lets them reside, fewer where not) and staged at 3 blocks an SM
FORMS = {"default": {}, "plain": {"LORAMUX_FUSED_PDL": 0}, "m3": {"LORAMUX_FUSED_BLOCKS_PER_SM": 3},
         "m5": {"LORAMUX_FUSED_BLOCKS_PER_SM": 5}, "staged": {"LORAMUX_FUSED_STAGE_A": 1},
         "staged-m3": {"LORAMUX_FUSED_STAGE_A": 1, "LORAMUX_FUSED_BLOCKS_PER_SM": 3}}
#: ... and, for the graph replays (another split: not the same bits), the split planned on the host
GRAPH_FORMS = {**FORMS, "host-split": {"LORAMUX_DECODE_DEVICE_SPLIT": 0}}
RANKS = [8, 16, 1, 0, 64, 7, 24, 33]  # <= 64: the fused kernel's ranks
ODD = [(1, 100, 37), (2, 100, 300)]  # widths the 16-byte paths cannot take
DORA = [(7, 1536, 576), (5, 1536, 576)]
WIDE = [(1, 1536, 512), (2, 1536, 256)]  # Hi past one 1024-element chunk


def _env(monkeypatch, **env):
    for k in KNOBS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def _apply(ad, x, y0, sot, widths, meta=None):
    y = y0.clone()
    kernels.lora_apply(x, y, meta or ad.meta(sot), 1, [w[0] for w in widths], [w[2] for w in widths])
    torch.cuda.synchronize()
    return y


def _workspace(segments, T, num_slots):
    """(start, items) of the fused kernel's workspace in a segments buffer: the header, 3 words an
    item, T token words and num_slots count words before it, 2 words a (slice, item) of 8 slices in
    it; a batch cut by its adapter count has one word more after it."""
    m = (segments.numel() - 4 - T - num_slots) // 19
    return 4 + 3 * m + T + num_slots, m


def _check(ad, slots, x, y0, y, widths):
    want = oracle_apply(ad, x, y0, slots, 1, [w[0] for w in widths], [w[2] for w in widths])
    assert torch.isfinite(y).all()
    untouched = [t for t, s in enumerate(slots) if s < 0]
    if untouched:
        assert torch.equal(y[untouched], y0[untouched]), "no-adapter rows changed"
    assert rel_err(y, want, y0) < TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 8, 9, 33, 64])
@pytest.mark.parametrize("widths,target", [(QKV, 528), (ODD, 528), (QKV, 1), (WIDE, 1)],
                         ids=["qkv", "odd", "qkv-3pass", "wide-4and2pass"])
def test_fused_matches_the_oracle_and_the_two_kernel_path_bit_for_bit(monkeypatch, dtype, T, widths, target):
    """Same split (shrink target) on both paths: same partials, same summation order per token. A
    split target of 1 gives chunks of 768 (576 wide: 3 passes of 256) and 1024 + 512 (1536: 4 and 2
    passes); 528 gives 256-element chunks."""
    ad, slots, x, y0, sot = _case(T * 7 + len(widths), dtype, T, widths, ranks=RANKS, max_rank=64)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=target, LORAMUX_DECODE_FUSED=1)
    fused = _apply(ad, x, y0, sot, widths)
    _check(ad, slots, x, y0, fused, widths)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=target, LORAMUX_DECODE_FUSED=0,
         LORAMUX_EXPAND_DECODE="grouped", LORAMUX_EXPAND_OPT="1")
    assert torch.equal(fused, _apply(ad, x, y0, sot, widths))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 9, 33, 64])
@pytest.mark.parametrize("widths,target", [(QKV, 528), (ODD, 528), (QKV, 1), (WIDE, 1)],
                         ids=["qkv", "odd", "qkv-3pass", "wide-4and2pass"])
def test_staged_a_matches_the_two_kernel_path_bit_for_bit(monkeypatch, dtype, T, widths, target):
    """The shrink's A staged in shared memory (cp.async, up to 4 rounds of rank rows in flight):
    the same partials as the register form, so the same rows as the two-kernel path."""
    ad, slots, x, y0, sot = _case(T * 5 + len(widths), dtype, T, widths, ranks=RANKS, max_rank=64)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=target, LORAMUX_DECODE_FUSED=1,
         LORAMUX_FUSED_STAGE_A=1)
    staged = _apply(ad, x, y0, sot, widths)
    _check(ad, slots, x, y0, staged, widths)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=target, LORAMUX_DECODE_FUSED=0,
         LORAMUX_EXPAND_DECODE="grouped", LORAMUX_EXPAND_OPT="1")
    assert torch.equal(staged, _apply(ad, x, y0, sot, widths))


@pytest.mark.parametrize("T", [1, 9, 33, 64])
@pytest.mark.parametrize("widths,target", [(QKV, 528), (WIDE, 1)], ids=["qkv", "wide-4and2pass"])
def test_host_planned_split_matches_the_two_kernel_path_bit_for_bit(monkeypatch, T, widths, target):
    """LORAMUX_DECODE_DEVICE_SPLIT=0 on both paths: the split planned on the host, as before."""
    ad, slots, x, y0, sot = _case(T * 3 + len(widths), torch.bfloat16, T, widths, ranks=RANKS, max_rank=64)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=target, LORAMUX_DECODE_FUSED=1,
         LORAMUX_DECODE_DEVICE_SPLIT=0)
    fused = _apply(ad, x, y0, sot, widths)
    _check(ad, slots, x, y0, fused, widths)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=target, LORAMUX_DECODE_FUSED=0,
         LORAMUX_EXPAND_DECODE="grouped", LORAMUX_EXPAND_OPT="1", LORAMUX_DECODE_DEVICE_SPLIT=0)
    assert torch.equal(fused, _apply(ad, x, y0, sot, widths))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,adapters,num_slots", [(64, 3, 96), (64, 1, 64), (32, 32, 32), (40, 8, 200), (16, 16, 16)],
                         ids=["few-of-many-slots", "one-tenant", "one-token-each", "8-of-200", "16-each"])
@pytest.mark.parametrize("stage_a", [0, 1], ids=["regs", "staged"])
def test_split_sized_from_the_step_item_count(monkeypatch, dtype, T, adapters, num_slots, stage_a):
    """The split and the column steps from the step's real item count (seg[0]): few items over a
    large slot table (the launch laid out for many more: blocks placed again), exactly the most
    items (the decode step: placed right away). Fused, two-kernel grouped and flat expands: bit for
    bit the same rows at the built-in targets' common one (528), and the oracle's. Forced on at 16
    tokens too (the planner's default takes it above 16)."""
    ranks = [16 if i % 3 else 64 for i in range(adapters)] + [0] * (num_slots - adapters)
    ad, slots, x, y0, sot = _case(40 + T + adapters, dtype, T, QKV, ranks=ranks, num_slots=num_slots, none_frac=0.1,
                                  max_rank=64)
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=528, LORAMUX_DECODE_FUSED=1,
         LORAMUX_FUSED_STAGE_A=stage_a, LORAMUX_DECODE_DEVICE_SPLIT=1)
    fused = _apply(ad, x, y0, sot, QKV)
    _check(ad, slots, x, y0, fused, QKV)
    for expand in ("grouped", "flat"):
        _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_SHRINK_TARGET_BLOCKS=528, LORAMUX_DECODE_FUSED=0,
             LORAMUX_EXPAND_DECODE=expand, LORAMUX_EXPAND_OPT="1", LORAMUX_DECODE_DEVICE_SPLIT=1)
        assert torch.equal(fused, _apply(ad, x, y0, sot, QKV)), expand
    # the fused kernel's built-in targets (264 shrink blocks, 396 expand blocks): the oracle's rows
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_DECODE_FUSED=1, LORAMUX_FUSED_STAGE_A=stage_a,
         LORAMUX_DECODE_DEVICE_SPLIT=1)
    _check(ad, slots, x, y0, _apply(ad, x, y0, sot, QKV), QKV)


@pytest.mark.parametrize("stage_a", [0, 1], ids=["regs", "staged"])
@pytest.mark.parametrize("T", [3, 40])
@pytest.mark.parametrize("expand_blocks", [1, 396, 100000])
def test_dora_rows_and_every_column_span(monkeypatch, T, expand_blocks, stage_a):
    """One expand block streaming every column step, the default, and one step a block."""
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_DECODE_FUSED=1, LORAMUX_FUSED_EXPAND_BLOCKS=expand_blocks,
         LORAMUX_FUSED_STAGE_A=stage_a)
    ad, slots, x, y0, sot = _case(11 + T, torch.bfloat16, T, DORA, ranks=[16, 8, 4, 32], dora_every=2, max_rank=32)
    _check(ad, slots, x, y0, _apply(ad, x, y0, sot, DORA), DORA)


@pytest.mark.parametrize("T", [1, 17, 64])
def test_token_order_does_not_change_a_fused_row(monkeypatch, T):
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_DECODE_FUSED=1)
    ad, slots, x, y0, sot = _case(900 + T, torch.bfloat16, T, QKV, ranks=[8, 16, 64, 0, 32], contiguous=True,
                                  max_rank=64)
    y_sorted = _apply(ad, x, y0, sot, QKV)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T)).to(DEV)
    y_perm = _apply(ad, x[perm].contiguous(), y0[perm].contiguous(), sot[perm].contiguous(), QKV)
    assert torch.equal(y_perm, y_sorted[perm])
    _check(ad, slots, x, y0, y_sorted, QKV)


def test_workspace_is_left_zeroed_and_reused_by_every_apply_of_a_step(monkeypatch):
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_DECODE_FUSED=1)
    T = 48
    ad, slots, x, y0, sot = _case(5, torch.bfloat16, T, QKV, ranks=RANKS, max_rank=64)
    num_slots = ad.table.shape[0]
    meta = replace(ad.meta(sot), segments=kernels.segments(sot, num_slots))
    ws, m = _workspace(meta.segments, T, num_slots)
    assert ws + 2 * 8 * m == meta.segments.numel()
    y = y0.clone()
    for _ in range(3):  # each apply reads the counters the previous one left
        kernels.lora_apply(x, y, meta, 1, [1, 2, 3], [576, 192, 192])
        torch.cuda.synchronize()
        assert not meta.segments[ws:].any(), "the fused kernel left its workspace dirty"
    want = y0
    for _ in range(3):
        want = oracle_apply(ad, x, want, slots, 1, [1, 2, 3], [576, 192, 192]).to(x.dtype).to(DEV)
    assert rel_err(y, want.double().cpu(), y0) < 3e-2


@pytest.mark.parametrize("T", [1, 8, 33, 64])
@pytest.mark.parametrize("max_rank", [32, 64])
def test_launch_forms_give_the_same_rows(monkeypatch, T, max_rank):
    """Plain or programmatic-dependent launch, 3 to 6 blocks an SM, A staged or in registers: bit for
    bit the same rows, checked against the oracle."""
    ranks = [r for r in RANKS if r <= max_rank]
    ad, slots, x, y0, sot = _case(300 + T + max_rank, torch.bfloat16, T, QKV, ranks=ranks, max_rank=max_rank)
    rows = {}
    for name, env in FORMS.items():
        _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_DECODE_FUSED=1, **env)
        rows[name] = _apply(ad, x, y0, sot, QKV)
    _check(ad, slots, x, y0, rows["default"], QKV)
    for name, y in rows.items():
        assert torch.equal(y, rows["default"]), name


@pytest.mark.parametrize("form", list(GRAPH_FORMS))
def test_graph_replays_with_new_mappings_need_no_memset(monkeypatch, form):
    """The segments built inside the capture right before the first apply (a programmatic
    dependent of the builder by default), the second apply right after the first; the replays'
    item counts differ (1 to 6 adapters), so the device-sized split differs replay to replay."""
    _env(monkeypatch, LORAMUX_TUNING="off", LORAMUX_DECODE_FUSED=1, **GRAPH_FORMS[form])
    T, widths = 32, [(1, 1024, 1024), (2, 1024, 256)]
    max_rank = 64 if form == "m3" else 32
    ranks = [16, 8, 32, 4, max_rank, 16]
    ad, _, x, y0, sot = _case(17, torch.bfloat16, T, widths, ranks=ranks, num_slots=6, max_rank=max_rank)
    static_sot, static_y = sot.clone(), y0.clone()
    mids, sizes = [1, 2], [1024, 256]

    def step():
        meta = replace(ad.meta(static_sot), segments=kernels.segments(static_sot, ad.table.shape[0]))
        kernels.lora_apply(x, static_y, meta, 1, mids, sizes)
        kernels.lora_apply(x, static_y, meta, 1, mids[:1], sizes[:1])

    g = captured(step)
    rng = random.Random(4)
    for distinct in (1, 6, 3, 6):
        new = [rng.randrange(distinct) if rng.random() > 0.2 else -1 for _ in range(T)]
        static_sot.copy_(torch.tensor(new, dtype=torch.int32))
        static_y.copy_(y0)
        g.replay()
        torch.cuda.synchronize()
        once = oracle_apply(ad, x, y0, new, 1, mids, sizes)
        twice = oracle_apply(ad, x, once.to(x.dtype).to(DEV), new, 1, mids[:1], sizes[:1])
        assert rel_err(static_y, twice, y0) < 3e-2, distinct


@pytest.mark.parametrize("T,adapters", [(65, 30), (128, 50), (256, 100), (300, 120), (512, 180)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank_set", ["r32", "r64-forced"])
def test_small_items_past_decode_take_the_fused_kernel(monkeypatch, T, adapters, dtype, rank_set):
    """A batch of 65..512 tokens whose counted adapters average fewer than 4 tokens (past 256 tokens:
    at most 6; ranks up to 32, above LORAMUX_FUSED_PAST_DECODE=1 forces it) runs on small items of 8
    tokens at most through the fused decode kernel, the planner says so, and its rows are the
    oracle's, mixed and zero ranks and no-adapter rows included; its workspace is left zeroed for the
    next apply of the step."""
    forced = rank_set == "r64-forced"
    _env(monkeypatch, LORAMUX_TUNING="off", **({"LORAMUX_FUSED_PAST_DECODE": 1} if forced else {}))
    pattern, max_rank = ((16, 64, 8, 0, 33), 64) if forced else ((16, 8, 0, 32, 4), 32)
    ranks = [pattern[i % 5] for i in range(adapters)]
    ad, slots, x, y0, sot = _case(T + adapters, dtype, T, QKV, ranks=ranks, num_slots=adapters, none_frac=0.05,
                                  max_rank=max_rank)
    used = len({s for s in slots if s >= 0})
    assert _core.small_items(T, used) and (forced or T < 4 * used or 256 < T <= 6 * used)
    assert _core.plan_fused(T, 576, 576, 3, adapters, max_rank, adapters=used) is not None
    meta = replace(ad.meta(sot), adapters=used, segments=kernels.segments(sot, adapters, used))
    y = _apply(ad, x, y0, sot, QKV, meta)
    _check(ad, slots, x, y0, y, QKV)
    ws, m = _workspace(meta.segments, T, adapters)
    assert m == min(-(-T // 8) + min(T, adapters), T)  # the items the segments hold room for (plan/items.rs max_items)
    assert meta.segments.numel() in (ws + 2 * 8 * m, ws + 2 * 8 * m + 1)
    assert not meta.segments[ws:ws + 2 * 8 * m].any(), "the fused kernel left its workspace dirty"
