//! Page-aligned host buffers for the host tier's pool: page-locked (cuMemHostAlloc) when a CUDA pool
//! is served so loads run at full DMA speed, plain pageable memory otherwise or when pinning fails.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use cudarc::driver::{result, sys};

pub const HOST_PAGE: usize = 4096;

/// One adapter image in host memory. Never read by the device after drop: the cache waits for
/// pending copies before it drops a buffer that was loaded.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    kind: HostKind,
}

enum HostKind {
    Pageable(Layout),
    /// Freed with cuMemFreeHost under the context it was allocated in.
    Pinned(sys::CUcontext),
}

// The buffer is plain bytes owned by this value; the context handle is only used to free it.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Zeroed pageable memory aligned to a host page, or None when the allocator refuses.
    pub fn pageable(len: usize) -> Option<HostBuffer> {
        let layout = Layout::from_size_align(len.max(1), HOST_PAGE).ok()?;
        // SAFETY: layout has non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(HostBuffer { ptr, len, kind: HostKind::Pageable(layout) })
    }

    /// Page-locked memory in `ctx` (portable across contexts), or None if the driver refuses.
    /// Its contents are unspecified: every caller packs a whole image into it (zeroing it first
    /// would be one more pass over memory the driver has already faulted in).
    ///
    /// # Safety
    /// `ctx` is a live context that outlives the buffer (a retained primary context).
    pub unsafe fn pinned(len: usize, ctx: sys::CUcontext) -> Option<HostBuffer> {
        // SAFETY: per the contract above; any byte pattern is a valid u8.
        unsafe {
            result::ctx::set_current(ctx).ok()?;
            let raw = result::malloc_host(len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE).ok()? as *mut u8;
            let ptr = NonNull::new(raw)?;
            Some(HostBuffer { ptr, len, kind: HostKind::Pinned(ctx) })
        }
    }

    pub fn is_pinned(&self) -> bool {
        matches!(self.kind, HostKind::Pinned(_))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte; the pool hands out disjoint runs behind it.
    pub fn base_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Writes one byte per host page so the kernel maps every page now, on every core, instead
    /// of on the first write of each put (a fresh page costs a fault and zeroing).
    pub fn prefault(&mut self) {
        use rayon::prelude::*;
        self.as_mut_slice().par_chunks_mut(1 << 21).for_each(|block| {
            for i in (0..block.len()).step_by(HOST_PAGE) {
                // SAFETY: in bounds; volatile so the store of a zero into zeroed memory stays.
                unsafe { std::ptr::write_volatile(block.as_mut_ptr().add(i), 0) };
            }
        });
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        match self.kind {
            // SAFETY: allocated by alloc_zeroed with this layout.
            HostKind::Pageable(layout) => unsafe { dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: allocated by cuMemHostAlloc; errors on teardown cannot be reported from drop.
            HostKind::Pinned(ctx) => unsafe {
                let _ = result::ctx::set_current(ctx);
                let _ = result::free_host(self.ptr.as_ptr() as *mut _);
            },
        }
    }
}

/// How the host tier allocates its pool; copied out of the copier so that allocating (slow for
/// pinned memory) never happens under the cache's lock.
#[derive(Clone, Copy, Debug)]
pub enum HostAllocator {
    Pageable,
    /// Page-locked in this (retained) context, pageable if the driver refuses.
    Pinned(sys::CUcontext),
}

// The context handle is only passed to the thread-safe cuMemHostAlloc / cuMemFreeHost.
unsafe impl Send for HostAllocator {}
unsafe impl Sync for HostAllocator {}

impl HostAllocator {
    /// A buffer of `len` bytes whose contents are unspecified, with every page already mapped:
    /// pinning faults the pages in, pageable memory is pre-faulted here. None when the host
    /// cannot allocate that much at all.
    pub fn alloc_resident(&self, len: usize) -> Option<HostBuffer> {
        let buf = match *self {
            HostAllocator::Pageable => None,
            // SAFETY: a Pinned allocator comes from a CudaCopier, whose retained context outlives
            // the cache's buffers (the cache drops them before the copier).
            HostAllocator::Pinned(ctx) => unsafe { HostBuffer::pinned(len, ctx) },
        };
        buf.or_else(|| {
            let mut buf = HostBuffer::pageable(len)?;
            buf.prefault();
            Some(buf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pageable_is_page_aligned_and_zeroed() {
        let mut b = HostBuffer::pageable(10_000).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % HOST_PAGE, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 3;
        assert_eq!(b.as_slice()[9_999], 3);
        assert!(!b.is_pinned());
        assert_eq!(HostBuffer::pageable(0).unwrap().len(), 0);
        assert!(HostBuffer::pageable(usize::MAX - HOST_PAGE).is_none());
    }
}
