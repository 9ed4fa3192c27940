//! Unit tests of format.rs: layouts (from a config or from row shapes), each bad-input class, the
//! NaN/Inf scan, the storage check, packing and dtype conversion.

use super::*;
use super::scan::first_overflow;

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

/// The example of the TensorRT-LLM LoRA documentation ("LoRA tensor format details"): q and k adapters, 4 layers, hidden 4 (heads chosen so q = k = 4 wide).
fn trtllm_doc_example() -> (Vec<ConfigRow>, ModelSpec) {
    let mut s = spec();
    s.num_kv_heads = 2;
    let cfg = vec![[1, 0, 2, 0], [2, 0, 4, 0], [1, 1, 2, 0], [2, 1, 4, 0], [1, 2, 2, 0], [1, 3, 8, 0]];
    (cfg, s)
}

#[test]
fn trtllm_doc_example_validates_with_expected_widths() {
    let (cfg, s) = trtllm_doc_example();
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
fn module_dims_follow_the_trtllm_module_table() {
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

#[test]
fn values_the_serving_dtype_cannot_hold_are_rejected_before_packing() {
    // Finite in the source dtype, but float16 tops out at 65504 (65520 and up round to inf) and
    // bfloat16 just below f32::MAX: a cache packing them would serve inf.
    let s = spec();
    let cfg = vec![[1, 0, 1, 0], [2, 0, 1, 0]]; // q and k, 8 values each
    let mut vals = vec![0.25f32; 2 * 8];
    let check = |vals: &[f32], src: WeightsDtype, dst: WeightsDtype| {
        let data: Vec<u8> = vals
            .iter()
            .flat_map(|v| match src {
                WeightsDtype::F32 => v.to_le_bytes().to_vec(),
                WeightsDtype::F16 => f16::from_f32(*v).to_bits().to_le_bytes().to_vec(),
                WeightsDtype::BF16 => bf16::from_f32(*v).to_bits().to_le_bytes().to_vec(),
            })
            .collect();
        let w = WeightsView::new(src, &[2, 8], &data).unwrap();
        let layout = validate(&w, &cfg, &s, ValidateOptions::default()).unwrap();
        check_representable(&w, &layout, dst)
    };
    use WeightsDtype::*;
    vals[13] = 65519.0; // rounds to 65504 in float16: fine
    assert!(check(&vals, F32, F16).is_ok());
    vals[13] = -65520.0;
    let err = check(&vals, F32, F16).unwrap_err();
    assert_eq!(err, LoraError::NotRepresentable { row: 1, column: 5, value: -65520.0, dtype: "float16" });
    assert_eq!(err.row(), Some(1));
    assert!(check(&vals, BF16, F16).is_err());
    for ok in [(F32, BF16), (F32, F32), (BF16, BF16), (BF16, F32)] {
        assert!(check(&vals, ok.0, ok.1).is_ok(), "{ok:?}");
    }
    vals[13] = f32::MAX;
    assert!(matches!(check(&vals, F32, BF16), Err(LoraError::NotRepresentable { dtype: "bfloat16", .. })));
    assert!(check(&vals, F32, F32).is_ok());
    // Agrees with the conversion itself on a sweep of finite float32 values.
    let sweep: Vec<f32> = (0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).filter(|v| v.is_finite()).collect();
    for dst in [F16, BF16] {
        let data = f32_bytes(&sweep);
        let got = first_overflow(F32, &data, sweep.len(), dst);
        let want = sweep.iter().position(|&v| !dst_is_finite(v, dst));
        assert_eq!(got, want, "{dst:?}");
        for &v in sweep.iter().take(5_000) {
            let one = f32_bytes(&[v]);
            assert_eq!(first_overflow(F32, &one, 1, dst).is_none(), dst_is_finite(v, dst), "{v:e} -> {dst:?}");
        }
    }
}

fn dst_is_finite(v: f32, dst: WeightsDtype) -> bool {
    match dst {
        WeightsDtype::F16 => f16::from_f32(v).is_finite(),
        WeightsDtype::BF16 => bf16::from_f32(v).is_finite(),
        WeightsDtype::F32 => v.is_finite(),
    }
}

/// Two rows as a float32 [2, 12] array: q (A 4, B 4, 4 DoRA scales: 12 values), then v (A 4, B 2,
/// then padding).
fn shaped_rows() -> (Vec<RowShape>, Vec<f32>) {
    let shapes = vec![
        RowShape { module_id: 1, layer: 0, rank: 1, hi: 4, ho: 4, is_dora: true },
        RowShape { module_id: 3, layer: 2, rank: 1, hi: 4, ho: 2, is_dora: false },
    ];
    (shapes, vec![0.25f32; 2 * 12])
}

#[test]
fn rows_from_shapes_lay_out_as_their_config_would() {
    let (shapes, vals) = shaped_rows();
    let data = f32_bytes(&vals);
    let w = WeightsView::new(WeightsDtype::F32, &[2, 12], &data).unwrap();
    let layout = layout_from_shapes(&w, &shapes).unwrap();
    let cfg = vec![[1, 0, 1, 1], [3, 2, 1, 0]];
    assert_eq!(layout, layout_from_config(&cfg, &spec(), ValidateOptions::default()).unwrap());
    for storage in WeightsDtype::ALL {
        assert_eq!(check_storable(&w, &layout, storage), Ok(()), "{storage:?}");
    }
}

#[test]
fn values_the_storage_type_cannot_hold_are_named_by_row_and_column() {
    use WeightsDtype::*;
    let (shapes, clean) = shaped_rows();
    let check = |column: usize, value: f32, storage: WeightsDtype| {
        let mut vals = clean.clone();
        vals[12 + column] = value; // row 1
        let data = f32_bytes(&vals);
        let w = WeightsView::new(F32, &[2, 12], &data).unwrap();
        check_storable(&w, &layout_from_shapes(&w, &shapes).unwrap(), storage)
    };
    for storage in WeightsDtype::ALL {
        assert_eq!(check(4, f32::NAN, storage).unwrap_err().row(), Some(1));
        assert!(matches!(check(4, f32::NAN, storage), Err(LoraError::NonFinite { row: 1, column: 4, value }) if value.is_nan()));
        assert_eq!(check(2, f32::NEG_INFINITY, storage), Err(LoraError::NonFinite { row: 1, column: 2, value: f32::NEG_INFINITY }));
        assert_eq!(check(7, f32::NAN, storage), Ok(())); // padding: not a value of the row
    }
    assert_eq!(check(5, 65519.0, F16), Ok(())); // rounds to 65504, float16's largest
    assert_eq!(check(5, 70000.0, F16), Err(LoraError::NotRepresentable { row: 1, column: 5, value: 70000.0, dtype: "float16" }));
    assert_eq!(check(5, -65520.0, F16), Err(LoraError::NotRepresentable { row: 1, column: 5, value: -65520.0, dtype: "float16" }));
    assert_eq!(check(5, 70000.0, BF16), Ok(()));
    assert_eq!(check(0, 3.4e38, BF16), Err(LoraError::NotRepresentable { row: 1, column: 0, value: 3.4e38, dtype: "bfloat16" }));
    assert_eq!(check(0, 3.4e38, F32), Ok(()));
    // A NaN is reported before a value out of range, wherever each sits (validation's order).
    let mut vals = clean.clone();
    vals[1] = 1e6;
    vals[12 + 5] = f32::NAN;
    let data = f32_bytes(&vals);
    let w = WeightsView::new(F32, &[2, 12], &data).unwrap();
    assert!(matches!(check_storable(&w, &layout_from_shapes(&w, &shapes).unwrap(), F16), Err(LoraError::NonFinite { row: 1, column: 5, .. })));
}

#[test]
fn unnormalized_dora_scales_are_storable() {
    // from_rows builds rows whose scales validate would refuse; storing them is not the fault.
    let (shapes, mut vals) = shaped_rows();
    vals[8] = 0.0;
    vals[9] = -3.0;
    let data = f32_bytes(&vals);
    let w = WeightsView::new(WeightsDtype::F32, &[2, 12], &data).unwrap();
    assert_eq!(check_storable(&w, &layout_from_shapes(&w, &shapes).unwrap(), WeightsDtype::F16), Ok(()));
}

#[test]
fn shapes_that_do_not_fit_the_weights_are_typed_errors() {
    let (shapes, vals) = shaped_rows();
    let data = f32_bytes(&vals[..2 * 11]);
    let narrow = WeightsView::new(WeightsDtype::F32, &[2, 11], &data).unwrap();
    let err = layout_from_shapes(&narrow, &shapes).unwrap_err();
    assert_eq!(err, LoraError::RowTooShort { row: 0, module: "attn_q", layer: 0, rank: 1, needed: 12, width: 11, dora: " + Ho" });

    let data = f32_bytes(&vals);
    let w = WeightsView::new(WeightsDtype::F32, &[2, 12], &data).unwrap();
    let unknown = [shapes[0], RowShape { module_id: 19, ..shapes[1] }];
    assert_eq!(layout_from_shapes(&w, &unknown), Err(LoraError::UnknownModuleId { row: 1, module_id: 19 }));
    let negative = [RowShape { module_id: -1, ..shapes[0] }, shapes[1]];
    assert_eq!(layout_from_shapes(&w, &negative), Err(LoraError::UnknownModuleId { row: 0, module_id: -1 }));
    // Sizes whose product wraps usize are too long for any row, not a short layout to scan past.
    let huge = [shapes[0], RowShape { rank: 1 << 33, hi: 1 << 33, ..shapes[1] }];
    assert!(matches!(layout_from_shapes(&w, &huge), Err(LoraError::RowTooShort { row: 1, needed: usize::MAX, .. })));
    assert_eq!(
        layout_from_shapes(&w, &shapes[..1]),
        Err(LoraError::RowCountMismatch { config_rows: 1, weight_rows: 2 })
    );
}
