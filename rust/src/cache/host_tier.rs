//! The host tier: every cached adapter's packed image, within a byte budget, in LRU order.
//! Planning room never mutates, so a put that cannot fit leaves the tier as it was.

use lru::LruCache;

use crate::cache::adapter_image::ImageLayout;
use crate::cache::host_pool::PoolImage;
use crate::error::{LoraError, Result};

pub struct HostEntry {
    pub image: PoolImage,
    pub layout: ImageLayout,
    pub digest: u64,
    /// A copy from this image was issued: wait for copies before freeing it.
    pub loaded: bool,
}

impl HostEntry {
    pub fn held_bytes(&self) -> u64 {
        self.image.len() as u64
    }
}

pub struct HostTier {
    budget_bytes: u64,
    used_bytes: u64,
    entries: LruCache<u64, HostEntry>,
}

impl HostTier {
    pub fn new(budget_bytes: u64) -> Self {
        HostTier { budget_bytes, used_bytes: 0, entries: LruCache::unbounded() }
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, task_id: u64) -> bool {
        self.entries.contains(&task_id)
    }

    /// The entry without touching LRU order.
    pub fn peek(&self, task_id: u64) -> Option<&HostEntry> {
        self.entries.peek(&task_id)
    }

    pub fn peek_mut(&mut self, task_id: u64) -> Option<&mut HostEntry> {
        self.entries.peek_mut(&task_id)
    }

    /// Marks a use: the adapter becomes the most recently used.
    pub fn touch(&mut self, task_id: u64) {
        self.entries.promote(&task_id);
    }

    /// Every image, for the pool to move them together (the caller ensures no copy reads them).
    pub fn images_mut(&mut self) -> impl Iterator<Item = &mut PoolImage> {
        self.entries.iter_mut().map(|(_, e)| &mut e.image)
    }

    /// Most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &HostEntry)> {
        self.entries.iter().map(|(&k, v)| (k, v))
    }

    /// The adapters to evict, least recently used first, so that `needed` more bytes fit once
    /// `replacing` (if any) is dropped. `keep` says which may not go (held by in-flight batches).
    pub fn plan_room(&self, needed: u64, replacing: Option<u64>, keep: impl Fn(u64) -> bool) -> Result<Vec<u64>> {
        let freed_by_replace = replacing.and_then(|id| self.peek(id)).map_or(0, HostEntry::held_bytes);
        let mut free = self.budget_bytes - self.used_bytes + freed_by_replace;
        let mut victims = Vec::new();
        let mut lru_first = self.entries.iter().rev();
        while free < needed {
            match lru_first.next() {
                Some((&id, entry)) if Some(id) != replacing && !keep(id) => {
                    victims.push(id);
                    free += entry.held_bytes();
                }
                Some(_) => {}
                // `free` is now everything that could be made free: unused budget + evictable.
                None => return Err(LoraError::TierFull { tier: "host", needed, evictable: free }),
            }
        }
        Ok(victims)
    }

    /// Stores an entry as the most recently used; the caller has made room.
    pub fn insert(&mut self, task_id: u64, entry: HostEntry) {
        self.used_bytes += entry.held_bytes();
        debug_assert!(self.used_bytes <= self.budget_bytes);
        if let Some(old) = self.entries.put(task_id, entry) {
            self.used_bytes -= old.held_bytes();
        }
    }

    pub fn remove(&mut self, task_id: u64) -> Option<HostEntry> {
        let entry = self.entries.pop(&task_id)?;
        self.used_bytes -= entry.held_bytes();
        Some(entry)
    }
}
