"""Tensor/pipeline-parallel LoRA: per-rank slicing (rust/src/tp.rs through loramux.parallel), and the
torch.distributed Llama forward at tp=2/4 and pp=2 against tp=1 (gloo, spawned processes)."""

from __future__ import annotations

import numpy as np
import pytest

import loramux as lm
import loramux.parallel as tp

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
    import ml_dtypes

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
    with pytest.raises(lm.LoraParallelError, match="pipeline stage 0 of 3 over 2 layers"):
        tp.stage_layers(2, 3, 0)
    for size, rank, layers in ((2, -1, None), (-2, 0, None), (1, 0, (-1, 1)), (2.5, 0, None)):
        with pytest.raises(lm.LoraParallelError, match="must be"):  # typed, not OverflowError
            tp.slice_adapter(w, c, SPEC, size, rank, layers)
    with pytest.raises(lm.LoraParallelError, match="tp_size must be"):
        tp.rank_spec(SPEC, -2)


# --- the torch.distributed forward: tp=2/4 and pp give tp=1's logits ------------------------------

import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tp_oracle import oracle_logits, random_adapter, tiny_llama  # noqa: E402

#: (tp_size, pp_size, dtype) layouts every spawned world of 4 runs, in order
LAYOUTS = [(4, 1, "float32"), (2, 2, "float32"), (1, 4, "float32"), (2, 2, "bfloat16")]
#: tolerance against tp=1 in the same dtype, relative to the largest logit (bf16: partial sums are
#: rounded before the all-reduce adds them, tp=1 rounds once)
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
ALL_MODULES = [1, 2, 3, 4, 5, 6, 7]


#: a DoRA adapter of fused rows (attn_qkv on layers 0 and 2, mlp_gate_up on 1 and 3) beside plain ones:
#: every rank keeps the fused rows as the q/k/v and gate/up parts its shard applies
FUSED_ROWS = [(0, 0, 4), (18, 1, 2), (0, 2, 2), (18, 3, 4), (4, 1, 2), (1, 1, 2), (7, 2, 2)]


def _scenario():
    """The model, a mixed batch and its adapters: ranks 2, 4 and 8, DoRA, fused rows, one row without."""
    model = tiny_llama(0)
    adapters = {
        11: random_adapter(model, [(m, l, 2) for m in ALL_MODULES for l in range(4)], dora=False, seed=1),
        12: random_adapter(model, [(m, l, 4) for m in (1, 3, 4, 6) for l in (0, 3)], dora=True, seed=2),
        13: random_adapter(model, [(m, l, 8) for m in (2, 5, 7) for l in (1, 2)], dora=False, seed=3),
        14: random_adapter(model, FUSED_ROWS, dora=True, seed=5),
    }
    input_ids = torch.randint(0, 64, (6, 6), generator=torch.Generator().manual_seed(4))
    task_ids = [11, 12, None, 13, 12, 14]
    return model, adapters, input_ids, task_ids


def _run_layout(tp_size, pp_size, dtype, model_state, adapters, input_ids, task_ids, device):
    from loramux.parallel import TpLlama, init_parallel

    ctx = init_parallel(tp_size, pp_size)
    model = tiny_llama(0)
    model.load_state_dict(model_state)
    shard = TpLlama(model.to(device, getattr(torch, dtype)), ctx, max_rank=8, host_cache_bytes=8 << 20, device_cache_bytes=4 << 20)
    for task_id, (w, c) in adapters.items():
        shard.load(task_id, w, c)
    ids = input_ids.to(device)
    return shard.forward(ids, task_ids), _decode_last(shard, ids, task_ids, model), shard


def _decode_last(shard, ids, task_ids, model):
    """The last position's logits by prefill of all but it, then one decode step over a KV cache."""
    import inspect

    from transformers import DynamicCache

    # the HF decoder's KV-cache argument was renamed past_key_values -> cache in transformers 5.x
    name = "cache" if "cache" in inspect.signature(type(model.model).forward).parameters else "past_key_values"
    kv = {name: DynamicCache(config=model.config), "use_cache": True}
    with shard.batch(task_ids):
        shard.step(ids[:, :-1], **kv)
        last = shard.step(ids[:, -1:], **kv)
    return None if last is None else last[:, -1]


def _worker(rank, world, rdv, out_dir, backend, layouts):
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{rdv}", rank=rank, world_size=world,
                            device_id=device if backend == "nccl" else None)
    model, adapters, input_ids, task_ids = _scenario()
    state = model.state_dict()
    for tp_size, pp_size, dtype in layouts:
        logits, decoded, shard = _run_layout(tp_size, pp_size, dtype, state, adapters, input_ids, task_ids, device)
        tag = f"tp{tp_size}_pp{pp_size}_{dtype}_rank{rank}"
        if logits is not None:
            torch.save(logits.cpu(), os.path.join(out_dir, f"logits_{tag}.pt"))
            torch.save(decoded.cpu(), os.path.join(out_dir, f"decoded_{tag}.pt"))
        torch.save(int(shard.spec.ffn_size), os.path.join(out_dir, f"ffn_{tag}.pt"))
        dist.barrier()
    dist.destroy_process_group()


def _spawn(world: int, out_dir: str, timeout_s: float, backend: str, layouts) -> None:
    args = (world, os.path.join(out_dir, "rdv"), out_dir, backend, layouts)
    ctx = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tensor-parallel workers did not finish in {timeout_s} s")


def _tp1_logits(dtypes=("float32",)):
    """The unsplit forward (tp=1, this process) per dtype; float32 checked against the merged-weights
    oracle."""
    from loramux.parallel import ParallelContext, TpLlama

    model, adapters, input_ids, task_ids = _scenario()
    out = {}
    for dtype in dtypes:
        single = TpLlama(tiny_llama(0).to(getattr(torch, dtype)), ParallelContext(), max_rank=8,
                         host_cache_bytes=8 << 20, device="cpu", device_cache_bytes=4 << 20)
        for task_id, (w, c) in adapters.items():
            single.load(task_id, w, c)
        out[dtype] = single.forward(input_ids, task_ids)
    want = oracle_logits(model, input_ids, adapters, task_ids)
    torch.testing.assert_close(out["float32"], want, rtol=1e-5, atol=1e-5)
    return out


def _check_layouts(out_dir, layouts, tp1, scale_tol=1.0):
    for tp_size, pp_size, dtype in layouts:
        want = tp1[dtype].float()
        tol = TOL[dtype] * scale_tol * (1.0 if dtype == "float32" else want.abs().max().item())
        last_stage = range((pp_size - 1) * tp_size, pp_size * tp_size)
        for rank in range(tp_size * pp_size):
            tag = f"tp{tp_size}_pp{pp_size}_{dtype}_rank{rank}"
            path = out_dir / f"logits_{tag}.pt"
            assert path.exists() == (rank in last_stage), f"only the last stage returns logits ({path.name})"
            if rank in last_stage:
                got = torch.load(path).float()
                torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=tol, msg=lambda m: f"{tag}: {m}")
                decoded = torch.load(out_dir / f"decoded_{tag}.pt").float()
                torch.testing.assert_close(decoded, want[:, -1], rtol=TOL[dtype], atol=tol,
                                           msg=lambda m: f"KV-cache decode, {tag}: {m}")
            # each rank caches against its shard's spec: the FFN width divided by tp
            assert torch.load(out_dir / f"ffn_{tag}.pt") == 64 // tp_size


def test_tp_and_pp_logits_equal_tp1_for_a_mixed_batch(tmp_path):
    tp1 = _tp1_logits(("float32", "bfloat16"))
    _spawn(4, str(tmp_path), timeout_s=150, backend="gloo", layouts=LAYOUTS)
    _check_layouts(tmp_path, LAYOUTS, tp1)


@pytest.mark.gpu
def test_nccl_tp_on_the_visible_gpus_equals_tp1(tmp_path):
    gpus = torch.cuda.device_count()
    world = 4 if gpus >= 4 else 2 if gpus >= 2 else 1
    layouts = [(world, 1, "float32"), (world, 1, "bfloat16")] + ([(world // 2, 2, "float32")] if world > 1 else [])
    tp1 = _tp1_logits(("float32", "bfloat16"))
    _spawn(world, str(tmp_path), timeout_s=300, backend="nccl", layouts=layouts)
    _check_layouts(tmp_path, layouts, tp1, scale_tol=10)  # GPU matmuls and kernels reduce in other orders


def test_parallel_forward_refuses_what_it_cannot_serve():
    from loramux.parallel import ParallelContext, TpLlama

    model = tiny_llama(0)
    with pytest.raises(lm.LoraParallelError, match="num_heads = 8"):  # 8 heads do not split 3 ways
        TpLlama(tiny_llama(0), ParallelContext(tp_size=3), max_rank=8, device="cpu", device_cache_bytes=1 << 20)
    shard = TpLlama(model, ParallelContext(), max_rank=8, host_cache_bytes=8 << 20, device="cpu",
                    device_cache_bytes=4 << 20)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(lm.LoraNotCachedError):
        shard.forward(ids, [None, 7])
    with pytest.raises(ValueError, match="3 task ids for a batch of 2 rows") as err:
        shard.forward(ids, [None, None, None])
    assert not isinstance(err.value, lm.LoraError)
    with torch.no_grad():  # rows without an adapter give the unsharded base model's logits
        base = tiny_llama(0)(ids).logits
    torch.testing.assert_close(shard.forward(ids, [None, None]), base)


# --- served (module, layer) pairs: every rank refuses and splits as an attached model does -------

#: tp=2 x pp=2 as (tp_rank, pp_rank): shards built in this process (loading needs no process group)
RANKS = [(0, 0), (1, 0), (0, 1), (1, 1)]


def _shard(tp_rank, pp_rank):
    from loramux.parallel import ParallelContext, TpLlama

    ctx = ParallelContext(tp_size=2, tp_rank=tp_rank, pp_size=2, pp_rank=pp_rank)
    return TpLlama(tiny_llama(0), ctx, max_rank=8, host_cache_bytes=2 << 20, device="cpu", device_cache_bytes=1 << 20)


def test_every_rank_refuses_a_row_no_layer_applies_and_keeps_its_cache():
    """An mlp_router row on layer 3 (a Llama has no router) is refused by every rank, the first
    stage's too (it never holds layer 3), naming the caller's row; each rank's cache keeps what it
    held. The last stage's cache refuses the row put into it directly as well (its pairs are the
    stage's, renumbered as the slice's rows are)."""
    model = tiny_llama(0)
    good = random_adapter(model, [(1, 0, 2), (6, 3, 2)], dora=False, seed=7)
    spec = lm.models.spec_from_config(model.config, max_rank=8)
    hi, ho = spec.module_dims(lm.modules.MODULE_IDS["mlp_router"])
    router = lm.format.AdapterRow(lm.modules.MODULE_IDS["mlp_router"], 3, np.ones((2, hi), np.float32), np.ones((ho, 2), np.float32))
    bad = lm.format.from_rows([*lm.format.to_rows(*good, spec), router], "float32")
    for tp_rank, pp_rank in reversed(RANKS):  # the stage holding layer 3 first
        shard = _shard(tp_rank, pp_rank)
        if pp_rank == 1:  # the stage's slice holds the router row as its row 1 (layer 3 -> 1)
            sliced = tp.slice_adapter(*bad, spec, 2, tp_rank, shard.layers)
            with pytest.raises(lm.LoraFormatError, match="config row 1: module mlp_router layer 1 is not applied"):
                shard.cache.put(3, sliced.weights, sliced.config)
            assert 3 not in shard.cache
        shard.load(1, *good)
        held = (shard.cache.task_ids(), shard.cache.stats()["host_bytes"], shard.cache._core.host_image(1))
        for task_id in (1, 2):
            with pytest.raises(lm.LoraFormatError, match="config row 2: module mlp_router layer 3 is not applied") as err:
                shard.load(task_id, *bad, replace=True)
            assert err.value.row == 2
        assert (shard.cache.task_ids(), shard.cache.stats()["host_bytes"], shard.cache._core.host_image(1)) == held
        assert 2 not in shard._empty_tasks


def test_each_rank_keeps_fused_rows_as_the_parts_of_its_shard():
    """Slicing an attn_qkv / mlp_gate_up row per rank and then splitting it into parts (what load
    does) caches exactly what splitting first and slicing the parts does: the latter, put under the
    same id, is "cached" on every rank of tp=2 x pp=2. The logits: test_tp_and_pp_logits_equal_tp1_for_a_mixed_batch."""
    from tp_oracle import as_parts

    model = tiny_llama(0)
    spec = lm.models.spec_from_config(model.config, max_rank=8)
    fused = random_adapter(model, FUSED_ROWS, dora=True, seed=5)
    parts = as_parts(model, *fused)
    for tp_rank, pp_rank in RANKS:
        shard = _shard(tp_rank, pp_rank)
        shard.load(1, *fused)
        sliced_parts = tp.slice_adapter(*parts, spec, 2, tp_rank, shard.layers)
        assert shard.cache.put(1, sliced_parts.weights, sliced_parts.config) == "cached"
        held = tp.slice_adapter(*fused, spec, 2, tp_rank, shard.layers).config[:, 0].tolist()
        assert {0, 18} <= set(held)  # the rank's slice did hold both kinds of fused row
