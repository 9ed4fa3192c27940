//! The host tier's memory, allocated up front as the TensorRT-LLM host cache is: chunks of pinned
//! (or pre-faulted pageable) memory carved into pages, each adapter image one contiguous run of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::cache::host_memory::{HostAllocator, HostBuffer};
use crate::cache::page_allocator::{PageAllocator, PageRun};
use crate::error::{LoraError, Result};

/// One allocation of host memory and which of its pages images hold.
struct Chunk {
    buf: HostBuffer,
    page_bytes: usize,
    pages: Mutex<PageAllocator>,
    /// Allocated when the cache was built (never freed before it), as opposed to grown later.
    built: bool,
}

// The buffer is only written through the disjoint runs handed out by `pages`.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

/// An adapter image: `len` bytes at the start of `run` in one chunk; its pages go back to the pool
/// when it is dropped (the cache drops an image only once no copy reads it any more).
pub struct PoolImage {
    chunk: Arc<Chunk>,
    run: PageRun,
    len: usize,
    /// The pool's count of staging bytes, while this image counts in it (packed before eviction).
    staged: Option<Arc<AtomicU64>>,
}

impl PoolImage {
    fn base(&self) -> *mut u8 {
        // SAFETY: the run lies inside the chunk's buffer (the page allocator's bounds).
        unsafe { self.chunk.buf.base_ptr().add(self.run.start * self.chunk.page_bytes) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pool pages the image holds.
    pub fn pages(&self) -> usize {
        self.run.pages
    }

    pub fn is_pinned(&self) -> bool {
        self.chunk.buf.is_pinned()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the run is this image's alone until drop, and holds at least len bytes.
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.len) }
    }
}

impl Drop for PoolImage {
    fn drop(&mut self) {
        self.unstage();
        self.chunk.pages.lock().free(self.run);
    }
}

impl PoolImage {
    /// The image joined the tier: it no longer counts against the staging reserve.
    pub fn unstage(&mut self) {
        if let Some(staged) = self.staged.take() {
            staged.fetch_sub((self.run.pages * self.chunk.page_bytes) as u64, Ordering::Relaxed);
        }
    }
}

/// What the pool holds, for stats.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolStats {
    pub bytes: u64,
    /// Of `bytes`, those page-locked (all of them with a CUDA pool, unless the driver refused).
    pub pinned_bytes: u64,
    pub chunks: u64,
    pub free_bytes: u64,
    pub free_runs: u64,
    pub largest_free_run_bytes: u64,
    /// Chunks allocated after construction (a put found no free run large enough).
    pub grows: u64,
    /// Seconds spent allocating (pinning or pre-faulting) pool memory, construction included.
    pub alloc_seconds: f64,
}

/// Host memory for adapter images, built once with the tier's budget plus a staging reserve: a put
/// packs into free pool pages beside the images it will evict (`try_stage`), so that a put whose
/// values are refused evicts nothing; staged bytes stay within the reserve and the unused budget,
/// so that the images a put evicts leave it room. Free space split into holes is closed by
/// `compact`. Only when concurrent puts' staged images block that does `alloc` grow the pool by
/// a chunk; grown chunks that empty are freed again, but for one kept for the next put.
pub struct HostPool {
    page_bytes: usize,
    staging_bytes: u64,
    staged: Arc<AtomicU64>,
    allocator: HostAllocator,
    chunks: Mutex<Vec<Arc<Chunk>>>,
    grows: Mutex<(u64, f64)>,
}

impl HostPool {
    /// Allocates the pool now: a typed error, not an out-of-memory kill later, when the host
    /// cannot hold it.
    pub fn new(allocator: HostAllocator, page_bytes: usize, budget_bytes: u64, staging_bytes: u64) -> Result<Self> {
        assert!(page_bytes > 0 && page_bytes % 16 == 0, "pool pages keep images 16-byte aligned");
        let pool = HostPool {
            page_bytes,
            staging_bytes,
            staged: Arc::new(AtomicU64::new(0)),
            allocator,
            chunks: Mutex::new(Vec::new()),
            grows: Mutex::new((0, 0.0)),
        };
        let pages = (budget_bytes + staging_bytes).div_ceil(page_bytes as u64);
        let bytes = pages * page_bytes as u64;
        let too_large = |limit: u64| {
            LoraError::BadCacheConfig(format!(
                "the host tier allocates its memory when the cache is built: {bytes} bytes (host_cache_bytes {budget_bytes} + a staging \
                 reserve of {staging_bytes}), more than the {limit} bytes of host memory available; give a smaller host_cache_bytes"
            ))
        };
        if let Some(available) = available_host_bytes().filter(|&a| bytes > a) {
            return Err(too_large(available));
        }
        if pages > 0 {
            let chunk = usize::try_from(pages).ok().and_then(|p| pool.new_chunk(p, true)).ok_or_else(|| too_large(0))?;
            pool.chunks.lock().push(chunk);
        }
        Ok(pool)
    }

    /// Memory for one chunk, every page resident before any put writes it (pinning faults the
    /// pages in; pageable memory is touched here) so that no put pays page faults.
    fn new_chunk(&self, pages: usize, built: bool) -> Option<Arc<Chunk>> {
        let start = Instant::now();
        let buf = self.allocator.alloc_resident(pages.checked_mul(self.page_bytes)?)?;
        let mut grows = self.grows.lock();
        grows.1 += start.elapsed().as_secs_f64();
        if !built {
            grows.0 += 1;
        }
        Some(Arc::new(Chunk { buf, page_bytes: self.page_bytes, pages: Mutex::new(PageAllocator::new(pages)), built }))
    }

    fn page_count(&self, len: usize) -> usize {
        len.div_ceil(self.page_bytes).max(1)
    }

    /// Room for an image of `len` bytes, first fit over the chunks, or None when no free run holds it.
    pub fn try_alloc(&self, len: usize) -> Option<PoolImage> {
        let pages = self.page_count(len);
        let chunks = self.chunks.lock();
        chunks.iter().find_map(|c| {
            let run = c.pages.lock().alloc(pages)?;
            Some(PoolImage { chunk: c.clone(), run, len, staged: None })
        })
    }

    /// Room to pack an image before the tier makes room for it, if a free run holds it and the
    /// staging reserve plus the tier's `unused_budget` (less what other puts are staging now)
    /// does: then the images a put evicts always leave it room in the pool.
    pub fn try_stage(&self, len: usize, unused_budget: u64) -> Option<PoolImage> {
        let bytes = (self.page_count(len) * self.page_bytes) as u64;
        let reserve = self.staging_bytes + unused_budget;
        self.staged.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| (s + bytes <= reserve).then_some(s + bytes)).ok()?;
        match self.try_alloc(len) {
            Some(mut image) => {
                image.staged = Some(self.staged.clone());
                Some(image)
            }
            None => {
                self.staged.fetch_sub(bytes, Ordering::Relaxed);
                None
            }
        }
    }

    /// Room for an image of `len` bytes: a free run, or else a new chunk (allocated without any
    /// lock held, as pinning takes long).
    pub fn alloc(&self, len: usize) -> Result<PoolImage> {
        if let Some(image) = self.try_alloc(len) {
            return Ok(image);
        }
        let pages = self.page_count(len);
        let chunk_pages = pages.max(self.page_count(self.staging_bytes as usize));
        let chunk = self.new_chunk(chunk_pages, false).ok_or_else(|| {
            LoraError::BadCacheConfig(format!("the host pool could not grow by {} bytes for an image", chunk_pages * self.page_bytes))
        })?;
        let run = chunk.pages.lock().alloc(pages).expect("a fresh chunk holds the image");
        self.chunks.lock().push(chunk.clone());
        Ok(PoolImage { chunk, run, len, staged: None })
    }

    /// Closes holes: in address order, each image's run is freed and taken again first fit, which
    /// is never later in the pool, and its bytes moved there. Images not passed (being staged by
    /// other puts) stay where they are. The caller ensures no copy reads the images meanwhile.
    pub fn compact<'a>(&self, images: impl Iterator<Item = &'a mut PoolImage>) -> u64 {
        let chunks = self.chunks.lock();
        let index = |img: &PoolImage| chunks.iter().position(|c| Arc::ptr_eq(c, &img.chunk)).unwrap_or(usize::MAX);
        let mut images: Vec<(usize, &'a mut PoolImage)> = images.map(|img| (index(img), img)).collect();
        images.sort_by_key(|(chunk, img)| (*chunk, img.run.start));
        let mut moved = 0;
        for (_, img) in images {
            img.chunk.pages.lock().free(img.run);
            let (chunk, run) = chunks
                .iter()
                .find_map(|c| c.pages.lock().alloc(img.run.pages).map(|run| (c.clone(), run)))
                .expect("the image's own run is free again");
            if Arc::ptr_eq(&chunk, &img.chunk) && run == img.run {
                continue;
            }
            let from = img.base();
            let to = PoolImage { chunk, run, len: img.len, staged: None };
            // SAFETY: both runs lie in live chunks; they may overlap within one chunk (memmove).
            unsafe { std::ptr::copy(from, to.base(), img.len) };
            // The old run is already free: swap in the new place, dropping only the old handle's
            // chunk reference (its Drop would free the run a second time).
            let old = std::mem::ManuallyDrop::new(std::mem::replace(img, to));
            // SAFETY: `old` is never used again; its chunk reference is read out exactly once.
            drop(unsafe { std::ptr::read(&old.chunk) });
            moved += 1;
        }
        moved
    }

    /// Frees grown chunks no image holds, keeping the largest one for the next put.
    pub fn trim(&self) {
        let freed: Vec<Arc<Chunk>> = {
            let mut chunks = self.chunks.lock();
            let empty = |c: &Arc<Chunk>| !c.built && c.pages.lock().used_pages() == 0;
            let keep = chunks.iter().enumerate().filter(|(_, c)| empty(c)).max_by_key(|(_, c)| c.buf.len()).map(|(i, _)| i);
            let mut i = 0;
            let mut freed = Vec::new();
            chunks.retain(|c| {
                let go = empty(c) && Some(i) != keep;
                i += 1;
                if go {
                    freed.push(c.clone());
                }
                !go
            });
            freed
        };
        drop(freed); // outside the lock: unpinning takes long too
    }

    pub fn stats(&self) -> PoolStats {
        let chunks = self.chunks.lock();
        let mut s = PoolStats::default();
        for c in chunks.iter() {
            let pages = c.pages.lock();
            s.bytes += c.buf.len() as u64;
            if c.buf.is_pinned() {
                s.pinned_bytes += c.buf.len() as u64;
            }
            s.chunks += 1;
            s.free_bytes += (pages.free_pages() * self.page_bytes) as u64;
            s.free_runs += pages.free_run_count() as u64;
            s.largest_free_run_bytes = s.largest_free_run_bytes.max((pages.largest_free_run() * self.page_bytes) as u64);
        }
        (s.grows, s.alloc_seconds) = *self.grows.lock();
        s
    }

    /// Every chunk's free map is consistent and holds at least the pages of the `held_pages`
    /// cached images (more while puts are staging; equal when none is).
    pub fn check(&self, held_pages: usize) -> std::result::Result<(), String> {
        let chunks = self.chunks.lock();
        let mut used = 0;
        for c in chunks.iter() {
            let pages = c.pages.lock();
            pages.check()?;
            used += pages.used_pages();
        }
        if used < held_pages {
            return Err(format!("host pool: {used} pages in use, fewer than cached images hold ({held_pages})"));
        }
        Ok(())
    }

    /// Bytes counted against the staging reserve now.
    pub fn staged_bytes(&self) -> u64 {
        self.staged.load(Ordering::Relaxed)
    }

    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }
}

/// MemAvailable from /proc/meminfo (Linux), None where it cannot be read.
fn available_host_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
#[path = "host_pool_tests.rs"]
mod tests;
