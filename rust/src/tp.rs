//! Tensor- and pipeline-parallel slicing: a request carries the full adapter, and each rank keeps
//! only what its shard of the model needs (the TensorRT-LLM LoRA
//! documentation, "LoRA with tensor parallel").
//!
//! Per-rank layout (what `slice_adapter` returns for rank r of tp_size t):
//! - ColumnLinear modules: A `[D, Hi]` whole; B's rows (Ho) and the DoRA scales split into t equal
//!   blocks, rank r keeping block r. A fused module splits each of its parts separately and
//!   concatenates rank r's block of every part in the original order, so the rank's output is laid
//!   out like its base shard: attn_qkv -> `q_r | k_r | v_r` (q and kv split at head boundaries),
//!   mlp_gate_up -> `gate_r | up_r`, cross_attn_qkv like attn_qkv.
//! - RowLinear modules (ids 4, 6, 12, 14): A's columns (Hi) split into t blocks, B and the DoRA
//!   scales whole. DoRA stays exact: the row-parallel output is a sum of per-rank partials
//!   p_r = x_r W0_r^T + x_r A_r^T B^T, and `scale ⊙ Σ_r p_r = Σ_r (scale ⊙ p_r)`, so each rank
//!   scales its own partial with the whole scale vector and the all-reduce sums them (the bias,
//!   if any, is added once after the all-reduce).
//! - Routers (moe_router 16, mlp_router 17) are replicated, not split: every rank needs all expert
//!   logits (and the single shared-expert gate) to route, so base and adapter are kept whole.
//! - Pipeline: a stage owning layers `[start, end)` keeps only those rows, renumbered to local
//!   layer indices `layer - start`, and its ModelSpec has `end - start` layers.

use std::ops::Range;

use crate::error::{LoraError, Result};
use crate::format::{self, ConfigRow, ModelSpec, RowLayout, ValidateOptions, WeightsDtype, WeightsView};
use crate::modules::{LoraModule, ParallelKind};

/// Which shard of the model one process serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParallelLayout {
    pub tp_size: usize,
    pub tp_rank: usize,
    /// The pipeline stage's layers (half-open, global indices); `None` = all layers.
    pub layers: Option<Range<usize>>,
}

impl ParallelLayout {
    pub fn new(tp_size: usize, tp_rank: usize, layers: Option<Range<usize>>) -> Self {
        ParallelLayout { tp_size, tp_rank, layers }
    }

    fn check(&self, spec: &ModelSpec) -> Result<()> {
        if self.tp_size == 0 {
            return Err(LoraError::BadParallelLayout("tp_size must be >= 1".into()));
        }
        if self.tp_rank >= self.tp_size {
            return Err(LoraError::BadParallelLayout(format!("tp_rank {} is not below tp_size {}", self.tp_rank, self.tp_size)));
        }
        if let Some(l) = &self.layers {
            if l.start >= l.end || l.end > spec.num_layers {
                return Err(LoraError::BadParallelLayout(format!(
                    "pipeline layers {}..{} must be a non-empty range within the model's {} layers",
                    l.start, l.end, spec.num_layers
                )));
            }
        }
        Ok(())
    }

    fn keeps_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }

    fn local_layer(&self, layer: usize) -> usize {
        layer - self.layers.as_ref().map_or(0, |l| l.start)
    }
}

/// How tensor parallelism treats a module's adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitKind {
    /// B and scales split along Ho, A whole.
    Column,
    /// A split along Hi; B and scales whole.
    Row,
    /// Whole on every rank (the routers).
    Replicated,
}

pub fn split_kind(module: LoraModule) -> SplitKind {
    match module {
        LoraModule::MoeRouter | LoraModule::MlpRouter => SplitKind::Replicated,
        m => match m.parallel_kind() {
            ParallelKind::Column => SplitKind::Column,
            ParallelKind::Row => SplitKind::Row,
        },
    }
}

/// One independently split part of the split dimension: `len` values made of `units` indivisible
/// units (heads or features) that must divide by tp_size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Part {
    len: usize,
    units: usize,
    dim: &'static str,
}

/// The parts of the dimension tensor parallelism splits (Ho for column, Hi for row), in order.
fn split_parts(module: LoraModule, spec: &ModelSpec) -> Vec<Part> {
    use LoraModule::*;
    let hd = spec.head_dim;
    let q = Part { len: spec.num_heads * hd, units: spec.num_heads, dim: "num_heads" };
    let kv = |dim| Part { len: spec.num_kv_heads * hd, units: spec.num_kv_heads, dim };
    let ffn = |dim| Part { len: spec.ffn_size, units: spec.ffn_size, dim };
    let expert_ffn = Part { len: spec.expert_ffn_size, units: spec.expert_ffn_size, dim: "expert_ffn_size" };
    match module {
        AttnQkv | CrossAttnQkv => vec![q, kv("num_kv_heads (k part)"), kv("num_kv_heads (v part)")],
        AttnQ | CrossAttnQ | AttnDense | CrossAttnDense => vec![q],
        AttnK | AttnV | CrossAttnK | CrossAttnV => vec![kv("num_kv_heads")],
        MlpHTo4h | MlpGate | Mlp4hToH => vec![ffn("ffn_size")],
        MlpGateUp => vec![ffn("ffn_size (gate part)"), ffn("ffn_size (up part)")],
        MoeHTo4h | MoeGate | Moe4hToH => vec![expert_ffn],
        MoeRouter | MlpRouter => vec![],
    }
}

/// The spec of one rank's model shard: heads and FFN widths divided by tp_size, the stage's layers.
pub fn rank_spec(spec: &ModelSpec, layout: &ParallelLayout) -> Result<ModelSpec> {
    layout.check(spec)?;
    let t = layout.tp_size;
    let div = |size: usize, what: &str| {
        if size % t == 0 {
            Ok(size / t)
        } else {
            Err(LoraError::BadParallelLayout(format!("the model's {what} = {size} does not divide by tp_size {t}")))
        }
    };
    Ok(ModelSpec {
        num_layers: layout.layers.as_ref().map_or(spec.num_layers, |l| l.len()),
        num_heads: div(spec.num_heads, "num_heads")?,
        num_kv_heads: div(spec.num_kv_heads, "num_kv_heads")?,
        ffn_size: div(spec.ffn_size, "ffn_size")?,
        expert_ffn_size: div(spec.expert_ffn_size, "expert_ffn_size")?,
        ..spec.clone()
    })
}

/// One rank's adapter: config rows (`[module, local layer, rank, is_dora]`) and a dense
/// `[rows, width]` weights array in the input dtype, width the longest sliced row.
#[derive(Clone, Debug, PartialEq)]
pub struct SlicedAdapter {
    pub config: Vec<ConfigRow>,
    pub dtype: WeightsDtype,
    pub width: usize,
    pub data: Vec<u8>,
    pub spec: ModelSpec,
}

/// Element ranges (in the row) that make rank r's slice of a row, in output order.
fn row_ranges(r: &RowLayout, parts: &[Part], kind: SplitKind, tp: usize, rank: usize) -> Vec<Range<usize>> {
    let whole = |off: usize, len: usize| off..off + len;
    // Rank's block of each part of a dimension of length sum(parts), as offsets along it.
    let blocks: Vec<Range<usize>> = {
        let mut at = 0;
        parts
            .iter()
            .map(|p| {
                let n = p.len / tp;
                let b = at + rank * n..at + (rank + 1) * n;
                at += p.len;
                b
            })
            .collect()
    };
    let mut out = Vec::new();
    match kind {
        SplitKind::Replicated => {
            out.push(whole(r.a_offset(), r.a_len()));
            out.push(whole(r.b_offset(), r.b_len()));
            out.push(whole(r.scale_offset(), r.scale_len()));
        }
        SplitKind::Column => out.extend(column_ranges(r, &blocks)),
        SplitKind::Row => {
            // A is [D, Hi] row-major: each of the D rows contributes the rank's Hi columns.
            for d in 0..r.rank {
                out.extend(blocks.iter().map(|b| r.a_offset() + d * r.hi + b.start..r.a_offset() + d * r.hi + b.end));
            }
            out.push(whole(r.b_offset(), r.b_len()));
            out.push(whole(r.scale_offset(), r.scale_len()));
        }
    }
    out.retain(|x| !x.is_empty());
    out
}

/// Element ranges of a ColumnLinear row that hold A whole, then B's rows and the DoRA scales of
/// each block of Ho (`blocks`, offsets along Ho), in order: a row keeping only those outputs.
pub(crate) fn column_ranges(r: &RowLayout, blocks: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(1 + 2 * blocks.len());
    out.push(r.a_offset()..r.a_offset() + r.a_len());
    // B is [Ho, D] row-major: a block of Ho rows is contiguous.
    out.extend(blocks.iter().map(|b| r.b_offset() + b.start * r.rank..r.b_offset() + b.end * r.rank));
    if r.is_dora {
        out.extend(blocks.iter().map(|b| r.scale_offset() + b.start..r.scale_offset() + b.end));
    }
    out
}

/// Where each part of a fused module (q | k | v, gate | up) lies along its Ho, in order.
pub(crate) fn fused_part_spans(module: LoraModule, spec: &ModelSpec) -> Vec<Range<usize>> {
    let mut at = 0;
    split_parts(module, spec)
        .iter()
        .map(|p| {
            at += p.len;
            at - p.len..at
        })
        .collect()
}

/// A dense `[rows, width]` array (width: the longest output row) whose row i is the concatenation
/// of `plans[i].1`, element ranges of source row `plans[i].0`; the rest of a row is zero.
pub(crate) fn gather_rows(weights: &WeightsView, plans: &[(usize, Vec<Range<usize>>)]) -> (usize, Vec<u8>) {
    let es = weights.dtype.size();
    let width = plans.iter().map(|(_, ranges)| ranges.iter().map(Range::len).sum::<usize>()).max().unwrap_or(0);
    let mut data = vec![0u8; plans.len() * width * es];
    for (i, (row, ranges)) in plans.iter().enumerate() {
        let src = weights.row_bytes(*row);
        let dst = &mut data[i * width * es..(i + 1) * width * es];
        let mut at = 0;
        for range in ranges {
            let n = range.len() * es;
            dst[at..at + n].copy_from_slice(&src[range.start * es..range.end * es]);
            at += n;
        }
    }
    (width, data)
}

/// Checks that every part a row's module splits divides by tp_size (heads split whole).
fn check_divisible(row: usize, module: LoraModule, parts: &[Part], tp: usize) -> Result<()> {
    match parts.iter().find(|p| p.units % tp != 0) {
        Some(p) => Err(LoraError::TpIndivisible { row, module: module.name(), dim: p.dim, size: p.units, tp_size: tp }),
        None => Ok(()),
    }
}

/// Validates the full adapter against the full model, then cuts rank `layout.tp_rank`'s slice of
/// the stage's layers. Every row is checked for divisibility (even rows another stage keeps), so
/// all ranks accept or refuse an adapter alike.
pub fn slice_adapter(weights: &WeightsView, config: &[ConfigRow], spec: &ModelSpec, layout: &ParallelLayout) -> Result<SlicedAdapter> {
    layout.check(spec)?;
    let full = format::validate(weights, config, spec, ValidateOptions::default())?;
    let tp = layout.tp_size;
    let mut plans = Vec::with_capacity(full.rows.len());
    for (row, r) in full.rows.iter().enumerate() {
        let kind = split_kind(r.module);
        let parts = if tp > 1 && kind != SplitKind::Replicated { split_parts(r.module, spec) } else { Vec::new() };
        check_divisible(row, r.module, &parts, tp)?;
        if layout.keeps_layer(r.layer) {
            let ranges = if parts.is_empty() {
                row_ranges(r, &parts, SplitKind::Replicated, 1, 0)
            } else {
                row_ranges(r, &parts, kind, tp, layout.tp_rank)
            };
            plans.push((row, r, ranges));
        }
    }
    let out_spec = rank_spec(spec, layout)?;
    let out_config = plans
        .iter()
        .map(|(_, r, _)| [r.module.id() as i64, layout.local_layer(r.layer) as i64, r.rank as i64, r.is_dora as i64])
        .collect();
    let ranges: Vec<(usize, Vec<Range<usize>>)> = plans.into_iter().map(|(row, _, ranges)| (row, ranges)).collect();
    let (width, data) = gather_rows(weights, &ranges);
    Ok(SlicedAdapter { config: out_config, dtype: weights.dtype, width, data, spec: out_spec })
}

#[cfg(test)]
#[path = "tp_tests.rs"]
mod tests;
