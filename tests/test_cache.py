"""loramux.cache.LoraCache on a host-memory pool: the task_id semantics of the TensorRT-LLM LoRA
documentation, typed errors that change nothing, and pool bytes at the slot table's addresses equal
to the adapter (numpy reference)."""

import os
import time

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from cache_helpers import PAGE, SHAPES, SPEC, make_adapter, pool_view, segment_pages

import loramux
from loramux.cache import LoraCache
from loramux.errors import (
    LoraCacheError,
    LoraCacheFullError,
    LoraCudaError,
    LoraFormatError,
    LoraNotCachedError,
    LoraTaskConflictError,
)


def new_cache(**kw):
    args = dict(host_cache_bytes=1 << 20, device_cache_bytes=1 << 16, page_bytes=PAGE, max_slots=4)
    args.update(kw)
    return LoraCache(SPEC, **args)


def reference_parts(weights, config, dtype):
    """Per row: (module, layer, A, B, scales) cast to the serving dtype, straight from the format."""
    out = []
    for row, (m, layer, r, d) in zip(weights.astype(np.float32), config):
        hi, ho = SPEC.module_dims(m)
        a = row[: r * hi]
        b = row[r * hi : r * hi + ho * r]
        s = row[r * hi + ho * r : r * hi + ho * r + ho] if d else np.zeros(0, np.float32)
        cast = lambda v: torch.from_numpy(v.copy()).to(dtype).reshape(-1).view(torch.uint8).numpy() if v.size else np.zeros(0, np.uint8)  # noqa: E731
        out.append((m, layer, cast(a), cast(b), cast(s)))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pool_bytes_at_table_addresses_equal_the_adapter(dtype):
    cache = new_cache(dtype=dtype)
    adapters = {7: make_adapter(7, SHAPES[1]), 9: make_adapter(9, SHAPES[3]), 11: make_adapter(11, SHAPES[2])}
    for tid, (w, c) in adapters.items():
        assert cache.put(tid, w, c) == "inserted"
    with cache.acquire([7, 9, 7, 11]) as batch:
        assert batch.slots[0] == batch.slots[2] and len(set(batch.slots)) == 3
        table = batch.table
        assert table.shape == (4, SPEC.num_layers, 19, 4) and table.dtype == torch.int64
        for tid, slot in zip(batch.task_ids, batch.slots):
            w, c = adapters[tid]
            present = set()
            for m, layer, a, b, s in reference_parts(w, c, dtype):
                a_addr, b_addr, s_addr, rank = table[slot, layer, m].tolist()
                assert rank == c[(c[:, 0] == m) & (c[:, 1] == layer)][0, 2]
                assert a_addr % 16 == 0 and b_addr % 16 == 0 and s_addr % 16 == 0
                np.testing.assert_array_equal(pool_view(cache, a_addr, a.size), a)
                np.testing.assert_array_equal(pool_view(cache, b_addr, b.size), b)
                if s.size:
                    np.testing.assert_array_equal(pool_view(cache, s_addr, s.size), s)
                else:
                    assert s_addr == 0
                present.add((layer, m))
            absent = [(layer, m) for layer in range(SPEC.num_layers) for m in range(19) if (layer, m) not in present]
            assert all(table[slot, layer, m].tolist() == [0, 0, 0, 0] for layer, m in absent)
    assert batch.released and cache.pinned_ids() == []
    cache.check_invariants()


def test_weights_as_bf16_ml_dtypes_and_torch_tensors_pack_alike():
    w, c = make_adapter(3, SHAPES[0])
    cache = new_cache(dtype=torch.bfloat16)
    cache.put(1, w.astype(ml_dtypes.bfloat16), c)
    cache.put(2, torch.from_numpy(w).to(torch.bfloat16), torch.from_numpy(c))
    assert cache._core.host_image(1)[0] == cache._core.host_image(2)[0]
    # the same values again, as a torch tensor, are the same adapter: a no-op
    assert cache.put(1, torch.from_numpy(w).to(torch.bfloat16), c) == "cached"


def test_task_id_semantics():
    cache = new_cache()
    w, c = make_adapter(1, SHAPES[0])
    w2, _ = make_adapter(2, SHAPES[0])
    assert cache.put(5, w, c) == "inserted"
    assert cache.put(5, w, c) == "cached"  # same weights again: a hit, no error
    padded = np.pad(w, ((0, 0), (0, 5)), constant_values=9.0)
    assert cache.put(5, padded, c) == "cached"  # padding is not part of the adapter
    with pytest.raises(LoraTaskConflictError, match="task_id 5"):
        cache.put(5, w2, c)
    assert 5 in cache and len(cache) == 1 and cache.task_ids() == [5]
    with pytest.raises(LoraNotCachedError, match="task_id 6 is not cached") as e:
        cache.acquire([5, 6])
    assert isinstance(e.value, KeyError) and e.value.task_id == 6
    assert cache.resident_ids() == [] and cache.pinned_ids() == []
    batch = cache.acquire([5])
    with pytest.raises(LoraCacheError, match="held by an in-flight batch") as e:
        cache.put(5, w2, c, replace=True)
    assert e.value.task_id == 5  # every cache error about a task names it (README: errors carry .task_id)
    batch.release()
    with pytest.raises(LoraCacheError, match="not held"):
        batch.release()
    assert cache.put(5, w2, c, replace=True) == "replaced"
    assert cache.resident_ids() == []  # the stale copy left the device tier
    assert cache.stats()["replacements"] == 1


def test_remove_unloads_from_both_tiers_and_refuses_unknown_or_held_ids():
    cache = new_cache()
    adapters = {1: make_adapter(1, SHAPES[1]), 2: make_adapter(2, SHAPES[2])}
    for tid, (w, c) in adapters.items():
        cache.put(tid, w, c)
    with cache.acquire([1, 2]):
        pass
    before = cache.stats()
    held = cache.acquire([1])
    state = lambda: (cache.task_ids(), cache.resident_ids(), cache.pinned_ids(), cache.stats())  # noqa: E731
    unchanged = state()
    with pytest.raises(LoraNotCachedError, match="task_id 9 is not cached") as e:
        cache.remove(9)
    assert e.value.task_id == 9
    with pytest.raises(LoraCacheError, match="task_id 1 is held by an in-flight batch; release it before removing it") as e:
        cache.remove(1)
    assert type(e.value) is LoraCacheError and e.value.task_id == 1
    with pytest.raises(ValueError, match="task_id must be"):
        cache.remove(-1)
    assert state() == unchanged
    held.release()
    assert cache.remove(1) is None
    after = cache.stats()
    freed = sum(segment_pages(SHAPES[1])) * PAGE
    assert 1 not in cache and cache.slot_of(1) is None and cache.task_ids() == [2] and cache.resident_ids() == [2]
    assert after["host_bytes"] == before["host_bytes"] - freed
    assert after["device_bytes_held"] == before["device_bytes_held"] - freed and after["slots_used"] == 1
    assert after["removals"] == 1 and after["host_evictions"] == before["host_evictions"]
    with pytest.raises(LoraNotCachedError):
        cache.acquire([1])
    with pytest.raises(LoraNotCachedError):
        cache.remove(1)
    # Its pages and slot serve the next load; put again, it is a new adapter whose bytes are right.
    w, c = adapters[1]
    assert cache.put(1, w, c) == "inserted"
    with cache.acquire([1]) as batch:
        for m, layer, a, b, s in reference_parts(w, c, torch.float16):
            a_addr, b_addr, _, _ = batch.table[batch.slots[0], layer, m].tolist()
            np.testing.assert_array_equal(pool_view(cache, a_addr, a.size), a)
            np.testing.assert_array_equal(pool_view(cache, b_addr, b.size), b)
    cache.remove(1)
    cache.remove(2)
    s = cache.stats()
    assert len(cache) == 0 and s["host_bytes"] == 0 and s["device_bytes_held"] == 0 and s["slots_used"] == 0
    assert s["device_largest_free_run_bytes"] == s["device_capacity_bytes"]  # no page leaked
    cache.check_invariants()


def test_bad_input_is_typed_and_changes_nothing():
    cache = new_cache()
    w, c = make_adapter(1, SHAPES[0])
    cache.put(1, w, c)
    before = (cache.task_ids(), cache.stats()["host_bytes"])
    bad_w = w.copy()
    bad_w[1, 3] = np.nan
    with pytest.raises(LoraFormatError, match="row 1"):
        cache.put(2, bad_w, c)
    with pytest.raises(LoraFormatError, match="module_id 19"):
        cache.put(2, w, np.array([[19, 0, 1], [1, 1, 1]]))
    with pytest.raises(LoraFormatError, match="not present in this model"):
        cache.put(2, w, np.array([[13, 0, 1], [1, 1, 1]]))  # no experts
    with pytest.raises(LoraFormatError):
        cache.put(2, w.astype(np.float64), c)
    with pytest.raises(ValueError, match="task_id must be"):
        cache.put(-1, w, c)
    with pytest.raises(TypeError, match="task_id must be"):
        cache.acquire(["x"])
    with pytest.raises(ValueError, match="acquired from this cache"):
        cache.release("not a batch")
    assert -1 not in cache and "x" not in cache
    assert (cache.task_ids(), cache.stats()["host_bytes"]) == before
    spare = cache.stats()["host_spare_bytes"]
    with pytest.raises(LoraFormatError, match="row 1"):
        cache.put(2, bad_w, c)
    assert cache.stats()["host_spare_bytes"] == spare  # a rejected put leaves the spare images too
    cache.check_invariants()


PAIRS = [(m, layer) for m in (1, 2, 3, 4, 5, 6, 7, 18) for layer in range(SPEC.num_layers)]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.sampled_from(PAIRS), min_size=1, max_size=5, unique=True),
       served=st.sets(st.sampled_from(PAIRS)), ranks=st.lists(st.integers(1, 8), min_size=5, max_size=5))
def test_rows_the_model_does_not_apply_are_refused_naming_the_first_and_change_nothing(rows, served, ranks):
    """A model without a layer for a module-layer (an mlp_router row on a Llama) would serve the
    adapter without those rows; a cache told what the model applies refuses such an adapter. A
    fused mlp_gate_up row (18) on a layer that applies its parts (5, 7) is served as them, unless
    the adapter gives one of those parts too."""
    served = served | {(m, layer) for m, layer, _, _ in SHAPES[0]}  # the adapter already cached
    cache = new_cache(served=served)
    cache.put(1, *make_adapter(1, SHAPES[0]))
    before = (cache.task_ids(), cache.stats()["host_bytes"], cache._core.host_image(1)[0])
    weights, config = make_adapter(2, [(m, layer, r, 0) for (m, layer), r in zip(rows, ranks)])

    row_of = {pair: i for i, pair in enumerate(rows)}
    refusal = None  # (row, message) of the first row refused, in config order
    for i, (m, layer) in enumerate(rows):
        if (m, layer) in served:
            continue
        if m == 18 and {(5, layer), (7, layer)} <= served:  # served as its parts, unless given beside one
            beside = [row_of[(p, layer)] for p in (5, 7) if (p, layer) in row_of]
            if beside:
                refusal = (i, f"config rows {i} and {beside[0]}: this model applies mlp_gate_up layer {layer} as its parts")
                break
            continue
        refusal = (i, f"config row {i}: module .* layer {layer} is not applied")
        break
    if refusal is None:
        assert cache.put(2, weights, config) == "inserted"
        return
    row, message = refusal
    with pytest.raises(LoraFormatError, match=message) as err:
        cache.put(2, weights, config)
    assert err.value.row == row
    assert (cache.task_ids(), cache.stats()["host_bytes"], cache._core.host_image(1)[0]) == before
    if row > 0:  # a fault the format names in an earlier row is reported first, by the format's check
        config[0, 1] = SPEC.num_layers
        with pytest.raises(LoraFormatError, match="config row 0: layer_idx"):
            cache.put(2, weights, config)
    with pytest.raises(LoraCacheError, match="served pair"):
        new_cache(served=[(19, 0)])


def test_host_pool_is_allocated_with_the_cache_and_puts_only_carve_it():
    # 40 pages of budget + a 10-page staging reserve, allocated (pinned on CUDA) by the constructor
    cache = new_cache(host_cache_bytes=40 * PAGE, device_cache_bytes=64 * PAGE)
    s = cache.stats()
    assert s["host_pool_bytes"] == LoraCache.host_pool_bytes(40 * PAGE, PAGE) == 50 * PAGE
    assert (s["host_pool_chunks"], s["host_spare_bytes"], s["host_pool_grows"], s["host_pool_pinned_bytes"]) == (1, 50 * PAGE, 0, 0)
    assert s["host_pool_alloc_seconds"] > 0
    adapters, rng = {}, np.random.default_rng(0)
    for tid in range(60):  # 2..18-page adapters through a 40-page tier: evictions, holes, puts in place
        adapters[tid] = make_adapter(tid, SHAPES[rng.integers(len(SHAPES))])
        assert cache.put(tid, *adapters[tid]) == "inserted"
        if tid % 2:
            with cache.acquire([tid]):
                pass
    bad_w, bad_c = make_adapter(99, SHAPES[4])  # 18 pages: more than the reserve, packed in place
    bad_w[1, 3] = np.nan
    before = (cache.task_ids(), cache.stats())
    with pytest.raises(LoraFormatError, match="row 1"):
        cache.put(99, bad_w, bad_c)
    assert (cache.task_ids(), cache.stats()) == before  # checked before anything was evicted
    s = cache.stats()
    assert s["host_evictions"] > 0 and s["host_compactions"] > 0
    assert (s["host_pool_grows"], s["host_pool_chunks"], s["host_pool_bytes"]) == (0, 1, 50 * PAGE)
    assert s["host_spare_bytes"] == s["host_pool_bytes"] - s["host_bytes"]
    assert 0.0 <= s["host_fragmentation"] < 1.0
    for tid in cache.task_ids():  # images moved together still hold their adapters
        w, c = adapters[tid]
        data, segs = cache._core.host_image(tid)
        parts = {(m, layer): (a, b) for m, layer, a, b, _ in reference_parts(w, c, torch.float16)}
        for m, layer, _, off, b_off, _ in segs:
            a, b = parts[(m, layer)]
            assert data[off : off + a.size] == a.tobytes() and data[off + b_off : off + b_off + b.size] == b.tobytes()
    cache.check_invariants()


def test_a_host_tier_larger_than_host_memory_is_refused_when_built():
    with pytest.raises(LoraCacheError, match=r"host_cache_bytes 1152921504606846976.*give a smaller host_cache_bytes"):
        new_cache(host_cache_bytes=1 << 60)
    assert LoraCache.host_pool_bytes(1 << 30) == (1 << 30) + (1 << 28)  # a quarter more for staging
    assert LoraCache.host_pool_bytes(64 << 30) == (65 << 30)  # the reserve stops at 1 GiB


def test_values_beyond_the_serving_dtype_are_refused_not_served_as_inf():
    w, c = make_adapter(4, SHAPES[1])
    w[2, 5] = 1e6  # finite in float32; inf once packed into float16
    cache = new_cache(dtype=torch.float16)
    with pytest.raises(LoraFormatError, match="row 2.*float16") as err:
        cache.put(1, w, c)
    assert err.value.row == 2
    assert len(cache) == 0 and cache.stats()["host_bytes"] == 0
    assert new_cache(dtype=torch.float32).put(1, w, c) == "inserted"
    assert new_cache(dtype=torch.bfloat16).put(1, w, c) == "inserted"


def test_adapter_larger_than_a_tier():
    big_w, big_c = make_adapter(1, SHAPES[4])  # 18 pages
    with pytest.raises(LoraCacheFullError, match="device tier"):
        new_cache(device_cache_bytes=16 * PAGE).put(1, big_w, big_c)
    with pytest.raises(LoraCacheFullError, match="host tier"):
        new_cache(host_cache_bytes=17 * PAGE).put(1, big_w, big_c)


def test_batch_that_cannot_fit_names_how_many_fit_and_spares_other_batches():
    cache = new_cache(device_cache_bytes=12 * PAGE, max_slots=8)
    for tid in (1, 2, 3):
        cache.put(tid, *make_adapter(tid, SHAPES[1]))  # 10 pages each
    cache.put(4, *make_adapter(4, SHAPES[0]))  # 2 pages
    held = cache.acquire([1])
    with pytest.raises(LoraCacheFullError, match="only 1 fit"):
        cache.acquire([2, 4, 3])
    assert cache.resident_ids() == [1] and cache.pinned_ids() == [1]
    with cache.acquire([4]) as b:  # fits beside the pinned 1
        assert b.slots != held.slots
    held.release()
    with cache.acquire([2]):
        assert cache.resident_ids() == [2, 4]  # 1 evicted (least recent), 4 kept
    assert cache.stats()["device_evictions"] == 1
    small = new_cache(max_slots=2)
    for tid in (1, 2, 3):
        small.put(tid, *make_adapter(tid, SHAPES[0]))
    with pytest.raises(LoraCacheFullError, match="3 adapters .* only 2 fit"):
        small.acquire([1, 2, 3])


def test_prefetch_and_stats():
    cache = new_cache()
    w, c = make_adapter(1, SHAPES[2])
    cache.put(1, w, c)
    cache.prefetch([1])
    assert cache.resident_ids() == [1] and cache.pinned_ids() == []
    with cache.acquire([1]):
        pass
    s = cache.stats()
    expect_bytes = sum(segment_pages(c.tolist())) * PAGE
    assert (s["hits"], s["misses"], s["loads"], s["load_bytes"]) == (1, 1, 1, expect_bytes)
    assert s["host_bytes"] == s["device_bytes_held"] == expect_bytes
    assert 0 < s["device_bytes_used"] <= s["device_bytes_held"] and 0.0 <= s["fragmentation"] < 1.0
    assert s["host_pageable_adapters"] == 1 and s["host_pinned_adapters"] == 0  # no CUDA pool here
    assert s["load_gbps"] > 0 and s["in_flight_batches"] == 0


def test_ten_thousand_adapters_stream_through_a_small_pool():
    cache = new_cache(host_cache_bytes=64 * PAGE, device_cache_bytes=24 * PAGE, max_slots=4)
    shapes = [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[1]]
    w_c = [make_adapter(i, s) for i, s in enumerate(shapes)]
    for tid in range(10_000):
        w, c = w_c[tid % 4]
        cache.put(tid, w, c)
        with cache.acquire([tid, tid - 1] if tid % 3 == 0 and tid else [tid]):
            pass
    cache.check_invariants()
    s = cache.stats()
    assert s["device_evictions"] > 9_000 and s["host_evictions"] > 9_000
    assert s["device_bytes_held"] == sum(sum(segment_pages(w_c[t % 4][1].tolist())) * PAGE for t in cache.resident_ids())


def test_host_pool_options_and_repr():
    with pytest.raises(ValueError, match="device_cache_fraction"):
        LoraCache(SPEC, device_cache_fraction=1.5)
    with pytest.raises(TypeError, match="device_cache_fraction"):
        LoraCache(SPEC, device_cache_fraction="half")
    with pytest.raises(ValueError, match="not both"):
        LoraCache(SPEC, device_cache_bytes=1 << 16, device_cache_fraction=0.5)
    assert LoraCache(SPEC, host_cache_bytes=1 << 20, device_cache_fraction=0.25).pool.numel() == 1 << 18
    with pytest.raises(ValueError, match="page_bytes"):
        LoraCache(SPEC, host_cache_bytes=1 << 16, page_bytes=100)
    with pytest.raises(ValueError, match="max_slots"):
        LoraCache(SPEC, max_slots=0)
    with pytest.raises(TypeError, match="max_slots"):
        LoraCache(SPEC, max_slots=2.5)
    with pytest.raises(ValueError, match="host_cache_bytes"):
        LoraCache(SPEC, host_cache_bytes=-1)
    with pytest.raises(ValueError, match="dtype"):
        LoraCache(SPEC, dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be"):
        LoraCache(SPEC, device="meta")
    with pytest.raises(LoraCacheError, match="could not allocate"):  # typed, not torch's RuntimeError
        LoraCache(SPEC, device_cache_bytes=1 << 60)
    cache = LoraCache(SPEC, host_cache_bytes=1 << 20, page_bytes=4096)
    assert cache.pool.numel() == 1 << 20 and cache.pool.device.type == "cpu"
    assert "LoraCache(" in repr(cache) and loramux.LoraCache is LoraCache


def test_a_cuda_pool_torch_cannot_reach_is_a_cuda_error():
    """device="cuda" without a GPU (or a CUDA device index past the last GPU) raises LoraCudaError
    saying so, before any allocation, rather than torch's RuntimeError from deep inside it."""
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(LoraCudaError, match="CUDA") as err:
        LoraCache(SPEC, device=missing, device_cache_bytes=1 << 16, page_bytes=PAGE)
    assert missing in str(err.value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_put_in_a_forked_child_after_the_parent_packed():
    # The packing threads exist only in the process that started them: a forked child (a
    # pre-forking server's worker) must pack on threads of its own, not wait on its parent's.
    w, c = make_adapter(5, SHAPES[1])
    new_cache().put(1, w, c)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = new_cache()
            code = 0 if child.put(1, w, c) == "inserted" and child._core.host_image(1) is not None else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("put in a forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
