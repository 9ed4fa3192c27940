"""Every launch choice the tuning table (or an A/B environment override) can make gives the
float64 oracle's result: each expand kernel on the paths that allow it, coarse and fine shrink
splits, on mixed ranks, no-adapter rows and DoRA scales; and a table entry reaches the launcher."""

import json

import pytest
import torch

from test_kernels import QKV, _case, _check_apply

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DORA = [(7, 1536, 576), (5, 1536, 576)]
KNOBS = ("LORAMUX_EXPAND_DECODE", "LORAMUX_EXPAND_OPT", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_SHRINK_TARGET_BLOCKS",
         "LORAMUX_TUNING", "LORAMUX_DECODE_FUSED", "LORAMUX_FUSED_EXPAND_BLOCKS", "LORAMUX_FUSED_PDL",
         "LORAMUX_FUSED_BLOCKS_PER_SM", "LORAMUX_FUSED_STAGE_A", "LORAMUX_PREFILL", "LORAMUX_EXPAND_SPAN_TILES",
         "LORAMUX_PIPE_SMALL", "LORAMUX_PIPE_MAX_SPLIT", "LORAMUX_PIPE_USUM", "LORAMUX_DECODE_DEVICE_SPLIT",
         "LORAMUX_PIPE_SPAN_RULE", "LORAMUX_PIPE_MERGE", "LORAMUX_PIPE_FRAGMENTS", "LORAMUX_PIPE_RANK_TILES",
         "LORAMUX_PIPE_SIGNAL")
#: (expand kernel, the token counts whose path allows it)
KINDS = [("fused", [1, 8, 40]), ("flat", [8, 40]), ("o1", [8, 40, 200]), ("o1w", [8, 40, 200]), ("o4", [8, 200]), ("c1", [300]),
         ("c4", [300, 1000]), ("p", [200, 300, 1000]), ("p1", [300]), ("p4", [1000]), ("p6", [1000]), ("p16", [1000])]


def _force(monkeypatch, kind, target):
    for k in KNOBS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LORAMUX_SHRINK_TARGET_BLOCKS", str(target))
    monkeypatch.setenv("LORAMUX_DECODE_FUSED", "1" if kind == "fused" else "0")
    if kind == "fused":
        pass
    elif kind == "flat":
        monkeypatch.setenv("LORAMUX_EXPAND_DECODE", "flat")
    elif kind.startswith("o"):
        monkeypatch.setenv("LORAMUX_EXPAND_DECODE", "grouped")
        monkeypatch.setenv("LORAMUX_EXPAND_OPT", kind[1:])
        monkeypatch.setenv("LORAMUX_PIPE_SMALL", "0")  # the CUDA-core kernels at every rank
    elif kind.startswith("p"):  # the pipelined prefill kernels, the expand's span planned or forced
        monkeypatch.setenv("LORAMUX_PREFILL", "pipe")
        monkeypatch.setenv("LORAMUX_PIPE_SMALL", "1")  # at 200 tokens: over the small items
        if kind[1:]:
            monkeypatch.setenv("LORAMUX_EXPAND_SPAN_TILES", kind[1:])
    else:
        monkeypatch.setenv("LORAMUX_EXPAND_TILE_COLS", kind[1:])


@pytest.mark.parametrize("kind,T", [(k, t) for k, ts in KINDS for t in ts])
@pytest.mark.parametrize("target", [132, 1056])
def test_each_expand_kernel_and_split(monkeypatch, kind, T, target):
    _force(monkeypatch, kind, target)
    # the fused kernel takes ranks up to 64 (a wider max_rank keeps the two-kernel path)
    ranks, max_rank = ([8, 16, 1, 0, 64, 7, 24, 33], 64) if kind == "fused" else ([8, 16, 1, 0, 64, 7, 128, 33], 128)
    ad, slots, x, y0, sot = _case(T + target, torch.bfloat16, T, QKV, ranks=ranks, max_rank=max_rank)
    _check_apply(ad, slots, x, y0, sot, 1, QKV)
    ad, slots, x, y0, sot = _case(3 * T + target, torch.float16, T, DORA, ranks=[16, 8, 4, 32], dora_every=2,
                                  max_rank=64 if kind == "fused" else 128)
    _check_apply(ad, slots, x, y0, sot, 1, DORA)


def test_a_table_entry_reaches_the_launcher(monkeypatch, tmp_path):
    from loramux.ops import kernels, tuning

    for k in KNOBS:
        monkeypatch.delenv(k, raising=False)
    arch = kernels._arch(torch.cuda.current_device())
    T = 40
    entry = dict(arch=arch, hi=576, out_sizes=[w[2] for w in QKV], rank_bucket=128, token_bucket=tuning.token_bucket(T),
                 expand_kernel="o1w", shrink_target_blocks=1056)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    seen = []
    real = kernels._partials

    def spy(x, meta, layer, module_ids, choice, *rest, **kwargs):
        seen.append(choice)
        return real(x, meta, layer, module_ids, choice, *rest, **kwargs)

    monkeypatch.setattr(kernels, "_partials", spy)
    ad, slots, x, y0, sot = _case(5, torch.bfloat16, T, QKV, ranks=[8, 16, 1, 0, 64, 7, 128, 33])
    _check_apply(ad, slots, x, y0, sot, 1, QKV)
    assert seen == [tuning.Choice(1056, "o1w")]


@pytest.mark.parametrize("max_rank", [16, 32])
def test_pipelined_kernels_at_small_max_ranks(monkeypatch, max_rank):
    """The pipelined kernels with the launch's max rank at 16 and 32 (smaller tiles of A, B and u
    than the other tests' 128): mixed, odd and zero ranks, no-adapter rows, DoRA, both dtypes,
    spans of the planned length and of 16 tiles."""
    _force(monkeypatch, "p", 528)
    ad, slots, x, y0, sot = _case(7 + max_rank, torch.bfloat16, 300, QKV, ranks=[8, 16, 1, 0, max_rank, 7, 12, 4],
                                  max_rank=max_rank)
    _check_apply(ad, slots, x, y0, sot, 1, QKV)
    monkeypatch.setenv("LORAMUX_EXPAND_SPAN_TILES", "16")
    ad, slots, x, y0, sot = _case(11 + max_rank, torch.float16, 1000, DORA, ranks=[16, 8, 4, max_rank], dora_every=2,
                                  max_rank=max_rank)
    _check_apply(ad, slots, x, y0, sot, 1, DORA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [300, 2048])
def test_u_sums_match_the_serial_sum_bit_for_bit(monkeypatch, dtype, T):
    """The pipelined shrink's last split sums u 4 ranks at a time with the partials in flight
    (ranks in fours, items of more than 512 u elements), element by element (odd ranks, small
    items; LORAMUX_PIPE_USUM=serial everywhere), or 4 at a time wherever ranks allow
    (LORAMUX_PIPE_USUM=float4): the same additions in the same order, so y is equal bit for bit
    in all three, and matches the oracle. Items here hold 4..64 tokens at ranks 1..128: both sides
    of the 512-element rule."""
    _force(monkeypatch, "p", 1056)
    ad, slots, x, y0, sot = _case(T + 3, dtype, T, QKV, ranks=[8, 16, 1, 0, 64, 7, 128, 33, 4, 32],
                                  num_slots=11)
    y = _check_apply(ad, slots, x, y0, sot, 1, QKV)
    for form in ("serial", "float4"):
        monkeypatch.setenv("LORAMUX_PIPE_USUM", form)
        assert torch.equal(_check_apply(ad, slots, x, y0, sot, 1, QKV), y), form


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [200, 300, 2048])
def test_ldmatrix_fragments_equal_the_lds32_form_bit_for_bit(monkeypatch, dtype, T):
    """The pipelined kernels take their mma fragments by ldmatrix, their copies from addresses set
    once an item and u a float4 at a time (the default), or by 32-bit shared loads with the copy
    indices recomputed a copy (LORAMUX_PIPE_FRAGMENTS=lds32, prefill-5..7): the same fragments
    multiplied in the same order, so y is equal bit for bit, and matches the oracle. Ranks 1..128
    (odd ranks: B copied by plain loads; 128: every rank tile of a warp), no-adapter rows, DoRA
    scales; small items at 200 tokens, 64-token tiles at 300 and 2048."""
    _force(monkeypatch, "p", 1056)
    cases = [(QKV, dict(ranks=[8, 16, 1, 0, 64, 7, 128, 33, 4, 32], num_slots=11)),
             (DORA, dict(ranks=[16, 8, 4, 32, 0, 24], dora_every=2, max_rank=128))]
    for i, (modules, kw) in enumerate(cases):
        ad, slots, x, y0, sot = _case(T + 7 * i, dtype, T, modules, **kw)
        monkeypatch.delenv("LORAMUX_PIPE_FRAGMENTS", raising=False)
        y = _check_apply(ad, slots, x, y0, sot, 1, modules)
        monkeypatch.setenv("LORAMUX_PIPE_FRAGMENTS", "lds32")
        assert torch.equal(_check_apply(ad, slots, x, y0, sot, 1, modules), y), modules


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [200, 300, 2048])
@pytest.mark.parametrize("max_rank,ranks", [(16, [16, 1, 0, 8, 7]), (32, [32, 8, 17, 0]), (48, [48, 16, 33, 5]),
                                            (64, [64, 16, 0, 8, 33, 1, 40])])
def test_fixed_rank_tiles_equal_the_per_item_form_bit_for_bit(monkeypatch, dtype, T, max_rank, ranks):
    """Launches whose max rank pads to 16..64 take the pipelined kernels with their rank tiles
    fixed at compile time (`_w1`..`_w4`): every item runs the launch's tiles, rows past its own rank
    zero-filled, where the per-item form (LORAMUX_PIPE_RANK_TILES=item) runs only its own. The
    stored sums are the same products in the same order plus exact zeros: y equal bit for bit, and
    the oracle's. Mixed, odd (B by plain loads) and zero ranks, no-adapter rows, DoRA scales; small
    items at 200 tokens, 64-token tiles at 300 and 2048."""
    _force(monkeypatch, "p", 1056)
    cases = [(QKV, dict(ranks=ranks, num_slots=len(ranks) + 1, max_rank=max_rank)),
             (DORA, dict(ranks=ranks[::-1], dora_every=2, max_rank=max_rank))]
    for i, (modules, kw) in enumerate(cases):
        ad, slots, x, y0, sot = _case(T + max_rank + 7 * i, dtype, T, modules, **kw)
        monkeypatch.delenv("LORAMUX_PIPE_RANK_TILES", raising=False)
        y = _check_apply(ad, slots, x, y0, sot, 1, modules)
        monkeypatch.setenv("LORAMUX_PIPE_RANK_TILES", "item")
        assert torch.equal(_check_apply(ad, slots, x, y0, sot, 1, modules), y), modules


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,ranks,contiguous", [(200, [64, 16, 0, 8, 33, 1], False), (256, [64, 0], False),
                                                (129, [64, 8, 16], True), (256, [7, 64, 32, 0, 16], True)])
def test_merged_small_items_equal_one_block_an_item_bit_for_bit(monkeypatch, dtype, T, ranks, contiguous):
    """The pipelined kernels over small items (65..256 tokens): a slot's consecutive 8-token items
    merged into one block's 64-token tile (the shrink's under LORAMUX_PIPE_MERGE=shrink, both
    kernels' under =both) give y bit for bit as one block an item (the default), rows being computed on their own in the same order; one adapter with
    every token (groups of 8 items and a short last one), several sharing the batch, odd and zero
    ranks, no-adapter rows, both token orders; and match the oracle."""
    _force(monkeypatch, "p", 528)
    ad, slots, x, y0, sot = _case(T + len(ranks), dtype, T, QKV, ranks=ranks, num_slots=len(ranks) + 1,
                                  contiguous=contiguous)
    y = _check_apply(ad, slots, x, y0, sot, 1, QKV)
    for merge in ("shrink", "both"):  # default: neither merges
        monkeypatch.setenv("LORAMUX_PIPE_MERGE", merge)
        assert torch.equal(_check_apply(ad, slots, x, y0, sot, 1, QKV), y), merge


def test_an_unaligned_x_takes_the_reduce_before_the_pipelined_expand(monkeypatch):
    """x 2 bytes off 16-byte alignment: the pipelined shrink falls back to the register-staged one,
    which leaves the split-K partials unsummed, so lora_apply reduces them into u once and the
    pipelined expand (y aligned) reads u (before: every expand span re-summed the partials)."""
    from loramux.ops import kernels

    for k in KNOBS:
        monkeypatch.delenv(k, raising=False)
    T = 600
    ad, slots, x, y0, sot = _case(5, torch.bfloat16, T, QKV, ranks=[8, 16, 1, 0, 64, 7, 128, 33])
    wide = torch.zeros(T, x.shape[1] + 8, dtype=x.dtype, device=x.device)
    wide[:, 1:1 + x.shape[1]] = x
    xu = wide[:, 1:1 + x.shape[1]]
    assert xu.data_ptr() % 16 != 0 and xu.stride(0) % 8 == 0
    reduces = []
    real = kernels._expand_after

    def spy(batch, y, ids, sizes, plan, partial, u_offset, *rest):
        reduces.append(u_offset is None and bool(plan[2]))  # _expand_after's reduce condition
        return real(batch, y, ids, sizes, plan, partial, u_offset, *rest)

    monkeypatch.setattr(kernels, "_expand_after", spy)
    _check_apply(ad, slots, xu, y0, sot, 1, QKV)
    assert reduces == [True], "the reduce did not run after the shrink's fallback"
    reduces.clear()
    _check_apply(ad, slots, x, y0, sot, 1, QKV)
    assert reduces == []  # aligned: the signalled pair (kernels.lora_apply), u summed by the shrink
    monkeypatch.setenv("LORAMUX_PIPE_SIGNAL", "0")
    _check_apply(ad, slots, x, y0, sot, 1, QKV)
    assert reduces == [False]  # aligned, the grid wait: the pipelined shrink summed u itself


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,ranks,modules,max_rank", [(64, [16], QKV, 16), (40, [64, 0, 8], QKV, 64),
                                                      (300, [8, 16, 1, 0, 64, 7, 33], QKV, 128),
                                                      (2048, [16, 8, 4, 32], DORA, 32), (256, [48], DORA, 48)])
def test_the_expand_waiting_on_each_items_signal_equals_the_grid_wait_bit_for_bit(monkeypatch, dtype, T, ranks, modules,
                                                                                  max_rank):
    """The pipelined pair of one apply: the shrink's last split of an item signals its u in the
    segments' workspace and the expand waits on that (LORAMUX_PIPE_SIGNAL=1; the default past 512
    tokens), or the expand waits on the whole shrink grid (=0): the same sums, y equal bit for bit and the oracle's;
    the workspace is left as the builder made it (the signal wrapped back to zero by the item's
    last expand block), so the next apply over the same segments, and a second one, find it zeroed.
    One adapter's 64 and 256 tokens and two adapters' 40 (64-token tiles, the count known), mixed,
    odd and zero ranks, no-adapter rows, DoRA scales; the fixed rank-tile kernels (max rank 16..64)
    and the per-item one (128)."""
    from dataclasses import replace

    from kernel_fixtures import oracle_apply, rel_err
    from loramux.ops import kernels
    from test_kernels import TOL

    for k in KNOBS:
        monkeypatch.delenv(k, raising=False)
    ad, slots, x, y0, sot = _case(T + len(ranks), dtype, T, modules, ranks=ranks, num_slots=len(ranks) + 1,
                                  dora_every=2 if modules is DORA else 0, none_frac=0.0 if len(ranks) == 1 else 0.2,
                                  max_rank=max_rank)
    used = len({s for s in slots if s >= 0})
    meta = ad.meta(sot)
    meta = replace(meta, adapters=used, segments=kernels.segments(meta.slot_of_token, meta.table.shape[0], used))
    built = meta.segments.clone()
    mids, sizes = [w[0] for w in modules], [w[2] for w in modules]
    unsignalled = []
    real = kernels._expand_after

    def spy(*args):
        unsignalled.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, "_expand_after", spy)
    ys = {}
    for signal in ("1", "0"):  # forced: by default only batches past 512 tokens signal
        monkeypatch.setenv("LORAMUX_PIPE_SIGNAL", signal)
        unsignalled.clear()
        for _ in range(2):
            y = y0.clone()
            kernels.lora_apply(x, y, meta, 1, mids, sizes)
        torch.cuda.synchronize()
        assert len(unsignalled) == (0 if signal == "1" else 2), signal  # the signalled pair ran, or not
        assert torch.equal(meta.segments, built), signal
        ys[signal] = y
    assert torch.equal(ys["1"], ys["0"])
    want = oracle_apply(ad, x, y0, slots, 1, mids, sizes)
    assert rel_err(ys["1"], want, y0) < TOL[dtype]
