//! The host tier over its pool: puts larger than the staging reserve pack in place, holes left by
//! mixed sizes are closed by moving images, and no put allocates once the cache is built.

use rand::{Rng, SeedableRng};

use crate::cache::tests::{adapter, fixture, put, spec};
use crate::cache::PutOutcome;
use crate::error::LoraError;
use crate::format::{self, ValidateOptions, WeightsDtype, WeightsView};

const PAGE: usize = 256;

/// The cached image equals the adapter packed afresh by the format (independent of where it sits).
fn assert_image_is(c: &crate::cache::TwoLevelCache, id: u64, seed: u64, modules: &[i64], rank: i64) {
    let (bytes, width, cfg) = adapter(seed, modules, rank);
    let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap();
    let layout = format::validate(&w, &cfg, &spec(), ValidateOptions::default()).unwrap();
    let (image, image_layout) = c.host_image(id).unwrap();
    let mut want = vec![0u8; image_layout.held_bytes()];
    image_layout.pack(&w, &layout, &mut want);
    assert_eq!(image, want, "task {id}");
}

#[test]
fn mixed_sizes_past_the_staging_reserve_compact_and_never_allocate() {
    // 40 pages of budget, a 10-page reserve; adapters of 3 to 24 pages.
    let f = fixture(40 * PAGE as u64, 64 * PAGE, PAGE, 4);
    let shapes: [(&[i64], i64); 4] = [(&[1], 1), (&[1], 16), (&[2], 4), (&[1, 2], 2)];
    let built = f.cache.stats().host_pool_bytes;
    assert_eq!(built, 50 * PAGE as u64, "budget + 1/4 staging, allocated by the constructor");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut shape_of = Vec::new();
    for id in 0..600u64 {
        let (modules, rank) = shapes[rng.random_range(0..4)];
        shape_of.push((modules, rank));
        assert_eq!(put(&f.cache, id, id, modules, rank), Ok(PutOutcome::Inserted));
        if rng.random_bool(0.5) {
            let b = f.cache.acquire(&[id], 0).unwrap(); // loaded images wait for copies before moving
            f.cache.release(b.batch_id, 0).unwrap();
        }
        f.cache.check_invariants().unwrap();
        if id % 25 == 0 {
            for cached in f.cache.task_ids() {
                let (modules, rank) = shape_of[cached as usize];
                assert_image_is(&f.cache, cached, cached, modules, rank);
            }
        }
    }
    let s = f.cache.stats();
    assert!(s.counters.host_compactions > 0, "mixed sizes left holes that needed closing");
    assert_eq!((s.host_pool_grows, s.host_pool_chunks, s.host_pool_bytes), (0, 1, built), "no put allocated");
    assert_eq!(s.host_spare_bytes, s.host_pool_bytes - s.host_bytes, "every evicted image's pages came back");
    assert!((0.0..1.0).contains(&s.host_fragmentation()));
}

#[test]
fn a_refused_put_in_place_changes_nothing() {
    let f = fixture(40 * PAGE as u64, 64 * PAGE, PAGE, 4);
    for id in 0..3 {
        put(&f.cache, id, id, &[1], 8).unwrap(); // 12 pages each: 36 of 40
    }
    let b = f.cache.acquire(&[1], 0).unwrap();
    let state = || (f.cache.task_ids(), f.cache.resident_ids(), f.cache.stats());
    let before = state();
    // 24 pages: more than the 10-page reserve, so it is checked before anything is evicted.
    let (mut bytes, width, cfg) = adapter(9, &[1], 16);
    let at = (width + 2) * 4; // row 1, column 2, as f32
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap();
    assert!(matches!(f.cache.put(9, &w, &cfg, false), Err(LoraError::NonFinite { row: 1, column: 2, .. })));
    assert_eq!(state(), before);
    // Valid, it evicts the two least recent unpinned adapters (0 and 2), not the held 1.
    assert_eq!(put(&f.cache, 9, 9, &[1], 16), Ok(PutOutcome::Inserted));
    assert_eq!(f.cache.task_ids(), vec![9, 1]);
    assert_image_is(&f.cache, 9, 9, &[1], 16);
    assert_image_is(&f.cache, 1, 1, &[1], 8);
    f.cache.release(b.batch_id, 0).unwrap();
    let s = f.cache.stats();
    assert_eq!((s.host_pool_grows, s.counters.host_evictions), (0, 2));
    f.cache.check_invariants().unwrap();
}

/// Staged puts, puts in place, compactions, loads and removals from 4 threads at once: every
/// cached image still holds its adapter and every page comes back.
#[test]
fn four_threads_staging_and_packing_in_place_leak_no_page() {
    let f = std::sync::Arc::new(fixture(40 * PAGE as u64, 64 * PAGE, PAGE, 4));
    let shapes: [(&[i64], i64); 4] = [(&[1], 1), (&[1], 16), (&[2], 4), (&[1, 2], 2)];
    let shape = |id: u64| shapes[(id % 4) as usize];
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let f = std::sync::Arc::clone(&f);
            scope.spawn(move || {
                let c = &f.cache;
                let mut rng = rand::rngs::StdRng::seed_from_u64(40 + t);
                for _ in 0..3_000 {
                    let id = rng.random_range(0..24u64);
                    let (modules, rank) = shape(id);
                    match rng.random_range(0..6) {
                        0..=2 => match put(c, id, id, modules, rank) {
                            Ok(_) | Err(LoraError::TierFull { .. }) => {}
                            Err(e) => panic!("put {id}: {e}"),
                        },
                        3 | 4 => match c.acquire(&[id], 0) {
                            Ok(b) => c.release(b.batch_id, 0).unwrap(),
                            Err(LoraError::NotCached { .. } | LoraError::BatchDoesNotFit { .. }) => {}
                            Err(e) => panic!("acquire {id}: {e}"),
                        },
                        _ => match c.remove(id) {
                            Ok(()) | Err(LoraError::NotCached { .. } | LoraError::TaskInUse { .. }) => {}
                            Err(e) => panic!("remove {id}: {e}"),
                        },
                    }
                }
            });
        }
    });
    f.cache.check_invariants().unwrap();
    for id in f.cache.task_ids() {
        let (modules, rank) = shape(id);
        assert_image_is(&f.cache, id, id, modules, rank);
    }
    let s = f.cache.stats();
    assert!(s.counters.host_compactions > 0 && s.counters.host_evictions > 0);
    assert_eq!(s.host_spare_bytes, s.host_pool_bytes - s.host_bytes, "pages of every evicted or refused image came back");
    eprintln!("grows {} compactions {}", s.host_pool_grows, s.counters.host_compactions);
    for id in f.cache.task_ids() {
        f.cache.remove(id).unwrap();
    }
    let s = f.cache.stats();
    assert_eq!((s.host_bytes, s.host_spare_bytes), (0, s.host_pool_bytes));
    assert!(s.host_pool_chunks <= 2, "emptied grown chunks are freed but one: {} chunks", s.host_pool_chunks);
}
