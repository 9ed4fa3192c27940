//! Unit tests of tp.rs: every rank's slice, recombined with the maths of column / row parallelism,
//! reproduces the full adapter's delta (B A) and DoRA output.

use super::*;

fn spec() -> ModelSpec {
    // q = 4 heads * 2 = 8, kv = 2 heads * 2 = 4, ffn 8, experts 4 x 4.
    ModelSpec {
        num_layers: 4,
        hidden_size: 8,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 2,
        ffn_size: 8,
        expert_ffn_size: 4,
        num_experts: 4,
        encoder_hidden_size: 0,
        max_rank: 8,
    }
}

/// Deterministic pseudo-random values in (-1, 1), positive (0.5..1.5) for DoRA scales.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Full {
    config: Vec<ConfigRow>,
    width: usize,
    rows: Vec<Vec<f32>>,
}

/// A full adapter over `config`, each row filled with random A, B and positive scales.
fn full_adapter(config: Vec<ConfigRow>, s: &ModelSpec) -> Full {
    let layout = format::layout_from_config(&config, s, ValidateOptions::default()).unwrap();
    let width = layout.rows.iter().map(RowLayout::needed).max().unwrap() + 3; // some padding
    let rows = layout
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = values(width, i as u64 + 7);
            for x in &mut v[r.scale_offset()..r.scale_offset() + r.scale_len()] {
                *x = 1.0 + 0.5 * *x;
            }
            v
        })
        .collect();
    Full { config, width, rows }
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn slice(full: &Full, s: &ModelSpec, tp: usize, rank: usize, layers: Option<Range<usize>>) -> Result<SlicedAdapter> {
    let data = bytes_f32(&full.rows.concat());
    let w = WeightsView::new(WeightsDtype::F32, &[full.rows.len(), full.width], &data).unwrap();
    slice_adapter(&w, &full.config, s, &ParallelLayout::new(tp, rank, layers), None)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// (delta = B A as [Ho][Hi], scales) of one row of values.
fn delta(v: &[f32], rank: usize, hi: usize, ho: usize, dora: bool) -> (Vec<Vec<f32>>, Vec<f32>) {
    let (a, b) = (&v[..rank * hi], &v[rank * hi..rank * hi + ho * rank]);
    let d = (0..ho).map(|o| (0..hi).map(|i| (0..rank).map(|r| b[o * rank + r] * a[r * hi + i]).sum()).collect()).collect();
    let scales = if dora { v[rank * hi + ho * rank..rank * hi + ho * rank + ho].to_vec() } else { vec![] };
    (d, scales)
}

/// Global indices of rank r's block of each part, concatenated (the per-rank layout).
fn block_indices(parts: &[usize], tp: usize, rank: usize) -> Vec<usize> {
    let mut at = 0;
    let mut idx = Vec::new();
    for &len in parts {
        let n = len / tp;
        idx.extend(at + rank * n..at + (rank + 1) * n);
        at += len;
    }
    idx
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn every_rank_slice_reproduces_its_part_of_the_full_delta() {
    let s = spec();
    // qkv (fused), k, dense (row), gate_up (fused), down (row), moe up/down, router; DoRA mixed in.
    let config = vec![
        [0, 0, 2, 1],
        [2, 0, 3, 0],
        [4, 0, 4, 1],
        [18, 1, 2, 1],
        [6, 1, 5, 0],
        [13, 2, 2, 1],
        [14, 2, 3, 1],
        [16, 3, 2, 1],
        [7, 3, 1, 0],
    ];
    let full = full_adapter(config.clone(), &s);
    for tp in [1, 2] {
        for rank in 0..tp {
            let sliced = slice(&full, &s, tp, rank, None).unwrap();
            assert_eq!(sliced.config, config, "config rows keep order and layers without a pipeline");
            let rs = rank_spec(&s, &ParallelLayout::new(tp, rank, None)).unwrap();
            assert_eq!(sliced.spec, rs);
            let data = f32s(&sliced.data);
            let w = WeightsView::new(WeightsDtype::F32, &[config.len(), sliced.width], &sliced.data).unwrap();
            let local = format::validate(&w, &sliced.config, &rs, ValidateOptions::default()).unwrap();
            assert_eq!(sliced.width, local.rows.iter().map(RowLayout::needed).max().unwrap(), "width is tight");
            for (i, (row, lr)) in full.rows.iter().zip(&local.rows).enumerate() {
                let module = lr.module;
                let (hi, ho) = s.module_dims(module).unwrap();
                let (d_full, s_full) = delta(row, lr.rank, hi, ho, lr.is_dora);
                let (d_loc, s_loc) = delta(&data[i * sliced.width..], lr.rank, lr.hi, lr.ho, lr.is_dora);
                let parts: Vec<usize> = split_parts(module, &s).iter().map(|p| p.len).collect();
                match split_kind(module) {
                    SplitKind::Column => {
                        let idx = if tp == 1 { (0..ho).collect() } else { block_indices(&parts, tp, rank) };
                        assert_eq!(lr.ho, idx.len());
                        for (o_loc, &o) in idx.iter().enumerate() {
                            assert!((0..hi).all(|i| close(d_loc[o_loc][i], d_full[o][i])), "{module:?} row {o}");
                            if lr.is_dora {
                                assert_eq!(s_loc[o_loc], s_full[o]);
                            }
                        }
                    }
                    SplitKind::Row => {
                        let idx = if tp == 1 { (0..hi).collect() } else { block_indices(&parts, tp, rank) };
                        assert_eq!(lr.hi, idx.len());
                        for o in 0..ho {
                            assert!(idx.iter().enumerate().all(|(i_loc, &i)| close(d_loc[o][i_loc], d_full[o][i])));
                        }
                        assert_eq!(s_loc, s_full, "row-parallel DoRA scales stay whole");
                    }
                    SplitKind::Replicated => assert_eq!(&data[i * sliced.width..i * sliced.width + lr.needed()], &row[..lr.needed()]),
                }
            }
        }
    }
}

#[test]
fn fused_qkv_rank_layout_is_q_then_k_then_v_heads() {
    let s = spec();
    let full = full_adapter(vec![[0, 0, 1, 0]], &s);
    // rank 1 of 2 gets q rows 4..8, k rows 8+2..8+4, v rows 12+2..12+4 of B (rank 1, so B = Ho values).
    let b_full = &full.rows[0][8..8 + 16];
    let sliced = slice(&full, &s, 2, 1, None).unwrap();
    let got = f32s(&sliced.data);
    let b_loc = &got[8..8 + 8];
    let want: Vec<f32> = [4, 5, 6, 7, 10, 11, 14, 15].iter().map(|&o| b_full[o]).collect();
    assert_eq!(b_loc, &want[..]);
}

/// Row parallel + DoRA: each rank scales its partial by the whole scale vector, the all-reduce
/// sums the partials, and the result equals the unsplit DoRA output.
#[test]
fn row_parallel_dora_partials_sum_to_the_full_output() {
    let s = ModelSpec { num_kv_heads: 4, ..spec() }; // tp=4 needs kv heads divisible by 4
    let full = full_adapter(vec![[6, 0, 3, 1]], &s); // mlp_4h_to_h: Hi = ffn 8, Ho = hidden 8
    let (hi, ho, rank) = (8, 8, 3);
    let x = values(hi, 99);
    let w0: Vec<f32> = values(ho * hi, 5); // base [Ho, Hi]
    let (d, scale) = delta(&full.rows[0], rank, hi, ho, true);
    let want: Vec<f32> = (0..ho).map(|o| scale[o] * (0..hi).map(|i| x[i] * (w0[o * hi + i] + d[o][i])).sum::<f32>()).collect();
    for tp in [2, 4] {
        let mut total = vec![0f32; ho];
        for r in 0..tp {
            let sl = slice(&full, &s, tp, r, None).unwrap();
            let v = f32s(&sl.data);
            let lhi = hi / tp;
            let (dl, sc) = delta(&v, rank, lhi, ho, true);
            for o in 0..ho {
                let cols = r * lhi..(r + 1) * lhi;
                let partial: f32 = cols.clone().enumerate().map(|(il, i)| x[i] * (w0[o * hi + i] + dl[o][il])).sum();
                total[o] += sc[o] * partial; // per-rank scaling, then the all-reduce's sum
            }
        }
        assert!(total.iter().zip(&want).all(|(a, b)| close(*a, *b)), "tp={tp}: {total:?} vs {want:?}");
    }
}

#[test]
fn indivisible_sizes_name_row_module_and_dim() {
    let mut s = spec();
    s.num_kv_heads = 3;
    s.head_dim = 2;
    let full = full_adapter(vec![[1, 0, 2, 0], [3, 1, 2, 0]], &s);
    let err = slice(&full, &s, 2, 0, None).unwrap_err();
    assert_eq!(err, LoraError::TpIndivisible { row: 1, module: "attn_v", dim: "num_kv_heads", size: 3, tp_size: 2 });
    assert!(err.to_string().contains("attn_v has num_kv_heads = 3"), "{err}");

    let s = spec();
    let full = full_adapter(vec![[18, 0, 2, 0]], &s);
    let err = slice(&full, &s, 16, 0, None).unwrap_err();
    assert!(matches!(err, LoraError::TpIndivisible { row: 0, module: "mlp_gate_up", dim: "ffn_size (gate part)", .. }), "{err:?}");
    // The model itself: a spec whose kv heads do not divide, adapter on q only.
    let mut s3 = spec();
    s3.num_kv_heads = 1;
    let full = full_adapter(vec![[1, 0, 2, 0]], &s3);
    assert!(matches!(slice(&full, &s3, 2, 0, None), Err(LoraError::BadParallelLayout(m)) if m.contains("num_kv_heads")));
}

#[test]
fn pipeline_stage_keeps_and_renumbers_its_layers() {
    let s = spec();
    let full = full_adapter(vec![[1, 0, 2, 0], [1, 2, 3, 0], [4, 3, 1, 1], [2, 1, 2, 0]], &s);
    let sl = slice(&full, &s, 1, 0, Some(2..4)).unwrap();
    assert_eq!(sl.config, vec![[1, 0, 3, 0], [4, 1, 1, 1]]);
    assert_eq!(sl.spec.num_layers, 2);
    let v = f32s(&sl.data);
    assert_eq!(&v[..3 * 8 + 8 * 3], &full.rows[1][..48]);
    // Combined tp x pp; a stage with no rows of this adapter gives an empty slice.
    let sl = slice(&full, &s, 2, 1, Some(2..3)).unwrap();
    assert_eq!(sl.config, vec![[1, 0, 3, 0]]);
    let empty = full_adapter(vec![[1, 0, 2, 0]], &s);
    let sl = slice(&empty, &s, 2, 0, Some(1..4)).unwrap();
    assert!(sl.config.is_empty() && sl.data.is_empty() && sl.width == 0);
    for (tp, rank, layers) in [(2, 2, None), (0, 0, None), (1, 0, Some(3..3)), (1, 0, Some(2..5))] {
        assert!(matches!(slice(&full, &s, tp, rank, layers), Err(LoraError::BadParallelLayout(_))));
    }
}

#[test]
fn half_precision_bytes_are_copied_exactly() {
    let s = spec();
    let config = vec![[4, 0, 2, 1]];
    let layout = format::layout_from_config(&config, &s, ValidateOptions::default()).unwrap();
    let n = layout.rows[0].needed();
    let halves: Vec<u16> = (0..n as u16).map(|i| half::f16::from_f32(0.25 + i as f32 / 64.0).to_bits()).collect();
    let data: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    let w = WeightsView::new(WeightsDtype::F16, &[1, n], &data).unwrap();
    let sl = slice_adapter(&w, &config, &s, &ParallelLayout::new(2, 1, None), None).unwrap();
    assert_eq!(sl.dtype, WeightsDtype::F16);
    let got: Vec<u16> = sl.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    // attn_dense: A [2, 8] keeps columns 4..8 of each row; B [8, 2] and 8 scales whole.
    let mut want: Vec<u16> = Vec::new();
    want.extend(&halves[4..8]);
    want.extend(&halves[12..16]);
    want.extend(&halves[16..n]);
    assert_eq!(got, want);
}

#[test]
fn invalid_full_adapters_are_rejected_before_slicing() {
    let s = spec();
    let mut full = full_adapter(vec![[1, 0, 2, 0]], &s);
    full.rows[0][1] = f32::NAN;
    assert!(matches!(slice(&full, &s, 2, 0, None), Err(LoraError::NonFinite { row: 0, column: 1, .. })));
}

/// Every (module, layer) of the Llama-like `spec()` a model with separate q/k/v and gate/up layers
/// applies: attn_q, attn_k, attn_v, attn_dense, mlp_h_to_4h, mlp_4h_to_h, mlp_gate on each layer.
fn split_llama(s: &ModelSpec) -> ServedModules {
    let pairs: Vec<(i64, i64)> = (0..s.num_layers as i64).flat_map(|l| [1, 2, 3, 4, 5, 6, 7].map(|m| (m, l))).collect();
    ServedModules::new(&pairs, s.num_layers).unwrap()
}

#[test]
fn a_row_the_model_never_applies_is_refused_by_every_rank_and_stage() {
    let s = spec();
    // mlp_router on layer 3: only the stage owning layers 2..4 keeps it, yet every rank refuses it.
    let full = full_adapter(vec![[1, 0, 2, 0], [0, 1, 2, 0], [17, 3, 2, 0]], &s);
    let data = bytes_f32(&full.rows.concat());
    let w = WeightsView::new(WeightsDtype::F32, &[full.rows.len(), full.width], &data).unwrap();
    let served = split_llama(&s);
    for (rank, layers) in [(0, Some(0..2)), (1, Some(0..2)), (0, Some(2..4)), (1, None)] {
        let err = slice_adapter(&w, &full.config, &s, &ParallelLayout::new(2, rank, layers), Some(&served)).unwrap_err();
        assert_eq!(err, LoraError::ModuleNotApplied { row: 2, module: "mlp_router", layer: 3 });
    }
    // The attn_qkv row on layer 1 is applied as its parts: it passes, still fused.
    let two = WeightsView::new(WeightsDtype::F32, &[2, full.width], &data[..2 * full.width * 4]).unwrap();
    let sl = slice_adapter(&two, &full.config[..2], &s, &ParallelLayout::new(2, 1, Some(0..2)), Some(&served)).unwrap();
    assert_eq!(sl.config, vec![[1, 0, 2, 0], [0, 1, 2, 0]]);
}

/// The config rows of a layout, in order.
fn config_of(layout: &format::AdapterLayout) -> Vec<ConfigRow> {
    layout.rows.iter().map(|r| [r.module.id() as i64, r.layer as i64, r.rank as i64, r.is_dora as i64]).collect()
}

#[test]
fn slicing_a_fused_row_then_splitting_it_equals_splitting_then_slicing() {
    use crate::fused_rows::split_fused_rows;

    let s = spec();
    // attn_qkv (DoRA), mlp_gate_up, beside a plain row; the stage keeps layers 1..4.
    let full = full_adapter(vec![[0, 1, 2, 1], [18, 2, 3, 0], [4, 3, 2, 0]], &s);
    let data = bytes_f32(&full.rows.concat());
    let w = WeightsView::new(WeightsDtype::F32, &[full.rows.len(), full.width], &data).unwrap();
    let full_layout = format::validate(&w, &full.config, &s, ValidateOptions::default()).unwrap();
    let parts = split_fused_rows(&w, &full_layout, &[0, 1], &s);
    let part_config = config_of(&parts.layout);
    for rank in 0..2 {
        let layout = ParallelLayout::new(2, rank, Some(1..4));
        let split_then_sliced = slice_adapter(&parts.view(), &part_config, &s, &layout, None).unwrap();
        let sliced = slice_adapter(&w, &full.config, &s, &layout, None).unwrap();
        let sliced_view = WeightsView::new(sliced.dtype, &[sliced.config.len(), sliced.width], &sliced.data).unwrap();
        let sliced_layout = format::validate(&sliced_view, &sliced.config, &sliced.spec, ValidateOptions::default()).unwrap();
        let sliced_then_split = split_fused_rows(&sliced_view, &sliced_layout, &[0, 1], &sliced.spec);
        assert_eq!(config_of(&sliced_then_split.layout), split_then_sliced.config, "rank {rank}");
        assert_eq!((sliced_then_split.width, sliced_then_split.data), (split_then_sliced.width, split_then_sliced.data), "rank {rank}");
    }
}
