//! Fixed-size pages over one externally owned region: runs of contiguous pages are handed out
//! first-fit and given back with coalescing, so mixed ranks share the pool without per-adapter allocs.

use std::collections::BTreeMap;

/// A run of `pages` contiguous pages starting at page `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub start: usize,
    pub pages: usize,
}

/// Free space as a map start -> length of maximal free runs (neighbours are always merged).
#[derive(Clone, Debug)]
pub struct PageAllocator {
    total_pages: usize,
    free_runs: BTreeMap<usize, usize>,
    free_pages: usize,
}

impl PageAllocator {
    pub fn new(total_pages: usize) -> Self {
        let mut free_runs = BTreeMap::new();
        if total_pages > 0 {
            free_runs.insert(0, total_pages);
        }
        PageAllocator { total_pages, free_runs, free_pages: total_pages }
    }

    pub fn total_pages(&self) -> usize {
        self.total_pages
    }

    pub fn free_pages(&self) -> usize {
        self.free_pages
    }

    pub fn used_pages(&self) -> usize {
        self.total_pages - self.free_pages
    }

    pub fn free_run_count(&self) -> usize {
        self.free_runs.len()
    }

    pub fn largest_free_run(&self) -> usize {
        self.free_runs.values().copied().max().unwrap_or(0)
    }

    /// First-fit: the lowest-addressed free run that holds `pages`; None if none does.
    pub fn alloc(&mut self, pages: usize) -> Option<PageRun> {
        assert!(pages > 0, "PageAllocator::alloc of zero pages");
        let (&start, &len) = self.free_runs.iter().find(|(_, &len)| len >= pages)?;
        self.free_runs.remove(&start);
        if len > pages {
            self.free_runs.insert(start + pages, len - pages);
        }
        self.free_pages -= pages;
        Some(PageRun { start, pages })
    }

    /// Returns a run; panics on a double free or a run outside the region (a cache bug, not input).
    pub fn free(&mut self, run: PageRun) {
        assert!(run.pages > 0 && run.start + run.pages <= self.total_pages, "free of {run:?} outside the pool");
        let mut start = run.start;
        let mut len = run.pages;
        if let Some((&prev_start, &prev_len)) = self.free_runs.range(..run.start).next_back() {
            assert!(prev_start + prev_len <= run.start, "double free of {run:?}");
            if prev_start + prev_len == run.start {
                self.free_runs.remove(&prev_start);
                start = prev_start;
                len += prev_len;
            }
        }
        if let Some((&next_start, &next_len)) = self.free_runs.range(run.start..).next() {
            assert!(next_start >= run.start + run.pages, "double free of {run:?}");
            if next_start == run.start + run.pages {
                self.free_runs.remove(&next_start);
                len += next_len;
            }
        }
        self.free_runs.insert(start, len);
        self.free_pages += run.pages;
    }

    /// Allocates every request or none: on failure the allocator is unchanged.
    pub fn alloc_all(&mut self, requests: &[usize]) -> Option<Vec<PageRun>> {
        let mut runs = Vec::with_capacity(requests.len());
        for &pages in requests {
            match self.alloc(pages) {
                Some(run) => runs.push(run),
                None => {
                    for run in runs {
                        self.free(run);
                    }
                    return None;
                }
            }
        }
        Some(runs)
    }

    /// Checks the free map is sorted, disjoint, merged and counted right (tests and debug).
    pub fn check(&self) -> Result<(), String> {
        let mut end = None;
        let mut counted = 0;
        for (&start, &len) in &self.free_runs {
            if len == 0 || start + len > self.total_pages {
                return Err(format!("bad free run {start}+{len}"));
            }
            if let Some(e) = end {
                if start <= e {
                    return Err(format!("free run {start} touches or overlaps the previous one ending at {e}"));
                }
            }
            end = Some(start + len);
            counted += len;
        }
        if counted != self.free_pages {
            return Err(format!("free pages counted {counted}, recorded {}", self.free_pages));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_fills_holes_and_frees_coalesce() {
        let mut a = PageAllocator::new(10);
        let r1 = a.alloc(3).unwrap();
        let r2 = a.alloc(2).unwrap();
        let r3 = a.alloc(4).unwrap();
        assert_eq!((r1.start, r2.start, r3.start), (0, 3, 5));
        assert_eq!(a.free_pages(), 1);
        a.free(r2);
        assert_eq!(a.alloc(1).unwrap().start, 3); // first fit: the hole, not the tail
        assert!(a.alloc(3).is_none());
        a.free(r1);
        a.free(r3);
        a.check().unwrap();
        assert_eq!(a.largest_free_run(), 6); // pages 4..10, around the hole's new tenant at 3
        assert_eq!(a.free_run_count(), 2);
    }

    #[test]
    fn alloc_all_is_all_or_nothing() {
        let mut a = PageAllocator::new(8);
        let before = a.clone();
        assert!(a.alloc_all(&[4, 3, 2]).is_none());
        assert_eq!(a.free_pages(), before.free_pages());
        assert_eq!(a.largest_free_run(), 8);
        assert_eq!(a.alloc_all(&[4, 4]).unwrap().len(), 2);
        assert_eq!(a.free_pages(), 0);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = PageAllocator::new(4);
        let r = a.alloc(2).unwrap();
        a.free(r);
        a.free(r);
    }

    #[test]
    fn random_churn_keeps_the_map_consistent() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut a = PageAllocator::new(257);
        let mut held: Vec<PageRun> = Vec::new();
        for _ in 0..20_000 {
            if rng.random_bool(0.55) {
                if let Some(r) = a.alloc(rng.random_range(1..9)) {
                    held.push(r);
                }
            } else if !held.is_empty() {
                let i = rng.random_range(0..held.len());
                a.free(held.swap_remove(i));
            }
        }
        a.check().unwrap();
        assert_eq!(a.used_pages(), held.iter().map(|r| r.pages).sum::<usize>());
        for r in held.drain(..) {
            a.free(r);
        }
        assert_eq!(a.largest_free_run(), 257);
    }
}
