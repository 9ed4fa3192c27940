//! The two-level cache on a host-memory pool: task_id semantics of the TensorRT-LLM LoRA
//! documentation, error atomicity, pool bytes
//! against the format's own packing, streaming many adapters, and an 8-thread stress run.

use std::sync::Arc;

use rand::{Rng, SeedableRng};

use super::*;
use crate::cache::host_memory;
use crate::error::LoraError;
use crate::format::{self, ConfigRow, ModelSpec, ValidateOptions, WeightsDtype, WeightsView};

pub(crate) fn spec() -> ModelSpec {
    ModelSpec { num_layers: 3, hidden_size: 32, num_heads: 4, num_kv_heads: 2, head_dim: 8, ffn_size: 48, expert_ffn_size: 0, num_experts: 0, encoder_hidden_size: 0, max_rank: 16 }
}

/// A cache over a pool and table owned by the returned boxes (16-byte aligned via u128).
pub(crate) struct Fixture {
    pub cache: TwoLevelCache,
    _pool: Box<[u128]>,
    _table: Box<[u128]>,
}

pub(crate) fn fixture(host_budget_bytes: u64, pool_bytes: usize, page_bytes: usize, max_slots: usize) -> Fixture {
    fixture_serving(host_budget_bytes, pool_bytes, page_bytes, max_slots, None)
}

/// `fixture` for a model that applies only the `served` (module, layer) pairs.
pub(crate) fn fixture_serving(host_budget_bytes: u64, pool_bytes: usize, page_bytes: usize, max_slots: usize, served: Option<ServedModules>) -> Fixture {
    let pool = vec![0u128; pool_bytes / 16].into_boxed_slice();
    let table = vec![0u128; SlotTable::table_bytes(max_slots, spec().num_layers) / 16].into_boxed_slice();
    let cfg = CacheConfig { spec: spec(), dtype: WeightsDtype::F16, host_budget_bytes, page_bytes, max_slots, validate: ValidateOptions::default(), served };
    let region = PoolRegion { pool_addr: pool.as_ptr() as u64, pool_bytes: pool_bytes as u64, table_addr: table.as_ptr() as u64 };
    // SAFETY: both boxes live in the fixture beside the cache and are touched by nothing else.
    let cache = unsafe { TwoLevelCache::new(cfg, region, Box::new(HostMemcpy::default())).unwrap() };
    Fixture { cache, _pool: pool, _table: table }
}

/// An adapter as (f32 weights bytes, width, config): `modules` on every layer at `rank`, values
/// derived from `seed` so two adapters with different seeds differ.
pub(crate) fn adapter(seed: u64, modules: &[i64], rank: i64) -> (Vec<u8>, usize, Vec<ConfigRow>) {
    let s = spec();
    let cfg: Vec<ConfigRow> = (0..s.num_layers as i64).flat_map(|l| modules.iter().map(move |&m| [m, l, rank, 0])).collect();
    let layout = format::layout_from_config(&cfg, &s, ValidateOptions::default()).unwrap();
    let width = layout.rows.iter().map(|r| r.needed()).max().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let vals: Vec<u8> = (0..cfg.len() * width).flat_map(|_| (rng.random_range(-1.0f32..1.0)).to_le_bytes()).collect();
    (vals, width, cfg)
}

pub(crate) fn put(c: &TwoLevelCache, id: u64, seed: u64, modules: &[i64], rank: i64) -> crate::error::Result<PutOutcome> {
    let (bytes, width, cfg) = adapter(seed, modules, rank);
    let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap();
    c.put(id, &w, &cfg, false)
}

/// Reads `len` bytes at an absolute address inside a fixture's pool.
fn read(addr: i64, len: usize) -> Vec<u8> {
    // SAFETY: addresses come from the slot table, which only points into the live pool.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len).to_vec() }
}

/// The pool bytes behind a slot equal the adapter packed by format::pack_into (independent layout).
fn assert_slot_holds(c: &TwoLevelCache, slot: usize, seed: u64, modules: &[i64], rank: i64) {
    let (bytes, width, cfg) = adapter(seed, modules, rank);
    let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap();
    let layout = format::validate(&w, &cfg, &spec(), ValidateOptions::default()).unwrap();
    let packed = format::packed_layout(&layout);
    let mut want = vec![0u8; packed.total_elems * 2];
    format::pack_into(&w, &layout, &packed, WeightsDtype::F16, &mut want);
    for (r, p) in layout.rows.iter().zip(&packed.rows) {
        let [a, b, scale, got_rank] = c.table_entry(slot, r.layer, r.module.id() as usize);
        assert_eq!((got_rank, scale), (r.rank as i64, 0));
        assert_eq!(read(a, r.a_len() * 2), want[p.a * 2..(p.a + r.a_len()) * 2]);
        assert_eq!(read(b, r.b_len() * 2), want[p.b * 2..(p.b + r.b_len()) * 2]);
        assert_eq!(a % 16, 0);
        assert_eq!(b % 16, 0);
    }
}

#[test]
fn acquired_slots_point_at_the_packed_adapter() {
    let f = fixture(1 << 20, 1 << 18, 256, 4);
    put(&f.cache, 7, 70, &[1, 3, 6], 4).unwrap();
    put(&f.cache, 9, 90, &[0, 18], 16).unwrap();
    let b = f.cache.acquire(&[7, 9, 7], 0).unwrap();
    assert_eq!(b.slots[0], b.slots[2]);
    assert_ne!(b.slots[0], b.slots[1]);
    assert_slot_holds(&f.cache, b.slots[0], 70, &[1, 3, 6], 4);
    assert_slot_holds(&f.cache, b.slots[1], 90, &[0, 18], 16);
    // A module-layer the adapter lacks reads rank 0.
    assert_eq!(f.cache.table_entry(b.slots[0], 0, 2), [0, 0, 0, 0]);
    f.cache.release(b.batch_id, 0).unwrap();
    assert!(matches!(f.cache.release(b.batch_id, 0), Err(LoraError::UnknownBatch { .. })));
    let s = f.cache.stats();
    assert_eq!((s.counters.misses, s.counters.hits, s.host_adapters, s.device_adapters), (2, 0, 2, 2));
    assert!(s.device_bytes_used <= s.device_bytes_held && s.fragmentation() < 1.0);
    f.cache.check_invariants().unwrap();
}

#[test]
fn first_request_carries_weights_later_ones_the_task_id() {
    let f = fixture(1 << 20, 1 << 18, 256, 4);
    assert_eq!(put(&f.cache, 1, 10, &[1], 2).unwrap(), PutOutcome::Inserted);
    assert_eq!(put(&f.cache, 1, 10, &[1], 2).unwrap(), PutOutcome::AlreadyCached);
    assert_eq!(put(&f.cache, 1, 11, &[1], 2), Err(LoraError::TaskConflict { task_id: 1 }));
    assert_eq!(f.cache.acquire(&[1, 5], 0), Err(LoraError::NotCached { task_id: 5 }));
    assert!(f.cache.resident_ids().is_empty(), "a failed acquire loads nothing");

    let b = f.cache.acquire(&[1], 0).unwrap();
    let (bytes, width, cfg) = adapter(11, &[1], 2);
    let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap();
    assert_eq!(f.cache.put(1, &w, &cfg, true), Err(LoraError::TaskInUse { task_id: 1, action: "replacing its weights" }));
    f.cache.release(b.batch_id, 0).unwrap();
    assert_eq!(f.cache.put(1, &w, &cfg, true).unwrap(), PutOutcome::Replaced);
    assert!(f.cache.resident_ids().is_empty(), "stale weights leave the device tier");
    let b = f.cache.acquire(&[1], 0).unwrap();
    assert_slot_holds(&f.cache, b.slots[0], 11, &[1], 2);
    f.cache.check_invariants().unwrap();
}

#[test]
fn too_large_and_bad_input_change_nothing() {
    let f = fixture(4096, 2048, 256, 2);
    // attn_qkv on 3 layers at rank 16: far over both tiers.
    let err = put(&f.cache, 3, 1, &[0, 4, 5, 6], 16).unwrap_err();
    assert!(matches!(err, LoraError::AdapterTooLarge { task_id: 3, .. }), "{err:?}");
    let vals = vec![0u8; 4 * 64];
    let w = WeightsView::new(WeightsDtype::F32, &[1, 64], &vals).unwrap();
    let err = f.cache.put(3, &w, &[[13, 0, 2, 0]], false).unwrap_err(); // no experts in this model
    assert!(matches!(err, LoraError::ModuleNotInModel { row: 0, .. }), "{err:?}");
    assert_eq!(f.cache.len(), 0);
    assert_eq!(f.cache.stats().host_bytes, 0);
}

#[test]
fn host_tier_evicts_least_recently_used_unpinned() {
    // Each adapter: 3 layers x attn_q rank 1 = 3 segments x 1 page of 256 B = 768 B.
    let f = fixture(3 * 768, 1 << 16, 256, 8);
    for id in 1..=3 {
        put(&f.cache, id, id, &[1], 1).unwrap();
    }
    let b = f.cache.acquire(&[1], 0).unwrap(); // 1 is now most recent and pinned
    put(&f.cache, 4, 4, &[1], 1).unwrap(); // evicts 2 (least recent)
    assert!(!f.cache.contains(2) && f.cache.contains(1) && f.cache.contains(3));
    put(&f.cache, 5, 5, &[1], 1).unwrap(); // evicts 3
    assert_eq!(f.cache.task_ids(), vec![5, 4, 1]);
    put(&f.cache, 6, 6, &[1], 1).unwrap(); // evicts 4, never the pinned 1
    assert!(f.cache.contains(1));
    f.cache.release(b.batch_id, 0).unwrap();
    f.cache.check_invariants().unwrap();
    assert_eq!(f.cache.stats().counters.host_evictions, 3);
}

#[test]
fn batch_that_cannot_fit_says_how_many_and_disturbs_nothing() {
    // Pool of 6 pages; each adapter needs 3 pages (attn_q rank 1 on 3 layers).
    let f = fixture(1 << 20, 6 * 256, 256, 8);
    for id in 1..=4 {
        put(&f.cache, id, id, &[1], 1).unwrap();
    }
    let held = f.cache.acquire(&[1], 0).unwrap();
    let err = f.cache.acquire(&[2, 3], 0).unwrap_err();
    assert_eq!(err, LoraError::BatchDoesNotFit { requested: 2, fits: 1 });
    assert_eq!(f.cache.resident_ids(), vec![1]);
    assert_slot_holds(&f.cache, held.slots[0], 1, &[1], 1);
    // Once 1 is released, 2 and 3 fit by evicting it.
    f.cache.release(held.batch_id, 0).unwrap();
    let b = f.cache.acquire(&[2, 3], 0).unwrap();
    assert_slot_holds(&f.cache, b.slots[0], 2, &[1], 1);
    assert_slot_holds(&f.cache, b.slots[1], 3, &[1], 1);
    assert_eq!(f.cache.stats().counters.device_evictions, 1);
    // More distinct adapters than slots.
    let g = fixture(1 << 20, 1 << 16, 256, 2);
    for id in 1..=3 {
        put(&g.cache, id, id, &[1], 1).unwrap();
    }
    assert_eq!(g.cache.acquire(&[1, 2, 3], 0), Err(LoraError::BatchDoesNotFit { requested: 3, fits: 2 }));
    f.cache.check_invariants().unwrap();
}

#[test]
fn prefetch_loads_without_pinning() {
    let f = fixture(1 << 20, 3 * 256, 256, 4);
    put(&f.cache, 1, 1, &[1], 1).unwrap();
    put(&f.cache, 2, 2, &[1], 1).unwrap();
    f.cache.prefetch(&[1]).unwrap();
    assert_eq!(f.cache.resident_ids(), vec![1]);
    assert!(f.cache.pinned_ids().is_empty());
    f.cache.prefetch(&[2]).unwrap(); // evicts the unpinned 1
    assert_eq!(f.cache.resident_ids(), vec![2]);
    let b = f.cache.acquire(&[2], 0).unwrap();
    assert_eq!(f.cache.stats().counters.hits, 1);
    f.cache.release(b.batch_id, 0).unwrap();
}

#[test]
fn ten_thousand_adapters_stream_through_a_small_pool_without_leaking() {
    let f = fixture(64 * 1024, 40 * 256, 256, 8);
    let mixes: [(&[i64], i64); 4] = [(&[1], 1), (&[1, 3], 2), (&[4], 8), (&[18, 6], 3)];
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for id in 0..10_000u64 {
        let (modules, rank) = mixes[(id % 4) as usize];
        put(&f.cache, id, id, modules, rank).unwrap();
        let b = if id > 0 && rng.random_bool(0.5) { f.cache.acquire(&[id, id - 1], 0) } else { f.cache.acquire(&[id], 0) };
        let b = b.unwrap();
        if id % 997 == 0 {
            assert_slot_holds(&f.cache, b.slots[0], id, modules, rank);
            f.cache.check_invariants().unwrap();
        }
        f.cache.release(b.batch_id, 0).unwrap();
    }
    f.cache.check_invariants().unwrap();
    let s = f.cache.stats();
    assert!(s.counters.device_evictions > 9_000 && s.counters.host_evictions > 9_000);
    assert_eq!(s.in_flight_batches, 0);
    // Every image was carved from the pool built with the cache (budget + 1/4 staging): no put
    // allocated, and the pages of 10,000 evicted images all came back.
    assert_eq!((s.host_pool_chunks, s.host_pool_grows, s.host_pool_bytes), (1, 0, 64 * 1024 + 16 * 1024));
    assert_eq!(s.host_spare_bytes, s.host_pool_bytes - s.host_bytes);
    eprintln!("compactions {} fragmentation {}", s.counters.host_compactions, s.host_fragmentation());
}

/// 8 threads x 100k mixed operations over a shared cache under eviction pressure: invariants hold
/// throughout, a pinned adapter's bytes never change while held, and nothing deadlocks.
#[test]
fn eight_threads_mixed_operations_keep_invariants() {
    const THREADS: u64 = 8;
    const OPS: u64 = 100_000;
    const IDS: u64 = 48;
    let f = Arc::new(fixture(20 * 768 * 2, 24 * 256, 256, 16));
    let mixes: [(&[i64], i64); 3] = [(&[1], 1), (&[1, 3], 1), (&[2], 2)];
    let shape = |id: u64| mixes[(id % 3) as usize];
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let f = Arc::clone(&f);
            scope.spawn(move || {
                let c = &f.cache;
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                for op in 0..OPS {
                    let id = rng.random_range(0..IDS);
                    let (modules, rank) = shape(id);
                    match rng.random_range(0..10) {
                        0..=2 => match put(c, id, id, modules, rank) {
                            Ok(_) | Err(LoraError::TierFull { .. }) => {}
                            Err(e) => panic!("put {id}: {e}"),
                        },
                        3..=7 => {
                            let other = rng.random_range(0..IDS);
                            match c.acquire(&[id, other, id], 0) {
                                Ok(b) => {
                                    assert_eq!(b.slots[0], b.slots[2]);
                                    let [a, ..] = c.table_entry(b.slots[0], 0, modules[0] as usize);
                                    let first = read(a, 16);
                                    std::thread::yield_now();
                                    let [a2, ..] = c.table_entry(b.slots[0], 0, modules[0] as usize);
                                    assert_eq!((a, read(a2, 16)), (a2, first), "pinned adapter {id} moved or changed");
                                    if op % 4096 == 0 {
                                        assert_slot_holds(c, b.slots[0], id, modules, rank);
                                    }
                                    c.release(b.batch_id, 0).unwrap();
                                }
                                Err(LoraError::NotCached { .. } | LoraError::BatchDoesNotFit { .. }) => {}
                                Err(e) => panic!("acquire: {e}"),
                            }
                        }
                        8 => match c.prefetch(&[id]) {
                            Ok(()) | Err(LoraError::NotCached { .. } | LoraError::BatchDoesNotFit { .. }) => {}
                            Err(e) => panic!("prefetch: {e}"),
                        },
                        _ => {
                            let _ = c.contains(id);
                            if op % 1024 == 0 {
                                c.check_invariants().unwrap();
                            }
                        }
                    }
                }
            });
        }
    });
    f.cache.check_invariants().unwrap();
    let s = f.cache.stats();
    assert!(s.host_bytes <= s.host_budget_bytes);
    assert_eq!((s.in_flight_batches, s.pinned_by_batches), (0, 0));
    assert!(s.counters.hits > 0 && s.counters.misses > 0 && s.counters.device_evictions > 0 && s.counters.host_evictions > 0);
}

/// Host memcpy that also records which releases each batch of loads was ordered after, hands
/// out release tickets the way a CUDA copier does (a sequence number per stream), and fails its
/// copies while `fail` is set (as a CUDA copy can, on a driver error).
#[derive(Default)]
struct OrderRecorder {
    inner: HostMemcpy,
    next_seq: std::collections::HashMap<u64, u64>,
    log: Arc<parking_lot::Mutex<Vec<Vec<ReleaseTicket>>>>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl Copier for OrderRecorder {
    fn host_allocator(&self) -> host_memory::HostAllocator {
        self.inner.host_allocator()
    }
    fn begin_loads(&mut self, after: &[ReleaseTicket]) -> crate::error::Result<()> {
        self.log.lock().push(after.to_vec());
        self.inner.begin_loads(after)
    }
    unsafe fn copy(&mut self, dst: u64, src: &[u8]) -> crate::error::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(LoraError::Cuda("injected copy failure".into()));
        }
        unsafe { self.inner.copy(dst, src) }
    }
    fn end_loads(&mut self, bytes: u64) -> crate::error::Result<()> {
        self.inner.end_loads(bytes)
    }
    fn order_after_loads(&mut self, s: u64) -> crate::error::Result<()> {
        self.inner.order_after_loads(s)
    }
    fn note_release(&mut self, stream: u64) -> crate::error::Result<ReleaseTicket> {
        let seq = self.next_seq.entry(stream).or_insert(0);
        *seq += 1;
        Ok(ReleaseTicket { stream, seq: *seq - 1 })
    }
    fn wait_idle(&mut self) -> crate::error::Result<()> {
        Ok(())
    }
    fn load_timing(&mut self) -> (u64, f64) {
        self.inner.load_timing()
    }
}

#[test]
fn loads_wait_only_for_releases_of_adapters_whose_pages_they_reuse() {
    let pool = vec![0u128; 6 * 256 / 16].into_boxed_slice(); // 2 adapters of 3 pages
    let table = vec![0u128; SlotTable::table_bytes(4, spec().num_layers) / 16].into_boxed_slice();
    let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let copier = OrderRecorder { log: Arc::clone(&log), ..Default::default() };
    let cfg = CacheConfig { spec: spec(), dtype: WeightsDtype::F16, host_budget_bytes: 1 << 20, page_bytes: 256, max_slots: 4, validate: ValidateOptions::default(), served: None };
    let region = PoolRegion { pool_addr: pool.as_ptr() as u64, pool_bytes: pool.len() as u64 * 16, table_addr: table.as_ptr() as u64 };
    let c = unsafe { TwoLevelCache::new(cfg, region, Box::new(copier)).unwrap() };
    for id in 1..=4 {
        put(&c, id, id, &[1], 1).unwrap();
    }
    let a = c.acquire(&[1], 7).unwrap();
    c.release(a.batch_id, 7).unwrap(); // ticket (7, 0)
    let b = c.acquire(&[2], 9).unwrap(); // free pages: no wait
    c.release(b.batch_id, 9).unwrap(); // ticket (9, 0)
    let b = c.acquire(&[2], 9).unwrap();
    c.release(b.batch_id, 9).unwrap(); // ticket (9, 1): 2's last release on stream 9
    let d = c.acquire(&[3], 7).unwrap(); // evicts 1 (least recent): after (7, 0)
    c.release(d.batch_id, 7).unwrap();
    c.prefetch(&[4]).unwrap(); // evicts 2: after (9, 1) only
    let got = log.lock().clone();
    let t = |stream, seq| ReleaseTicket { stream, seq };
    assert_eq!(got, vec![vec![], vec![], vec![t(7, 0)], vec![t(9, 1)]]);
    c.check_invariants().unwrap();
}

#[test]
fn long_per_row_id_lists_map_each_id_to_one_slot() {
    let f = fixture(1 << 20, 1 << 16, 256, 8);
    for id in 0..5 {
        put(&f.cache, id, id, &[1], 1).unwrap();
    }
    let rows: Vec<u64> = (0..40).map(|i| (i * 7 % 5) as u64).collect();
    for _ in 0..2 {
        let b = f.cache.acquire(&rows, 0).unwrap(); // first: loads; second: all resident
        for (id, slot) in rows.iter().zip(&b.slots) {
            assert_eq!(Some(*slot), f.cache.slot_of(*id));
        }
        f.cache.release(b.batch_id, 0).unwrap();
    }
    let s = f.cache.stats();
    assert_eq!((s.counters.misses, s.counters.hits), (5, 5));
}

#[test]
fn a_failed_load_leaves_no_half_loaded_adapter_resident() {
    let pool = vec![0u128; (1 << 16) / 16].into_boxed_slice();
    let table = vec![0u128; SlotTable::table_bytes(4, spec().num_layers) / 16].into_boxed_slice();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let copier = OrderRecorder { fail: Arc::clone(&fail), ..Default::default() };
    let cfg = CacheConfig { spec: spec(), dtype: WeightsDtype::F16, host_budget_bytes: 1 << 20, page_bytes: 256, max_slots: 4, validate: ValidateOptions::default(), served: None };
    let region = PoolRegion { pool_addr: pool.as_ptr() as u64, pool_bytes: pool.len() as u64 * 16, table_addr: table.as_ptr() as u64 };
    let c = unsafe { TwoLevelCache::new(cfg, region, Box::new(copier)).unwrap() };
    put(&c, 1, 10, &[1, 3], 4).unwrap();
    put(&c, 2, 20, &[6], 2).unwrap();
    let b = c.acquire(&[1], 0).unwrap();
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(c.acquire(&[2], 0), Err(LoraError::Cuda(_))));
    assert!(matches!(c.prefetch(&[2]), Err(LoraError::Cuda(_))));
    // Not resident, so the next acquire loads it again rather than serving unwritten pages.
    assert_eq!(c.resident_ids(), vec![1]);
    c.check_invariants().unwrap();
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let b2 = c.acquire(&[2, 1], 0).unwrap();
    assert_eq!(b2.slots[1], b.slots[0]);
    assert_slot_holds(&c, b2.slots[0], 20, &[6], 2);
    assert_slot_holds(&c, b2.slots[1], 10, &[1, 3], 4);
    c.release(b.batch_id, 0).unwrap();
    c.release(b2.batch_id, 0).unwrap();
    c.check_invariants().unwrap();
}
