//! Read-only views of the cache: stats, placements, images and the invariant check used by tests.

use crate::cache::adapter_image::ImageLayout;
use crate::cache::id_hash::IdMap;
use crate::cache::slot_table::ENTRY_WORDS;
use crate::cache::stats::CacheStats;
use crate::cache::two_level::TwoLevelCache;

impl TwoLevelCache {
    pub fn stats(&self) -> CacheStats {
        let mut st = self.state.write();
        let (load_bytes_timed, load_seconds) = st.copier.load_timing();
        let (mut pinned, mut pinned_bytes, mut pageable, mut pageable_bytes) = (0, 0, 0, 0);
        for (_, e) in st.host.iter() {
            if e.image.is_pinned() {
                pinned += 1;
                pinned_bytes += e.held_bytes();
            } else {
                pageable += 1;
                pageable_bytes += e.held_bytes();
            }
        }
        let pages = st.device.pages();
        let pool = self.pool.stats();
        CacheStats {
            counters: st.counters.clone(),
            host_adapters: st.host.len() as u64,
            host_bytes: st.host.used_bytes(),
            host_budget_bytes: st.host.budget_bytes(),
            host_pinned_adapters: pinned,
            host_pinned_bytes: pinned_bytes,
            host_pageable_adapters: pageable,
            host_pageable_bytes: pageable_bytes,
            host_spare_bytes: pool.free_bytes,
            host_pool_bytes: pool.bytes,
            host_pool_pinned_bytes: pool.pinned_bytes,
            host_pool_chunks: pool.chunks,
            host_pool_grows: pool.grows,
            host_pool_free_runs: pool.free_runs,
            host_pool_largest_free_run_bytes: pool.largest_free_run_bytes,
            host_pool_alloc_seconds: pool.alloc_seconds,
            device_adapters: st.device.len() as u64,
            device_bytes_used: st.device.used_bytes(),
            device_bytes_held: st.device.held_bytes(),
            device_capacity_bytes: (pages.total_pages() * self.cfg.page_bytes) as u64,
            page_bytes: self.cfg.page_bytes as u64,
            device_free_runs: pages.free_run_count() as u64,
            device_largest_free_run_bytes: (pages.largest_free_run() * self.cfg.page_bytes) as u64,
            slots_used: st.device.len() as u64,
            max_slots: self.cfg.max_slots as u64,
            in_flight_batches: st.batches.len() as u64,
            pinned_by_batches: st.pins.len() as u64,
            load_bytes_timed,
            load_seconds,
        }
    }

    /// The slot an adapter is resident in, if it is (no LRU touch).
    pub fn slot_of(&self, task_id: u64) -> Option<usize> {
        self.state.read().device.get(task_id).map(|r| r.slot)
    }

    /// Device-resident task ids, most recently used first.
    pub fn resident_ids(&self) -> Vec<u64> {
        self.state.read().device.iter().map(|(id, _)| id).collect()
    }

    /// Task ids pinned by in-flight batches.
    pub fn pinned_ids(&self) -> Vec<u64> {
        self.state.read().pins.keys().copied().collect()
    }

    /// A copy of a cached adapter's host image and layout (tests compare pool bytes against it).
    pub fn host_image(&self, task_id: u64) -> Option<(Vec<u8>, ImageLayout)> {
        let st = self.state.read();
        st.host.peek(task_id).map(|e| (e.image.as_slice().to_vec(), e.layout.clone()))
    }

    /// The slot table entry (`slot_table::ENTRY_FIELDS`) the cache last wrote.
    pub fn table_entry(&self, slot: usize, layer: usize, module: usize) -> [i64; ENTRY_WORDS] {
        self.state.read().table.entry(slot, layer, module)
    }

    /// Every structural invariant: budgets, tier inclusion, pins, slots, pages (tests and debug).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let st = self.state.read();
        let host_sum: u64 = st.host.iter().map(|(_, e)| e.held_bytes()).sum();
        if host_sum != st.host.used_bytes() || host_sum > st.host.budget_bytes() {
            return Err(format!("host bytes {host_sum} (recorded {}) vs budget {}", st.host.used_bytes(), st.host.budget_bytes()));
        }
        self.pool.check(st.host.iter().map(|(_, e)| e.image.pages()).sum())?;
        st.device.check(self.cfg.max_slots)?;
        if let Some((id, _)) = st.device.iter().find(|(id, _)| !st.host.contains(*id)) {
            return Err(format!("task {id} is on the device tier but not the host tier"));
        }
        if let Some(id) = st.pins.keys().find(|id| st.device.get(**id).is_none()) {
            return Err(format!("pinned task {id} is not resident"));
        }
        if let Some(id) = st.released_at.keys().find(|id| st.device.get(**id).is_none()) {
            return Err(format!("task {id} keeps release tickets after leaving the device tier"));
        }
        let mut counted: IdMap<u32> = IdMap::default();
        st.batches.values().flatten().for_each(|id| *counted.entry(*id).or_insert(0) += 1);
        if counted != st.pins {
            return Err("pin counts differ from the batches holding them".into());
        }
        Ok(())
    }
}
