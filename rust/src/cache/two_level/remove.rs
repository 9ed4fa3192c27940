//! Unloading an adapter (a server's "unload" call): it leaves both tiers at once, its host image
//! and device pages go back, and a refusal (unknown, or held by a batch) changes nothing.

use crate::cache::two_level::TwoLevelCache;
use crate::error::{LoraError, Result};

impl TwoLevelCache {
    /// Drops `task_id`'s adapter from the host and device tiers. NotCached when it is not cached;
    /// TaskInUse while an in-flight batch holds it. Its image's pages go back to the host pool for
    /// the next put, and its device pages and slot are free for the next load, which waits for the
    /// compute work that last read them.
    pub fn remove(&self, task_id: u64) -> Result<()> {
        let mut st = self.state.write();
        let Some(entry) = st.host.peek(task_id) else { return Err(LoraError::NotCached { task_id }) };
        if st.pins.contains_key(&task_id) {
            return Err(LoraError::TaskInUse { task_id, action: "removing it" });
        }
        if entry.loaded {
            // Copies from the image may still be in flight; wait before anything changes, so a
            // device error leaves the adapter cached as it was.
            st.copier.wait_idle()?;
        }
        let entry = st.host.remove(task_id).expect("peeked above");
        if let Some(resident) = st.device.evict(task_id) {
            st.forget_resident(task_id, resident.slot);
        }
        st.counters.removals += 1;
        st.removed.insert(task_id);
        drop(st);
        drop(entry); // its pages go back to the pool
        self.pool.trim();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::cache::tests::{fixture, put};
    use crate::error::LoraError;

    #[test]
    fn remove_drops_both_tiers_and_gives_back_bytes_pages_and_slot() {
        let f = fixture(1 << 20, 1 << 18, 256, 2);
        put(&f.cache, 1, 10, &[1, 3], 4).unwrap();
        put(&f.cache, 2, 20, &[0, 6], 8).unwrap();
        let b = f.cache.acquire(&[1, 2], 0).unwrap();
        f.cache.release(b.batch_id, 0).unwrap();
        let before = f.cache.stats();
        let one = f.cache.host_image(1).unwrap().0.len() as u64;
        f.cache.remove(1).unwrap();
        let after = f.cache.stats();
        assert!(!f.cache.contains(1) && f.cache.slot_of(1).is_none());
        assert!(f.cache.was_removed(1) && !f.cache.was_removed(2) && !f.cache.was_removed(3));
        assert_eq!(f.cache.task_ids(), vec![2]);
        assert_eq!(after.host_bytes, before.host_bytes - one);
        assert_eq!(after.device_bytes_held, before.device_bytes_held - one); // images are whole pages
        assert_eq!((after.device_adapters, after.slots_used, after.counters.removals), (1, 1, 1));
        f.cache.check_invariants().unwrap();
        assert_eq!(f.cache.acquire(&[1], 0), Err(LoraError::NotCached { task_id: 1 }));
        // Its slot and pages serve the next adapter; putting it again starts from scratch.
        put(&f.cache, 3, 30, &[2], 16).unwrap();
        assert_eq!(put(&f.cache, 1, 10, &[1, 3], 4), Ok(crate::cache::PutOutcome::Inserted));
        assert!(!f.cache.was_removed(1), "put again: no longer a removed id");
        let b = f.cache.acquire(&[3, 2], 0).unwrap();
        f.cache.release(b.batch_id, 0).unwrap();
        f.cache.check_invariants().unwrap();
    }

    #[test]
    fn unknown_or_held_adapters_are_refused_and_nothing_changes() {
        let f = fixture(1 << 20, 1 << 18, 256, 4);
        put(&f.cache, 1, 10, &[1], 4).unwrap();
        put(&f.cache, 2, 20, &[1], 4).unwrap();
        let held = f.cache.acquire(&[2, 1], 0).unwrap();
        let state = || (f.cache.task_ids(), f.cache.resident_ids(), f.cache.stats());
        let before = state();
        assert_eq!(f.cache.remove(9), Err(LoraError::NotCached { task_id: 9 }));
        let err = f.cache.remove(2).unwrap_err();
        assert_eq!(err, LoraError::TaskInUse { task_id: 2, action: "removing it" });
        assert_eq!(err.task_id(), Some(2));
        assert!(err.to_string().contains("task_id 2") && err.to_string().contains("removing it"));
        assert_eq!(state(), before);
        f.cache.release(held.batch_id, 0).unwrap();
        f.cache.remove(2).unwrap();
        assert_eq!(f.cache.task_ids(), vec![1]);
        f.cache.check_invariants().unwrap();
    }

    #[test]
    fn churn_of_puts_loads_and_removes_leaks_no_page() {
        use rand::{Rng, SeedableRng};
        let f = fixture(1 << 20, 1 << 17, 256, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for step in 0..300u64 {
            let id = rng.random_range(0..6u64);
            match rng.random_range(0..3) {
                0 => {
                    let _ = put(&f.cache, id, id, &[1 + (id as i64 % 3)], 1 + (id as i64 % 4) * 4);
                }
                1 => {
                    if let Ok(b) = f.cache.acquire(&[id], 0) {
                        f.cache.release(b.batch_id, 0).unwrap();
                    }
                }
                _ => {
                    let cached = f.cache.contains(id);
                    assert_eq!(f.cache.remove(id).is_ok(), cached, "step {step}");
                }
            }
            f.cache.check_invariants().unwrap();
        }
        for id in f.cache.task_ids() {
            f.cache.remove(id).unwrap();
        }
        let s = f.cache.stats();
        assert_eq!((s.host_bytes, s.device_bytes_held, s.device_adapters, s.slots_used), (0, 0, 0, 0));
        assert_eq!(s.device_largest_free_run_bytes, s.device_capacity_bytes);
    }
}
