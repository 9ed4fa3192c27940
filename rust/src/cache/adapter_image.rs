//! An adapter as the cache stores it: each module-layer segment (A [rank, Hi], B [Ho, rank], DoRA
//! scales; each part 16-byte aligned) starts on a page boundary, so the host copy is a byte image of
//! what the device pool holds and a load is one memcpy per run of adjacent pages.

use crate::error::Result;
use crate::format::{self, AdapterLayout, PackTarget, PackedLayout, PackedRow, RowLayout, ValueChecks, WeightsDtype, WeightsView, PACK_ALIGN_ELEMS};

/// Where one module-layer sits in the image (byte offsets) and how many pages it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub row: RowLayout,
    /// Start of the segment in the image; a multiple of the page size.
    pub image_offset: usize,
    /// B's offset from the segment start.
    pub b_offset: usize,
    /// DoRA scales' offset from the segment start (None without DoRA).
    pub scale_offset: Option<usize>,
    /// Bytes the segment really uses (A + B + scales + alignment gaps).
    pub used_bytes: usize,
    pub pages: usize,
}

/// The page-aligned layout of one adapter in a given serving dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    pub dtype: WeightsDtype,
    pub page_bytes: usize,
    pub segments: Vec<Segment>,
}

impl ImageLayout {
    pub fn new(layout: &AdapterLayout, dtype: WeightsDtype, page_bytes: usize) -> Self {
        assert!(page_bytes > 0 && page_bytes % 16 == 0, "page_bytes must be a positive multiple of 16");
        let es = dtype.size();
        let align = |elems: usize| elems.div_ceil(PACK_ALIGN_ELEMS) * PACK_ALIGN_ELEMS * es;
        let mut at = 0;
        let segments = layout
            .rows
            .iter()
            .map(|&row| {
                let b_offset = align(row.a_len());
                let scale_start = b_offset + align(row.b_len());
                let used_bytes = scale_start + align(row.scale_len());
                let pages = used_bytes.div_ceil(page_bytes).max(1);
                let seg = Segment {
                    row,
                    image_offset: at,
                    b_offset,
                    scale_offset: row.is_dora.then_some(scale_start),
                    used_bytes,
                    pages,
                };
                at += pages * page_bytes;
                seg
            })
            .collect();
        ImageLayout { dtype, page_bytes, segments }
    }

    pub fn total_pages(&self) -> usize {
        self.segments.iter().map(|s| s.pages).sum()
    }

    /// Bytes the image holds (whole pages): what the adapter costs in either tier.
    pub fn held_bytes(&self) -> usize {
        self.total_pages() * self.page_bytes
    }

    pub fn used_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.used_bytes).sum()
    }

    pub fn page_counts(&self) -> Vec<usize> {
        self.segments.iter().map(|s| s.pages).collect()
    }

    /// Where each row's A, B and scales start, in elements of the serving dtype from the image start.
    pub fn packed_layout(&self) -> PackedLayout {
        let es = self.dtype.size();
        let rows = self
            .segments
            .iter()
            .map(|s| {
                let a = s.image_offset / es;
                PackedRow { a, b: a + s.b_offset / es, scale: a + s.scale_offset.unwrap_or(s.used_bytes) / es }
            })
            .collect();
        PackedLayout { rows, total_elems: self.held_bytes() / es }
    }

    /// Packs validated weights into `out` (`held_bytes()` long), converting to the serving dtype.
    pub fn pack(&self, weights: &WeightsView, layout: &AdapterLayout, out: &mut [u8]) {
        format::pack_into(weights, layout, &self.packed_layout(), self.dtype, out);
    }

    /// Checks the values, packs them into `out` and returns the adapter's digest, in one pass over
    /// the weights on every core; `out` holds garbage when a check fails.
    pub fn check_and_pack(&self, weights: &WeightsView, layout: &AdapterLayout, checks: ValueChecks, out: &mut [u8]) -> Result<u64> {
        let packed = self.packed_layout();
        format::scan_digest_pack(weights, layout, checks, Some(PackTarget { packed: &packed, dtype: self.dtype, out }), true)
    }
}

/// A 64-bit digest of an adapter's meaning (dtype, config rows, the values each row uses; padding
/// ignored) so a second put of the same task can tell "same weights" from "different weights".
pub fn digest(weights: &WeightsView, layout: &AdapterLayout) -> u64 {
    format::scan_digest_pack(weights, layout, ValueChecks::default(), None, true).expect("no checks, no fault")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{validate, ModelSpec, ValidateOptions};

    fn spec() -> ModelSpec {
        ModelSpec { num_layers: 2, hidden_size: 8, num_heads: 2, num_kv_heads: 1, head_dim: 4, ffn_size: 16, expert_ffn_size: 0, num_experts: 0, encoder_hidden_size: 0, max_rank: 8 }
    }

    #[test]
    fn segments_start_on_pages_and_parts_are_aligned() {
        // q: rank 3, A 3x8 = 24, B 8x3 = 24; v: rank 1 DoRA, A 8, B 4, scales 4.
        let cfg = vec![[1, 0, 3, 0], [3, 1, 1, 1]];
        let width = 48;
        let vals: Vec<u8> = (0..2 * width).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
        let w = WeightsView::new(WeightsDtype::F32, &[2, width], &vals).unwrap();
        let layout = validate(&w, &cfg, &spec(), ValidateOptions::default()).unwrap();
        let img = ImageLayout::new(&layout, WeightsDtype::F16, 64);
        let s0 = img.segments[0];
        assert_eq!((s0.image_offset, s0.b_offset, s0.scale_offset, s0.used_bytes, s0.pages), (0, 48, None, 96, 2));
        let s1 = img.segments[1];
        assert_eq!((s1.image_offset, s1.b_offset, s1.scale_offset, s1.used_bytes, s1.pages), (128, 16, Some(32), 48, 1));
        assert_eq!((img.held_bytes(), img.used_bytes()), (192, 144));
        let mut out = vec![0xAAu8; img.held_bytes()];
        img.pack(&w, &layout, &mut out);
        let h = |byte: usize| half::f16::from_bits(u16::from_le_bytes([out[byte], out[byte + 1]])).to_f32();
        assert_eq!(h(2), 0.5); // q A[0][1]
        assert_eq!(h(48), 12.0); // q B starts at column 24
        assert_eq!(h(128 + 16), 28.0); // v B: row 1 starts at 48, B at column 8
        assert_eq!(h(128 + 32), 30.0); // v scales at column 12
        assert!(out[96..128].iter().all(|&b| b == 0)); // page tail zeroed
    }

    #[test]
    fn digest_ignores_padding_and_sees_values() {
        let cfg = vec![[1, 0, 1, 0]]; // needs 8 + 8 = 16 values
        let mut vals = vec![1.0f32; 20];
        let bytes = |v: &Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let b1 = bytes(&vals);
        let w1 = WeightsView::new(WeightsDtype::F32, &[1, 20], &b1).unwrap();
        let layout = validate(&w1, &cfg, &spec(), ValidateOptions::default()).unwrap();
        vals[18] = 5.0; // padding
        let b2 = bytes(&vals);
        let w2 = WeightsView::new(WeightsDtype::F32, &[1, 20], &b2).unwrap();
        assert_eq!(digest(&w1, &layout), digest(&w2, &layout));
        vals[3] = 2.0;
        let b3 = bytes(&vals);
        let w3 = WeightsView::new(WeightsDtype::F32, &[1, 20], &b3).unwrap();
        assert_ne!(digest(&w1, &layout), digest(&w3, &layout));
    }
}
