"""Fused rows (attn_qkv, mlp_gate_up, cross_attn_qkv) on a model whose layers are their parts (a
Llama's q_proj, k_proj, v_proj; gate_proj, up_proj): the cache keeps each fused row as its part
rows, sharing its A, each with its block of B's rows and DoRA scales, so the model serves exactly
the fused adapter. A fused row beside a row of its own part is refused; so is one whose parts the
model lacks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from dora_adapters import ADAPTERS, ROWS, dora_input_ids, dora_peft_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_models import ARCHS, make_inputs

import loramux as lm
from loramux.cache import LoraCache
from loramux.errors import LoraFormatError
from loramux.modules import MODULE_IDS

_M = MODULE_IDS
#: fused module -> its parts in output order (TensorRT-LLM's: q | k | v; h_to_4h | gate = HF gate | up)
PARTS = {_M["attn_qkv"]: (_M["attn_q"], _M["attn_k"], _M["attn_v"]),
         _M["mlp_gate_up"]: (_M["mlp_h_to_4h"], _M["mlp_gate"]),
         _M["cross_attn_qkv"]: (_M["cross_attn_q"], _M["cross_attn_k"], _M["cross_attn_v"])}


def split_by_hand(rows, spec, fused_ids=tuple(PARTS)):
    """AdapterRows with each fused row written as its part rows: A shared, B's rows and the scales cut."""
    out = []
    for r in rows:
        if r.module_id not in fused_ids:
            out.append(r)
            continue
        at = 0
        for part in PARTS[r.module_id]:
            ho = spec.module_dims(part)[1]
            scale = None if r.dora_scale is None else r.dora_scale[at : at + ho]
            out.append(lm.format.AdapterRow(part, r.layer, r.a, r.b[at : at + ho], scale))
            at += ho
    return out


def fuse_block_diagonal(rows):
    """AdapterRows with each layer's q, k, v (gate, up) rows, where all are given, merged into one
    attn_qkv (mlp_gate_up) row of their summed rank: A stacked, B block-diagonal, the same delta B A."""
    by_key = {(r.module_id, r.layer): r for r in rows}
    out, merged = [], set()
    for r in rows:
        fused = next((f for f, parts in PARTS.items() if r.module_id in parts), None)
        parts = [by_key.get((p, r.layer)) for p in PARTS.get(fused, ())]
        if (r.module_id, r.layer) in merged:
            continue
        if not parts or None in parts:
            out.append(r)
            continue
        merged.update((p.module_id, p.layer) for p in parts)
        a = np.concatenate([p.a for p in parts])
        b = np.zeros((sum(p.b.shape[0] for p in parts), a.shape[0]), np.float32)
        row = col = 0
        for p in parts:
            b[row : row + p.b.shape[0], col : col + p.b.shape[1]] = p.b
            row, col = row + p.b.shape[0], col + p.b.shape[1]
        scale = None if parts[0].dora_scale is None else np.concatenate([p.dora_scale for p in parts])
        out.append(lm.format.AdapterRow(fused, r.layer, a, b, scale))
    return out


# --- the split, property-based: each part row's delta is its block of the fused row's -----------

@settings(max_examples=40, deadline=None)
@given(fused=st.sampled_from(sorted(PARTS)), heads=st.integers(1, 4), kv_heads=st.integers(1, 4), head_dim=st.integers(1, 6),
       hidden=st.integers(1, 24), ffn=st.integers(1, 24), rank=st.integers(1, 8), dora=st.booleans(), seed=st.integers(0, 2**16))
def test_part_rows_reproduce_the_fused_delta_exactly(fused, heads, kv_heads, head_dim, hidden, ffn, rank, dora, seed):
    spec = lm.ModelSpec(num_layers=2, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                        ffn_size=ffn, encoder_hidden_size=hidden, max_rank=8)
    cache = LoraCache(spec, dtype=torch.float32, host_cache_bytes=1 << 20, device_cache_bytes=1 << 20, page_bytes=256,
                      served=[(p, layer) for p in PARTS[fused] for layer in range(2)])
    rng = np.random.default_rng(seed)
    hi, ho = spec.module_dims(fused)
    a, b = rng.uniform(-1, 1, (rank, hi)).astype(np.float32), rng.uniform(-1, 1, (ho, rank)).astype(np.float32)
    scale = rng.uniform(0.5, 2, ho).astype(np.float32) if dora else None
    assert cache.put(1, *lm.format.from_rows([lm.format.AdapterRow(fused, 1, a, b, scale)], "float32")) == "inserted"
    with cache.acquire([1]) as batch:
        segs = {s["module_id"]: s for s in cache.segments(1, batch.slots[0])}
    assert sorted(segs) == sorted(PARTS[fused]), "the fused row is kept only as its parts"
    at = 0
    for part in PARTS[fused]:
        s, (p_hi, p_ho) = segs[part], spec.module_dims(part)
        p_a = np.frombuffer(s["a"], np.float32).reshape(rank, p_hi)
        p_b = np.frombuffer(s["b"], np.float32).reshape(p_ho, rank)
        assert s["rank"] == rank and np.array_equal(p_a, a), "A is shared, rank unchanged"
        # A whole and B's block of rows: the part's delta is exactly its block of the fused B @ A
        # (compared as stored; products of differently shaped blocks may round apart by an ulp)
        assert np.array_equal(p_b, b[at : at + p_ho])
        if dora:
            assert np.array_equal(np.frombuffer(s["scale"], np.float32), scale[at : at + p_ho])
        else:
            assert s["scale"] == b""
        at += p_ho
    assert at == ho


# --- refused: a fused row beside its own part; a fused row whose parts the model lacks ----------

@pytest.mark.parametrize("fused, part", [("attn_qkv", "attn_v"), ("mlp_gate_up", "mlp_h_to_4h")])
def test_a_fused_row_beside_its_part_is_refused_naming_both_rows_and_changes_nothing(fused, part):
    model = ARCHS["llama"][0]().eval()
    engine = lm.attach(model, max_rank=16, host_cache_bytes=4 << 20, device_cache_bytes=1 << 20)
    spec = lm.models.spec_from_config(model.config)
    rng = np.random.default_rng(0)

    def row(name, layer):
        hi, ho = spec.module_dims(_M[name])
        return lm.format.AdapterRow(_M[name], layer, rng.uniform(-1, 1, (2, hi)).astype(np.float32),
                                    rng.uniform(-1, 1, (ho, 2)).astype(np.float32))

    cached = lm.format.from_rows([row("attn_qkv", 0), row("attn_q", 1)], "float32")
    assert engine.cache.put(1, *cached) == "inserted"
    before = (engine.cache.task_ids(), engine.cache.stats()["host_bytes"], engine.cache._core.host_image(1)[0])
    weights, config = lm.format.from_rows([row("attn_dense", 0), row(part, 1), row(fused, 1)], "float32")
    with pytest.raises(LoraFormatError, match=f"config rows 2 and 1: this model applies {fused} layer 1 as its parts, "
                                              f"and row 1 gives its part {part} too") as err:
        engine.cache.put(2, weights, config)
    assert err.value.row == 2
    assert (engine.cache.task_ids(), engine.cache.stats()["host_bytes"], engine.cache._core.host_image(1)[0]) == before
    assert engine.cache.put(2, weights[[0, 2]], config[[0, 2]]) == "inserted"  # the fused row alone is served
    engine.detach()


def test_a_fused_row_whose_parts_the_model_lacks_is_still_refused():
    """GPT-2's MLP has c_fc (mlp_h_to_4h) and no gate: an mlp_gate_up row cannot be served as parts."""
    model = ARCHS["gpt2"][0]().eval()
    engine = lm.attach(model, max_rank=16, host_cache_bytes=4 << 20, device_cache_bytes=1 << 20)
    spec = lm.models.spec_from_config(model.config)
    hi, ho = spec.module_dims(_M["mlp_gate_up"])
    weights, config = lm.format.from_rows([lm.format.AdapterRow(_M["mlp_gate_up"], 0, np.ones((2, hi), np.float32),
                                                                np.ones((ho, 2), np.float32))], "float32")
    with pytest.raises(LoraFormatError, match="config row 0: module mlp_gate_up layer 0 is not applied"):
        engine.cache.put(1, weights, config)
    assert len(engine.cache) == 0 and engine.cache.stats()["host_bytes"] == 0


# --- end to end on a tiny Llama ------------------------------------------------------------------

def test_fused_adapters_on_a_llama_match_peft_with_dora_and_without(dora_setup):
    """PEFT's adapters (two DoRA, one plain, on all seven projections or some) written with fused
    attn_qkv and mlp_gate_up rows (q|k|v and gate|up merged block-diagonally: the same delta) and put
    into an attached Llama: each row of a mixed batch gets PEFT's logits for its adapter."""
    base, peft_model, converted, _ = dora_setup
    ids = dora_input_ids()
    want = dora_peft_rows(peft_model, ids)
    model = copy.deepcopy(base)
    engine = lm.attach(model, max_rank=32, host_cache_bytes=16 << 20, device_cache_bytes=8 << 20)
    spec = lm.models.spec_from_config(model.config, max_rank=32)
    task = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    fused_somewhere = set()
    for name, (w, c) in converted.items():
        rows = fuse_block_diagonal(lm.format.to_rows(w, c, spec))
        fused_somewhere |= {r.module_id for r in rows} & set(PARTS)
        assert engine.cache.put(task[name], *lm.format.from_rows(rows, "float32")) == "inserted"
    assert fused_somewhere == {_M["attn_qkv"], _M["mlp_gate_up"]}
    with torch.no_grad(), engine.batch([None if n is None else task[n] for n in ROWS]):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    engine.detach()


@pytest.mark.parametrize("fuse_siblings", [True, False])
def test_a_fused_adapter_gives_the_logits_of_its_parts_written_as_rows(fuse_siblings):
    """A fused adapter with one A per fused row (as TensorRT-LLM's fused-qkv Llama engines train
    them) against the same adapter written by hand as attn_q/k/v and mlp_h_to_4h/mlp_gate rows, in one
    batch with a no-adapter row; and against a float64 reference of one layer's fused qkv output."""
    model = ARCHS["llama"][0]().eval()
    spec = lm.models.spec_from_config(model.config, max_rank=16)
    rng = np.random.default_rng(4)

    def row(mid, layer, rank):
        hi, ho = spec.module_dims(mid)
        return lm.format.AdapterRow(mid, layer, rng.uniform(-0.5, 0.5, (rank, hi)).astype(np.float32),
                                    rng.uniform(-0.5, 0.5, (ho, rank)).astype(np.float32))

    fused = [row(_M["attn_qkv"], 0, 4), row(_M["mlp_gate_up"], 0, 3), row(_M["attn_qkv"], 1, 2), row(_M["attn_dense"], 1, 5)]
    inputs = {k: v[:1].repeat(3, 1) for k, v in make_inputs(model, 1).items()}  # one prompt, three times
    with torch.no_grad():
        base_out = model(**inputs).logits[0]
        attn = model.model.layers[0].self_attn
        x = torch.randn(1, 5, spec.hidden_size, generator=torch.Generator().manual_seed(1))
        qkv_base = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1).double()
    engine = lm.attach(model, max_rank=16, host_cache_bytes=4 << 20, device_cache_bytes=1 << 20, page_bytes=4096,
                       fuse_siblings=fuse_siblings)
    assert engine.cache.put(1, *lm.format.from_rows(fused, "float32")) == "inserted"
    assert engine.cache.put(2, *lm.format.from_rows(split_by_hand(fused, spec), "float32")) == "inserted"
    with torch.no_grad():
        with engine.batch([1, 2, None]):
            got = model(**inputs).logits
        with engine.batch([1]):
            qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1).double()
    scale = got.abs().max().item()
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(got[2], base_out, rtol=1e-5, atol=1e-5 * scale)
    assert (got[0] - base_out).abs().max() > 1e-3 * scale, "the adapter must change the output for the test to mean anything"
    a, b = (torch.from_numpy(v).double() for v in (fused[0].a, fused[0].b))
    torch.testing.assert_close(qkv, qkv_base + x.double() @ a.T @ b.T, rtol=1e-5, atol=1e-5)
    engine.detach()
