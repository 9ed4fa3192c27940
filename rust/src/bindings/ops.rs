//! The CUDA LoRA kernels for Python (python/loramux/ops/kernels.py): raw pointers and sizes in,
//! launches on the given stream out. Translation only; validation and planning live in
//! rust/src/cuda/launch.rs.

use pyo3::prelude::*;

use crate::bindings::errors::IntoPyResult;
use crate::cuda::{self, launch, nvrtc, plan};

/// One op call's batch and layer, as raw device pointers (`BatchMeta` translated by kernels.py).
#[pyclass(name = "KernelBatch", module = "loramux._core", frozen)]
pub struct PyKernelBatch {
    device: i32,
    batch: launch::Batch,
}

#[pymethods]
impl PyKernelBatch {
    #[new]
    #[pyo3(signature = (*, device, stream, dtype, slot_of_token, segments, tokens, table, num_slots, num_layers, layer, max_rank,
                        shrink_target_blocks=None, expand_kernel=None, decode_device_split=None, adapters=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        device: i32, stream: u64, dtype: &str, slot_of_token: u64, segments: u64, tokens: usize, table: u64,
        num_slots: usize, num_layers: usize, layer: usize, max_rank: usize, shrink_target_blocks: Option<usize>,
        expand_kernel: Option<&str>, decode_device_split: Option<bool>, adapters: Option<usize>,
    ) -> PyResult<Self> {
        let dtype = launch::Dtype::parse(dtype).py()?;
        let tuning = tuning(shrink_target_blocks, expand_kernel, decode_device_split)?;
        let batch = launch::Batch {
            stream, dtype, slot_of_token, segments, tokens, table, num_slots, num_layers, layer, max_rank, tuning, adapters,
        };
        Ok(PyKernelBatch { device, batch })
    }

    /// Shrink x [T, Hi] into the fp32 partial buffer; `plan` from `plan_shrink`. Returns u's offset
    /// (floats) in the buffer where the pipelined prefill shrink also summed the partials into u
    /// (the buffer has `u_len` floats past the partials), else None.
    #[pyo3(signature = (x, x_stride, hi, module_ids, partial, partial_capacity, plan))]
    #[allow(clippy::too_many_arguments)]
    fn shrink(
        &self, x: u64, x_stride: usize, hi: usize, module_ids: Vec<u32>, partial: u64, partial_capacity: usize,
        plan: ShrinkTuple,
    ) -> PyResult<Option<usize>> {
        let k = cuda::kernels(self.device).py()?;
        let plan = shrink_plan(plan);
        launch::shrink(&k, &self.batch, x, x_stride, hi, &module_ids, partial, partial_capacity, &plan).py()
    }

    /// Shrink and expand of one apply on the pipelined kernels, the expand waiting on each item's
    /// signal rather than the whole shrink grid; False, nothing launched, where that pair does not
    /// apply (then `shrink` and `expand`). `partial` as for `shrink`, with room for u.
    #[pyo3(signature = (x, x_stride, hi, y, y_stride, module_ids, out_sizes, partial, partial_capacity, plan))]
    #[allow(clippy::too_many_arguments)]
    fn apply_signalled(
        &self, x: u64, x_stride: usize, hi: usize, y: u64, y_stride: usize, module_ids: Vec<u32>, out_sizes: Vec<usize>,
        partial: u64, partial_capacity: usize, plan: ShrinkTuple,
    ) -> PyResult<bool> {
        let k = cuda::kernels(self.device).py()?;
        let plan = shrink_plan(plan);
        launch::apply_signalled(&k, &self.batch, x, x_stride, hi, y, y_stride, &module_ids, &out_sizes, partial, partial_capacity, &plan)
            .py()
    }

    /// u [S, T, max_rank] = the summed partials (zero past each token's rank).
    fn reduce(&self, module_ids: Vec<u32>, partial: u64, plan: ShrinkTuple, u: u64) -> PyResult<()> {
        let k = cuda::kernels(self.device).py()?;
        let plan = shrink_plan(plan);
        if plan.split_target > 0 {
            // the reduce sums every planned split: a device-sized split leaves some unwritten
            return Err(crate::error::LoraError::Cuda("reduce takes a host-planned split (plan_shrink(..., device_split=False))".into())).py();
        }
        launch::reduce(&k, &self.batch, &module_ids, partial, &plan, u).py()
    }

    /// The join of a LoRA branch run beside the base GEMM into `delta`: y = f * y + delta over
    /// `width` columns, f the row adapter's DoRA scales over `applies` ([(module ids, out sizes)],
    /// each from column 0).
    #[pyo3(signature = (applies, width, y, y_stride, delta, delta_stride))]
    fn merge_beside(
        &self, applies: Vec<(Vec<u32>, Vec<usize>)>, width: usize, y: u64, y_stride: usize, delta: u64, delta_stride: usize,
    ) -> PyResult<()> {
        let k = cuda::kernels(self.device).py()?;
        launch::merge_beside(&k, &self.batch, &applies, width, y, y_stride, delta, delta_stride).py()
    }

    /// y[:, slice columns] += partials summed over ksplit @ B^T (DoRA scaled), in place.
    /// `chained`: launched right after the shrink that wrote `partial` (may overlap it). `hi` and
    /// `split_target`: the shrink's, where its plan sized the split on the device (plan[3] > 0).
    #[pyo3(signature = (partial, ksplit, y, y_stride, module_ids, out_sizes, chained=false, hi=0, split_target=0))]
    #[allow(clippy::too_many_arguments)]
    fn expand(
        &self, partial: u64, ksplit: usize, y: u64, y_stride: usize, module_ids: Vec<u32>, out_sizes: Vec<usize>,
        chained: bool, hi: usize, split_target: usize,
    ) -> PyResult<()> {
        if split_target > 0 && hi == 0 {
            // without hi the expand cannot size the split the shrink used: it would sum unwritten partials
            return Err(crate::error::LoraError::Cuda("expand: a device-sized split (split_target > 0) needs the shrink's hi".into())).py();
        }
        let k = cuda::kernels(self.device).py()?;
        let split = (split_target > 0).then_some((hi, split_target));
        launch::expand(&k, &self.batch, partial, ksplit, y, y_stride, &module_ids, &out_sizes, chained, split).py()
    }

    /// The fused decode apply: y[:, slices] += LoRA(x) in one launch; `plan` from `plan_fused`.
    #[pyo3(signature = (x, x_stride, hi, y, y_stride, module_ids, out_sizes, partial, partial_capacity, plan))]
    #[allow(clippy::too_many_arguments)]
    fn fused(
        &self, x: u64, x_stride: usize, hi: usize, y: u64, y_stride: usize, module_ids: Vec<u32>, out_sizes: Vec<usize>,
        partial: u64, partial_capacity: usize, plan: FusedTuple,
    ) -> PyResult<()> {
        let k = cuda::kernels(self.device).py()?;
        let plan = fused_plan(plan);
        launch::fused(&k, &self.batch, x, x_stride, hi, y, y_stride, &module_ids, &out_sizes, partial, partial_capacity, &plan).py()
    }
}

/// (ksplit, kchunk, col_steps, col_groups, staged_a, blocks_per_sm, split_target, expand_target) of the fused
/// decode kernel for this apply (split_target > 0: split and column steps sized on the device), or None when
/// the apply takes shrink + expand (plan::decode_is_fused), or its segments cut tiles (`adapters`, the
/// host's count, as for plan::small_items). The tuning arguments as for KernelBatch.
#[pyfunction]
#[pyo3(signature = (tokens, hi, max_out, num_slices, num_slots, max_rank, shrink_target_blocks=None, expand_kernel=None,
                    decode_device_split=None, adapters=None))]
#[allow(clippy::too_many_arguments)]
fn plan_fused(
    tokens: usize, hi: usize, max_out: usize, num_slices: usize, num_slots: usize, max_rank: usize,
    shrink_target_blocks: Option<usize>, expand_kernel: Option<&str>, decode_device_split: Option<bool>,
    adapters: Option<usize>,
) -> PyResult<Option<FusedTuple>> {
    let t = tuning(shrink_target_blocks, expand_kernel, decode_device_split)?;
    if !plan::decode_is_fused(tokens, plan::small_items(tokens, adapters), adapters, max_rank, &t) {
        return Ok(None);
    }
    let p = plan::plan_fused(tokens, hi, max_out, num_slices, num_slots, &t);
    Ok(Some((p.shrink.ksplit, p.shrink.kchunk, p.col_steps, p.col_groups, p.staged_a, p.blocks_per_sm, p.shrink.split_target, p.expand_target)))
}

/// The fused decode plan as Python holds it: (ksplit, kchunk, col_steps, col_groups, staged_a,
/// blocks_per_sm or None, split_target, expand_target).
type FusedTuple = (usize, usize, usize, usize, bool, Option<usize>, usize, usize);

fn fused_plan(p: FusedTuple) -> plan::FusedPlan {
    plan::FusedPlan {
        shrink: plan::ShrinkPlan { ksplit: p.0, kchunk: p.1, split_target: p.6 },
        col_steps: p.2,
        col_groups: p.3,
        staged_a: p.4,
        blocks_per_sm: p.5,
        expand_target: p.7,
    }
}

/// The shrink plan as Python holds it: (ksplit, kchunk, reduce_first, split_target).
type ShrinkTuple = (usize, usize, bool, usize);

fn shrink_plan(p: ShrinkTuple) -> plan::ShrinkPlan {
    plan::ShrinkPlan { ksplit: p.0, kchunk: p.1, split_target: p.3 }
}

/// A tuning table's launch choices (python/loramux/ops/tuning.py) as the planner takes them.
fn tuning(
    shrink_target_blocks: Option<usize>, expand_kernel: Option<&str>, device_split: Option<bool>,
) -> PyResult<plan::Tuning> {
    let expand = match expand_kernel {
        None => None,
        Some(name) => Some(plan::ExpandKind::parse(name).ok_or_else(|| {
            let known: Vec<&str> = plan::ExpandKind::ALL.iter().map(|k| k.name()).collect();
            crate::error::LoraError::Cuda(format!("unknown expand kernel {name:?} (known: {})", known.join(", ")))
        })
        .py()?),
    };
    Ok(plan::Tuning { shrink_target_blocks: shrink_target_blocks.filter(|&b| b > 0), expand, device_split })
}

/// (ksplit, kchunk, reduce_first, split_target) of the shrink for this geometry; reduce_first:
/// lora_apply sums the partials into u before the expand where the shrink did not (it returned no
/// u); split_target > 0: the decode kernels size the split from the step's item count (pass hi and
/// it to the expand). The tuning arguments as for KernelBatch; `max_rank` (the batch's, default 16)
/// decides whether small items take the pipelined kernels; `device_split=False` plans the split on
/// the host (the standalone shrink, whose reduce sums every planned split). `adapters`: as for
/// KernelBatch (the segments' item layout).
#[pyfunction]
#[pyo3(signature = (tokens, hi, num_slices, num_slots, shrink_target_blocks=None, expand_kernel=None, max_rank=16, device_split=true,
                    decode_device_split=None, adapters=None))]
#[allow(clippy::too_many_arguments)]
fn plan_shrink(
    tokens: usize, hi: usize, num_slices: usize, num_slots: usize, shrink_target_blocks: Option<usize>,
    expand_kernel: Option<&str>, max_rank: usize, device_split: bool, decode_device_split: Option<bool>,
    adapters: Option<usize>,
) -> PyResult<ShrinkTuple> {
    let t = tuning(shrink_target_blocks, expand_kernel, decode_device_split)?;
    let small = plan::small_items(tokens, adapters);
    let p = if device_split {
        plan::plan_shrink(tokens, small, adapters, hi, num_slices, num_slots, max_rank, &t)
    } else {
        plan::plan_shrink_on_host(tokens, small, adapters, hi, num_slices, num_slots, max_rank, &t)
    };
    Ok((p.ksplit, p.kchunk, plan::apply_reduces_first(small, &p), p.split_target))
}

/// int32 elements of the token-segments buffer for `tokens` tokens over `num_slots` slots
/// (`adapters`: the distinct slots among them where known, which may change how they are cut into items).
#[pyfunction]
#[pyo3(signature = (tokens, num_slots, adapters=None))]
fn segments_len(tokens: usize, num_slots: usize, adapters: Option<usize>) -> usize {
    plan::segments_len(tokens, num_slots, plan::small_items(tokens, adapters))
}

/// Whether the segments of `tokens` tokens over `adapters` distinct slots (None: unknown) cut them
/// into small items (8 tokens of one adapter) rather than 64-token tensor-core tiles.
#[pyfunction]
#[pyo3(signature = (tokens, adapters=None))]
fn small_items(tokens: usize, adapters: Option<usize>) -> bool {
    plan::small_items(tokens, adapters)
}

/// Builds a batch's token segments on `stream` (one kernel, no host sync): see launch::build_segments.
#[pyfunction]
#[pyo3(signature = (device, stream, slot_of_token, tokens, num_slots, segments, capacity, adapters=None))]
#[allow(clippy::too_many_arguments)]
fn build_segments(
    device: i32, stream: u64, slot_of_token: u64, tokens: usize, num_slots: usize, segments: u64, capacity: usize,
    adapters: Option<usize>,
) -> PyResult<()> {
    let k = cuda::kernels(device).py()?;
    launch::build_segments(&k, stream, slot_of_token, tokens, num_slots, adapters, segments, capacity).py()
}

/// Whether libnvrtc can be opened.
#[pyfunction]
fn nvrtc_available() -> bool {
    nvrtc::library_present()
}

#[pyfunction]
fn nvrtc_version() -> PyResult<(i32, i32)> {
    nvrtc::version().py()
}

/// Compiles every kernel family for sm_{arch} (no GPU needed): [(family, cubin bytes)]; with
/// `cache`, through the disk cache (read if there, written if not), as a first launch would.
/// A compile error raises LoraCudaError with NVRTC's log.
#[pyfunction]
#[pyo3(signature = (arch, cache = false))]
fn nvrtc_compile_all(py: Python<'_>, arch: u32, cache: bool) -> PyResult<Vec<(String, usize)>> {
    py.detach(|| {
        nvrtc::FAMILIES
            .iter()
            .map(|f| {
                let cubin = if cache { nvrtc::cubin(f, arch) } else { nvrtc::compile(f, &f.source(), arch) };
                cubin.map(|b| (f.name.to_string(), b.len()))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .py()
}

/// `[(family, [shared parts prepended after lora_common.cuh, in order]), ...]`: what the loader
/// compiles, for tools that compile a family's source themselves (benchmarks/ptxas_report.py).
#[pyfunction]
fn kernel_families() -> Vec<(&'static str, Vec<&'static str>)> {
    nvrtc::FAMILIES.iter().map(|f| (f.name, f.parts.iter().map(|(name, _)| *name).collect())).collect()
}

/// The folder compiled kernels are cached in (None: no cache folder can be named).
#[pyfunction]
fn nvrtc_cache_dir() -> Option<String> {
    nvrtc::cache_dir().map(|d| d.to_string_lossy().into_owned())
}

/// `[(struct name, sizeof, alignof, [(field name, offsetof), ...]), ...]` of the kernels'
/// argument structs as Rust lays them out, for the check against cuda/lora_common.cuh.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn kernel_struct_layouts() -> Vec<(&'static str, usize, usize, Vec<(&'static str, usize)>)> {
    launch::abi::struct_layouts().into_iter().map(|s| (s.name, s.size, s.align, s.fields)).collect()
}

/// `[(macro name in cuda/lora_common.cuh, value the Rust side uses), ...]`.
#[pyfunction]
fn kernel_constants() -> Vec<(&'static str, usize)> {
    launch::abi::constants()
}

/// Compiles (or reads from the disk cache) and loads the kernels on `device`; returns its arch.
#[pyfunction]
fn load_kernels(py: Python<'_>, device: i32) -> PyResult<u32> {
    py.detach(|| cuda::kernels(device).map(|k| k.arch)).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyKernelBatch>()?;
    m.add_function(wrap_pyfunction!(plan_shrink, m)?)?;
    m.add_function(wrap_pyfunction!(plan_fused, m)?)?;
    m.add_function(wrap_pyfunction!(segments_len, m)?)?;
    m.add_function(wrap_pyfunction!(small_items, m)?)?;
    m.add_function(wrap_pyfunction!(build_segments, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_available, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_compile_all, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_families, m)?)?;
    m.add_function(wrap_pyfunction!(load_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_struct_layouts, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_constants, m)?)?;
    m.add("KERNEL_MAX_RANK", launch::MAX_RANK)?;
    m.add("KERNEL_MAX_SLICES", launch::MAX_SLICES)?;
    Ok(())
}
