//! How adapter bytes move from the host tier into the pool region: one trait, with a plain memcpy
//! for a host-memory pool (tests, CPU serving) and cuMemcpyHtoDAsync for a CUDA pool (cuda_copier.rs).

use std::time::Instant;

use crate::cache::host_memory::HostAllocator;
use crate::error::Result;

/// A point on a compute stream where a batch was released: work queued there before it may still
/// read the batch's pages and slot rows. `seq` counts releases on that stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseTicket {
    pub stream: u64,
    pub seq: u64,
}

/// Moves bytes into the pool and orders the compute stream after them. The cache calls it only
/// under its write lock, so implementations need no locking of their own.
pub trait Copier: Send + Sync {
    /// How to allocate adapter images (pinned where that helps this copier).
    fn host_allocator(&self) -> HostAllocator;

    /// Starts a batch of loads, ordered after the released work in `after` (the last releases of
    /// adapters whose pages or slots were freed since the previous batch of loads).
    fn begin_loads(&mut self, after: &[ReleaseTicket]) -> Result<()>;

    /// Copies `src` to pool address `dst`; may return before the copy completes.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` lies inside the pool region, and `src` stays alive and unchanged
    /// until `wait_idle` returns or a later `end_loads` batch is known complete.
    unsafe fn copy(&mut self, dst: u64, src: &[u8]) -> Result<()>;

    /// Ends the batch begun by `begin_loads`; `bytes` is what it moved (for load-rate stats).
    fn end_loads(&mut self, bytes: u64) -> Result<()>;

    /// Makes work later enqueued on `compute_stream` run after every load issued so far.
    fn order_after_loads(&mut self, compute_stream: u64) -> Result<()>;

    /// Marks the release of a batch that ran on `compute_stream`; loads that later overwrite its
    /// pages pass the returned ticket to `begin_loads`.
    fn note_release(&mut self, compute_stream: u64) -> Result<ReleaseTicket>;

    /// Blocks until every copy issued so far has completed (before dropping a host buffer).
    fn wait_idle(&mut self) -> Result<()>;

    /// (bytes, seconds) of loads known complete, for the load GB/s figure.
    fn load_timing(&mut self) -> (u64, f64);
}

/// The pool is ordinary host memory: copies are synchronous memcpys.
#[derive(Default)]
pub struct HostMemcpy {
    batch_start: Option<Instant>,
    bytes: u64,
    seconds: f64,
}

impl Copier for HostMemcpy {
    fn host_allocator(&self) -> HostAllocator {
        HostAllocator::Pageable
    }

    fn begin_loads(&mut self, _after: &[ReleaseTicket]) -> Result<()> {
        self.batch_start = Some(Instant::now());
        Ok(())
    }

    unsafe fn copy(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the caller guarantees dst is inside the pool region, which does not overlap src.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn end_loads(&mut self, bytes: u64) -> Result<()> {
        if let Some(start) = self.batch_start.take() {
            self.seconds += start.elapsed().as_secs_f64();
            self.bytes += bytes;
        }
        Ok(())
    }

    fn order_after_loads(&mut self, _compute_stream: u64) -> Result<()> {
        Ok(())
    }

    fn note_release(&mut self, compute_stream: u64) -> Result<ReleaseTicket> {
        Ok(ReleaseTicket { stream: compute_stream, seq: 0 }) // memcpy is synchronous: nothing to wait for
    }

    fn wait_idle(&mut self) -> Result<()> {
        Ok(())
    }

    fn load_timing(&mut self) -> (u64, f64) {
        (self.bytes, self.seconds)
    }
}
