"""Many Python threads on one LoraCache (the GIL is released inside): puts, batches, prefetches
under eviction pressure. No deadlock, no pinned adapter moved or changed, invariants hold.
The 8 threads x 100k operations run is the Rust test cache::tests::eight_threads_mixed_operations_keep_invariants."""

import random
import threading

import numpy as np
from cache_helpers import PAGE, SHAPES, SPEC, make_adapter

from loramux.cache import LoraCache
from loramux.errors import LoraCacheFullError, LoraNotCachedError

THREADS, OPS, IDS = 8, 1500, 24


def test_threads_mixed_operations_keep_invariants():
    cache = LoraCache(SPEC, host_cache_bytes=60 * PAGE, device_cache_bytes=30 * PAGE, page_bytes=PAGE, max_slots=8)
    shapes = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[3]]
    adapters = {t: make_adapter(t, shapes[t % 4]) for t in range(IDS)}
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for op in range(OPS):
                tid = rng.randrange(IDS)
                r = rng.random()
                if r < 0.3:
                    try:
                        assert cache.put(tid, *adapters[tid]) in ("inserted", "cached")
                    except LoraCacheFullError:
                        pass  # every host byte pinned by other threads' batches
                elif r < 0.85:
                    ids = [tid, rng.randrange(IDS), tid]
                    try:
                        batch = cache.acquire(ids)
                    except (LoraNotCachedError, LoraCacheFullError):
                        continue
                    with batch:
                        assert batch.slots[0] == batch.slots[2]
                        entry = batch.table[batch.slots[0]].clone()
                        addr = int(entry[entry[..., 3] > 0][0, 0]) - cache.pool.data_ptr()
                        first = cache.pool[addr : addr + 32].clone()
                        assert tid in cache.pinned_ids()
                        assert bool((batch.table[batch.slots[0]] == entry).all()), f"pinned {tid} moved"
                        assert bool((cache.pool[addr : addr + 32] == first).all()), f"pinned {tid} overwritten"
                elif r < 0.95:
                    try:
                        cache.prefetch([tid])
                    except (LoraNotCachedError, LoraCacheFullError):
                        pass
                else:
                    cache.check_invariants()
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker never finished"
    assert not errors, errors[0]
    cache.check_invariants()
    s = cache.stats()
    assert s["in_flight_batches"] == 0 and s["pinned_by_batches"] == 0
    assert s["host_bytes"] <= s["host_budget_bytes"]
    assert s["hits"] > 0 and s["misses"] > 0 and s["evictions"] > 0
    # every adapter still cached is intact: the pool copy of a fresh acquire equals its image
    for tid in cache.task_ids():
        with cache.acquire([tid]) as b:
            for seg in cache.segments(tid, b.slots[0]):
                a_off = seg["entry"][0] - cache.pool.data_ptr()
                assert np.array_equal(cache.pool[a_off : a_off + len(seg["a"])].numpy(), np.frombuffer(seg["a"], np.uint8))
