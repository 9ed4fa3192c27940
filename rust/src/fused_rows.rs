//! Fused rows as their parts. A fused row (attn_qkv, mlp_gate_up, cross_attn_qkv) holds one A and
//! a B whose rows stack its parts' outputs (q | k | v; mlp_h_to_4h | mlp_gate): x A^T B^T is
//! [x A^T B_q^T | x A^T B_k^T | x A^T B_v^T], and DoRA scales act per output row. So the row is,
//! exactly, its part rows sharing its A (same rank), each with its block of B's rows and of the
//! scales: what a model whose layers are the parts (a Llama's q_proj, k_proj, v_proj) serves.
//! The blocks are those tensor parallelism cuts each rank's slice from (tp.rs).

use std::ops::Range;

use crate::format::{AdapterLayout, ModelSpec, RowLayout, WeightsDtype, WeightsView};
use crate::tp::{column_ranges, fused_part_spans, gather_rows};

/// An adapter with some fused rows replaced by their parts: a dense `[rows, width]` array.
#[derive(Clone, Debug, PartialEq)]
pub struct PartRows {
    pub layout: AdapterLayout,
    pub dtype: WeightsDtype,
    pub width: usize,
    pub data: Vec<u8>,
}

impl PartRows {
    pub fn view(&self) -> WeightsView<'_> {
        WeightsView { dtype: self.dtype, rows: self.layout.rows.len(), width: self.width, data: &self.data }
    }
}

/// The part rows of one fused row, in the fused row's output order, and the element ranges of the
/// fused row that make each one (A whole, then the part's B rows and scales).
pub fn part_rows(r: &RowLayout, spec: &ModelSpec) -> Vec<(RowLayout, Vec<Range<usize>>)> {
    let parts = r.module.fused_parts().expect("only a fused module has parts");
    let spans = fused_part_spans(r.module, spec);
    debug_assert_eq!(spans.last().map(|s| s.end), Some(r.ho), "the parts tile the fused output");
    parts
        .iter()
        .zip(spans)
        .map(|(&module, span)| {
            debug_assert_eq!(spec.module_dims(module), Ok((r.hi, span.len())), "a part reads the fused row's input");
            let part = RowLayout { module, ho: span.len(), ..*r };
            (part, column_ranges(r, std::slice::from_ref(&span)))
        })
        .collect()
}

/// `weights` (rows laid out as `layout` says, already checked) with each row whose index is in
/// `split` (fused rows) replaced, where it stands, by its part rows; the other rows are copied
/// as they are.
pub fn split_fused_rows(weights: &WeightsView, layout: &AdapterLayout, split: &[usize], spec: &ModelSpec) -> PartRows {
    let mut rows = Vec::with_capacity(layout.rows.len() + 2 * split.len());
    let mut plans = Vec::with_capacity(rows.capacity());
    for (row, r) in layout.rows.iter().enumerate() {
        if split.contains(&row) {
            for (part, ranges) in part_rows(r, spec) {
                rows.push(part);
                plans.push((row, ranges));
            }
        } else {
            rows.push(*r);
            plans.push((row, std::iter::once(0..r.needed()).collect()));
        }
    }
    let (width, data) = gather_rows(weights, &plans);
    PartRows { layout: AdapterLayout { rows }, dtype: weights.dtype, width, data }
}

#[cfg(test)]
#[path = "fused_rows_tests.rs"]
mod tests;
