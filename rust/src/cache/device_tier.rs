//! The device tier: which adapters are resident in the pool, in which slot and pages, in LRU order.
//! Loads are planned on a copy of the allocator; the plan either fits as a whole or is dropped.

use std::collections::BTreeSet;

use lru::LruCache;

use crate::cache::adapter_image::ImageLayout;
use crate::cache::page_allocator::{PageAllocator, PageRun};

/// A resident adapter: its slot and one page run per module-layer segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident {
    pub slot: usize,
    pub runs: Vec<PageRun>,
    pub used_bytes: u64,
}

/// The tier's state after a batch's loads: taken whole by `DeviceTier::apply`.
pub struct LoadPlan {
    pages: PageAllocator,
    free_slots: BTreeSet<usize>,
    pub victims: Vec<u64>,
    /// (task_id, slot, runs) per adapter to load, in request order.
    pub placements: Vec<(u64, usize, Vec<PageRun>)>,
}

pub struct DeviceTier {
    pub pool_base: u64,
    pub page_bytes: usize,
    pages: PageAllocator,
    free_slots: BTreeSet<usize>,
    resident: LruCache<u64, Resident>,
    used_bytes: u64,
}

impl DeviceTier {
    pub fn new(pool_base: u64, pool_bytes: u64, page_bytes: usize, max_slots: usize) -> Self {
        DeviceTier {
            pool_base,
            page_bytes,
            pages: PageAllocator::new((pool_bytes / page_bytes as u64) as usize),
            free_slots: (0..max_slots).collect(),
            resident: LruCache::unbounded(),
            used_bytes: 0,
        }
    }

    pub fn pages(&self) -> &PageAllocator {
        &self.pages
    }

    pub fn len(&self) -> usize {
        self.resident.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resident.is_empty()
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn held_bytes(&self) -> u64 {
        (self.pages.used_pages() * self.page_bytes) as u64
    }

    pub fn get(&self, task_id: u64) -> Option<&Resident> {
        self.resident.peek(&task_id)
    }

    pub fn touch(&mut self, task_id: u64) {
        self.resident.promote(&task_id);
    }

    /// Most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Resident)> {
        self.resident.iter().map(|(&k, v)| (k, v))
    }

    /// Places `missing` adapters, evicting least recently used residents that `protected` allows
    /// until each fits (a slot and a run per segment). None if they cannot all fit.
    pub fn plan_loads(&self, missing: &[(u64, &ImageLayout)], protected: impl Fn(u64) -> bool) -> Option<LoadPlan> {
        let mut pages = self.pages.clone();
        let mut free_slots = self.free_slots.clone();
        let candidates: Vec<u64> = self.resident.iter().rev().map(|(&id, _)| id).filter(|&id| !protected(id)).collect();
        let mut next_candidate = candidates.iter();
        let mut victims = Vec::new();
        let mut placements = Vec::with_capacity(missing.len());
        for &(task_id, image) in missing {
            let counts = image.page_counts();
            loop {
                if !free_slots.is_empty() {
                    if let Some(runs) = pages.alloc_all(&counts) {
                        placements.push((task_id, free_slots.pop_first().unwrap(), runs));
                        break;
                    }
                }
                let &victim = next_candidate.next()?;
                let r = self.resident.peek(&victim).unwrap();
                r.runs.iter().for_each(|&run| pages.free(run));
                free_slots.insert(r.slot);
                victims.push(victim);
            }
        }
        Some(LoadPlan { pages, free_slots, victims, placements })
    }

    /// How many of a batch could be resident at once if every resident adapter not `pinned` by
    /// another batch were evicted: those of it already resident, plus those that then fit in order.
    pub fn how_many_fit(&self, resident_wanted: &[u64], missing: &[(u64, &ImageLayout)], pinned: impl Fn(u64) -> bool) -> usize {
        let mut pages = self.pages.clone();
        let mut free_slots = self.free_slots.clone();
        for (id, r) in self.resident.iter() {
            if !pinned(*id) && !resident_wanted.contains(id) {
                r.runs.iter().for_each(|&run| pages.free(run));
                free_slots.insert(r.slot);
            }
        }
        let mut fits = resident_wanted.len();
        for (_, image) in missing {
            if free_slots.is_empty() {
                break;
            }
            if pages.alloc_all(&image.page_counts()).is_some() {
                free_slots.pop_first();
                fits += 1;
            }
        }
        fits
    }

    /// Commits a plan: victims leave (returned with their old placement), placements arrive.
    pub fn apply(&mut self, plan: LoadPlan, images: &[(u64, &ImageLayout)]) -> Vec<(u64, Resident)> {
        let evicted: Vec<(u64, Resident)> = plan.victims.iter().map(|&id| (id, self.resident.pop(&id).unwrap())).collect();
        self.used_bytes -= evicted.iter().map(|(_, r)| r.used_bytes).sum::<u64>();
        self.pages = plan.pages;
        self.free_slots = plan.free_slots;
        for ((task_id, slot, runs), (_, image)) in plan.placements.into_iter().zip(images) {
            let used_bytes = image.used_bytes() as u64;
            self.used_bytes += used_bytes;
            self.resident.put(task_id, Resident { slot, runs, used_bytes });
        }
        evicted
    }

    /// Drops a resident adapter (host eviction or replacement), freeing its pages and slot.
    pub fn evict(&mut self, task_id: u64) -> Option<Resident> {
        let r = self.resident.pop(&task_id)?;
        r.runs.iter().for_each(|&run| self.pages.free(run));
        self.free_slots.insert(r.slot);
        self.used_bytes -= r.used_bytes;
        Some(r)
    }

    /// Slots, pages and byte counts agree with the resident set (tests and debug).
    pub fn check(&self, max_slots: usize) -> Result<(), String> {
        self.pages.check()?;
        let mut slots = BTreeSet::new();
        let mut runs: Vec<PageRun> = Vec::new();
        let mut used = 0;
        for (id, r) in self.resident.iter() {
            if r.slot >= max_slots || !slots.insert(r.slot) || self.free_slots.contains(&r.slot) {
                return Err(format!("task {id}: slot {} duplicated, out of range or also free", r.slot));
            }
            runs.extend(&r.runs);
            used += r.used_bytes;
        }
        if slots.len() + self.free_slots.len() != max_slots {
            return Err("a slot is neither free nor held".into());
        }
        runs.sort_by_key(|r| r.start);
        if runs.windows(2).any(|w| w[0].start + w[0].pages > w[1].start) {
            return Err("two resident segments overlap".into());
        }
        if runs.iter().map(|r| r.pages).sum::<usize>() != self.pages.used_pages() {
            return Err("pages held by residents differ from pages the allocator counts as used (leak)".into());
        }
        if used != self.used_bytes {
            return Err(format!("used bytes {used} vs recorded {}", self.used_bytes));
        }
        Ok(())
    }
}
