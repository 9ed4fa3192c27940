//! The TensorRT-LLM LoRA tensor format: a `[N, 3|4]` config (`module_id, layer_idx, rank[, is_dora]`)
//! and an `[N, W]` weights array whose row i holds A_i (D x Hi), B_i (Ho x D), then Ho DoRA scales.
//! This file owns the row layout, its validation against a model, and packing rows into a cache page.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightsDtype {
    F16,
    BF16,
    F32,
}

impl WeightsDtype {
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
    fn read(self, bytes: &[u8], i: usize) -> f32 {
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
/// naming the row and the field.
pub fn validate(weights: &WeightsView, config: &[ConfigRow], spec: &ModelSpec, opts: ValidateOptions) -> Result<AdapterLayout> {
    if config.len() != weights.rows {
        return Err(LoraError::RowCountMismatch { config_rows: config.len(), weight_rows: weights.rows });
    }
    let layout = layout_from_config(config, spec, opts)?;
    for (row, r) in layout.rows.iter().enumerate() {
        if r.needed() > weights.width {
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
        if opts.check_finite {
            check_finite(weights.dtype, weights.row_bytes(row), r.needed(), row)?;
        }
        if r.is_dora {
            check_dora_scales(weights.dtype, weights.row_bytes(row), r, row)?;
        }
    }
    Ok(layout)
}

/// A normalized DoRA scale m_o / ||W0[o,:] + B[o,:] A|| is finite and > 0; anything else (zeros of
/// an unfilled row, a sign flip) was not produced by normalization and would corrupt the output.
fn check_dora_scales(dtype: WeightsDtype, bytes: &[u8], r: &RowLayout, row: usize) -> Result<()> {
    for column in r.scale_offset()..r.scale_offset() + r.scale_len() {
        let value = dtype.read(bytes, column);
        if !(value.is_finite() && value > 0.0) {
            return Err(LoraError::DoraNotNormalized { row, column, value });
        }
    }
    Ok(())
}

fn check_finite(dtype: WeightsDtype, bytes: &[u8], len: usize, row: usize) -> Result<()> {
    // Exponent-all-ones is NaN or Inf in every IEEE-like format; test bits, not floats, for speed.
    let bad = match dtype {
        WeightsDtype::F32 => first_exponent_all_ones::<4>(bytes, len, 0x7f80_0000),
        WeightsDtype::F16 => first_exponent_all_ones::<2>(bytes, len, 0x7c00),
        WeightsDtype::BF16 => first_exponent_all_ones::<2>(bytes, len, 0x7f80),
    };
    match bad {
        Some(column) => Err(LoraError::NonFinite { row, column, value: dtype.read(bytes, column) }),
        None => Ok(()),
    }
}

/// Little-endian element of width N (2 or 4 bytes) as u32.
#[inline(always)]
fn le_bits<const N: usize>(c: &[u8]) -> u32 {
    if N == 2 {
        u16::from_le_bytes([c[0], c[1]]) as u32
    } else {
        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    }
}

/// Index of the first of `len` elements whose `mask` bits are all set. Each block is tested
/// branch-free (so the compiler vectorizes it); only a block that has one is searched.
fn first_exponent_all_ones<const N: usize>(bytes: &[u8], len: usize, mask: u32) -> Option<usize> {
    const BLOCK: usize = 512;
    let bytes = &bytes[..len * N];
    if N == 4 && cfg!(target_endian = "little") {
        // SAFETY: every bit pattern is a valid u32; align_to only reinterprets the aligned middle.
        let (head, words, _) = unsafe { bytes.align_to::<u32>() };
        if head.is_empty() {
            let hit = |w: &u32| *w & mask == mask;
            for (b, block) in words.chunks(BLOCK).enumerate() {
                if block.iter().fold(false, |any, w| any | hit(w)) {
                    return block.iter().position(hit).map(|i| b * BLOCK + i);
                }
            }
            return None;
        }
    }
    let hit = |c: &[u8]| le_bits::<N>(c) & mask == mask;
    for (b, block) in bytes.chunks(BLOCK * N).enumerate() {
        if block.chunks_exact(N).fold(false, |any, c| any | hit(c)) {
            return block.chunks_exact(N).position(hit).map(|i| b * BLOCK + i);
        }
    }
    None
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
fn copy_convert(src: &[u8], src_dtype: WeightsDtype, dst: &mut [u8], dst_dtype: WeightsDtype, len: usize) {
    use WeightsDtype::*;
    if src_dtype == dst_dtype {
        let n = len * src_dtype.size();
        dst[..n].copy_from_slice(&src[..n]);
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
    let es = out_dtype.size();
    assert!(out.len() >= packed.total_elems * es, "pack_into: output buffer too small");
    let ins = weights.dtype.size();
    // Segments ascend through `out`: zero only the alignment gaps between them, so each output
    // byte is written once (a whole-buffer fill first would double the memory traffic).
    let mut at = 0;
    for (row, (r, p)) in layout.rows.iter().zip(&packed.rows).enumerate() {
        let src = weights.row_bytes(row);
        let segs = [(r.a_offset(), p.a, r.a_len()), (r.b_offset(), p.b, r.b_len()), (r.scale_offset(), p.scale, r.scale_len())];
        for (src_off, dst_off, len) in segs {
            if len > 0 {
                out[at * es..dst_off * es].fill(0);
                copy_convert(&src[src_off * ins..], weights.dtype, &mut out[dst_off * es..], out_dtype, len);
                at = dst_off + len;
            }
        }
    }
    out[at * es..packed.total_elems * es].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            num_layers: 4,
            hidden_size: 4,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            ffn_size: 8,
            expert_ffn_size: 0,
            num_experts: 0,
            encoder_hidden_size: 0,
            max_rank: 8,
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The seed's example: q and k adapters, 4 layers, hidden 4 (heads chosen so q = k = 4 wide).
    fn seed_example() -> (Vec<ConfigRow>, ModelSpec) {
        let mut s = spec();
        s.num_kv_heads = 2;
        let cfg = vec![[1, 0, 2, 0], [2, 0, 4, 0], [1, 1, 2, 0], [2, 1, 4, 0], [1, 2, 2, 0], [1, 3, 8, 0]];
        (cfg, s)
    }

    #[test]
    fn seed_example_validates_with_expected_widths() {
        let (cfg, s) = seed_example();
        let width = 8 * 4 + 4 * 8;
        let data = f32_bytes(&vec![0.5; cfg.len() * width]);
        let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &data).unwrap();
        let layout = validate(&w, &cfg, &s, ValidateOptions::default()).unwrap();
        let needed: Vec<usize> = layout.rows.iter().map(|r| r.needed()).collect();
        assert_eq!(needed, vec![16, 32, 16, 32, 16, 64]);
        assert_eq!(layout.rows[1].b_offset(), 16);
    }

    #[test]
    fn leading_batch_dim_is_accepted() {
        let data = f32_bytes(&[0.0; 2 * 16]);
        let w = WeightsView::new(WeightsDtype::F32, &[1, 2, 16], &data).unwrap();
        assert_eq!((w.rows, w.width), (2, 16));
        assert!(WeightsView::new(WeightsDtype::F32, &[2, 1, 16], &data).is_err());
        assert_eq!(config_rows(&[1, 1, 3], &[1, 0, 2]).unwrap(), vec![[1, 0, 2, 0]]);
    }

    #[test]
    fn each_bad_config_class_names_its_row() {
        let s = spec();
        let opts = ValidateOptions::default();
        let cases: Vec<(ConfigRow, fn(&LoraError) -> bool)> = vec![
            ([19, 0, 2, 0], |e| matches!(e, LoraError::UnknownModuleId { row: 1, .. })),
            ([1, 4, 2, 0], |e| matches!(e, LoraError::LayerOutOfRange { row: 1, .. })),
            ([1, -1, 2, 0], |e| matches!(e, LoraError::LayerOutOfRange { row: 1, .. })),
            ([1, 1, 0, 0], |e| matches!(e, LoraError::BadRank { row: 1, .. })),
            ([1, 1, 9, 0], |e| matches!(e, LoraError::BadRank { row: 1, .. })),
            ([1, 1, 2, 2], |e| matches!(e, LoraError::BadIsDora { row: 1, .. })),
            ([1, 0, 2, 0], |e| matches!(e, LoraError::DuplicateModuleLayer { row: 1, first_row: 0, .. })),
            ([13, 0, 2, 0], |e| matches!(e, LoraError::ModuleNotInModel { row: 1, .. })),
            ([10, 0, 2, 0], |e| matches!(e, LoraError::ModuleNotInModel { row: 1, .. })),
        ];
        for (bad, check) in cases {
            let cfg = vec![[1, 0, 2, 0], bad];
            let err = layout_from_config(&cfg, &s, opts).unwrap_err();
            assert!(check(&err), "{bad:?} gave {err:?}");
            assert_eq!(err.row(), Some(1));
        }
        let dora = vec![[1, 0, 2, 1]];
        let err = layout_from_config(&dora, &s, ValidateOptions { dora_allowed: false, check_finite: true }).unwrap_err();
        assert_eq!(err, LoraError::DoraWithoutBase { row: 0 });
    }

    #[test]
    fn non_finite_scan_finds_the_first_bad_value_aligned_or_not() {
        let n = 3 * 512 + 7; // several scan blocks and a ragged tail
        for bad in [0, 511, 512, 1000, n - 1] {
            let mut vals = vec![0.25f32; n];
            vals[bad] = f32::NAN;
            if bad + 3 < n {
                vals[bad + 3] = f32::INFINITY; // a later one must not be reported
            }
            let bytes = f32_bytes(&vals);
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes); // an unaligned view takes the byte-wise path
            for view in [&bytes[..], &shifted[1..]] {
                let err = check_finite(WeightsDtype::F32, view, n, 7).unwrap_err();
                assert!(matches!(err, LoraError::NonFinite { row: 7, column, .. } if column == bad), "{bad}: {err:?}");
            }
            let halves: Vec<u8> = vals.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect();
            assert!(matches!(check_finite(WeightsDtype::F16, &halves, n, 0), Err(LoraError::NonFinite { column, .. }) if column == bad));
            let brains: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
            assert!(matches!(check_finite(WeightsDtype::BF16, &brains, n, 0), Err(LoraError::NonFinite { column, .. }) if column == bad));
        }
        assert!(check_finite(WeightsDtype::F32, &f32_bytes(&vec![1.0; n]), n, 0).is_ok());
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let specials = [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, 1e-45, f32::INFINITY, f32::NEG_INFINITY];
        let sweep = (0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        for v in specials.into_iter().chain(sweep) {
            let want = bf16::from_f32(v);
            if v.is_nan() {
                assert!(bf16::from_bits(f32_to_bf16_bits(v)).is_nan());
            } else {
                assert_eq!(f32_to_bf16_bits(v), want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn packing_converts_between_every_dtype_pair() {
        let vals = [0.5f32, -1.25, 3.0, 0.0];
        let encode = |d: WeightsDtype| -> Vec<u8> {
            vals.iter()
                .flat_map(|v| match d {
                    WeightsDtype::F32 => v.to_le_bytes().to_vec(),
                    WeightsDtype::F16 => f16::from_f32(*v).to_bits().to_le_bytes().to_vec(),
                    WeightsDtype::BF16 => bf16::from_f32(*v).to_bits().to_le_bytes().to_vec(),
                })
                .collect()
        };
        let all = [WeightsDtype::F32, WeightsDtype::F16, WeightsDtype::BF16];
        for src in all {
            for dst in all {
                let mut out = vec![0u8; vals.len() * dst.size()];
                copy_convert(&encode(src), src, &mut out, dst, vals.len());
                let got: Vec<f32> = (0..vals.len()).map(|i| dst.read(&out, i)).collect();
                assert_eq!(got, vals, "{src:?} -> {dst:?}"); // these values are exact in every dtype
            }
        }
    }

    #[test]
    fn short_rows_and_non_finite_values_are_rejected() {
        let s = spec();
        let cfg = vec![[1, 0, 2, 1]]; // needs 2*4 + 4*2 + 4 = 20
        let data = f32_bytes(&[0.1; 19]);
        let w = WeightsView::new(WeightsDtype::F32, &[1, 19], &data).unwrap();
        assert!(matches!(validate(&w, &cfg, &s, ValidateOptions::default()), Err(LoraError::RowTooShort { needed: 20, width: 19, .. })));

        let mut vals = vec![0.1f32; 24];
        vals[19] = 0.0; // a DoRA scale that normalization cannot produce
        let data = f32_bytes(&vals);
        let w = WeightsView::new(WeightsDtype::F32, &[1, 24], &data).unwrap();
        let err = validate(&w, &cfg, &s, ValidateOptions::default()).unwrap_err();
        assert_eq!(err, LoraError::DoraNotNormalized { row: 0, column: 19, value: 0.0 });
        assert_eq!(err.python_class(), "LoraDoraError");
        vals[19] = 0.1;
        vals[21] = f32::NAN; // in the padding: ignored
        let data = f32_bytes(&vals);
        let w = WeightsView::new(WeightsDtype::F32, &[1, 24], &data).unwrap();
        assert!(validate(&w, &cfg, &s, ValidateOptions::default()).is_ok());
        vals[17] = f32::INFINITY;
        let data = f32_bytes(&vals);
        let w = WeightsView::new(WeightsDtype::F32, &[1, 24], &data).unwrap();
        assert!(matches!(validate(&w, &cfg, &s, ValidateOptions::default()), Err(LoraError::NonFinite { row: 0, column: 17, .. })));

        let half_nan: Vec<u8> = [0x3c00u16, 0x7e00].iter().flat_map(|b| b.to_le_bytes()).collect();
        assert!(check_finite(WeightsDtype::F16, &half_nan, 2, 3).is_err());
        let bf_inf: Vec<u8> = [0x3f80u16, 0xff80].iter().flat_map(|b| b.to_le_bytes()).collect();
        assert!(check_finite(WeightsDtype::BF16, &bf_inf, 2, 3).is_err());
    }

    #[test]
    fn module_dims_follow_the_design_table() {
        let s = ModelSpec { num_layers: 1, hidden_size: 16, num_heads: 4, num_kv_heads: 2, head_dim: 4, ffn_size: 32, expert_ffn_size: 8, num_experts: 4, encoder_hidden_size: 12, max_rank: 4 };
        use LoraModule::*;
        assert_eq!(s.module_dims(AttnQkv), Ok((16, 16 + 16)));
        assert_eq!(s.module_dims(AttnDense), Ok((16, 16)));
        assert_eq!(s.module_dims(MlpGateUp), Ok((16, 64)));
        assert_eq!(s.module_dims(CrossAttnK), Ok((12, 8)));
        assert!(s.module_dims(CrossAttnQkv).is_err());
        assert_eq!(s.module_dims(Moe4hToH), Ok((8, 16)));
        assert_eq!(s.module_dims(MoeRouter), Ok((16, 4)));
        assert_eq!(s.module_dims(MlpRouter), Ok((16, 1)));
    }

    #[test]
    fn packing_drops_padding_aligns_segments_and_converts() {
        let s = spec();
        let cfg = vec![[1, 0, 1, 0], [3, 0, 1, 1]]; // q: A 4, B 4; v: A 4, B 2, scales 2
        let width = 12;
        let vals: Vec<f32> = (0..2 * width).map(|i| i as f32).collect();
        let data = f32_bytes(&vals);
        let w = WeightsView::new(WeightsDtype::F32, &[2, width], &data).unwrap();
        let layout = validate(&w, &cfg, &s, ValidateOptions::default()).unwrap();
        let packed = packed_layout(&layout);
        assert_eq!(packed.rows[0], PackedRow { a: 0, b: 8, scale: 16 });
        assert_eq!(packed.rows[1], PackedRow { a: 16, b: 24, scale: 32 });
        assert_eq!(packed.total_elems, 40);
        let mut out = vec![0xffu8; packed.total_elems * 2];
        pack_into(&w, &layout, &packed, WeightsDtype::F16, &mut out);
        let got = |i: usize| f16::from_bits(u16::from_le_bytes([out[2 * i], out[2 * i + 1]])).to_f32();
        assert_eq!(got(0), 0.0);
        assert_eq!(got(8), 4.0); // row 0's B starts at column 4
        assert_eq!(got(5), 0.0); // alignment gap is zero
        assert_eq!(got(24), 16.0); // row 1's B: column 4 of row 1 = 12 + 4
        assert_eq!(got(32), 18.0); // row 1's scales: column 6
    }
}
