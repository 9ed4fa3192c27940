"""The cache against a plain Python model of a two-level LRU (host byte budget; device pages placed
first-fit, lowest free slot, LRU eviction of unpinned adapters): puts, acquires, releases,
prefetches, removes and bad inputs under eviction pressure, with mixed ranks, modules and DoRA."""

import re
from collections import OrderedDict

import numpy as np
import pytest
from cache_helpers import PAGE, SHAPES, SPEC, make_adapter, segment_pages
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import loramux._core as _core
from loramux.cache import LoraCache
from loramux.errors import LoraCacheError, LoraCacheFullError, LoraFormatError, LoraNotCachedError, LoraTaskConflictError

HOST_PAGES, DEVICE_PAGES, MAX_SLOTS = 16, 12, 3
IDS = st.integers(0, 5)
UNKNOWN = 7  # never put


class Pages:
    """First-fit page runs, as a sorted list of [start, length] maximal free runs."""

    def __init__(self, total):
        self.free = [[0, total]]

    def copy(self):
        p = Pages(0)
        p.free = [list(r) for r in self.free]
        return p

    def alloc(self, n):
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = [start + n, length - n]
                return (start, n)
        return None

    def release(self, run):
        self.free.append(list(run))
        self.free.sort()
        merged = []
        for start, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += length
            else:
                merged.append([start, length])
        self.free = merged

    def alloc_all(self, counts):
        runs = []
        for n in counts:
            run = self.alloc(n)
            if run is None:
                for r in runs:
                    self.release(r)
                return None
            runs.append(run)
        return runs


class Model:
    def __init__(self):
        self.host = OrderedDict()  # id -> (key, pages list); last = most recent
        self.device = OrderedDict()  # id -> (slot, runs); last = most recent
        self.pages = Pages(DEVICE_PAGES)
        self.free_slots = set(range(MAX_SLOTS))
        self.pins = {}
        self.batches = {}
        self.counts = dict(hits=0, misses=0, host_evictions=0, device_evictions=0, removals=0)

    def host_used(self):
        return sum(sum(p) for _, p in self.host.values())

    def drop_device(self, tid):
        slot, runs = self.device.pop(tid)
        for r in runs:
            self.pages.release(r)
        self.free_slots.add(slot)

    def put(self, tid, key, pages, replace):
        """Returns the outcome or the expected exception class (and changes nothing then)."""
        need = sum(pages)
        if need > HOST_PAGES or need > DEVICE_PAGES:
            return LoraCacheFullError
        if tid in self.host:
            if self.host[tid][0] == key:
                self.host.move_to_end(tid)
                return "cached"
            if not replace:
                return LoraTaskConflictError
            if tid in self.pins:
                return LoraCacheError
        replacing = tid in self.host
        free = HOST_PAGES - self.host_used() + (sum(self.host[tid][1]) if replacing else 0)
        victims = []
        for vid, (_, vp) in self.host.items():  # least recent first
            if free >= need:
                break
            if vid != tid and vid not in self.pins:
                victims.append(vid)
                free += sum(vp)
        if free < need:
            return LoraCacheFullError
        for vid in victims + ([tid] if replacing else []):
            del self.host[vid]
            if vid in self.device:
                self.drop_device(vid)
        self.counts["host_evictions"] += len(victims)
        self.host[tid] = (key, pages)
        return "replaced" if replacing else "inserted"

    def remove(self, tid):
        """None, or the expected exception class (and nothing changes then)."""
        if tid not in self.host:
            return LoraNotCachedError
        if tid in self.pins:
            return LoraCacheError
        del self.host[tid]
        if tid in self.device:
            self.drop_device(tid)
        self.counts["removals"] += 1
        return None

    def make_resident(self, ids):
        wanted = list(dict.fromkeys(ids))
        for tid in wanted:
            if tid not in self.host:
                return LoraNotCachedError, None
        resident = [t for t in wanted if t in self.device]
        missing = [t for t in wanted if t not in self.device]
        if missing:
            plan = self.plan(missing, wanted) if len(wanted) <= MAX_SLOTS else None
            if plan is None:
                return LoraCacheFullError, min(self.how_many_fit(resident, missing), MAX_SLOTS)
            pages, free_slots, victims, placements = plan
            for v in victims:
                del self.device[v]
            self.pages, self.free_slots = pages, free_slots
            for tid, slot, runs in placements:
                self.device[tid] = (slot, runs)
            self.counts["device_evictions"] += len(victims)
        self.counts["hits"] += len(resident)
        self.counts["misses"] += len(missing)
        for tid in wanted:
            self.device.move_to_end(tid)
            self.host.move_to_end(tid)
        return None, wanted

    def plan(self, missing, wanted):
        pages, free_slots = self.pages.copy(), set(self.free_slots)
        candidates = iter([t for t in self.device if t not in self.pins and t not in wanted])
        victims, placements = [], []
        for tid in missing:
            while True:
                if free_slots:
                    runs = pages.alloc_all(self.host[tid][1])
                    if runs is not None:
                        slot = min(free_slots)
                        free_slots.remove(slot)
                        placements.append((tid, slot, runs))
                        break
                victim = next(candidates, None)
                if victim is None:
                    return None
                vslot, vruns = self.device[victim]
                for r in vruns:
                    pages.release(r)
                free_slots.add(vslot)
                victims.append(victim)
        return pages, free_slots, victims, placements

    def how_many_fit(self, resident, missing):
        pages, free_slots = self.pages.copy(), set(self.free_slots)
        for tid, (slot, runs) in self.device.items():
            if tid not in self.pins and tid not in resident:
                for r in runs:
                    pages.release(r)
                free_slots.add(slot)
        fits = len(resident)
        for tid in missing:
            if not free_slots:
                break
            if pages.alloc_all(self.host[tid][1]) is not None:
                free_slots.remove(min(free_slots))
                fits += 1
        return fits


class CacheMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.cache = LoraCache(SPEC, host_cache_bytes=HOST_PAGES * PAGE, device_cache_bytes=DEVICE_PAGES * PAGE, page_bytes=PAGE, max_slots=MAX_SLOTS)
        self.model = Model()
        self.open = []  # (AcquiredBatch, wanted ids)
        for tid, shape in ((0, 0), (1, 2), (2, 3)):  # a few small adapters so batches start early
            self.put(tid, 0, shape, False)

    @rule(tid=IDS, seed=st.integers(0, 1), shape=st.integers(0, len(SHAPES) - 1), replace=st.booleans())
    def put(self, tid, seed, shape, replace):
        weights, config = make_adapter(seed * 10 + shape, SHAPES[shape])
        want = self.model.put(tid, (seed, shape), segment_pages(SHAPES[shape]), replace)
        event(f"put -> {want if isinstance(want, str) else want.__name__}")
        if isinstance(want, str):
            assert self.cache.put(tid, weights, config, replace=replace) == want
        else:
            with pytest.raises(want):
                self.cache.put(tid, weights, config, replace=replace)

    @rule(tid=IDS, kind=st.sampled_from(["nan", "rank0", "no_experts", "short"]))
    def put_bad(self, tid, kind):
        weights, config = make_adapter(99, SHAPES[1])
        if kind == "nan":
            weights[2, 5] = np.inf
        elif kind == "rank0":
            config[1, 2] = 0
        elif kind == "no_experts":
            config[0, 0] = 13
        else:
            weights = weights[:, :40]
        with pytest.raises(LoraFormatError):
            self.cache.put(tid, weights, config)

    @rule(tid=st.one_of(IDS, st.just(UNKNOWN)))
    def remove(self, tid):
        want = self.model.remove(tid)
        event(f"remove -> {want.__name__ if want else 'ok'}")
        if want is None:
            assert self.cache.remove(tid) is None
        else:
            with pytest.raises(want) as e:
                self.cache.remove(tid)
            assert type(e.value) is want and e.value.task_id == tid and f"task_id {tid}" in str(e.value)

    @rule(ids=st.lists(IDS, min_size=1, max_size=4))
    def acquire(self, ids):
        err, wanted = self.model.make_resident(ids)
        event(f"acquire -> {err.__name__ if err else 'ok'}")
        if err is None:
            batch = self.cache.acquire(ids)
            assert batch.slots == [self.model.device[t][0] for t in ids]
            for t in wanted:
                self.model.pins[t] = self.model.pins.get(t, 0) + 1
            self.open.append((batch, wanted))
        else:
            with pytest.raises(err) as e:
                self.cache.acquire(ids)
            if wanted is not None:
                assert int(re.search(r"only (\d+) fit", str(e.value)).group(1)) == wanted

    @rule(ids=st.lists(IDS, min_size=0, max_size=2), at=st.integers(0, 2))
    def acquire_with_unknown(self, ids, at):
        ids.insert(min(at, len(ids)), UNKNOWN)
        self.acquire(ids)

    @rule(ids=st.lists(IDS, min_size=1, max_size=3))
    def prefetch(self, ids):
        err, _ = self.model.make_resident(ids)
        if err is None:
            self.cache.prefetch(ids)
        else:
            with pytest.raises(err):
                self.cache.prefetch(ids)

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 100))
    def release(self, pick):
        batch, wanted = self.open.pop(pick % len(self.open))
        batch.release()
        for t in wanted:
            self.model.pins[t] -= 1
            if not self.model.pins[t]:
                del self.model.pins[t]
        with pytest.raises(LoraCacheError):
            batch.release()

    @invariant()
    def agrees_with_model(self):
        m, c = self.model, self.cache
        event(f"evictions so far: host {min(m.counts['host_evictions'], 3)}+, device {min(m.counts['device_evictions'], 3)}+")
        assert c.task_ids() == list(reversed(m.host))
        assert c.resident_ids() == list(reversed(m.device))
        assert all(c.slot_of(t) == slot for t, (slot, _) in m.device.items())
        assert c.pinned_ids() == sorted(m.pins)
        s = c.stats()
        assert s["host_bytes"] == m.host_used() * PAGE <= HOST_PAGES * PAGE
        assert s["device_bytes_held"] == sum(n for _, runs in m.device.values() for _, n in runs) * PAGE
        assert s["device_free_runs"] == len(m.pages.free)
        assert {k: s[k] for k in m.counts} == m.counts
        # Host images live in the pool built with the cache; one thread never makes it grow (a put
        # larger than the staging reserve packs in place, moving images together when needed).
        event(f"host compactions so far: {min(s['host_compactions'], 3)}+")
        assert s["host_pool_bytes"] == _core.AdapterCache.host_pool_bytes(HOST_PAGES * PAGE, PAGE) and s["host_pool_grows"] == 0
        assert s["host_spare_bytes"] == s["host_pool_bytes"] - s["host_bytes"]
        c.check_invariants()


CacheMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_cache_matches_two_level_lru_model = CacheMachine.TestCase
