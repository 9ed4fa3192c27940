//! Loads into a CUDA pool: cuMemcpyHtoDAsync on a copy stream the caller owns (torch's), an event
//! after each batch that compute streams wait on, and events from released batches that the copy
//! stream waits on before it overwrites pages a kernel may still be reading.

use std::collections::{HashMap, VecDeque};

use cudarc::driver::{result, sys};

use crate::cache::copier::{Copier, ReleaseTicket};
use crate::cache::host_memory::HostAllocator;
use crate::error::{LoraError, Result};

fn cuda_err(what: &str, e: result::DriverError) -> LoraError {
    LoraError::Cuda(format!("{what}: {e:?}"))
}

/// Whether a CUDA driver can be loaded here (cudarc panics on first use without one).
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library loads.
    unsafe { sys::is_culib_present() }
}

/// Timed batches still in flight: (start, end, bytes).
type PendingTiming = (sys::CUevent, sys::CUevent, u64);

pub struct CudaCopier {
    ctx: sys::CUcontext,
    device: sys::CUdevice,
    copy_stream: sys::CUstream,
    /// Recorded on the copy stream after every batch of loads.
    loads_done: sys::CUevent,
    loads_issued: u64,
    /// Per compute stream: its release event and how many load batches it already waits for.
    compute: HashMap<u64, ComputeStream>,
    batch_start: Option<sys::CUevent>,
    pending: VecDeque<PendingTiming>,
    spare_events: Vec<sys::CUevent>,
    done_bytes: u64,
    done_seconds: f64,
}

/// Release events are recorded into a ring per stream; a ticket whose slot was re-recorded since
/// points at a later release, and waiting for that is still correct (only longer).
const RELEASE_RING: usize = 64;

struct ComputeStream {
    released: Vec<sys::CUevent>,
    next_release: u64,
    waited_loads: u64,
}

// Raw driver handles, used through &mut under the cache's write lock; the one &self method
// (host_allocator) only copies the context handle.
unsafe impl Send for CudaCopier {}
unsafe impl Sync for CudaCopier {}

impl CudaCopier {
    /// Uses device `ordinal`'s primary context (the one torch uses) and the caller's `copy_stream`
    /// (a raw CUstream it keeps alive for the life of the cache; never destroyed here).
    pub fn new(ordinal: i32, copy_stream: u64) -> Result<CudaCopier> {
        if !driver_present() {
            return Err(LoraError::Cuda("no CUDA driver (libcuda) could be loaded".into()));
        }
        result::init().map_err(|e| cuda_err("cuInit", e))?;
        let device = result::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
        // SAFETY: the retained context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(device) }.map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        let loads_done = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| cuda_err("cuEventCreate", e))?;
        Ok(CudaCopier {
            ctx,
            device,
            copy_stream: copy_stream as sys::CUstream,
            loads_done,
            loads_issued: 0,
            compute: HashMap::new(),
            batch_start: None,
            pending: VecDeque::new(),
            spare_events: Vec::new(),
            done_bytes: 0,
            done_seconds: 0.0,
        })
    }

    fn bind(&self) -> Result<()> {
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }

    fn timing_event(&mut self) -> Result<sys::CUevent> {
        match self.spare_events.pop() {
            Some(e) => Ok(e),
            None => result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| cuda_err("cuEventCreate", e)),
        }
    }

    fn compute_stream(&mut self, stream: u64) -> Result<&mut ComputeStream> {
        use std::collections::hash_map::Entry;
        match self.compute.entry(stream) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(v) => {
                let released = (0..RELEASE_RING)
                    .map(|_| result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| cuda_err("cuEventCreate", e)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(v.insert(ComputeStream { released, next_release: 0, waited_loads: 0 }))
            }
        }
    }

    /// Folds finished timed batches into the totals; with `block`, waits for all of them.
    fn collect_timing(&mut self, block: bool) {
        while let Some(&(start, end, bytes)) = self.pending.front() {
            // SAFETY: both events were created here and recorded on the copy stream.
            let ready = unsafe { if block { result::event::synchronize(end).is_ok() } else { result::event::query(end).is_ok() } };
            if !ready {
                break;
            }
            if let Ok(ms) = unsafe { result::event::elapsed(start, end) } {
                self.done_seconds += ms as f64 / 1e3;
                self.done_bytes += bytes;
            }
            self.pending.pop_front();
            self.spare_events.extend([start, end]);
        }
    }

    pub fn device(&self) -> sys::CUdevice {
        self.device
    }
}

impl Copier for CudaCopier {
    fn host_allocator(&self) -> HostAllocator {
        HostAllocator::Pinned(self.ctx)
    }

    fn begin_loads(&mut self, after: &[ReleaseTicket]) -> Result<()> {
        self.bind()?;
        let copy_stream = self.copy_stream;
        // Per stream, waiting for its latest listed release covers the earlier ones (stream order).
        let mut latest: HashMap<u64, u64> = HashMap::new();
        for t in after {
            let seq = latest.entry(t.stream).or_insert(t.seq);
            *seq = (*seq).max(t.seq);
        }
        for (stream, seq) in latest {
            let Some(cs) = self.compute.get(&stream) else { continue };
            let event = cs.released[(seq % RELEASE_RING as u64) as usize];
            // SAFETY: event and stream are live handles.
            unsafe { result::stream::wait_event(copy_stream, event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(|e| cuda_err("cuStreamWaitEvent(copy stream, release)", e))?;
        }
        let start = self.timing_event()?;
        unsafe { result::event::record(start, copy_stream) }.map_err(|e| cuda_err("cuEventRecord", e))?;
        self.batch_start = Some(start);
        Ok(())
    }

    unsafe fn copy(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the caller guarantees dst is in the pool and src outlives the copy.
        unsafe { result::memcpy_htod_async(dst, src, self.copy_stream) }.map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))
    }

    fn end_loads(&mut self, bytes: u64) -> Result<()> {
        let end = self.timing_event()?;
        unsafe {
            result::event::record(end, self.copy_stream).map_err(|e| cuda_err("cuEventRecord", e))?;
            result::event::record(self.loads_done, self.copy_stream).map_err(|e| cuda_err("cuEventRecord", e))?;
        }
        self.loads_issued += 1;
        if let Some(start) = self.batch_start.take() {
            self.pending.push_back((start, end, bytes));
        }
        if self.pending.len() > 256 {
            self.collect_timing(false);
        }
        Ok(())
    }

    fn order_after_loads(&mut self, compute_stream: u64) -> Result<()> {
        let (issued, done) = (self.loads_issued, self.loads_done);
        if issued == 0 {
            return Ok(());
        }
        self.bind()?;
        let cs = self.compute_stream(compute_stream)?;
        if cs.waited_loads < issued {
            // SAFETY: live event; the stream handle comes from torch and outlives this call.
            unsafe { result::stream::wait_event(compute_stream as sys::CUstream, done, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(|e| cuda_err("cuStreamWaitEvent(compute stream, loads)", e))?;
            cs.waited_loads = issued;
        }
        Ok(())
    }

    fn note_release(&mut self, compute_stream: u64) -> Result<ReleaseTicket> {
        self.bind()?;
        let cs = self.compute_stream(compute_stream)?;
        let seq = cs.next_release;
        let event = cs.released[(seq % RELEASE_RING as u64) as usize];
        // SAFETY: live event; the stream handle comes from torch and outlives this call.
        unsafe { result::event::record(event, compute_stream as sys::CUstream) }.map_err(|e| cuda_err("cuEventRecord(release)", e))?;
        cs.next_release += 1;
        Ok(ReleaseTicket { stream: compute_stream, seq })
    }

    fn wait_idle(&mut self) -> Result<()> {
        if self.loads_issued == 0 {
            return Ok(());
        }
        self.bind()?;
        unsafe { result::event::synchronize(self.loads_done) }.map_err(|e| cuda_err("cuEventSynchronize", e))
    }

    fn load_timing(&mut self) -> (u64, f64) {
        if self.bind().is_ok() {
            self.collect_timing(false);
        }
        (self.done_bytes, self.done_seconds)
    }
}

impl Drop for CudaCopier {
    fn drop(&mut self) {
        // SAFETY: every handle below was created here; the streams are not ours and stay alive.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            let _ = result::event::synchronize(self.loads_done);
            let mut events = vec![self.loads_done];
            events.extend(self.compute.values().flat_map(|c| c.released.iter().copied()));
            events.append(&mut self.spare_events);
            events.extend(self.pending.drain(..).flat_map(|(s, e, _)| [s, e]));
            events.extend(self.batch_start.take());
            for e in events {
                let _ = result::event::destroy(e);
            }
            let _ = result::primary_ctx::release(self.device);
        }
    }
}
