"""LoraCache with its pool on a CUDA device: loads through pinned memory on a copy stream, the
compute stream ordered after them, device bytes equal to the host image, and a clear error for a
pool larger than the GPU."""

import numpy as np
import pytest
import torch
from cache_helpers import SHAPES, SPEC, make_adapter

import loramux
from loramux.cache import LoraCache
from loramux.errors import LoraCudaError

pytestmark = pytest.mark.gpu  # skipped without CUDA (conftest.py)

# Llama-8B-like projections at rank 16 on 8 layers: about 20 MiB per adapter, so copies take a while
BIG = loramux.ModelSpec(num_layers=8, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_size=14336, max_rank=64)
BIG_ROWS = [(m, layer, 16, 0) for layer in range(8) for m in (1, 2, 3, 4, 5, 6, 7)]


def device_bytes(cache, addr, n):
    off = addr - cache.pool.data_ptr()
    assert 0 <= off and off + n <= cache.pool.numel()
    return cache.pool[off : off + n].cpu().numpy()


def assert_resident_equals_image(cache, tid, slot):
    for seg in cache.segments(tid, slot):
        a_addr, b_addr, s_addr, rank = seg["entry"]
        assert rank == seg["rank"]
        assert np.array_equal(device_bytes(cache, a_addr, len(seg["a"])), np.frombuffer(seg["a"], np.uint8))
        assert np.array_equal(device_bytes(cache, b_addr, len(seg["b"])), np.frombuffer(seg["b"], np.uint8))
        if seg["scale"]:
            assert np.array_equal(device_bytes(cache, s_addr, len(seg["scale"])), np.frombuffer(seg["scale"], np.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_device_bytes_equal_the_host_image(dtype):
    cache = LoraCache(SPEC, dtype=dtype, host_cache_bytes=1 << 22, device="cuda", device_cache_bytes=1 << 20, page_bytes=4096, max_slots=4)
    assert cache.pool.is_cuda and cache.table.is_cuda
    s = cache.stats()  # the whole host pool was pinned by the constructor, before any put
    assert s["host_pool_pinned_bytes"] == s["host_pool_bytes"] == LoraCache.host_pool_bytes(1 << 22, 4096) == 5 << 20
    for tid, shape in enumerate(SHAPES[:4]):
        cache.put(tid, *make_adapter(tid, shape))
    with cache.acquire([0, 1, 3, 1]) as batch:
        torch.cuda.current_stream().synchronize()
        for tid, slot in zip(batch.task_ids, batch.slots):
            assert_resident_equals_image(cache, tid, slot)
    s = cache.stats()
    assert s["host_pinned_adapters"] == 4 and s["host_pageable_adapters"] == 0  # cuMemHostAlloc worked
    assert s["host_pool_grows"] == 0 and s["host_pool_pinned_bytes"] == 5 << 20  # puts carved the pool
    cache.synchronize()
    assert cache.stats()["load_gbps"] > 0
    cache.check_invariants()


def test_compute_stream_waits_for_the_copy_stream():
    """Reads of the pool queued on the compute stream right after acquire see the loaded bytes."""
    cache = LoraCache(BIG, host_cache_bytes=1 << 30, device="cuda", device_cache_bytes=96 << 20, max_slots=8)
    weights, config = make_adapter(5, BIG_ROWS, dtype=np.float16, spec=BIG)
    for tid in range(8):
        cache.put(tid, weights, config)
    for tid in range(8):  # 4 fit at a time: later ones evict and reuse pages
        torch.cuda._sleep(5_000_000)  # keep the compute stream busy so a missing wait would show
        with cache.acquire([tid]) as b:
            snapshot = cache.pool.clone()  # queued on the compute stream right after acquire
            segs = cache.segments(tid, b.slots[0])  # (reads the table: syncs, but after the clone)
        pool = snapshot.cpu().numpy()
        base = cache.pool.data_ptr()
        for seg in segs:
            a, b_ = seg["entry"][0] - base, seg["entry"][1] - base
            assert np.array_equal(pool[a : a + len(seg["a"])], np.frombuffer(seg["a"], np.uint8)), f"adapter {tid} A"
            assert np.array_equal(pool[b_ : b_ + len(seg["b"])], np.frombuffer(seg["b"], np.uint8)), f"adapter {tid} B"
    s = cache.stats()
    assert s["device_evictions"] >= 4 and s["misses"] == 8


def test_loads_never_overwrite_pages_a_released_batch_still_reads():
    """A batch released while its kernels are still queued: the next load that evicts its adapter
    waits for them (release ticket) instead of overwriting the pages they read."""
    cache = LoraCache(BIG, host_cache_bytes=1 << 30, device="cuda", device_cache_bytes=24 << 20, max_slots=2)
    for tid in (0, 1):  # one 20 MiB adapter fits at a time
        cache.put(tid, *make_adapter(tid + 1, BIG_ROWS, dtype=np.float16, spec=BIG))
    with cache.acquire([0]) as b:
        segs = cache.segments(0, b.slots[0])  # syncs: adapter 0 is in place
        torch.cuda._sleep(50_000_000)  # tens of ms of queued "compute" before the read below
        seen = cache.pool.clone()
    with cache.acquire([1]):  # evicts 0 and loads 1 into the same pages
        pass
    pool = seen.cpu().numpy()
    base = cache.pool.data_ptr()
    for seg in segs:
        a = seg["entry"][0] - base
        assert np.array_equal(pool[a : a + len(seg["a"])], np.frombuffer(seg["a"], np.uint8)), "a load overwrote pages in use"
    assert cache.stats()["device_evictions"] == 1


def test_many_adapters_stream_through_a_small_device_pool():
    cache = LoraCache(SPEC, host_cache_bytes=1 << 16, device="cuda", device_cache_bytes=40 * 256, page_bytes=256, max_slots=4)
    made = [make_adapter(i, SHAPES[i % 4]) for i in range(4)]
    for tid in range(500):
        cache.put(tid, *made[tid % 4])
        with cache.acquire([tid]) as b:
            if tid % 50 == 0:
                torch.cuda.current_stream().synchronize()
                assert_resident_equals_image(cache, tid, b.slots[0])
    cache.check_invariants()


def test_pool_larger_than_the_gpu_is_a_clear_error():
    free, total = torch.cuda.mem_get_info()
    with pytest.raises(LoraCudaError, match="free"):
        LoraCache(SPEC, device="cuda", device_cache_bytes=total + (1 << 30))
    with pytest.raises(ValueError, match="device_cache_fraction"):
        LoraCache(SPEC, device="cuda", device_cache_fraction=1.5)
    small = LoraCache(SPEC, device="cuda", device_cache_fraction=0.01, page_bytes=4096)
    assert 0 < small.pool.numel() <= free * 0.01
