//! Unit tests of host_pool.rs: carving, staging within the reserve, compaction, growth and trim.

use super::*;

const PAGE: usize = 4096;
const P: u64 = PAGE as u64;

#[test]
fn images_are_carved_from_the_built_chunk_and_their_pages_come_back() {
    let pool = HostPool::new(HostAllocator::Pageable, PAGE, 8 * P, 2 * P).unwrap();
    let base = pool.stats();
    assert_eq!((base.bytes, base.chunks, base.free_bytes, base.grows), (10 * P, 1, 10 * P, 0));
    let mut a = pool.alloc(3 * PAGE - 5).unwrap();
    let mut b = pool.alloc(PAGE).unwrap();
    assert_eq!((a.len(), a.pages(), b.len()), (3 * PAGE - 5, 3, PAGE));
    assert_eq!(b.as_slice().as_ptr() as usize - a.as_slice().as_ptr() as usize, 3 * PAGE); // back to back
    assert_eq!(a.as_slice().as_ptr() as usize % PAGE, 0);
    a.as_mut_slice().fill(1);
    b.as_mut_slice().fill(2);
    assert!(a.as_slice().iter().all(|&x| x == 1) && b.as_slice().iter().all(|&x| x == 2));
    assert_eq!(pool.stats().free_bytes, 6 * P);
    pool.check(4).unwrap();
    assert!(pool.check(5).is_err());
    let a_at = a.as_slice().as_ptr();
    drop(a);
    let c = pool.alloc(2 * PAGE).unwrap();
    assert_eq!(c.as_slice().as_ptr(), a_at, "freed pages are reused first fit");
    drop((b, c));
    let s = pool.stats();
    assert_eq!((s.free_bytes, s.free_runs, s.largest_free_run_bytes, s.grows), (10 * P, 1, 10 * P, 0));
    pool.check(0).unwrap();
}

#[test]
fn staging_stays_within_the_reserve() {
    let pool = HostPool::new(HostAllocator::Pageable, PAGE, 8 * P, 3 * P).unwrap();
    assert!(pool.try_stage(4 * PAGE, 0).is_none(), "larger than the reserve on a full tier");
    drop(pool.try_stage(4 * PAGE, P).expect("the reserve and one unused page of budget"));
    let mut one = pool.try_stage(2 * PAGE, 0).unwrap();
    assert!(pool.try_stage(2 * PAGE, 0).is_none(), "2 + 2 pages staged > 3 reserved");
    let two = pool.try_stage(PAGE, 0).unwrap();
    assert_eq!(pool.staged_bytes(), 3 * P);
    one.unstage(); // joined the tier
    assert_eq!(pool.staged_bytes(), P);
    drop(two); // refused: its reserve and pages come back
    assert_eq!((pool.staged_bytes(), pool.stats().free_bytes), (0, 9 * P));
    drop(one);
    assert_eq!((pool.staged_bytes(), pool.stats().free_bytes), (0, 11 * P));
}

#[test]
fn compaction_closes_holes_and_keeps_every_image_s_bytes() {
    let pool = HostPool::new(HostAllocator::Pageable, PAGE, 6 * P, 0).unwrap();
    let mut held: Vec<Option<PoolImage>> = (0..6).map(|_| Some(pool.alloc(PAGE).unwrap())).collect();
    for (i, img) in held.iter_mut().enumerate() {
        img.as_mut().unwrap().as_mut_slice().fill(i as u8 + 1);
    }
    for i in [0, 2, 4] {
        held[i] = None; // three free pages, no two adjacent
    }
    let s = pool.stats();
    assert_eq!((s.free_bytes, s.free_runs, s.largest_free_run_bytes), (3 * P, 3, P));
    assert!(pool.try_alloc(2 * PAGE).is_none(), "fragmented: 3 pages free, none adjacent");
    let mut kept: Vec<PoolImage> = held.into_iter().flatten().collect();
    assert_eq!(pool.compact(kept.iter_mut()), 3);
    for (img, fill) in kept.iter().zip([2u8, 4, 6]) {
        assert!(img.as_slice().iter().all(|&x| x == fill), "image {fill} moved with its bytes");
    }
    assert_eq!(kept[0].as_slice().as_ptr() as usize + PAGE, kept[1].as_slice().as_ptr() as usize);
    let s = pool.stats();
    assert_eq!((s.free_runs, s.largest_free_run_bytes, s.grows), (1, 3 * P, 0));
    let three = pool.try_alloc(3 * PAGE).expect("the holes are one run now");
    pool.check(6).unwrap();
    assert_eq!(pool.compact(kept.iter_mut()), 0, "nothing left to move");
    drop((kept, three));
    assert_eq!(pool.stats().largest_free_run_bytes, 6 * P);
}

#[test]
fn a_full_pool_grows_and_emptied_grown_chunks_are_trimmed_to_one() {
    let pool = HostPool::new(HostAllocator::Pageable, PAGE, 2 * P, 2 * P).unwrap();
    let full = pool.alloc(4 * PAGE).unwrap();
    let a = pool.alloc(PAGE).unwrap(); // grows a chunk of max(1, reserve 2) pages
    let b = pool.alloc(3 * PAGE).unwrap(); // and one sized to the image
    let s = pool.stats();
    assert_eq!((s.chunks, s.grows, s.bytes), (3, 2, 9 * P));
    drop((a, b));
    pool.trim();
    let s = pool.stats();
    assert_eq!((s.chunks, s.bytes), (2, 7 * P), "the larger empty grown chunk is kept");
    let again = pool.alloc(3 * PAGE).unwrap();
    assert_eq!(pool.stats().grows, 2, "the kept chunk serves the next image without allocating");
    drop((again, full));
    pool.trim();
    pool.check(0).unwrap();
    assert_eq!(pool.stats().largest_free_run_bytes, 4 * P, "the built chunk coalesces whole again");
}

#[test]
fn pageable_chunks_are_resident_and_zeroed() {
    let pool = HostPool::new(HostAllocator::Pageable, PAGE, 4 * P, 0).unwrap();
    let img = pool.alloc(4 * PAGE).unwrap();
    assert!(img.as_slice().iter().all(|&x| x == 0) && !img.is_pinned());
    assert!(pool.stats().alloc_seconds > 0.0);
}

#[test]
fn a_pool_larger_than_host_memory_is_refused_at_construction() {
    let err = HostPool::new(HostAllocator::Pageable, PAGE, 1 << 60, 0).err().expect("refused");
    assert!(matches!(&err, LoraError::BadCacheConfig(m) if m.contains("host_cache_bytes 1152921504606846976")), "{err}");
}

#[test]
fn a_zero_budget_builds_nothing_and_grows_on_demand() {
    let pool = HostPool::new(HostAllocator::Pageable, PAGE, 0, 0).unwrap();
    assert_eq!(pool.stats().chunks, 0);
    let img = pool.alloc(10).unwrap();
    assert_eq!((img.len(), pool.stats().chunks, pool.stats().grows), (10, 1, 1));
}
