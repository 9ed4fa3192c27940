//! `AdapterCache` for Python: the two-level cache over a pool and slot table that Python allocates
//! as torch tensors (python/loramux/cache.py). Translation only; the GIL is released around work.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::bindings::adapter::AdapterInput;
use crate::bindings::errors::IntoPyResult;
use crate::bindings::spec::PyModelSpec;
use crate::cache::slot_table::ENTRY_FIELDS;
use crate::cache::{
    self, CacheConfig, Copier, CudaCopier, HostMemcpy, PoolRegion, PutOutcome, ServedModules, SlotTable, StatValue, TwoLevelCache,
};
use crate::format::{ValidateOptions, WeightsDtype};

#[pyclass(name = "AdapterCache", module = "loramux._core", frozen)]
pub struct PyAdapterCache {
    inner: TwoLevelCache,
}

#[pymethods]
impl PyAdapterCache {
    /// Addresses are those of tensors the caller keeps alive as long as this object: a uint8 pool
    /// of `pool_bytes` and a zeroed int64 table of `table_bytes(max_slots, num_layers)` bytes, on
    /// CUDA device `cuda_device` (with `copy_stream` a raw CUstream) or in host memory when None.
    #[new]
    #[pyo3(signature = (spec, dtype, host_cache_bytes, pool_addr, pool_bytes, table_addr, max_slots, page_bytes, cuda_device=None, copy_stream=0, dora_allowed=true, served=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: &PyModelSpec,
        dtype: &str,
        host_cache_bytes: u64,
        pool_addr: u64,
        pool_bytes: u64,
        table_addr: u64,
        max_slots: usize,
        page_bytes: usize,
        cuda_device: Option<i32>,
        copy_stream: u64,
        dora_allowed: bool,
        served: Option<Vec<(i64, i64)>>,
    ) -> PyResult<Self> {
        let cfg = CacheConfig {
            spec: spec.core.clone(),
            dtype: WeightsDtype::from_name(dtype).py()?,
            host_budget_bytes: host_cache_bytes,
            page_bytes,
            max_slots,
            validate: ValidateOptions { dora_allowed, check_finite: true },
            served: served.map(|pairs| ServedModules::new(&pairs, spec.core.num_layers)).transpose().py()?,
        };
        let copier: Box<dyn Copier> = match cuda_device {
            Some(ordinal) => Box::new(CudaCopier::new(ordinal, copy_stream).py()?),
            None => Box::new(HostMemcpy::default()),
        };
        let region = PoolRegion { pool_addr, pool_bytes, table_addr };
        // SAFETY: python/loramux/cache.py passes tensors it allocated as documented above and
        // keeps them referenced for the life of this object.
        let inner = unsafe { TwoLevelCache::new(cfg, region, copier) }.py()?;
        Ok(PyAdapterCache { inner })
    }

    /// Stores an adapter (`format.adapter_input(weights, config)`); returns "inserted", "cached"
    /// (same weights already there) or "replaced".
    #[pyo3(signature = (task_id, adapter, replace=false))]
    fn put(&self, py: Python<'_>, task_id: u64, adapter: AdapterInput<'_>, replace: bool) -> PyResult<&'static str> {
        let (weights, rows) = adapter.core()?;
        let outcome = py.detach(|| self.inner.put(task_id, &weights, &rows, replace)).py()?;
        Ok(match outcome {
            PutOutcome::Inserted => "inserted",
            PutOutcome::AlreadyCached => "cached",
            PutOutcome::Replaced => "replaced",
        })
    }

    /// Drops an adapter from both tiers; LoraNotCachedError if not cached, LoraCacheError while held.
    fn remove(&self, py: Python<'_>, task_id: u64) -> PyResult<()> {
        py.detach(|| self.inner.remove(task_id)).py()
    }

    fn contains(&self, task_id: u64) -> bool {
        self.inner.contains(task_id)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Cached task ids, most recently used first.
    fn task_ids(&self) -> Vec<u64> {
        self.inner.task_ids()
    }

    /// (batch_id, slot per given id); `compute_stream` is a raw CUstream (0 for a host pool).
    fn acquire(&self, py: Python<'_>, task_ids: Vec<u64>, compute_stream: u64) -> PyResult<(u64, Vec<usize>)> {
        let b = py.detach(|| self.inner.acquire(&task_ids, compute_stream)).py()?;
        Ok((b.batch_id, b.slots))
    }

    fn release(&self, py: Python<'_>, batch_id: u64, compute_stream: u64) -> PyResult<()> {
        py.detach(|| self.inner.release(batch_id, compute_stream)).py()
    }

    fn prefetch(&self, py: Python<'_>, task_ids: Vec<u64>) -> PyResult<()> {
        py.detach(|| self.inner.prefetch(&task_ids)).py()
    }

    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.synchronize()).py()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = py.detach(|| self.inner.stats());
        let d = PyDict::new(py);
        for (name, value) in stats.fields() {
            match value {
                StatValue::Count(n) => d.set_item(name, n)?,
                StatValue::Ratio(x) => d.set_item(name, x)?,
            }
        }
        Ok(d)
    }

    fn slot_of(&self, task_id: u64) -> Option<usize> {
        self.inner.slot_of(task_id)
    }

    /// Device-resident task ids, most recently used first.
    fn resident_ids(&self) -> Vec<u64> {
        self.inner.resident_ids()
    }

    fn pinned_ids(&self) -> Vec<u64> {
        let mut ids = self.inner.pinned_ids();
        ids.sort_unstable();
        ids
    }

    /// None when every structural invariant holds, else what is broken.
    fn check_invariants(&self) -> Option<String> {
        self.inner.check_invariants().err()
    }

    /// The host image of a cached adapter as bytes, and per segment (module_id, layer, rank,
    /// image_offset, b_offset, scale_offset or -1).
    #[allow(clippy::type_complexity)]
    fn host_image<'py>(&self, py: Python<'py>, task_id: u64) -> Option<(Bound<'py, PyBytes>, Vec<(u32, usize, usize, usize, usize, i64)>)> {
        self.inner.host_image(task_id).map(|(bytes, layout)| {
            let segs = layout
                .segments
                .iter()
                .map(|s| (s.row.module.id(), s.row.layer, s.row.rank, s.image_offset, s.b_offset, s.scale_offset.map_or(-1, |o| o as i64)))
                .collect();
            (PyBytes::new(py, &bytes), segs)
        })
    }

    #[staticmethod]
    fn table_bytes(max_slots: usize, num_layers: usize) -> usize {
        SlotTable::table_bytes(max_slots, num_layers)
    }

    /// Host bytes a cache of this budget allocates (pinned with a CUDA pool) when it is built.
    #[staticmethod]
    fn host_pool_bytes(host_cache_bytes: u64, page_bytes: usize) -> PyResult<u64> {
        if page_bytes == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err("page_bytes must be positive"));
        }
        Ok(cache::built_pool_bytes(host_cache_bytes, page_bytes))
    }

    /// Threads a put spreads its checking and packing over.
    #[staticmethod]
    fn worker_threads() -> usize {
        crate::format::pass_threads()
    }

    /// Whether a CUDA driver library can be loaded in this process.
    #[staticmethod]
    fn cuda_driver_present() -> bool {
        cache::driver_present()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyAdapterCache>()?;
    // The names of one slot-table entry's int64 words, in order (rust/src/cache/slot_table.rs).
    m.add("SLOT_ENTRY_FIELDS", PyTuple::new(m.py(), ENTRY_FIELDS)?)?;
    Ok(())
}
