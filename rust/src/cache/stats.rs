//! What the cache reports: event counters kept under its lock, and a snapshot joining them with
//! the tiers' occupancy (bytes used vs held, pinned vs pageable) and the measured load rate.

/// Event counts since the cache was built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// put() calls that stored a new adapter.
    pub puts: u64,
    /// put() of a task already cached with the same weights (a no-op).
    pub put_hits: u64,
    /// put(replace=True) that swapped an adapter's weights.
    pub replacements: u64,
    /// remove() calls that dropped an adapter from both tiers.
    pub removals: u64,
    /// Adapters an acquire/prefetch found already on the device tier.
    pub hits: u64,
    /// Adapters an acquire/prefetch had to load into the device tier.
    pub misses: u64,
    pub host_evictions: u64,
    pub device_evictions: u64,
    /// Puts that found the host pool's free space split into holes too small and moved the
    /// cached images together.
    pub host_compactions: u64,
    /// Load batches issued and the bytes they moved (issued, whether or not timed yet).
    pub loads: u64,
    pub load_bytes_issued: u64,
}

/// A point-in-time view of the whole cache.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheStats {
    pub counters: Counters,
    pub host_adapters: u64,
    pub host_bytes: u64,
    pub host_budget_bytes: u64,
    pub host_pinned_adapters: u64,
    pub host_pinned_bytes: u64,
    pub host_pageable_adapters: u64,
    pub host_pageable_bytes: u64,
    /// Host pool bytes no cached adapter holds: room for the next puts without allocating.
    pub host_spare_bytes: u64,
    /// Host memory the pool holds (pinned for a CUDA pool): the budget plus a staging reserve,
    /// allocated when the cache was built, plus any chunks grown since.
    pub host_pool_bytes: u64,
    pub host_pool_pinned_bytes: u64,
    pub host_pool_chunks: u64,
    /// Chunks allocated after construction: a put found no free run its image fits.
    pub host_pool_grows: u64,
    pub host_pool_free_runs: u64,
    pub host_pool_largest_free_run_bytes: u64,
    /// Seconds spent allocating (pinning, or pre-faulting) pool memory, construction included.
    pub host_pool_alloc_seconds: f64,
    pub device_adapters: u64,
    /// Bytes adapters' segments really use on the device tier.
    pub device_bytes_used: u64,
    /// Bytes of the pages they hold (used + the unused tail of each segment's last page).
    pub device_bytes_held: u64,
    pub device_capacity_bytes: u64,
    pub page_bytes: u64,
    pub device_free_runs: u64,
    pub device_largest_free_run_bytes: u64,
    pub slots_used: u64,
    pub max_slots: u64,
    pub in_flight_batches: u64,
    pub pinned_by_batches: u64,
    /// Loads whose completion was observed, and how long they took on the copy stream.
    pub load_bytes_timed: u64,
    pub load_seconds: f64,
}

/// A stats value as Python receives it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StatValue {
    Count(u64),
    Ratio(f64),
}

impl CacheStats {
    /// Measured host->device load rate, GB/s (1e9 bytes); 0 before any timed load.
    pub fn load_gbps(&self) -> f64 {
        if self.load_seconds > 0.0 { self.load_bytes_timed as f64 / self.load_seconds / 1e9 } else { 0.0 }
    }

    /// Internal fragmentation of the device tier: share of held page bytes no segment uses.
    pub fn fragmentation(&self) -> f64 {
        if self.device_bytes_held == 0 { 0.0 } else { 1.0 - self.device_bytes_used as f64 / self.device_bytes_held as f64 }
    }

    /// External fragmentation of the host pool: share of its free bytes outside the largest free run.
    pub fn host_fragmentation(&self) -> f64 {
        if self.host_spare_bytes == 0 { 0.0 } else { 1.0 - self.host_pool_largest_free_run_bytes as f64 / self.host_spare_bytes as f64 }
    }

    pub fn hit_rate(&self) -> f64 {
        let total = self.counters.hits + self.counters.misses;
        if total == 0 { 0.0 } else { self.counters.hits as f64 / total as f64 }
    }

    /// Every figure by name, for the Python dict.
    pub fn fields(&self) -> Vec<(&'static str, StatValue)> {
        use StatValue::{Count as C, Ratio as R};
        let c = &self.counters;
        vec![
            ("puts", C(c.puts)),
            ("put_hits", C(c.put_hits)),
            ("replacements", C(c.replacements)),
            ("removals", C(c.removals)),
            ("hits", C(c.hits)),
            ("misses", C(c.misses)),
            ("hit_rate", R(self.hit_rate())),
            ("host_evictions", C(c.host_evictions)),
            ("device_evictions", C(c.device_evictions)),
            ("evictions", C(c.host_evictions + c.device_evictions)),
            ("host_adapters", C(self.host_adapters)),
            ("host_bytes", C(self.host_bytes)),
            ("host_budget_bytes", C(self.host_budget_bytes)),
            ("host_pinned_adapters", C(self.host_pinned_adapters)),
            ("host_pinned_bytes", C(self.host_pinned_bytes)),
            ("host_pageable_adapters", C(self.host_pageable_adapters)),
            ("host_pageable_bytes", C(self.host_pageable_bytes)),
            ("host_spare_bytes", C(self.host_spare_bytes)),
            ("host_pool_bytes", C(self.host_pool_bytes)),
            ("host_pool_pinned_bytes", C(self.host_pool_pinned_bytes)),
            ("host_compactions", C(c.host_compactions)),
            ("host_pool_chunks", C(self.host_pool_chunks)),
            ("host_pool_grows", C(self.host_pool_grows)),
            ("host_pool_free_runs", C(self.host_pool_free_runs)),
            ("host_pool_largest_free_run_bytes", C(self.host_pool_largest_free_run_bytes)),
            ("host_fragmentation", R(self.host_fragmentation())),
            ("host_pool_alloc_seconds", R(self.host_pool_alloc_seconds)),
            ("device_adapters", C(self.device_adapters)),
            ("device_bytes_used", C(self.device_bytes_used)),
            ("device_bytes_held", C(self.device_bytes_held)),
            ("device_capacity_bytes", C(self.device_capacity_bytes)),
            ("page_bytes", C(self.page_bytes)),
            ("device_free_runs", C(self.device_free_runs)),
            ("device_largest_free_run_bytes", C(self.device_largest_free_run_bytes)),
            ("fragmentation", R(self.fragmentation())),
            ("slots_used", C(self.slots_used)),
            ("max_slots", C(self.max_slots)),
            ("in_flight_batches", C(self.in_flight_batches)),
            ("pinned_by_batches", C(self.pinned_by_batches)),
            ("loads", C(c.loads)),
            ("load_bytes", C(c.load_bytes_issued)),
            ("load_bytes_timed", C(self.load_bytes_timed)),
            ("load_seconds", R(self.load_seconds)),
            ("load_gbps", R(self.load_gbps())),
        ]
    }
}
