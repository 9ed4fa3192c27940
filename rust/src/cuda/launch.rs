//! Typed launchers, one per kernel family: validate the geometry, plan the grid, and launch on
//! the caller's raw CUstream with raw device pointers (nothing here owns torch's stream or memory).
//! The `#[repr(C)]` structs mirror cuda/lora_common.cuh field for field.

use std::ffi::c_void;

use cudarc::driver::{result as drv, sys};

use super::plan::{
    decode_expand_is_flat, expand_columns_per_thread, expand_tiles_per_block, expand_variant, flat_expand_columns, fused_col_groups, fused_form,
    fused_grid_blocks, fused_is_dependent, fused_shape, grid_items, item_tokens, max_items, partial_len, pipe_expand_smem, pipe_expand_tiles,
    pipe_expand_kernel, pipe_merge_items, pipe_shrink_kernel, pipe_shrink_smem,
    pipe_signals, pipe_smem_fits, segments_len, small_items, takes_pipelined, u_len, FusedPlan, ShrinkPlan, Tuning, FUSED_COLS, FUSED_MAX_RANK, ITEMS_BY_ADAPTERS_MAX_T, TILE_T,
};
use super::DeviceKernels;
use crate::cache::slot_table::ENTRY_WORDS;
use crate::error::{LoraError, Result};
use crate::format::WeightsDtype;
use crate::modules::NUM_MODULES;

pub mod abi;

pub const MAX_SLICES: usize = 8;
/// The kernels keep a token tile's u in shared memory: ranks up to this fit.
pub const MAX_RANK: usize = 128;
const THREADS: u32 = 256;
const SEG_THREADS: u32 = 1024;
const MODULES: u32 = NUM_MODULES as u32;
/// Columns a thread of the beside merge takes (LMX_MERGE_COLS).
pub const MERGE_COLS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Float16,
    BFloat16,
}

impl Dtype {
    /// The serving dtypes the kernels are instantiated for.
    pub const ALL: [Dtype; 2] = [Dtype::Float16, Dtype::BFloat16];

    /// The same element type in the format's dtype table (its name and size).
    pub fn weights_dtype(self) -> WeightsDtype {
        match self {
            Dtype::Float16 => WeightsDtype::F16,
            Dtype::BFloat16 => WeightsDtype::BF16,
        }
    }

    pub fn parse(name: &str) -> Result<Dtype> {
        let name = name.trim_start_matches("torch.");
        let wanted = WeightsDtype::from_name(name).ok();
        Dtype::ALL
            .into_iter()
            .find(|d| Some(d.weights_dtype()) == wanted)
            .ok_or_else(|| LoraError::BadDtype { what: "LoRA kernel input", dtype: name.into(), expected: "float16, bfloat16" })
    }
    fn suffix(self) -> &'static str {
        match self {
            Dtype::Float16 => "f16",
            Dtype::BFloat16 => "bf16",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraSlices {
    count: i32,
    module_id: [i32; MAX_SLICES],
    out_offset: [i32; MAX_SLICES],
    out_size: [i32; MAX_SLICES],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LoraTable {
    layer_base: u64,
    slot_stride: i64,
    num_slots: i32,
    max_rank: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ShrinkArgs {
    x: u64,
    x_stride: i64,
    slot_of_token: u64,
    segments: u64,
    partial: u64,
    t: i32,
    hi: i32,
    ksplit: i32,
    kchunk: i32,
    max_items: i32,
    split_target: i32,
    merge_items: i32,
    signal_items: i32,
    table: LoraTable,
    slices: LoraSlices,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ExpandArgs {
    partial: u64,
    y: u64,
    y_stride: i64,
    slot_of_token: u64,
    segments: u64,
    t: i32,
    ksplit: i32,
    ochunk: i32,
    max_items: i32,
    hi: i32,
    split_target: i32,
    merge_items: i32,
    wait_items: i32,
    table: LoraTable,
    slices: LoraSlices,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FusedArgs {
    x: u64,
    x_stride: i64,
    y: u64,
    y_stride: i64,
    segments: u64,
    partial: u64,
    t: i32,
    hi: i32,
    ksplit: i32,
    kchunk: i32,
    max_items: i32,
    col_steps: i32,
    col_groups: i32,
    smem_bytes: i32,
    split_target: i32,
    expand_target: i32,
    placed_ksplit: i32,
    placed_kchunk: i32,
    placed_col_steps: i32,
    placed_groups: [i32; MAX_SLICES],
    table: LoraTable,
    slices: LoraSlices,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SegmentArgs {
    slot_of_token: u64,
    segments: u64,
    t: i32,
    num_slots: i32,
    max_items: i32,
    chunk: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ReduceArgs {
    partial: u64,
    u: u64,
    slot_of_token: u64,
    t: i32,
    ksplit: i32,
    table: LoraTable,
    slices: LoraSlices,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MergeArgs {
    y: u64,
    y_stride: i64,
    delta: u64,
    delta_stride: i64,
    slot_of_token: u64,
    t: i32,
    width: i32,
    vec: i32,
    table: LoraTable,
    slices: LoraSlices,
}

/// What every op shares: the batch (BatchMeta) and the layer.
#[derive(Clone, Debug)]
pub struct Batch {
    pub stream: u64,
    pub dtype: Dtype,
    /// int32 [T] device pointer
    pub slot_of_token: u64,
    /// int32 [segments_len(T, num_slots)] device pointer: the step's token segments, built by
    /// `build_segments` from the same slot_of_token (0: none; shrink and expand need them)
    pub segments: u64,
    pub tokens: usize,
    /// int64 [max_slots, num_layers, 19, ENTRY_WORDS] device pointer
    pub table: u64,
    pub num_slots: usize,
    pub num_layers: usize,
    pub layer: usize,
    pub max_rank: usize,
    /// the tuning table's launch choices for this call's geometry (default: the built-in rules)
    pub tuning: Tuning,
    /// distinct adapter slots among the tokens where the host knows them: with the token count it
    /// decides how the segments cut the tokens (`small_items`), so it must be what they were built with
    pub adapters: Option<usize>,
}

impl Batch {
    fn check(&self) -> Result<()> {
        let bad = |msg: String| Err(LoraError::Cuda(msg));
        if self.layer >= self.num_layers {
            return bad(format!("layer {} is out of range for a slot table of {} layers", self.layer, self.num_layers));
        }
        if self.max_rank == 0 || self.max_rank > MAX_RANK {
            return bad(format!("max_rank {} must be in 1..={MAX_RANK} for the CUDA kernels", self.max_rank));
        }
        if self.tokens > i32::MAX as usize / 2 {
            return bad(format!("{} tokens is more than the kernels index", self.tokens));
        }
        if self.num_slots == 0 {
            return bad("the slot table has no slots".into());
        }
        if self.num_slots > i32::MAX as usize / 4 {
            return bad(format!("{} slots is more than the kernels index", self.num_slots));
        }
        Ok(())
    }

    fn need_segments(&self) -> Result<()> {
        if self.segments == 0 {
            return Err(LoraError::Cuda("the token segments of the batch were not built (build_segments)".into()));
        }
        Ok(())
    }

    fn max_items(&self) -> usize {
        max_items(self.tokens, self.num_slots, self.decode())
    }

    fn grid_items(&self) -> usize {
        grid_items(self.tokens, self.num_slots, self.decode())
    }

    fn table_args(&self) -> LoraTable {
        let layer_words = MODULES as usize * ENTRY_WORDS;
        let slot_stride = (self.num_layers * layer_words) as i64;
        LoraTable {
            layer_base: self.table + (self.layer * layer_words * std::mem::size_of::<i64>()) as u64,
            slot_stride,
            num_slots: self.num_slots as i32,
            max_rank: self.max_rank as i32,
        }
    }

    /// Small work items on CUDA cores (split-K shrink, expand summing the partials) vs tensor-core tiles.
    fn decode(&self) -> bool {
        small_items(self.tokens, self.adapters)
    }

}

fn slices(module_ids: &[u32], out_sizes: Option<&[usize]>) -> Result<LoraSlices> {
    if module_ids.is_empty() || module_ids.len() > MAX_SLICES {
        return Err(LoraError::Cuda(format!("{} slices: one launch takes 1..={MAX_SLICES}", module_ids.len())));
    }
    let mut s = LoraSlices { count: module_ids.len() as i32, ..Default::default() };
    let mut offset = 0usize;
    for (i, &m) in module_ids.iter().enumerate() {
        if m >= MODULES {
            return Err(LoraError::UnknownModuleId { row: i, module_id: m as i64 });
        }
        s.module_id[i] = m as i32;
        if let Some(sizes) = out_sizes {
            s.out_offset[i] = offset as i32;
            s.out_size[i] = sizes[i] as i32;
            offset += sizes[i];
        }
    }
    if offset > i32::MAX as usize {
        return Err(LoraError::Cuda("output width past 2^31".into()));
    }
    Ok(s)
}

unsafe fn launch<A>(k: &DeviceKernels, name: &str, grid: (u32, u32, u32), stream: u64, args: &A) -> Result<()> {
    let f = k.function(name)?;
    let mut params = [args as *const A as *mut c_void];
    drv::launch_kernel(f, grid, (THREADS, 1, 1), 0, stream as sys::CUstream, &mut params)
        .map_err(|e| LoraError::Cuda(format!("launch {name}: {e:?}")))
}

/// Launches as a programmatic dependent of the kernel before it on the stream (sm_90+): it may
/// start while that one runs and waits in-kernel (griddepcontrol.wait) before reading its output.
unsafe fn launch_dependent<A>(k: &DeviceKernels, name: &str, grid: (u32, u32, u32), stream: u64, args: &A) -> Result<()> {
    if k.arch < 90 {
        return launch(k, name, grid, stream, args);
    }
    let f = k.function(name)?;
    launch_dependent_fn(f, name, grid, 0, stream, args)
}

unsafe fn launch_dependent_fn<A>(
    f: sys::CUfunction, name: &str, grid: (u32, u32, u32), smem: u32, stream: u64, args: &A,
) -> Result<()> {
    let mut params = [args as *const A as *mut c_void];
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream as sys::CUstream,
        attrs: &mut attr,
        numAttrs: 1,
    };
    sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut())
        .result()
        .map_err(|e| LoraError::Cuda(format!("launch {name} (dependent): {e:?}")))
}

/// Launches with `smem` bytes of dynamic shared memory (the attribute raised past the 48 KB default),
/// as a programmatic dependent of the kernel before it where `dependent` and the arch allow.
unsafe fn launch_smem<A>(
    k: &DeviceKernels, name: &str, grid: (u32, u32, u32), smem: usize, stream: u64, args: &A, dependent: bool,
) -> Result<()> {
    let f = k.function(name)?;
    if smem > 48 * 1024 {
        sys::cuFuncSetAttribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .result()
            .map_err(|e| LoraError::Cuda(format!("{name}: {smem} bytes of shared memory: {e:?}")))?;
    }
    if dependent && k.arch >= 90 {
        return launch_dependent_fn(f, name, grid, smem as u32, stream, args);
    }
    let mut params = [args as *const A as *mut c_void];
    drv::launch_kernel(f, grid, (THREADS, 1, 1), smem as u32, stream as sys::CUstream, &mut params)
        .map_err(|e| LoraError::Cuda(format!("launch {name}: {e:?}")))
}

/// Builds the token segments of a batch (cuda/lora_segments.cu) into `segments`, which must hold
/// `segments_len(tokens, num_slots, small_items(tokens, adapters))` int32s: once per step, before
/// the step's shrinks and expands (whose Batch carries the same `adapters`).
#[allow(clippy::too_many_arguments)]
pub fn build_segments(
    k: &DeviceKernels, stream: u64, slot_of_token: u64, tokens: usize, num_slots: usize, adapters: Option<usize>,
    segments: u64, capacity: usize,
) -> Result<()> {
    if num_slots == 0 || num_slots > i32::MAX as usize / 4 || tokens > i32::MAX as usize / 2 {
        return Err(LoraError::Cuda(format!("{tokens} tokens over {num_slots} slots is out of the kernels' range")));
    }
    let small = small_items(tokens, adapters);
    let need = segments_len(tokens, num_slots, small);
    if capacity < need {
        return Err(LoraError::Cuda(format!("segments buffer holds {capacity} int32s, {need} needed")));
    }
    if segments == 0 || (tokens > 0 && slot_of_token == 0) {
        return Err(LoraError::Cuda("null segments or slot_of_token pointer".into()));
    }
    let args = SegmentArgs {
        slot_of_token,
        segments,
        t: tokens as i32,
        num_slots: num_slots as i32,
        max_items: max_items(tokens, num_slots, small) as i32,
        chunk: item_tokens(small) as i32,
    };
    let f = k.function("lora_segments")?;
    let mut params = [&args as *const SegmentArgs as *mut c_void];
    unsafe { drv::launch_kernel(f, (1, 1, 1), (SEG_THREADS, 1, 1), 0, stream as sys::CUstream, &mut params) }
        .map_err(|e| LoraError::Cuda(format!("launch lora_segments: {e:?}")))
}

/// Shrink into the partial buffer. `partial` must hold `partial_len(plan, ...)` floats. Where the
/// pipelined prefill shrink runs and the buffer has room for u after the partials (`u_len`), it
/// also sums them into u there: returns u's offset in floats then (the expand reads it with
/// ksplit 1), else None.
#[allow(clippy::too_many_arguments)]
pub fn shrink(
    k: &DeviceKernels, b: &Batch, x: u64, x_stride: usize, hi: usize, module_ids: &[u32],
    partial: u64, partial_capacity: usize, plan: &ShrinkPlan,
) -> Result<Option<usize>> {
    match shrink_launch(k, b, x, x_stride, hi, module_ids, partial, partial_capacity, plan)? {
        Some(l) => l.go(k, b),
        None => Ok(None),
    }
}

/// A shrink launch, validated and planned, not yet launched.
struct ShrinkLaunch {
    args: ShrinkArgs,
    grid: (u32, u32, u32),
    /// the pipelined kernel's name and u's offset in the partial buffer, else None
    pipe: Option<(String, usize)>,
}

impl ShrinkLaunch {
    fn go(&self, k: &DeviceKernels, b: &Batch) -> Result<Option<usize>> {
        if let Some((name, u)) = &self.pipe {
            unsafe { launch_smem(k, name, self.grid, pipe_shrink_smem(b.max_rank), b.stream, &self.args, false)? };
            return Ok(Some(*u));
        }
        let kind = if b.decode() { "decode" } else { "tile" };
        let name = format!("lora_shrink_{kind}_{}", b.dtype.suffix());
        unsafe { launch(k, &name, self.grid, b.stream, &self.args)? };
        Ok(None)
    }
}

/// `shrink`'s checks and plan; None: nothing to launch (no tokens or an empty input width).
#[allow(clippy::too_many_arguments)]
fn shrink_launch(
    k: &DeviceKernels, b: &Batch, x: u64, x_stride: usize, hi: usize, module_ids: &[u32],
    partial: u64, partial_capacity: usize, plan: &ShrinkPlan,
) -> Result<Option<ShrinkLaunch>> {
    b.check()?;
    let sl = slices(module_ids, None)?;
    if b.tokens == 0 || hi == 0 {
        return Ok(None);
    }
    if x_stride < hi {
        return Err(LoraError::Cuda(format!("x row stride {x_stride} is shorter than Hi {hi}")));
    }
    let need = partial_len(plan, module_ids.len(), b.tokens, b.max_rank);
    if partial_capacity < need {
        return Err(LoraError::Cuda(format!("partial buffer holds {partial_capacity} floats, the plan needs {need}")));
    }
    b.need_segments()?;
    let items = b.max_items();
    let args = ShrinkArgs {
        x,
        x_stride: x_stride as i64,
        slot_of_token: b.slot_of_token,
        segments: b.segments,
        partial,
        t: b.tokens as i32,
        hi: hi as i32,
        ksplit: plan.ksplit as i32,
        kchunk: plan.kchunk as i32,
        max_items: items as i32,
        // the decode shrink only (T <= 64): the other kernels keep the planned split
        split_target: if b.decode() && b.tokens <= TILE_T { plan.split_target as i32 } else { 0 },
        merge_items: pipe_merge_items(b.tokens, b.decode(), true) as i32,
        signal_items: 0,
        table: b.table_args(),
        slices: sl,
    };
    let grid = (plan.ksplit as u32, b.grid_items() as u32, module_ids.len() as u32);
    // the pipelined prefill shrink copies x in 16-byte pieces (the register-staged one takes the rest)
    let pipe = (takes_pipelined(b.tokens, b.decode(), b.adapters, b.max_rank, &b.tuning)
        && hi % 8 == 0
        && x_stride % 8 == 0
        && x % 16 == 0
        && pipe_smem_fits(pipe_shrink_smem(b.max_rank), k.arch)
        && partial_capacity >= need + u_len(module_ids.len(), b.tokens, b.max_rank))
    .then(|| (pipe_shrink_kernel(b.dtype.suffix(), b.max_rank), need));
    Ok(Some(ShrinkLaunch { args, grid, pipe }))
}

/// Sums the partials into u [S, T, max_rank] (zero past each token's rank): the standalone shrink.
pub fn reduce(k: &DeviceKernels, b: &Batch, module_ids: &[u32], partial: u64, plan: &ShrinkPlan, u: u64) -> Result<()> {
    b.check()?;
    let sl = slices(module_ids, None)?;
    let total = module_ids.len() * b.tokens * b.max_rank;
    if total == 0 {
        return Ok(());
    }
    let args = ReduceArgs {
        partial,
        u,
        slot_of_token: b.slot_of_token,
        t: b.tokens as i32,
        ksplit: plan.ksplit as i32,
        table: b.table_args(),
        slices: sl,
    };
    let blocks = total.div_ceil(THREADS as usize).min(8 * 132) as u32;
    unsafe { launch(k, "lora_shrink_reduce", (blocks, 1, 1), b.stream, &args) }
}

/// Every slice of a beside branch's applies in one list, each apply's laid from column 0 (so
/// slices of different applies may overlap): what the merge scales y by.
fn merge_slices(applies: &[(Vec<u32>, Vec<usize>)], width: usize) -> Result<LoraSlices> {
    let mut sl = LoraSlices::default();
    for (ids, sizes) in applies {
        if ids.len() != sizes.len() {
            return Err(LoraError::Cuda(format!("{} module ids but {} out sizes", ids.len(), sizes.len())));
        }
        let one = slices(ids, Some(sizes))?;
        let end = sizes.iter().sum::<usize>();
        if end > width {
            return Err(LoraError::Cuda(format!("slices of {end} columns past the merged width {width}")));
        }
        for i in 0..one.count as usize {
            let n = sl.count as usize;
            if n == MAX_SLICES {
                return Err(LoraError::Cuda(format!("more than {MAX_SLICES} slices in one beside branch")));
            }
            sl.module_id[n] = one.module_id[i];
            sl.out_offset[n] = one.out_offset[i];
            sl.out_size[n] = one.out_size[i];
            sl.count += 1;
        }
    }
    Ok(sl)
}

/// The join of a LoRA branch run beside the base GEMM: y = f * y + delta over `width` columns,
/// f the product of the row adapter's DoRA scales over the slices covering a column. `applies`:
/// the branch's (module ids, out sizes), each laid from column 0 of y and of delta.
#[allow(clippy::too_many_arguments)]
pub fn merge_beside(
    k: &DeviceKernels, b: &Batch, applies: &[(Vec<u32>, Vec<usize>)], width: usize, y: u64, y_stride: usize, delta: u64,
    delta_stride: usize,
) -> Result<()> {
    b.check()?;
    let sl = merge_slices(applies, width)?;
    if width > i32::MAX as usize || y_stride < width || delta_stride < width {
        return Err(LoraError::Cuda(format!("merge of {width} columns over row strides {y_stride} (y) and {delta_stride} (delta)")));
    }
    if b.tokens == 0 || width == 0 {
        return Ok(());
    }
    let vec = (y | delta) % 16 == 0 && (y_stride | delta_stride) % 8 == 0;
    let args = MergeArgs {
        y,
        y_stride: y_stride as i64,
        delta,
        delta_stride: delta_stride as i64,
        slot_of_token: b.slot_of_token,
        t: b.tokens as i32,
        width: width as i32,
        vec: vec as i32,
        table: b.table_args(),
        slices: sl,
    };
    let grid = (b.tokens as u32, width.div_ceil(THREADS as usize * MERGE_COLS) as u32, 1);
    let name = format!("lora_beside_merge_{}", b.dtype.suffix());
    unsafe { launch(k, &name, grid, b.stream, &args) }
}

/// Expand from `ksplit` partials (ksplit = 1 for a caller's u) into y, in place. `chained`: the
/// kernel before it on the stream is the shrink that wrote `partial` (lora_apply). `split`: the
/// shrink's (Hi, split_target) where it sized its split on the device (ShrinkPlan::split_target):
/// the expand sums the same splits of the `ksplit` the partials are strided by.
#[allow(clippy::too_many_arguments)]
pub fn expand(
    k: &DeviceKernels, b: &Batch, partial: u64, ksplit: usize, y: u64, y_stride: usize, module_ids: &[u32],
    out_sizes: &[usize], chained: bool, split: Option<(usize, usize)>,
) -> Result<()> {
    match expand_launch(k, b, partial, ksplit, y, y_stride, module_ids, out_sizes, chained, split)? {
        Some(l) => l.go(k, b),
        None => Ok(()),
    }
}

/// An expand launch, validated and planned, not yet launched.
struct ExpandLaunch {
    args: ExpandArgs,
    grid: (u32, u32, u32),
    name: String,
    /// the pipelined kernel (its name in `name`)
    pipe: bool,
    chained: bool,
}

impl ExpandLaunch {
    fn go(&self, k: &DeviceKernels, b: &Batch) -> Result<()> {
        if self.pipe {
            return unsafe { launch_smem(k, &self.name, self.grid, pipe_expand_smem(b.max_rank), b.stream, &self.args, self.chained) };
        }
        // Chained right after our own shrink (which never writes y): start early, overlap the prologue.
        if self.chained {
            unsafe { launch_dependent(k, &self.name, self.grid, b.stream, &self.args) }
        } else {
            unsafe { launch(k, &self.name, self.grid, b.stream, &self.args) }
        }
    }
}

/// `expand`'s checks and plan; None: nothing to launch (no tokens or no output columns).
#[allow(clippy::too_many_arguments)]
fn expand_launch(
    k: &DeviceKernels, b: &Batch, partial: u64, ksplit: usize, y: u64, y_stride: usize, module_ids: &[u32],
    out_sizes: &[usize], chained: bool, split: Option<(usize, usize)>,
) -> Result<Option<ExpandLaunch>> {
    b.check()?;
    if out_sizes.len() != module_ids.len() {
        return Err(LoraError::Cuda(format!("{} out_sizes for {} module ids", out_sizes.len(), module_ids.len())));
    }
    let sl = slices(module_ids, Some(out_sizes))?;
    let width: usize = out_sizes.iter().sum();
    if y_stride < width {
        return Err(LoraError::Cuda(format!("y row stride {y_stride} is narrower than sum(out_sizes) = {width}")));
    }
    let max_out = out_sizes.iter().copied().max().unwrap_or(0);
    if b.tokens == 0 || max_out == 0 {
        return Ok(None);
    }
    b.need_segments()?;
    let items = b.max_items();
    // small items: output columns per thread (the kernel is templated on it: 1 and 4 instantiated)
    let per_thread = expand_columns_per_thread(&b.tuning);
    let flat = decode_expand_is_flat(b.tokens, b.decode(), b.adapters, module_ids.len(), b.max_rank, &b.tuning);
    let tiles = expand_tiles_per_block(&b.tuning);
    // the pipelined prefill expand copies y in 16-byte pieces (the register-staged one takes the rest)
    let pipe = !flat
        && takes_pipelined(b.tokens, b.decode(), b.adapters, b.max_rank, &b.tuning)
        && y % 16 == 0
        && y_stride % 8 == 0
        && out_sizes.iter().all(|&o| o % 8 == 0)
        && pipe_smem_fits(pipe_expand_smem(b.max_rank), k.arch);
    let ochunk = if flat {
        flat_expand_columns(b.tokens)
    } else if pipe {
        64 * pipe_expand_tiles(b.tokens, b.decode(), out_sizes, &b.tuning)
    } else if b.decode() {
        THREADS as usize * per_thread
    } else {
        64 * tiles
    };
    let args = ExpandArgs {
        partial,
        y,
        y_stride: y_stride as i64,
        slot_of_token: b.slot_of_token,
        segments: b.segments,
        t: b.tokens as i32,
        ksplit: ksplit as i32,
        ochunk: ochunk as i32,
        max_items: items as i32,
        hi: split.map_or(0, |s| s.0) as i32,
        split_target: match split {
            Some((hi, target)) if hi > 0 && ksplit > 1 && b.decode() && b.tokens <= TILE_T => target as i32,
            _ => 0,
        },
        merge_items: pipe_merge_items(b.tokens, b.decode(), false) as i32,
        wait_items: 0,
        table: b.table_args(),
        slices: sl,
    };
    let (name, gy) = if pipe {
        (pipe_expand_kernel(b.dtype.suffix(), b.max_rank), b.grid_items())
    } else if flat {
        (format!("lora_expand_flat_{}", b.dtype.suffix()), 1)
    } else if b.decode() {
        (format!("lora_expand_decode_{}_o{}", b.dtype.suffix(), expand_variant(&b.tuning)), b.grid_items())
    } else {
        (format!("lora_expand_tile_{}_c{tiles}", b.dtype.suffix()), b.grid_items())
    };
    let grid = (max_out.div_ceil(ochunk) as u32, gy as u32, module_ids.len() as u32);
    Ok(Some(ExpandLaunch { args, grid, name, pipe, chained }))
}

/// Shrink and expand of one lora_apply on the pipelined kernels, the expand waiting on each item's
/// u (its shrink's last split signals it, in the segments' workspace) rather than on the whole
/// shrink grid: an item's expand starts while other items' shrinks still run, and the wait ends
/// when the last split is summed, not when the grid has drained. Ok(false), nothing launched,
/// where either kernel would not be the pipelined one, the two would cut different items (merged
/// apart: LORAMUX_PIPE_MERGE=shrink), a slice has no columns, or `plan::pipe_signals` says no; the
/// caller then launches `shrink` and `expand`. Both are checked before either launches: a signal no
/// expand waits on would stay in the workspace.
#[allow(clippy::too_many_arguments)]
pub fn apply_signalled(
    k: &DeviceKernels, b: &Batch, x: u64, x_stride: usize, hi: usize, y: u64, y_stride: usize, module_ids: &[u32],
    out_sizes: &[usize], partial: u64, partial_capacity: usize, plan: &ShrinkPlan,
) -> Result<bool> {
    if !pipe_signals(b.tokens, b.max_rank)
        || pipe_merge_items(b.tokens, b.decode(), true) != pipe_merge_items(b.tokens, b.decode(), false)
        // a slice of no columns has no expand block to take its items' signals back
        || out_sizes.contains(&0)
    {
        return Ok(false);
    }
    let Some(mut shrink) = shrink_launch(k, b, x, x_stride, hi, module_ids, partial, partial_capacity, plan)? else {
        return Ok(false);
    };
    let Some((_, u)) = shrink.pipe else { return Ok(false) };
    let u_ptr = partial + (u * std::mem::size_of::<f32>()) as u64;
    if u_ptr % 16 != 0 {
        return Ok(false); // the expand's float4 form of reading u (pipe_signals) needs it aligned
    }
    let Some(mut expand) = expand_launch(k, b, u_ptr, 1, y, y_stride, module_ids, out_sizes, true, None)? else {
        return Ok(false);
    };
    if !expand.pipe {
        return Ok(false);
    }
    shrink.args.signal_items = 1;
    expand.args.wait_items = 1;
    shrink.go(k, b)?;
    expand.go(k, b)?;
    Ok(true)
}

/// The fused decode apply (cuda/lora_fused.cu): shrink and expand of a batch of <= 64 tokens in
/// one launch, y updated in place. `partial` must hold `partial_len(&plan.shrink, ...)` floats; the
/// segments buffer carries the kernel's workspace (zeroed by build_segments, left zeroed by every
/// launch), so launches sharing one segments buffer must be ordered on one stream.
#[allow(clippy::too_many_arguments)]
pub fn fused(
    k: &DeviceKernels, b: &Batch, x: u64, x_stride: usize, hi: usize, y: u64, y_stride: usize, module_ids: &[u32],
    out_sizes: &[usize], partial: u64, partial_capacity: usize, plan: &FusedPlan,
) -> Result<()> {
    b.check()?;
    if out_sizes.len() != module_ids.len() {
        return Err(LoraError::Cuda(format!("{} out_sizes for {} module ids", out_sizes.len(), module_ids.len())));
    }
    let sl = slices(module_ids, Some(out_sizes))?;
    if b.tokens > ITEMS_BY_ADAPTERS_MAX_T || b.max_rank > FUSED_MAX_RANK {
        return Err(LoraError::Cuda(format!(
            "the fused decode kernel takes up to {ITEMS_BY_ADAPTERS_MAX_T} tokens and rank {FUSED_MAX_RANK}, got {} and {}",
            b.tokens, b.max_rank
        )));
    }
    if !b.decode() {
        return Err(LoraError::Cuda(format!(
            "the fused decode kernel takes small-item segments; {} tokens over {:?} adapters are cut into tiles",
            b.tokens, b.adapters
        )));
    }
    let width: usize = out_sizes.iter().sum();
    if y_stride < width {
        return Err(LoraError::Cuda(format!("y row stride {y_stride} is narrower than sum(out_sizes) = {width}")));
    }
    if x_stride < hi {
        return Err(LoraError::Cuda(format!("x row stride {x_stride} is shorter than Hi {hi}")));
    }
    let max_out = out_sizes.iter().copied().max().unwrap_or(0);
    if b.tokens == 0 || hi == 0 || max_out == 0 {
        return Ok(());
    }
    let sp = &plan.shrink;
    if sp.kchunk % 256 != 0 || sp.kchunk > 1024 || sp.ksplit * sp.kchunk < hi || plan.col_steps == 0
        || (sp.split_target > 0 && plan.expand_target == 0)
        || plan.col_groups * plan.col_steps * FUSED_COLS < max_out
    {
        return Err(LoraError::Cuda(format!("fused plan {plan:?} does not cover Hi {hi} and {max_out} columns")));
    }
    let need = partial_len(sp, module_ids.len(), b.tokens, b.max_rank);
    if partial_capacity < need {
        return Err(LoraError::Cuda(format!("partial buffer holds {partial_capacity} floats, the plan needs {need}")));
    }
    b.need_segments()?;
    let items = b.max_items();
    let form = fused_form(b.max_rank, sp.kchunk, plan.staged_a, plan.blocks_per_sm);
    let smem = form.smem_bytes;
    // the kernel's shape and placement for the most items, computed here once, not in every block
    let (placed_ksplit, placed_kchunk, placed_col_steps) = fused_shape(plan, hi, out_sizes, items);
    let mut placed_groups = [0i32; MAX_SLICES];
    for (g, &o) in placed_groups.iter_mut().zip(out_sizes) {
        *g = fused_col_groups(o, placed_col_steps) as i32;
    }
    let args = FusedArgs {
        x,
        x_stride: x_stride as i64,
        y,
        y_stride: y_stride as i64,
        segments: b.segments,
        partial,
        t: b.tokens as i32,
        hi: hi as i32,
        ksplit: sp.ksplit as i32,
        kchunk: sp.kchunk as i32,
        max_items: items as i32,
        col_steps: plan.col_steps as i32,
        col_groups: plan.col_groups as i32,
        smem_bytes: smem as i32,
        split_target: sp.split_target as i32,
        expand_target: plan.expand_target as i32,
        placed_ksplit: placed_ksplit as i32,
        placed_kchunk: placed_kchunk as i32,
        placed_col_steps: placed_col_steps as i32,
        placed_groups,
        table: b.table_args(),
        slices: sl,
    };
    // a group of ksplit + col_groups blocks per (slice, item); groups past the step's items leave at once
    let blocks = fused_grid_blocks(plan, hi, out_sizes, items);
    if blocks > i32::MAX as usize {
        return Err(LoraError::Cuda(format!("{blocks} blocks is more than one launch takes")));
    }
    let name = form.kernel_name(b.dtype.suffix());
    unsafe { launch_smem(k, &name, (blocks as u32, 1, 1), smem, b.stream, &args, fused_is_dependent()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layouts_match_the_c_side() {
        // sizes as the CUDA compiler lays out lora_common.cuh (8-byte aligned members)
        assert_eq!(std::mem::size_of::<LoraSlices>(), 4 + 3 * 4 * MAX_SLICES);
        assert_eq!(std::mem::size_of::<LoraTable>(), 24);
        // 8 ints fill what was the padding before the 8-aligned table
        assert_eq!(std::mem::size_of::<ShrinkArgs>(), 40 + 32 + 24 + 100 + 4);
        assert_eq!(std::mem::size_of::<ExpandArgs>(), 40 + 32 + 24 + 100 + 4);
        assert_eq!(std::mem::size_of::<SegmentArgs>(), 32);
        // 13 ints and placed_groups leave 4 bytes of padding before the 8-aligned table
        assert_eq!(std::mem::size_of::<FusedArgs>(), 48 + 52 + 32 + 4 + 24 + 100 + 4);
    }

    #[test]
    fn slices_reject_bad_module_ids_and_counts() {
        assert!(matches!(slices(&[1, 19], None), Err(LoraError::UnknownModuleId { row: 1, .. })));
        assert!(slices(&[], None).is_err());
        assert!(slices(&[1; 9], None).is_err());
        let s = slices(&[1, 2, 3], Some(&[4096, 1024, 1024])).unwrap();
        assert_eq!((s.out_offset[2], s.out_size[2]), (5120, 1024));
    }

    #[test]
    fn merge_slices_lay_each_apply_from_column_zero() {
        let applies = vec![(vec![0], vec![384]), (vec![1, 2, 3], vec![256, 64, 64])];
        let s = merge_slices(&applies, 384).unwrap();
        assert_eq!(s.count, 4);
        assert_eq!(&s.module_id[..4], &[0, 1, 2, 3]);
        assert_eq!((&s.out_offset[..4], &s.out_size[..4]), (&[0, 0, 256, 320][..], &[384, 256, 64, 64][..]));
        assert!(merge_slices(&applies, 383).is_err()); // past the width
        assert!(merge_slices(&[(vec![1, 2], vec![8])], 8).is_err()); // ids and sizes differ in count
        assert!(matches!(merge_slices(&[(vec![19], vec![8])], 8), Err(LoraError::UnknownModuleId { .. })));
        let nine = vec![(vec![1, 2, 3, 4, 5], vec![1; 5]), (vec![6, 7, 8, 9], vec![1; 4])];
        assert!(merge_slices(&nine, 8).is_err()); // more than one merge takes
    }

    #[test]
    fn dtype_names() {
        assert_eq!(Dtype::parse("torch.bfloat16").unwrap(), Dtype::BFloat16);
        assert_eq!(Dtype::parse("float16").unwrap(), Dtype::Float16);
        assert!(matches!(Dtype::parse("float32"), Err(LoraError::BadDtype { .. })));
    }
}
