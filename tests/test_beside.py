"""The LoRA branch beside the base GEMM (ops.lora_apply_beside, Engine.lora_beside_base): the
branch runs on a side stream into a zeroed buffer that cuda/lora_merge.cu merges into the base
output, DoRA rows scaled as in order. The op equals the in-order applies and the float64 oracle
(DoRA rows, overlapping applies, rows without an adapter, a replayed graph over a changed mapping);
the logits equal the in-order path's, eager, graphed, and as a static batch (the serving graphs)."""

from __future__ import annotations

import copy

import pytest
import torch

import loramux as lm
from dora_adapters import ADAPTERS as DORA_ADAPTERS
from dora_adapters import ROWS as DORA_ROWS
from dora_adapters import dora_input_ids
from kernel_fixtures import build_adapters, captured, oracle_apply, rel_err
from peft_models import attach_converted, build, make_inputs

from loramux import ops
from loramux.errors import LoraCudaError, LoraError
from loramux.models.engine import BESIDE_MAX_TOKENS, Engine, beside_setting
from loramux.ops.gemm_carveout import carveout_available, gemm_sm_carveout


def test_beside_off_cuda_is_the_in_order_path(tmp_path):
    # on the CPU (the torch reference) lora_apply_beside runs base() then each apply, in order
    ours, _, names, formats = build("llama", torch.float32, tmp_path)
    other = copy.deepcopy(ours)
    beside = attach_converted(ours, names, formats)
    beside.lora_beside_base = True
    in_order = attach_converted(other, names, formats)
    rows = [1, None, 0, 2]
    inputs = make_inputs(ours, len(rows))
    with torch.no_grad(), beside.batch(rows):
        got = ours(**inputs).logits
    with torch.no_grad(), in_order.batch(rows):
        want = other(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_beside_setting_and_the_auto_bound():
    assert [beside_setting(v) for v in ("auto", "1", "on", "0", "off", "")] == [None, True, True, False, False, False]
    with pytest.raises(LoraError, match="LORAMUX_LORA_BESIDE_BASE='yes'"):
        beside_setting("yes")
    engine = Engine.__new__(Engine)
    engine.lora_beside_base = None
    assert engine.beside_for(BESIDE_MAX_TOKENS) and not engine.beside_for(BESIDE_MAX_TOKENS + 1)
    engine.lora_beside_base = False
    assert not engine.beside_for(1)
    # strings as the variable takes them: "auto" or "0" must not read as a truthy True
    engine.lora_beside_base = "auto"
    assert engine.lora_beside_base is None
    engine.lora_beside_base = "0"
    assert engine.lora_beside_base is False and not engine.beside_for(1)
    with pytest.raises(LoraError, match="lora_beside_base='sometimes'"):
        engine.lora_beside_base = "sometimes"
    with pytest.raises(TypeError, match="lora_beside_base takes True, False, None or 'auto', not 1"):
        engine.lora_beside_base = 1
    assert engine.lora_beside_base is False  # a refused value leaves the setting as it was


def _graph(step, engine):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    # the step's metadata (token segments) is built inside the capture, so a replay re-reads the slots
    engine.step._metas = {}
    engine._drop_sibling_outputs()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [True, False])
def test_beside_matches_in_order_eager_graphed_and_static(tmp_path, fuse):
    ours, _, names, formats = build("llama", torch.bfloat16, tmp_path, "cuda")
    other = copy.deepcopy(ours)
    beside = attach_converted(ours, names, formats, fuse_siblings=fuse)
    beside.lora_beside_base = True
    in_order = attach_converted(other, names, formats, fuse_siblings=fuse)
    in_order.lora_beside_base = False
    rows = [1, None, 0, 1, 2]
    ids = make_inputs(ours, len(rows), seq=1)["input_ids"]
    with torch.no_grad():
        base = ours(input_ids=ids, use_cache=False).logits.float()
        with in_order.batch(rows):
            want = other(input_ids=ids, use_cache=False).logits.float()
        with beside.batch(rows) as slots:
            step = lambda: ours(input_ids=ids, use_cache=False).logits  # noqa: E731
            eager = step().float()
            graph, out = _graph(step, beside)
            graph.replay()
            torch.cuda.synchronize()
            graphed = out.float().clone()
            # a static batch (as the serving graphs run): any adapter mix, DoRA included
            static = torch.tensor(slots, dtype=torch.int32, device="cuda")
            beside.set_static_batch(static, beside.cache.table, beside.cache.pool)
            s_graph, s_out = _graph(step, beside)
            s_graph.replay()
            torch.cuda.synchronize()
            static_graphed = s_out.float().clone()
            static.copy_(torch.tensor(list(reversed(slots)), dtype=torch.int32))  # another mix, same graph
            s_graph.replay()
            torch.cuda.synchronize()
            reversed_graphed = s_out.float().clone()
    scale = want.abs().max().item()
    assert (want - base).abs().max().item() > 1e-2 * scale  # the adapters change the output
    torch.testing.assert_close(eager, want, rtol=0, atol=2e-2 * scale)  # bf16: one more rounding (y + delta)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(static_graphed, want, rtol=0, atol=2e-2 * scale)
    rev_rows = list(reversed(rows))
    with torch.no_grad(), in_order.batch(rev_rows):
        want_rev = other(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(reversed_graphed, want_rev, rtol=0, atol=2e-2 * scale)


@pytest.mark.gpu
def test_beside_with_dora_rows_matches_in_order(dora_setup):
    base, _, converted, _ = dora_setup
    task = {name: i + 1 for i, name in enumerate(DORA_ADAPTERS)}
    rows = [None if n is None else task[n] for n in DORA_ROWS]
    ids = dora_input_ids().to("cuda")
    outs = []
    for beside in (False, True):
        model = copy.deepcopy(base).to(device="cuda", dtype=torch.bfloat16)
        engine = lm.attach(model, max_rank=8, host_cache_bytes=16 << 20, device_cache_bytes=8 << 20)
        engine.lora_beside_base = beside
        for name, (w, c) in converted.items():
            engine.cache.put(task[name], w, c)
        with torch.no_grad(), engine.batch(rows):
            outs.append(model(ids).logits.float())
    scale = outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-2 * scale)


HI, SIZES = 256, [256, 64, 64]  # q|k|v of one projection: module 0 (attn_qkv) or 1, 2, 3 side by side
WIDTH = sum(SIZES)
APPLIES = [([0], [WIDTH]), ([1, 2, 3], SIZES)]


def _op_case(T: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(5 + T)
    specs = {}
    for slot in range(6):
        dora = slot in (1, 3, 4, 5)
        if slot in (0, 1, 4):  # the fused module
            specs[(slot, 0, 0)] = (8, HI, WIDTH, dora)
        if slot in (2, 3, 4, 5):  # q, k, v; slot 4 has both, each DoRA-scaled: the scales multiply
            for mid, ho in zip([1, 2, 3], SIZES):
                specs[(slot, 0, mid)] = (16 if mid == 1 else 4, HI, ho, dora)
    ad = build_adapters(specs, num_slots=8, num_layers=1, max_rank=16, dtype=dtype, device="cuda", gen=gen)
    slots = [int(v) for v in torch.randint(-1, 7, (T,), generator=gen)]  # -1 and 6: no adapter rows
    x = torch.randn(T, HI, generator=gen).to("cuda", dtype)
    w = (torch.randn(WIDTH, HI, generator=gen) / HI ** 0.5).to("cuda", dtype)
    return ad, slots, x, w


def _oracle(ad, x, y0, slots):
    want = y0
    for ids, sizes in APPLIES:
        want = oracle_apply(ad, x, want, slots, 0, ids, sizes)
    return want


@pytest.mark.gpu
@pytest.mark.parametrize("T,dtype", [(1, torch.bfloat16), (7, torch.bfloat16), (64, torch.bfloat16), (300, torch.bfloat16),
                                     (7, torch.float16), (64, torch.float16)])
def test_beside_op_matches_in_order_and_oracle(T, dtype):
    ad, slots, x, w = _op_case(T, dtype)
    sot = torch.tensor(slots, dtype=torch.int32, device="cuda")
    meta = ad.meta(sot)
    y0 = x @ w.T
    base = lambda: y0.clone()  # noqa: E731
    in_order = y0.clone()
    for ids, sizes in APPLIES:
        ops.lora_apply(x, in_order, meta, 0, ids, sizes)
    got = ops.lora_apply_beside(x, base, meta, 0, APPLIES)
    torch.cuda.synchronize()
    want = _oracle(ad, x, y0, slots)
    assert rel_err(in_order, want, y0) < 1e-2
    assert rel_err(got, want, y0) < 1e-2  # one more rounding than in order: delta stored in bf16
    if T >= 64:
        assert 4 in slots  # rows whose two applies' DoRA scales multiply
    plain = [t for t, s in enumerate(slots) if s not in (1, 3, 4, 5)]  # rows no DoRA scale touches
    no_adapter = [t for t, s in enumerate(slots) if s in (-1, 6)]
    assert torch.equal(got[no_adapter], y0[no_adapter])  # f = 1, delta = 0: y exactly as base() left it
    # where no DoRA scale applies the two differ by delta's rounding: within 2 ulps of bf16 at the largest value
    assert (got[plain] - in_order[plain]).abs().max().item() <= 2 * in_order[plain].abs().max().item() * 2 ** -7


@pytest.mark.gpu
@pytest.mark.skipif(not carveout_available(), reason="this torch has no SM carveout")
def test_beside_op_under_the_gemm_carveout(monkeypatch):
    # LORAMUX_BESIDE_SM_CARVEOUT: base() through cuBLASLt on all but 16 SMs, the branch beside it

    ad, slots, x, w = _op_case(64)
    meta = ad.meta(torch.tensor(slots, dtype=torch.int32, device="cuda"))
    with gemm_sm_carveout(16):
        y0 = x @ w.T  # the base as the carved GEMM computes it
    monkeypatch.setenv("LORAMUX_BESIDE_SM_CARVEOUT", "16")
    got = ops.lora_apply_beside(x, lambda: x @ w.T, meta, 0, APPLIES)
    torch.cuda.synchronize()
    assert torch._C._get_sm_carveout_experimental() is None  # restored after base()
    assert rel_err(got, _oracle(ad, x, y0, slots), y0) < 1e-2


@pytest.mark.gpu
def test_beside_op_graph_replays_a_changed_mapping():
    ad, slots, x, w = _op_case(33)
    sot = torch.tensor(slots, dtype=torch.int32, device="cuda")
    meta = ad.meta(sot)  # segments built inside the capture from sot, so a replay re-reads it
    out = {}
    graph = captured(lambda: out.__setitem__("y", ops.lora_apply_beside(x, lambda: x @ w.T, meta, 0, APPLIES)))
    other = list(reversed(slots))
    sot.copy_(torch.tensor(other, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    y0 = x @ w.T
    assert rel_err(out["y"], _oracle(ad, x, y0, other), y0) < 1e-2


@pytest.mark.gpu
def test_beside_op_past_one_merge_runs_in_order():
    ad, slots, x, w = _op_case(16)
    meta = ad.meta(torch.tensor(slots, dtype=torch.int32, device="cuda"))
    y0 = x @ w.T
    applies = APPLIES + [([1, 2, 3], SIZES), ([1, 2], SIZES[:2])]  # 9 slices: more than one merge takes
    in_order = y0.clone()
    for ids, sizes in applies:
        ops.lora_apply(x, in_order, meta, 0, ids, sizes)
    got = ops.lora_apply_beside(x, lambda: y0.clone(), meta, 0, applies)
    assert torch.equal(got, in_order)


@pytest.mark.gpu
def test_beside_op_joins_the_side_stream_when_base_raises():
    ad, slots, x, w = _op_case(8)
    meta = ad.meta(torch.tensor(slots, dtype=torch.int32, device="cuda"))

    def failing_base():
        raise RuntimeError("base GEMM failed")

    with pytest.raises(RuntimeError, match="base GEMM failed"):
        ops.lora_apply_beside(x, failing_base, meta, 0, APPLIES)
    # the same call works afterwards, and a capture is not left waiting on an unjoined stream
    y0 = x @ w.T
    got = ops.lora_apply_beside(x, lambda: y0.clone(), meta, 0, APPLIES)
    torch.cuda.synchronize()
    assert rel_err(got, _oracle(ad, x, y0, slots), y0) < 1e-2


@pytest.mark.gpu
def test_beside_op_refuses_slices_wider_than_the_output():
    ad, slots, x, w = _op_case(4)
    meta = ad.meta(torch.tensor(slots, dtype=torch.int32, device="cuda"))
    calls = []
    with pytest.raises(LoraCudaError, match="do not fit a 384-column output"):
        ops.lora_apply_beside(x, lambda: calls.append(1) or x @ w.T, meta, 0, [([0], [WIDTH]), ([1, 2, 3], [256, 64, 128])])
    assert calls == []  # refused before base() or any launch
