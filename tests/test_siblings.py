"""Sibling fusion (models/siblings.py): q|k|v and gate|up take their LoRA from one multi-slice
lora_apply per layer, and the logits equal the per-projection path's and PEFT's (plain, DoRA,
biased, partial targets, no-adapter rows, generate with a KV cache, autograd on)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import loramux as lm
from loramux import ops
from dora_adapters import ADAPTERS as DORA_ADAPTERS
from dora_adapters import ROWS as DORA_ROWS
from dora_adapters import dora_input_ids, dora_peft_rows
from peft_models import attach_converted, build, make_inputs, peft_rows

Q, K, V, O, GATE, DOWN, UP = 1, 2, 3, 4, 5, 6, 7  # HF gate_proj is mlp_h_to_4h (5), up_proj mlp_gate (7)


@pytest.fixture
def applies(monkeypatch):
    """Every apply the models layer asks for, in order (ops.lora_apply) or beside its base GEMM (each
    entry of ops.lora_apply_beside), as (layer, module ids), still computed for real."""
    calls = []
    real, real_beside = ops.lora_apply, ops.lora_apply_beside

    def counting(x, y, meta, layer, module_ids, out_sizes):
        calls.append((layer, tuple(module_ids)))
        real(x, y, meta, layer, module_ids, out_sizes)

    def counting_beside(x, base, meta, layer, applies):
        calls.extend((layer, tuple(ids)) for ids, _ in applies)
        return real_beside(x, base, meta, layer, applies)  # its CPU fallback calls apply.lora_apply, not counted again

    monkeypatch.setattr(ops, "lora_apply", counting)
    monkeypatch.setattr(ops, "lora_apply_beside", counting_beside)
    return calls


def _both_paths(arch, tmp_path, row_of):
    """(fused engine + model, unfused engine + model, PeftModel, names) over one random model."""
    ours, peft_model, names, formats = build(arch, torch.float32, tmp_path)
    other = copy.deepcopy(ours)
    fused = attach_converted(ours, names, formats)
    unfused = attach_converted(other, names, formats, fuse_siblings=False)
    rows = [None if n is None else names.index(n) for n in row_of(names)]
    return (fused, ours), (unfused, other), peft_model, rows, row_of(names)


def _logits(engine, model, rows, inputs, calls):
    start = len(calls)
    with torch.no_grad(), engine.batch(rows):
        logits = model(**inputs).logits
    return logits, Counter(calls[start:])


def test_llama_fuses_qkv_and_gate_up_and_matches_unfused_and_peft(applies, tmp_path):
    # a0: q, v (r 4); a1: all 7 (r 8, rsLoRA); a2: down of layer 1 only; a None row
    (fused, ours), (unfused, other), peft_model, rows, names = _both_paths(
        "llama", tmp_path, lambda n: [n[0], None, n[1], n[2], n[0]])
    inputs = make_inputs(ours, len(rows))
    got, fused_calls = _logits(fused, ours, rows, inputs, applies)
    plain, unfused_calls = _logits(unfused, other, rows, inputs, applies)
    layers = ours.config.num_hidden_layers
    assert fused_calls == Counter({(l, ids): 1 for l in range(layers) for ids in [(Q, K, V), (O,), (GATE, UP), (DOWN,)]})
    assert unfused_calls == Counter({(l, (m,)): 1 for l in range(layers) for m in (Q, K, V, O, GATE, UP, DOWN)})
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6 * plain.abs().max().item())
    with torch.no_grad():
        want = peft_rows(peft_model, names, lambda m: m(**inputs).logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_generate_with_kv_cache_fuses_every_step_and_matches_peft(applies, tmp_path):
    (fused, ours), (unfused, other), peft_model, rows, names = _both_paths(
        "llama", tmp_path, lambda n: [n[1], None, n[0], n[1]])
    ids = make_inputs(ours, len(rows))["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with fused.batch(rows):
            got = ours.generate(input_ids=ids, **kw)
        steps = [c for c in applies if c[1] == (Q, K, V)]
        with unfused.batch(rows):
            plain = other.generate(input_ids=ids, **kw)
        want = peft_rows(peft_model, names, lambda m: m.generate(input_ids=ids, **kw))
    assert len(steps) == 4 * ours.config.num_hidden_layers  # prefill + 3 decode steps, each layer fused
    assert torch.equal(got, plain) and torch.equal(got, want)


def test_one_used_sibling_keeps_the_per_projection_path(applies, tmp_path):
    # mistral's adapter targets v, gate and down: q|k|v and gate|up each have one used slice
    (fused, ours), (_, other), peft_model, rows, names = _both_paths("mistral", tmp_path, lambda n: [n[0], None])
    inputs = make_inputs(ours, len(rows))
    got, calls = _logits(fused, ours, rows, inputs, applies)
    assert {ids for _, ids in calls} == {(V,), (GATE,), (DOWN,)}
    with torch.no_grad():
        want = peft_rows(peft_model, names, lambda m: m(**inputs).logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("arch, fused_ids", [("qwen2", {(Q, K, V)}), ("qwen2_moe", {(GATE, UP)}), ("bart", {(Q, K, V), (10, 11)})])
def test_other_architectures_fuse_and_match_peft(applies, tmp_path, arch, fused_ids):
    (fused, ours), (unfused, other), peft_model, rows, names = _both_paths(
        arch, tmp_path, lambda n: [n[0], None, *n[1:]])
    inputs = make_inputs(ours, len(rows))
    got, calls = _logits(fused, ours, rows, inputs, applies)
    plain, _ = _logits(unfused, other, rows, inputs, applies)
    assert fused_ids <= {ids for _, ids in calls}
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6 * plain.abs().max().item())
    with torch.no_grad():
        want = peft_rows(peft_model, names, lambda m: m(**inputs).logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dora_rows_fused_match_unfused_and_peft(applies, dora_setup):
    base, peft_model, converted, _ = dora_setup
    ids = dora_input_ids()
    task = {name: i + 1 for i, name in enumerate(DORA_ADAPTERS)}
    rows = [None if n is None else task[n] for n in DORA_ROWS]
    outs = {}
    for fuse in (True, False):
        model = copy.deepcopy(base)  # biases on every projection: added after each slice's DoRA scale
        engine = lm.attach(model, max_rank=8, host_cache_bytes=16 << 20, device_cache_bytes=8 << 20, fuse_siblings=fuse)
        for name, (w, c) in converted.items():
            engine.cache.put(task[name], w, c)
        outs[fuse], calls = _logits(engine, model, rows, dict(input_ids=ids), applies)
        assert ((0, (Q, K, V)) in calls) == fuse
    want = dora_peft_rows(peft_model, ids)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-6, atol=1e-6 * want.abs().max().item())
    torch.testing.assert_close(outs[True], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_inference_mode_fuses_and_matches_no_grad(applies, tmp_path):
    (fused, ours), _, _, rows, _ = _both_paths("llama", tmp_path, lambda n: [n[1], None])
    inputs = make_inputs(ours, len(rows))
    with torch.inference_mode(), fused.batch(rows):  # inference tensors keep no version counter
        got = ours(**inputs).logits
    want, calls = _logits(fused, ours, rows, inputs, applies)
    assert (0, (Q, K, V)) in calls and torch.equal(got, want)


def test_autograd_path_gives_the_same_logits_and_gradients_flow(tmp_path):
    (fused, ours), (unfused, other), _, rows, _ = _both_paths("llama", tmp_path, lambda n: [n[1], n[0]])
    inputs = make_inputs(ours, len(rows))
    with fused.batch(rows):
        tracked = ours(**inputs).logits  # grad on: the siblings' base outputs are concatenated
    with torch.no_grad(), fused.batch(rows):
        untracked = ours(**inputs).logits  # no grad: written in place into one buffer
    assert tracked.requires_grad
    tracked.sum().backward()
    assert ours.model.layers[0].self_attn.k_proj.base.weight.grad is not None
    torch.testing.assert_close(tracked.detach(), untracked, rtol=1e-6, atol=1e-6 * untracked.abs().max().item())


def test_a_sibling_called_with_another_input_falls_back(tmp_path):
    (fused, ours), (unfused, other), _, rows, _ = _both_paths("llama", tmp_path, lambda n: [n[1], n[0]])
    gen = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(len(rows), 3, ours.config.hidden_size, generator=gen) for _ in range(2))
    attn, attn_ref = ours.model.layers[0].self_attn, other.model.layers[0].self_attn
    group = attn.q_proj.sibling
    with torch.no_grad(), fused.batch(rows), unfused.batch(rows):
        q = attn.q_proj(x1)
        k = attn.k_proj(x2)  # not q's input: its own path, and the group stops fusing
        v = attn.v_proj(x1)
        assert not group.fusable
        for got, proj, x in ((q, "q_proj", x1), (k, "k_proj", x2), (v, "v_proj", x1)):
            want = getattr(attn_ref, proj)(x)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_outputs_not_taken_are_dropped_with_the_batch(tmp_path):
    (fused, ours), _, _, rows, _ = _both_paths("llama", tmp_path, lambda n: [n[1]])
    x = torch.randn(1, 2, ours.config.hidden_size)
    group = ours.model.layers[0].mlp.gate_proj.sibling
    with torch.no_grad(), fused.batch(rows):
        ours.model.layers[0].mlp.gate_proj(x)
        assert group.shared._pending is not None  # up_proj's slice waits
    assert group.shared._pending is None and group.fusable


@pytest.mark.gpu
def test_fused_siblings_on_cuda_match_unfused_and_replay_in_a_cuda_graph(applies, tmp_path):
    ours, _, names, formats = build("llama", torch.bfloat16, tmp_path, "cuda")
    other = copy.deepcopy(ours)
    fused = attach_converted(ours, names, formats)
    unfused = attach_converted(other, names, formats, fuse_siblings=False)
    rows = [1, None, 0, 1, 2]
    ids = make_inputs(ours, len(rows), seq=1)["input_ids"]  # a decode-shaped step: one token a row
    with torch.no_grad():
        base = ours(input_ids=ids, use_cache=False).logits.float()
        with fused.batch(rows):
            step = lambda: ours(input_ids=ids, use_cache=False).logits  # noqa: E731
            eager = step().float()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            graph.replay()
            torch.cuda.synchronize()
            graphed = out.float()
        with unfused.batch(rows):
            plain = other(input_ids=ids, use_cache=False).logits.float()
    assert (0, (Q, K, V)) in applies and (0, (GATE, UP)) in applies
    scale = plain.abs().max().item()
    lora_term = (plain - base).abs().max().item()
    assert lora_term > 1e-2 * scale  # the adapters change the output
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(eager, plain, rtol=0, atol=2e-2 * scale)  # bf16: summation order only
