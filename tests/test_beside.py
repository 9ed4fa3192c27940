"""The LoRA branch beside the base GEMM (ops.lora_apply_beside, Engine.lora_beside_base): the
logits equal the in-order path's, eager and replayed from a captured CUDA graph, on the path that
runs the whole branch on the side stream (no DoRA in the batch) and on the one that runs only the
shrinks there (DoRA rows, or a static batch whose adapter mix is unknown)."""

from __future__ import annotations

import copy

import pytest
import torch

import loramux as lm
from dora_adapters import ADAPTERS as DORA_ADAPTERS
from dora_adapters import ROWS as DORA_ROWS
from dora_adapters import dora_input_ids
from peft_models import attach_converted, build, make_inputs


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
            assert beside.dora_free(0, [1, 2, 3])  # plain adapters: the whole branch on the side stream
            step = lambda: ours(input_ids=ids, use_cache=False).logits  # noqa: E731
            eager = step().float()
            graph, out = _graph(step, beside)
            graph.replay()
            torch.cuda.synchronize()
            graphed = out.float().clone()
            # a static batch (as the serving graphs run): DoRA unknown, only the shrinks on the side
            static = torch.tensor(slots, dtype=torch.int32, device="cuda")
            beside.set_static_batch(static, beside.cache.table, beside.cache.pool)
            assert not beside.dora_free(0, [1, 2, 3])
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
def test_beside_with_dora_rows_runs_only_the_shrinks_aside(dora_setup):
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
            assert engine.dora_free(0, [1]) is False  # q of layer 0 has DoRA rows
            outs.append(model(ids).logits.float())
    scale = outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-2 * scale)
