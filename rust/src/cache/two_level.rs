//! The two-level adapter cache (the TensorRT-LLM LoRA documentation, "LoraCache configuration"):
//! put() validates and packs once into the host tier; acquire() makes a batch's adapters resident
//! in the device pool, pins them and hands back slots.
//! Every call plans first and mutates only once the whole call is known to succeed.

use parking_lot::RwLock;

mod inspect;
mod put;
mod remove;

use crate::cache::adapter_image::ImageLayout;
use crate::cache::copier::{Copier, ReleaseTicket};
use crate::cache::device_tier::DeviceTier;
use crate::cache::host_pool::HostPool;
use crate::cache::host_tier::HostTier;
use crate::cache::id_hash::IdMap;
use crate::cache::slot_table::SlotTable;
use crate::cache::served::ServedModules;
use crate::cache::stats::Counters;
use crate::error::{LoraError, Result};
use crate::format::{ModelSpec, ValidateOptions, WeightsDtype};

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub spec: ModelSpec,
    /// The serving dtype adapters are packed into.
    pub dtype: WeightsDtype,
    pub host_budget_bytes: u64,
    pub page_bytes: usize,
    pub max_slots: usize,
    pub validate: ValidateOptions,
    /// The (module, layer) pairs the model applies; None: every pair the spec allows.
    pub served: Option<ServedModules>,
}

/// The caller-owned memory the cache writes: the pool and the slot table (docs/internals.md).
#[derive(Clone, Copy, Debug)]
pub struct PoolRegion {
    pub pool_addr: u64,
    pub pool_bytes: u64,
    pub table_addr: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Inserted,
    /// Same weights were already cached: nothing changed but LRU order.
    AlreadyCached,
    Replaced,
}

/// A pinned batch: `slots[i]` is the slot of the i-th requested task id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    pub batch_id: u64,
    pub slots: Vec<usize>,
}

struct State {
    host: HostTier,
    device: DeviceTier,
    table: SlotTable,
    /// task_id -> number of in-flight batches holding it.
    pins: IdMap<u32>,
    /// batch_id -> the distinct task ids it holds.
    batches: IdMap<Vec<u64>>,
    /// task_id -> its last release per compute stream (while resident).
    released_at: IdMap<Vec<ReleaseTicket>>,
    /// Releases the next loads must follow: of adapters whose pages or slot were freed since.
    loads_after: Vec<ReleaseTicket>,
    next_batch: u64,
    counters: Counters,
    // Last: dropped after the host images, which may hold the last references to pinned chunks.
    copier: Box<dyn Copier>,
}

impl State {
    /// An adapter left the device tier: its slot rows go, and whatever last read its pages must
    /// finish before the next loads overwrite them.
    fn forget_resident(&mut self, task_id: u64, slot: usize) {
        self.table.forget_slot(slot);
        for ticket in self.released_at.remove(&task_id).unwrap_or_default() {
            // Per stream only the latest release matters (stream order covers the earlier ones).
            match self.loads_after.iter_mut().find(|t| t.stream == ticket.stream) {
                Some(t) => t.seq = t.seq.max(ticket.seq),
                None => self.loads_after.push(ticket),
            }
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Host images (and the caller's pool) must outlive every copy still in flight.
        let _ = self.copier.wait_idle();
    }
}

pub struct TwoLevelCache {
    cfg: CacheConfig,
    // Before `state`: the pool's pinned chunks are freed while the copier still holds the context.
    pool: HostPool,
    state: RwLock<State>,
}

/// Pool bytes beyond the host budget, allocated with it: room to pack a put beside the images it
/// will evict (so that a put whose values are refused evicts nothing). An image larger than this
/// on a full tier grows the pool once by its size.
pub fn staging_bytes(host_budget_bytes: u64) -> u64 {
    (host_budget_bytes / 4).min(1 << 30)
}

/// Host bytes a cache allocates (pins, for a CUDA pool) when it is built: the budget and the
/// staging reserve, in whole pages.
pub fn built_pool_bytes(host_budget_bytes: u64, page_bytes: usize) -> u64 {
    (host_budget_bytes + staging_bytes(host_budget_bytes)).div_ceil(page_bytes as u64) * page_bytes as u64
}

/// The ids in first-seen order without repeats (per-row id lists repeat ids a lot).
fn distinct(ids: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::with_capacity(ids.len());
    if ids.len() <= 16 {
        for &id in ids {
            if !out.contains(&id) {
                out.push(id);
            }
        }
    } else {
        let mut seen = IdMap::default();
        out.extend(ids.iter().copied().filter(|&id| seen.insert(id, ()).is_none()));
    }
    out
}

impl TwoLevelCache {
    /// # Safety
    /// `region.pool_addr` must point at `pool_bytes` bytes and `region.table_addr` at
    /// `SlotTable::table_bytes(max_slots, num_layers)` zeroed bytes, both writable through
    /// `copier`, 16-byte aligned, and alive and otherwise unused for the life of the cache.
    pub unsafe fn new(cfg: CacheConfig, region: PoolRegion, copier: Box<dyn Copier>) -> Result<Self> {
        let bad = |m: String| Err(LoraError::BadCacheConfig(m));
        if cfg.page_bytes == 0 || cfg.page_bytes % 256 != 0 {
            return bad(format!("page_bytes must be a positive multiple of 256, got {}", cfg.page_bytes));
        }
        if cfg.max_slots == 0 {
            return bad("max_slots must be at least 1".into());
        }
        if cfg.spec.num_layers == 0 {
            return bad("the model spec has no layers".into());
        }
        if region.pool_addr % 16 != 0 || region.table_addr % 16 != 0 {
            return bad("pool and table must be 16-byte aligned".into());
        }
        if region.pool_bytes < cfg.page_bytes as u64 {
            return bad(format!("device pool of {} bytes holds no page of {} bytes", region.pool_bytes, cfg.page_bytes));
        }
        // Allocated now, all of it, as the TensorRT-LLM host cache is: the first puts then run as
        // fast as later ones, and the cost (pinning takes seconds per tens of GB) is paid once,
        // where the caller sees it, instead of on the puts a request waits for.
        let pool = HostPool::new(copier.host_allocator(), cfg.page_bytes, cfg.host_budget_bytes, staging_bytes(cfg.host_budget_bytes))?;
        debug_assert_eq!(pool.stats().bytes, built_pool_bytes(cfg.host_budget_bytes, cfg.page_bytes));
        let state = State {
            host: HostTier::new(cfg.host_budget_bytes),
            device: DeviceTier::new(region.pool_addr, region.pool_bytes, cfg.page_bytes, cfg.max_slots),
            table: SlotTable::new(region.table_addr, cfg.max_slots, cfg.spec.num_layers),
            pins: IdMap::default(),
            batches: IdMap::default(),
            released_at: IdMap::default(),
            loads_after: Vec::new(),
            next_batch: 1,
            counters: Counters::default(),
            copier,
        };
        Ok(TwoLevelCache { cfg, pool, state: RwLock::new(state) })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    pub fn contains(&self, task_id: u64) -> bool {
        self.state.read().host.contains(task_id)
    }

    pub fn len(&self) -> usize {
        self.state.read().host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cached task ids, most recently used first.
    pub fn task_ids(&self) -> Vec<u64> {
        self.state.read().host.iter().map(|(id, _)| id).collect()
    }

    /// Makes every adapter of a batch resident and pins it until `release`; `compute_stream`
    /// (a raw CUstream, 0 for a host pool) is ordered after the loads. Same id, same slot.
    pub fn acquire(&self, task_ids: &[u64], compute_stream: u64) -> Result<Acquired> {
        let mut st = self.state.write();
        self.make_resident(&mut st, task_ids)?;
        st.copier.order_after_loads(compute_stream)?;
        let wanted = distinct(task_ids);
        for &id in &wanted {
            *st.pins.entry(id).or_insert(0) += 1;
        }
        let slots = task_ids.iter().map(|id| st.device.get(*id).unwrap().slot).collect();
        let batch_id = st.next_batch;
        st.next_batch += 1;
        st.batches.insert(batch_id, wanted);
        Ok(Acquired { batch_id, slots })
    }

    /// Starts loading adapters early without pinning them (same errors as acquire).
    pub fn prefetch(&self, task_ids: &[u64]) -> Result<()> {
        let mut st = self.state.write();
        self.make_resident(&mut st, task_ids)
    }

    /// Unpins a batch's adapters; later loads into their pages wait for work already on `compute_stream`.
    pub fn release(&self, batch_id: u64, compute_stream: u64) -> Result<()> {
        let mut st = self.state.write();
        if !st.batches.contains_key(&batch_id) {
            return Err(LoraError::UnknownBatch { batch_id });
        }
        let ticket = st.copier.note_release(compute_stream)?;
        let ids = st.batches.remove(&batch_id).unwrap();
        for id in ids {
            let count = st.pins.get_mut(&id).expect("a held batch's task is pinned");
            *count -= 1;
            if *count == 0 {
                st.pins.remove(&id);
            }
            let tickets = st.released_at.entry(id).or_default();
            tickets.retain(|t| t.stream != ticket.stream);
            tickets.push(ticket);
        }
        Ok(())
    }

    fn make_resident(&self, st: &mut State, task_ids: &[u64]) -> Result<()> {
        if task_ids.iter().all(|id| st.device.get(*id).is_some()) {
            // The common case: every adapter already resident; a hit per distinct id.
            for id in distinct(task_ids) {
                st.counters.hits += 1;
                st.device.touch(id);
                st.host.touch(id);
            }
            return Ok(());
        }
        let wanted = distinct(task_ids);
        if let Some(&task_id) = wanted.iter().find(|id| !st.host.contains(**id)) {
            return Err(LoraError::NotCached { task_id });
        }
        let (resident, missing_ids): (Vec<u64>, Vec<u64>) = wanted.iter().partition(|id| st.device.get(**id).is_some());
        if !missing_ids.is_empty() {
            let missing: Vec<(u64, &ImageLayout)> = missing_ids.iter().map(|&id| (id, &st.host.peek(id).unwrap().layout)).collect();
            let plan = (wanted.len() <= self.cfg.max_slots)
                .then(|| st.device.plan_loads(&missing, |id| st.pins.contains_key(&id) || wanted.contains(&id)))
                .flatten();
            let Some(plan) = plan else {
                let fits = st.device.how_many_fit(&resident, &missing, |id| st.pins.contains_key(&id));
                return Err(LoraError::BatchDoesNotFit { requested: wanted.len(), fits: fits.min(self.cfg.max_slots) });
            };
            let evicted = st.device.apply(plan, &missing);
            drop(missing);
            st.counters.device_evictions += evicted.len() as u64;
            for (id, r) in &evicted {
                st.forget_resident(*id, r.slot);
            }
            if let Err(e) = self.load(st, &missing_ids) {
                // Leave no adapter resident whose pages or slot rows may be half written: the
                // next acquire loads it again (the victims stay evicted; nothing held them).
                for &id in &missing_ids {
                    if let Some(r) = st.device.evict(id) {
                        st.forget_resident(id, r.slot);
                    }
                }
                return Err(e);
            }
        }
        st.counters.hits += resident.len() as u64;
        st.counters.misses += missing_ids.len() as u64;
        for &id in &wanted {
            st.device.touch(id);
            st.host.touch(id);
        }
        Ok(())
    }

    /// Copies freshly placed adapters from their host images and points their slots at them.
    /// One copy per run of segments that are adjacent both in the image and in the pool.
    fn load(&self, st: &mut State, ids: &[u64]) -> Result<()> {
        let State { host, device, table, copier, counters, loads_after, .. } = st;
        copier.begin_loads(loads_after)?;
        loads_after.clear();
        let page = self.cfg.page_bytes;
        let mut bytes = 0u64;
        for &id in ids {
            let entry = host.peek_mut(id).unwrap();
            entry.loaded = true;
            let r = device.get(id).unwrap();
            let src = entry.image.as_slice();
            let mut i = 0;
            while i < r.runs.len() {
                let (first_img, first_run) = (entry.layout.segments[i].image_offset, r.runs[i]);
                let mut pages = first_run.pages;
                let mut j = i + 1;
                while j < r.runs.len() && r.runs[j].start == first_run.start + pages {
                    pages += r.runs[j].pages; // image segments are always back to back
                    j += 1;
                }
                let dst = device.pool_base + (first_run.start * page) as u64;
                // SAFETY: the run lies in the pool (allocator bounds); the image stays alive until
                // copies finish (wait_idle before any image is dropped).
                unsafe { copier.copy(dst, &src[first_img..first_img + pages * page])? };
                bytes += (pages * page) as u64;
                i = j;
            }
            table.write_slot(copier.as_mut(), r.slot, &entry.layout, &r.runs, device.pool_base)?;
        }
        copier.end_loads(bytes)?;
        counters.loads += 1;
        counters.load_bytes_issued += bytes;
        Ok(())
    }

    /// Blocks until every load issued so far has landed in the pool.
    pub fn synchronize(&self) -> Result<()> {
        self.state.write().copier.wait_idle()
    }
}
