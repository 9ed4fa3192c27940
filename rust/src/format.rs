//! The TensorRT-LLM LoRA tensor format: a `[N, 3|4]` config (`module_id, layer_idx, rank[, is_dora]`)
//! and an `[N, W]` weights array whose row i holds A_i (D x Hi), B_i (Ho x D), then Ho DoRA scales.
//! This file owns the row layout, its validation against a model (or, for rows being built, the
//! storage check), and packing rows into a cache page.

use std::collections::HashMap;

use half::{bf16, f16};

use crate::error::{LoraError, Result};
use crate::modules::LoraModule;

/// The model dimensions that decide each module's Hi / Ho. Zero means "the model has no such part"
/// (no cross attention, no experts), and rows for modules that need it are rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub expert_ffn_size: usize,
    pub num_experts: usize,
    pub encoder_hidden_size: usize,
    pub max_rank: usize,
}

impl ModelSpec {
    fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }
    fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// (Hi, Ho) of a module in this model, or why the model lacks it.
    pub fn module_dims(&self, module: LoraModule) -> std::result::Result<(usize, usize), &'static str> {
        use LoraModule::*;
        let h = self.hidden_size;
        let (q, kv, f, fe, enc) = (self.q_size(), self.kv_size(), self.ffn_size, self.expert_ffn_size, self.encoder_hidden_size);
        let need = |ok: bool, why: &'static str| if ok { Ok(()) } else { Err(why) };
        match module {
            AttnQkv => Ok((h, q + 2 * kv)),
            AttnQ => Ok((h, q)),
            AttnK | AttnV => Ok((h, kv)),
            AttnDense => Ok((q, h)),
            MlpHTo4h | MlpGate => need(f > 0, "no dense MLP").map(|_| (h, f)),
            Mlp4hToH => need(f > 0, "no dense MLP").map(|_| (f, h)),
            MlpGateUp => need(f > 0, "no dense MLP").map(|_| (h, 2 * f)),
            CrossAttnQkv => need(enc == h && enc > 0, "fused cross-attention qkv needs encoder width == hidden")
                .map(|_| (h, q + 2 * kv)),
            CrossAttnQ => need(enc > 0, "no cross attention").map(|_| (h, q)),
            CrossAttnK | CrossAttnV => need(enc > 0, "no cross attention").map(|_| (enc, kv)),
            CrossAttnDense => need(enc > 0, "no cross attention").map(|_| (q, h)),
            MoeHTo4h | MoeGate => need(fe > 0 && self.num_experts > 0, "no experts").map(|_| (h, fe)),
            Moe4hToH => need(fe > 0 && self.num_experts > 0, "no experts").map(|_| (fe, h)),
            MoeRouter => need(self.num_experts > 0, "no experts").map(|_| (h, self.num_experts)),
            MlpRouter => Ok((h, 1)),
        }
    }
}

/// The element types adapters arrive in and are served in: the one table of dtype names and sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightsDtype {
    F16,
    BF16,
    F32,
}

impl WeightsDtype {
    pub const ALL: [WeightsDtype; 3] = [WeightsDtype::F16, WeightsDtype::BF16, WeightsDtype::F32];

    pub fn size(self) -> usize {
        match self {
            WeightsDtype::F32 => 4,
            _ => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WeightsDtype::F16 => "float16",
            WeightsDtype::BF16 => "bfloat16",
            WeightsDtype::F32 => "float32",
        }
    }
    pub fn from_name(name: &str) -> Result<WeightsDtype> {
        match name {
            "float16" | "fp16" | "half" => Ok(WeightsDtype::F16),
            "bfloat16" | "bf16" => Ok(WeightsDtype::BF16),
            "float32" | "fp32" | "float" => Ok(WeightsDtype::F32),
            other => Err(LoraError::BadDtype { what: "weights", dtype: other.to_string(), expected: "float16, bfloat16, float32" }),
        }
    }
    /// Element `i` of a little-endian buffer of this dtype, as f32.
    #[inline]
    pub(crate) fn read(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            WeightsDtype::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
            WeightsDtype::F16 => f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
            WeightsDtype::BF16 => bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        }
    }
}

/// A borrowed `[rows, width]` C-contiguous weights array.
#[derive(Clone, Copy, Debug)]
pub struct WeightsView<'a> {
    pub dtype: WeightsDtype,
    pub rows: usize,
    pub width: usize,
    pub data: &'a [u8],
}

impl<'a> WeightsView<'a> {
    /// Accepts `[N, W]` or the `[1, N, W]` that TensorRT-LLM files carry.
    pub fn new(dtype: WeightsDtype, shape: &[usize], data: &'a [u8]) -> Result<Self> {
        let (rows, width) = match shape {
            [n, w] => (*n, *w),
            [1, n, w] => (*n, *w),
            _ => return Err(LoraError::BadShape { what: "weights", expected: "[N, W] or [1, N, W]", shape: shape.to_vec() }),
        };
        if data.len() != rows * width * dtype.size() {
            return Err(LoraError::BadShape { what: "weights buffer", expected: "N * W elements", shape: shape.to_vec() });
        }
        Ok(WeightsView { dtype, rows, width, data })
    }
    pub fn row_bytes(&self, row: usize) -> &'a [u8] {
        let stride = self.width * self.dtype.size();
        &self.data[row * stride..(row + 1) * stride]
    }
}

/// One config row, normalized: `[module_id, layer_idx, rank, is_dora]`.
pub type ConfigRow = [i64; 4];

/// Reads a `[N, 3]`, `[N, 4]` (or `[1, N, 3|4]`) config given as flat i64 values.
pub fn config_rows(shape: &[usize], values: &[i64]) -> Result<Vec<ConfigRow>> {
    let (n, cols) = match shape {
        [n, c] | [1, n, c] if *c == 3 || *c == 4 => (*n, *c),
        _ => return Err(LoraError::BadShape { what: "config", expected: "[N, 3] or [N, 4]", shape: shape.to_vec() }),
    };
    if values.len() != n * cols {
        return Err(LoraError::BadShape { what: "config buffer", expected: "N * 3|4 values", shape: shape.to_vec() });
    }
    Ok(values
        .chunks_exact(cols)
        .map(|c| [c[0], c[1], c[2], if cols == 4 { c[3] } else { 0 }])
        .collect())
}

/// Where one module-layer's A, B and DoRA scales sit, in elements from the start of its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    pub module: LoraModule,
    pub layer: usize,
    pub rank: usize,
    pub hi: usize,
    pub ho: usize,
    pub is_dora: bool,
}

impl RowLayout {
    pub fn a_len(&self) -> usize {
        self.rank * self.hi
    }
    pub fn b_len(&self) -> usize {
        self.ho * self.rank
    }
    pub fn scale_len(&self) -> usize {
        if self.is_dora { self.ho } else { 0 }
    }
    pub fn a_offset(&self) -> usize {
        0
    }
    pub fn b_offset(&self) -> usize {
        self.a_len()
    }
    pub fn scale_offset(&self) -> usize {
        self.a_len() + self.b_len()
    }
    /// Values the row must hold: D*Hi + Ho*D (+ Ho with DoRA).
    pub fn needed(&self) -> usize {
        self.a_len() + self.b_len() + self.scale_len()
    }
}

/// A validated adapter: one layout per config row, in config order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterLayout {
    pub rows: Vec<RowLayout>,
}

impl AdapterLayout {
    pub fn total_values(&self) -> usize {
        self.rows.iter().map(RowLayout::needed).sum()
    }
    pub fn has_dora(&self) -> bool {
        self.rows.iter().any(|r| r.is_dora)
    }
}

/// What validation may assume beyond the model's shape.
#[derive(Clone, Copy, Debug)]
pub struct ValidateOptions {
    /// DoRA rows are only servable where the base weights were available to normalize against.
    pub dora_allowed: bool,
    /// Scan every used value for NaN / Inf.
    pub check_finite: bool,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions { dora_allowed: true, check_finite: true }
    }
}

/// Checks the config alone against the model and returns the row layouts (no weights needed).
pub fn layout_from_config(config: &[ConfigRow], spec: &ModelSpec, opts: ValidateOptions) -> Result<AdapterLayout> {
    let mut seen: HashMap<(LoraModule, usize), usize> = HashMap::with_capacity(config.len());
    let mut rows = Vec::with_capacity(config.len());
    for (row, &[module_id, layer, rank, is_dora]) in config.iter().enumerate() {
        let module = LoraModule::from_id(module_id).ok_or(LoraError::UnknownModuleId { row, module_id })?;
        let (hi, ho) = spec
            .module_dims(module)
            .map_err(|reason| LoraError::ModuleNotInModel { row, module: module.name(), reason })?;
        if layer < 0 || layer as usize >= spec.num_layers {
            return Err(LoraError::LayerOutOfRange { row, layer, layers: spec.num_layers });
        }
        if rank < 1 || rank as usize > spec.max_rank {
            return Err(LoraError::BadRank { row, rank, max_rank: spec.max_rank });
        }
        if is_dora != 0 && is_dora != 1 {
            return Err(LoraError::BadIsDora { row, value: is_dora });
        }
        if is_dora == 1 && !opts.dora_allowed {
            return Err(LoraError::DoraWithoutBase { row });
        }
        let layer = layer as usize;
        if let Some(&first_row) = seen.get(&(module, layer)) {
            return Err(LoraError::DuplicateModuleLayer { row, first_row, module: module.name(), layer });
        }
        seen.insert((module, layer), row);
        rows.push(RowLayout { module, layer, rank: rank as usize, hi, ho, is_dora: is_dora == 1 });
    }
    Ok(AdapterLayout { rows })
}

/// Validates (weights, config) against the model: every bad-input class gets its own typed error
/// naming the row and the field (the first one a row-by-row check meets).
pub fn validate(weights: &WeightsView, config: &[ConfigRow], spec: &ModelSpec, opts: ValidateOptions) -> Result<AdapterLayout> {
    let layout = checked_layout(weights, config, spec, opts)?;
    scan_digest_pack(weights, &layout, opts.value_checks(None), None, false)?;
    Ok(layout)
}

impl ValidateOptions {
    /// The value checks `validate` makes, plus the serving-dtype range when a cache packs.
    pub fn value_checks(&self, representable_in: Option<WeightsDtype>) -> ValueChecks {
        ValueChecks { finite: self.check_finite, dora_scales: true, representable_in }
    }
}

/// The config checks and each row's width, without the value scans (`scan_digest_pack` makes
/// them). A row too short to hold its values is reported only after the rows before it are
/// scanned, so the error is the one a row-by-row validation meets first.
pub fn checked_layout(weights: &WeightsView, config: &[ConfigRow], spec: &ModelSpec, opts: ValidateOptions) -> Result<AdapterLayout> {
    if config.len() != weights.rows {
        return Err(LoraError::RowCountMismatch { config_rows: config.len(), weight_rows: weights.rows });
    }
    let layout = layout_from_config(config, spec, opts)?;
    if let Some((row, r)) = layout.rows.iter().enumerate().find(|(_, r)| r.needed() > weights.width) {
        let before = AdapterLayout { rows: layout.rows[..row].to_vec() };
        scan_digest_pack(weights, &before, opts.value_checks(None), None, false)?;
        return Err(LoraError::RowTooShort {
            row,
            module: r.module.name(),
            layer: r.layer,
            rank: r.rank,
            needed: r.needed(),
            width: weights.width,
            dora: if r.is_dora { " + Ho" } else { "" },
        });
    }
    Ok(layout)
}

/// One row's shape as the code building an adapter knows it, before there is a config, or a model
/// to check it against (python/loramux/format.py `from_rows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    pub module_id: i64,
    pub layer: usize,
    pub rank: usize,
    pub hi: usize,
    pub ho: usize,
    pub is_dora: bool,
}

/// The layout of rows given by their shapes: each module id must be one of the format's, and each
/// row's values must fit the weights' width (so the value scans stay inside the row). Ranks,
/// layers and widths are the builder's; `validate` checks them against a model later.
pub fn layout_from_shapes(weights: &WeightsView, shapes: &[RowShape]) -> Result<AdapterLayout> {
    if shapes.len() != weights.rows {
        return Err(LoraError::RowCountMismatch { config_rows: shapes.len(), weight_rows: weights.rows });
    }
    let mut rows = Vec::with_capacity(shapes.len());
    for (row, s) in shapes.iter().enumerate() {
        let module = LoraModule::from_id(s.module_id).ok_or(LoraError::UnknownModuleId { row, module_id: s.module_id })?;
        // The sizes come from the caller, not a model: a count past usize is a row no array holds.
        let needed = s
            .rank
            .checked_mul(s.hi)
            .and_then(|a| s.ho.checked_mul(s.rank).and_then(|b| a.checked_add(b)))
            .and_then(|ab| ab.checked_add(if s.is_dora { s.ho } else { 0 }));
        if needed.is_none_or(|n| n > weights.width) {
            return Err(LoraError::RowTooShort {
                row,
                module: module.name(),
                layer: s.layer,
                rank: s.rank,
                needed: needed.unwrap_or(usize::MAX),
                width: weights.width,
                dora: if s.is_dora { " + Ho" } else { "" },
            });
        }
        rows.push(RowLayout { module, layer: s.layer, rank: s.rank, hi: s.hi, ho: s.ho, is_dora: s.is_dora });
    }
    Ok(AdapterLayout { rows })
}

/// Every used value is finite, and stays finite once stored as `storage`: what an adapter's
/// builder checks before converting (numpy stores an overflow as inf with only a warning). DoRA
/// scales are not checked for > 0: builders hold unnormalized scales that `validate` refuses later.
pub fn check_storable(weights: &WeightsView, layout: &AdapterLayout, storage: WeightsDtype) -> Result<()> {
    let checks = ValueChecks { finite: true, dora_scales: false, representable_in: Some(storage) };
    scan_digest_pack(weights, layout, checks, None, false).map(|_| ())
}

/// Little-endian element of width N (2 or 4 bytes) as u32.
#[inline(always)]
pub(crate) fn le_bits<const N: usize>(c: &[u8]) -> u32 {
    if N == 2 {
        u16::from_le_bytes([c[0], c[1]]) as u32
    } else {
        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    }
}

/// Elements each packed segment (A, B, scales) is aligned to, so kernels can use 16-byte loads.
pub const PACK_ALIGN_ELEMS: usize = 8;

fn align_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Offsets, in elements of the packed dtype, of each row's A, B and scales in a packed adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedRow {
    pub a: usize,
    pub b: usize,
    pub scale: usize,
}

/// A packed adapter: rows' used values, padding dropped, each segment aligned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    pub rows: Vec<PackedRow>,
    pub total_elems: usize,
}

pub fn packed_layout(layout: &AdapterLayout) -> PackedLayout {
    let mut at = 0;
    let rows = layout
        .rows
        .iter()
        .map(|r| {
            let a = at;
            let b = align_up(a + r.a_len(), PACK_ALIGN_ELEMS);
            let scale = align_up(b + r.b_len(), PACK_ALIGN_ELEMS);
            at = align_up(scale + r.scale_len(), PACK_ALIGN_ELEMS);
            PackedRow { a, b, scale }
        })
        .collect();
    PackedLayout { rows, total_elems: at }
}

/// Copies a segment of `len` values, converting dtype when it differs.
pub(crate) fn copy_convert(src: &[u8], src_dtype: WeightsDtype, dst: &mut [u8], dst_dtype: WeightsDtype, len: usize) {
    use WeightsDtype::*;
    if src_dtype == dst_dtype {
        let n = len * src_dtype.size();
        dst[..n].copy_from_slice(&src[..n]);
        return;
    }
    if convert_aligned(&src[..len * src_dtype.size()], src_dtype, &mut dst[..len * dst_dtype.size()], dst_dtype) {
        return;
    }
    let f16_in = |c: &[u8]| f16::from_bits(le_bits::<2>(c) as u16).to_f32();
    let bf16_in = |c: &[u8]| bf16::from_bits(le_bits::<2>(c) as u16).to_f32();
    let f32_in = |c: &[u8]| f32::from_bits(le_bits::<4>(c));
    let f16_out = |v: f32, d: &mut [u8]| d.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    let bf16_out = |v: f32, d: &mut [u8]| d.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
    let f32_out = |v: f32, d: &mut [u8]| d.copy_from_slice(&v.to_le_bytes());
    // One monomorphic loop per (source, destination) pair: no per-element dtype dispatch.
    match (src_dtype, dst_dtype) {
        (F16, BF16) => convert_each::<2, 2>(src, dst, len, f16_in, bf16_out),
        (F16, F32) => convert_each::<2, 4>(src, dst, len, f16_in, f32_out),
        (BF16, F16) => convert_each::<2, 2>(src, dst, len, bf16_in, f16_out),
        (BF16, F32) => convert_each::<2, 4>(src, dst, len, bf16_in, f32_out),
        (F32, F16) => convert_each::<4, 2>(src, dst, len, f32_in, f16_out),
        (F32, BF16) => convert_each::<4, 2>(src, dst, len, f32_in, bf16_out),
        _ => unreachable!("same dtype handled above"),
    }
}

/// The conversions a serving cache makes, on typed slices so they vectorize (float16 through the
/// half crate's F16C path where the CPU has it). False when either side is not aligned to its
/// element: the caller then converts byte-wise.
fn convert_aligned(src: &[u8], src_dtype: WeightsDtype, dst: &mut [u8], dst_dtype: WeightsDtype) -> bool {
    use half::slice::HalfFloatSliceExt;
    use WeightsDtype::*;
    if cfg!(target_endian = "big") {
        return false;
    }
    // SAFETY: f32, u16, f16 and u32 accept every bit pattern; align_to only reinterprets the
    // aligned middle, and a non-empty head or tail sends the caller to the byte-wise path.
    unsafe {
        match (src_dtype, dst_dtype) {
            (F32, BF16) => match (src.align_to::<u32>(), dst.align_to_mut::<u16>()) {
                (([], s, []), ([], d, [])) => d.iter_mut().zip(s).for_each(|(d, &s)| *d = f32_to_bf16_bits(f32::from_bits(s))),
                _ => return false,
            },
            (F32, F16) => match (src.align_to::<f32>(), dst.align_to_mut::<f16>()) {
                (([], s, []), ([], d, [])) => d.convert_from_f32_slice(s),
                _ => return false,
            },
            (F16, F32) => match (src.align_to::<f16>(), dst.align_to_mut::<f32>()) {
                (([], s, []), ([], d, [])) => s.convert_to_f32_slice(d),
                _ => return false,
            },
            _ => return false,
        }
    }
    true
}

/// f32 -> bf16 bits, round to nearest even (as half does), written branch-free so the packing loop
/// vectorizes; NaN stays a quiet NaN.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    if nan { ((bits >> 16) as u16) | 0x0040 } else { rounded }
}

#[inline(always)]
fn convert_each<const S: usize, const D: usize>(
    src: &[u8],
    dst: &mut [u8],
    len: usize,
    read: impl Fn(&[u8]) -> f32,
    write: impl Fn(f32, &mut [u8]),
) {
    for (s, d) in src[..len * S].chunks_exact(S).zip(dst[..len * D].chunks_exact_mut(D)) {
        write(read(s), d);
    }
}

/// Packs validated rows into `out` (`packed.total_elems` elements of `out_dtype`); gaps are zeroed.
pub fn pack_into(weights: &WeightsView, layout: &AdapterLayout, packed: &PackedLayout, out_dtype: WeightsDtype, out: &mut [u8]) {
    let target = PackTarget { packed, dtype: out_dtype, out };
    scan_digest_pack(weights, layout, ValueChecks::default(), Some(target), false).expect("no checks, no fault");
}

/// The values of every row, checked against the serving dtype alone: a float32 1e6 is a valid
/// weight but would be served as inf in float16.
pub fn check_representable(weights: &WeightsView, layout: &AdapterLayout, out_dtype: WeightsDtype) -> Result<()> {
    let checks = ValueChecks { representable_in: Some(out_dtype), ..ValueChecks::default() };
    scan_digest_pack(weights, layout, checks, None, false).map(|_| ())
}

#[path = "format_scan.rs"]
mod scan;
#[path = "format_pass.rs"]
mod pass;
pub use pass::{pass_threads, scan_digest_pack, PackTarget, ValueChecks};
#[cfg(test)]
use scan::check_finite;

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
