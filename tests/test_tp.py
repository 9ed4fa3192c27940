"""Tensor/pipeline-parallel LoRA: per-rank slicing (rust/src/tp.rs through loramux.tp), and the
torch.distributed Llama forward at tp=2/4 and pp=2 against tp=1 (gloo, spawned processes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import loramux as lm
from loramux import tp

SPEC = lm.ModelSpec(num_layers=4, hidden_size=16, num_heads=8, num_kv_heads=4, ffn_size=24, max_rank=8)  # q 16, kv 8


def _adapter(config, spec=SPEC, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    config = np.asarray(config, dtype=np.int64)
    dims = [spec.module_dims(int(m)) for m in config[:, 0]]
    width = max(int(c[2]) * (hi + ho) + (ho if config.shape[1] == 4 and c[3] else 0) for c, (hi, ho) in zip(config, dims))
    w = rng.standard_normal((len(config), width)).astype(np.float32)
    if config.shape[1] == 4:
        for i, (c, (hi, ho)) in enumerate(zip(config, dims)):
            if c[3]:
                r = int(c[2])
                w[i, r * (hi + ho) : r * (hi + ho) + ho] = rng.uniform(0.5, 1.5, ho)
    return w.astype(dtype), config


def _delta(row, rank, hi, ho):
    a = row[: rank * hi].astype(np.float64).reshape(rank, hi)
    b = row[rank * hi : rank * hi + ho * rank].astype(np.float64).reshape(ho, rank)
    return b @ a


def test_column_and_row_slices_recombine_to_the_full_delta():
    # attn_qkv (fused, q|k|v per rank), attn_dense (row, DoRA), mlp_gate_up (gate|up per rank), down.
    w, c = _adapter([[0, 0, 2, 0], [4, 1, 3, 1], [18, 2, 4, 0], [6, 3, 2, 0]])
    q, kv, f = 16, 8, 24  # SPEC: 8 heads x 2, 4 kv heads x 2, ffn 24
    for tp_size in (2, 4):
        parts = {0: [q, kv, kv], 4: [q], 18: [f, f], 6: [f]}
        slices = [tp.slice_adapter(w, c, SPEC, tp_size, r) for r in range(tp_size)]
        for i, (mid, _, rank, is_dora) in enumerate(c):
            hi, ho = SPEC.module_dims(int(mid))
            full = _delta(w[i], rank, hi, ho)
            if mid in (4, 6):  # row-parallel: concat of the ranks' column blocks is the full delta
                got = np.concatenate([_delta(s.weights[i], rank, hi // tp_size, ho) for s in slices], axis=1)
            else:  # column-parallel: each part of Ho is reassembled from the ranks' blocks
                locals_ = [_delta(s.weights[i], rank, hi, ho // tp_size) for s in slices]
                got, at = [], 0
                for p in parts[int(mid)]:
                    n = p // tp_size
                    got += [loc[at : at + n] for loc in locals_]
                    at += n
                got = np.concatenate(got, axis=0)
            np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
            if is_dora:
                r = int(rank)
                for s in slices:  # row-parallel DoRA scales stay whole on every rank
                    ls = s.weights[i][r * (hi // tp_size) + ho * r :][:ho]
                    np.testing.assert_array_equal(ls, w[i][r * hi + ho * r :][:ho])


def test_shapes_dtypes_and_pipeline_renumbering_are_kept():
    w, c = _adapter([[1, 0, 2], [2, 1, 4], [1, 3, 8]], dtype=ml_dtypes.bfloat16)
    r = tp.slice_adapter(w, c, SPEC, 2, 0, layers=(1, 4))
    assert r.weights.dtype == ml_dtypes.bfloat16 and r.config.shape == (2, 3)
    assert r.config.tolist() == [[2, 0, 4], [1, 2, 8]]
    assert (r.spec.num_layers, r.spec.num_heads, r.spec.num_kv_heads, r.spec.ffn_size) == (3, 4, 2, 12)
    lm.format.validate(r.weights, r.config, r.spec)  # the slice is a valid adapter of the rank's model
    assert tp.rank_spec(SPEC, 4, (0, 2)).num_layers == 2
    assert [tp.stage_layers(5, 2, s) for s in range(2)] == [(0, 3), (3, 5)]


def test_indivisible_sizes_and_bad_layouts_raise_parallel_errors():
    gqa = lm.ModelSpec(num_layers=4, hidden_size=16, num_heads=8, num_kv_heads=2, ffn_size=24, max_rank=8)
    w, c = _adapter([[1, 0, 2], [3, 1, 2]], spec=gqa)
    with pytest.raises(lm.LoraParallelError, match=r"row 1: attn_v has num_kv_heads = 2, which does not divide by tp_size 4") as e:
        tp.slice_adapter(w, c, gqa, 4, 0)
    assert e.value.row == 1
    with pytest.raises(lm.LoraParallelError, match="num_heads = 8"):
        tp.slice_adapter(w, c, SPEC, 3, 0)
    with pytest.raises(lm.LoraParallelError, match="tp_rank 2"):
        tp.slice_adapter(w, c, SPEC, 2, 2)
    with pytest.raises(lm.LoraParallelError, match="pipeline layers"):
        tp.slice_adapter(w, c, SPEC, 1, 0, layers=(2, 9))
    with pytest.raises(lm.LoraFormatError):  # invalid full adapter: named before any slicing
        tp.slice_adapter(w[:, :10], c, SPEC, 2, 0)
