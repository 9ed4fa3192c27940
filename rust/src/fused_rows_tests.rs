//! Unit tests of fused_rows.rs: the part rows of a fused row reproduce its delta (B A, row by row)
//! and its DoRA scales exactly, in the fused row's output order; other rows pass unchanged.

use super::*;
use crate::format::{layout_from_config, ConfigRow, ValidateOptions};
use crate::modules::LoraModule;

fn spec() -> ModelSpec {
    // q = 3 heads * 2 = 6, kv = 1 head * 2 = 2 (q != kv, so a wrong block shows), ffn 5, encoder = hidden.
    ModelSpec {
        num_layers: 2,
        hidden_size: 7,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 2,
        ffn_size: 5,
        expert_ffn_size: 0,
        num_experts: 0,
        encoder_hidden_size: 7,
        max_rank: 8,
    }
}

/// Distinct values per position (exact in f32), positive for DoRA scales.
fn adapter(config: &[ConfigRow]) -> (AdapterLayout, usize, Vec<u8>) {
    let layout = layout_from_config(config, &spec(), ValidateOptions::default()).unwrap();
    let width = layout.rows.iter().map(RowLayout::needed).max().unwrap() + 3; // padding too
    let vals: Vec<f32> = (0..config.len() * width).map(|i| 1.0 + (i % 97) as f32 / 8.0 + (i / 97) as f32).collect();
    (layout, width, vals.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn row_values(w: &WeightsView, row: usize) -> Vec<f32> {
    (0..w.width).map(|c| w.dtype.read(w.row_bytes(row), c)).collect()
}

/// delta[o][i] = sum_d B[o][d] A[d][i] of one row, in f64.
fn delta(r: &RowLayout, v: &[f32]) -> Vec<Vec<f64>> {
    let (a, b) = (&v[r.a_offset()..], &v[r.b_offset()..]);
    (0..r.ho)
        .map(|o| (0..r.hi).map(|i| (0..r.rank).map(|d| b[o * r.rank + d] as f64 * a[d * r.hi + i] as f64).sum()).collect())
        .collect()
}

#[test]
fn part_rows_reproduce_the_fused_delta_and_scales_in_order() {
    for fused in [LoraModule::AttnQkv, LoraModule::MlpGateUp, LoraModule::CrossAttnQkv] {
        for dora in [0, 1] {
            let cfg = vec![[4, 0, 2, 0], [fused.id() as i64, 1, 3, dora], [1, 0, 1, dora]];
            let (layout, width, bytes) = adapter(&cfg);
            let w = WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap();
            let parts = split_fused_rows(&w, &layout, &[1], &spec());
            let pw = parts.view();
            let names: Vec<&str> = parts.layout.rows.iter().map(|r| r.module.name()).collect();
            let want: Vec<&str> = ["attn_dense"].into_iter().chain(fused.fused_parts().unwrap().iter().map(|m| m.name())).chain(["attn_q"]).collect();
            assert_eq!(names, want, "parts stand where the fused row stood");

            let f = layout.rows[1];
            let (fused_delta, fused_vals) = (delta(&f, &row_values(&w, 1)), row_values(&w, 1));
            let mut at = 0; // output rows of the fused row covered so far
            for (i, p) in parts.layout.rows[1..parts.layout.rows.len() - 1].iter().enumerate() {
                assert_eq!((p.layer, p.rank, p.hi, p.is_dora), (1, 3, f.hi, dora == 1));
                assert_eq!(spec().module_dims(p.module), Ok((p.hi, p.ho)));
                let v = row_values(&pw, 1 + i);
                assert_eq!(v[..p.a_len()], fused_vals[..f.a_len()], "A duplicated");
                assert_eq!(delta(p, &v), fused_delta[at..at + p.ho].to_vec(), "{} of {}", p.module.name(), fused.name());
                if p.is_dora {
                    assert_eq!(v[p.scale_offset()..p.needed()], fused_vals[f.scale_offset() + at..f.scale_offset() + at + p.ho]);
                }
                at += p.ho;
            }
            assert_eq!(at, f.ho, "the parts cover the fused output");
            for (src, dst) in [(0, 0), (2, parts.layout.rows.len() - 1)] {
                let r = layout.rows[src];
                assert_eq!(parts.layout.rows[dst], r);
                assert_eq!(row_values(&pw, dst)[..r.needed()], row_values(&w, src)[..r.needed()], "other rows unchanged");
            }
            assert_eq!(pw.width, parts.layout.rows.iter().map(RowLayout::needed).max().unwrap(), "dense: no padding kept");
        }
    }
}

#[test]
fn rows_not_named_are_copied_as_they_are() {
    let cfg = vec![[0, 0, 2, 0], [18, 1, 1, 1]];
    let (layout, width, bytes) = adapter(&cfg);
    let w = WeightsView::new(WeightsDtype::F32, &[2, width], &bytes).unwrap();
    let same = split_fused_rows(&w, &layout, &[], &spec());
    assert_eq!(same.layout, layout);
    for row in 0..2 {
        let n = layout.rows[row].needed();
        assert_eq!(row_values(&same.view(), row)[..n], row_values(&w, row)[..n]);
    }
}
