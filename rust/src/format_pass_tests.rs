//! Property tests of the parallel pass against a plain row-by-row reference written here: packed
//! bytes identical for every dtype pair, and the same first error for any mix of bad rows.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{LoraError, Result};
use crate::format::*;

/// Big enough that rows span several chunks (hidden 2048: rank 16 A alone is 32768 values).
fn spec() -> ModelSpec {
    ModelSpec { num_layers: 3, hidden_size: 2048, num_heads: 16, num_kv_heads: 4, head_dim: 128, ffn_size: 5632, expert_ffn_size: 0, num_experts: 0, encoder_hidden_size: 0, max_rank: 16 }
}

fn encode(v: f32, d: WeightsDtype) -> Vec<u8> {
    match d {
        WeightsDtype::F32 => v.to_le_bytes().to_vec(),
        WeightsDtype::F16 => f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
        WeightsDtype::BF16 => bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
    }
}

/// One element converted the obvious way, through the half crate.
fn convert(v: f32, d: WeightsDtype) -> Vec<u8> {
    encode(v, d)
}

/// Packing as a loop over every used value of every row, into a zeroed buffer.
fn reference_pack(w: &WeightsView, layout: &AdapterLayout, packed: &PackedLayout, out: WeightsDtype) -> Vec<u8> {
    let es = out.size();
    let mut buf = vec![0u8; packed.total_elems * es];
    for (row, (r, p)) in layout.rows.iter().zip(&packed.rows).enumerate() {
        let src = w.row_bytes(row);
        for (src_off, dst_off, len) in [(r.a_offset(), p.a, r.a_len()), (r.b_offset(), p.b, r.b_len()), (r.scale_offset(), p.scale, r.scale_len())] {
            for i in 0..len {
                let bytes = convert(w.dtype.read(src, src_off + i), out);
                buf[(dst_off + i) * es..(dst_off + i + 1) * es].copy_from_slice(&bytes);
            }
        }
    }
    buf
}

fn served_finite(v: f32, d: WeightsDtype) -> bool {
    match d {
        WeightsDtype::F32 => v.is_finite(),
        WeightsDtype::F16 => f16::from_f32(v).is_finite(),
        WeightsDtype::BF16 => bf16::from_f32(v).is_finite(),
    }
}

/// Validation then the serving-dtype check, one row and one value at a time.
fn reference_check(w: &WeightsView, cfg: &[ConfigRow], s: &ModelSpec, serving: WeightsDtype) -> Result<AdapterLayout> {
    let layout = layout_from_config(cfg, s, ValidateOptions::default())?;
    for (row, r) in layout.rows.iter().enumerate() {
        if r.needed() > w.width {
            let dora = if r.is_dora { " + Ho" } else { "" };
            return Err(LoraError::RowTooShort { row, module: r.module.name(), layer: r.layer, rank: r.rank, needed: r.needed(), width: w.width, dora });
        }
        let bytes = w.row_bytes(row);
        if let Some(column) = (0..r.needed()).find(|&c| !w.dtype.read(bytes, c).is_finite()) {
            return Err(LoraError::NonFinite { row, column, value: w.dtype.read(bytes, column) });
        }
        for column in r.scale_offset()..r.needed() {
            let value = w.dtype.read(bytes, column);
            if !(value > 0.0) {
                return Err(LoraError::DoraNotNormalized { row, column, value });
            }
        }
    }
    for (row, r) in layout.rows.iter().enumerate() {
        let bytes = w.row_bytes(row);
        if let Some(column) = (0..r.needed()).find(|&c| !served_finite(w.dtype.read(bytes, c), serving)) {
            return Err(LoraError::NotRepresentable { row, column, value: w.dtype.read(bytes, column), dtype: serving.name() });
        }
    }
    Ok(layout)
}

/// The checks a cache's put makes, through the parallel pass.
fn pass_check(w: &WeightsView, cfg: &[ConfigRow], s: &ModelSpec, serving: WeightsDtype) -> Result<AdapterLayout> {
    let opts = ValidateOptions::default();
    let layout = checked_layout(w, cfg, s, opts)?;
    scan_digest_pack(w, &layout, opts.value_checks(Some(serving)), None, false)?;
    Ok(layout)
}

struct Case {
    cfg: Vec<ConfigRow>,
    width: usize,
    dtype: WeightsDtype,
    data: Vec<u8>,
}

fn random_case(rng: &mut StdRng, s: &ModelSpec) -> Case {
    let dtypes = [WeightsDtype::F32, WeightsDtype::F16, WeightsDtype::BF16];
    let dtype = dtypes[rng.random_range(0..3)];
    let mut pairs: Vec<(i64, i64)> = (1..=7).flat_map(|m| (0..3).map(move |l| (m, l))).collect();
    let rows = rng.random_range(1..=5);
    let cfg: Vec<ConfigRow> = (0..rows)
        .map(|_| {
            let (m, l) = pairs.swap_remove(rng.random_range(0..pairs.len()));
            let rank = if rng.random_bool(0.5) { rng.random_range(1..=3) } else { rng.random_range(4..=16) };
            [m, l, rank, rng.random_bool(0.25) as i64]
        })
        .collect();
    let layout = layout_from_config(&cfg, s, ValidateOptions::default()).unwrap();
    let width = layout.rows.iter().map(RowLayout::needed).max().unwrap() + rng.random_range(0..40);
    let mut values: Vec<f32> = (0..rows * width).map(|_| rng.random_range(0.01f32..2.0) * if rng.random_bool(0.5) { -1.0 } else { 1.0 }).collect();
    // DoRA scales are positive; subnormals and values near each dtype's edge keep rounding honest.
    for (row, r) in layout.rows.iter().enumerate() {
        for c in r.scale_offset()..r.needed() {
            values[row * width + c] = values[row * width + c].abs();
        }
        for _ in 0..8 {
            let c = rng.random_range(0..r.scale_offset().max(1));
            let edge = [1e-40f32, -3e-8, 65519.0, 6.1e-5, 1.0e38][rng.random_range(0..5)];
            values[row * width + c] = if served_finite(edge, dtype) { edge } else { 65504.0 };
        }
    }
    let data = values.iter().flat_map(|&v| encode(v, dtype)).collect();
    Case { cfg, width, dtype, data }
}

/// Puts 1..=3 faults of random kinds at random places (or a row too short for its values).
fn inject_faults(rng: &mut StdRng, case: &mut Case, s: &ModelSpec) {
    let layout = layout_from_config(&case.cfg, s, ValidateOptions::default()).unwrap();
    for _ in 0..rng.random_range(1..=3) {
        let row = rng.random_range(0..case.cfg.len());
        let r = layout.rows[row];
        let (column, value) = match rng.random_range(0..5) {
            0 => (rng.random_range(0..r.needed()), f32::NAN),
            1 => (rng.random_range(0..r.needed()), f32::NEG_INFINITY),
            2 => (rng.random_range(0..r.needed()), 1e6),
            3 if r.is_dora => (rng.random_range(r.scale_offset()..r.needed()), [0.0, -0.5][rng.random_range(0..2)]),
            _ => {
                let shorter = r.needed() - rng.random_range(1..=r.needed().min(5));
                if shorter < case.width {
                    let (rows, es) = (case.cfg.len(), case.dtype.size());
                    let old = std::mem::take(&mut case.data);
                    case.data = old.chunks(case.width * es).flat_map(|row| row[..shorter * es].to_vec()).collect();
                    assert_eq!(case.data.len(), rows * shorter * es);
                    case.width = shorter;
                }
                continue;
            }
        };
        if column >= case.width {
            continue; // the row was cut short already
        }
        let es = case.dtype.size();
        let at = (row * case.width + column) * es;
        case.data[at..at + es].copy_from_slice(&encode(value, case.dtype));
    }
}

#[test]
fn parallel_packing_is_bit_identical_to_a_value_by_value_pack() {
    let s = spec();
    let mut rng = StdRng::seed_from_u64(11);
    for case_no in 0..12 {
        let case = random_case(&mut rng, &s);
        let w = WeightsView::new(case.dtype, &[case.cfg.len(), case.width], &case.data).unwrap();
        let layout = validate(&w, &case.cfg, &s, ValidateOptions::default()).unwrap();
        let packed = packed_layout(&layout);
        for out_dtype in [WeightsDtype::F32, WeightsDtype::F16, WeightsDtype::BF16] {
            let mut got = vec![0xA5u8; packed.total_elems * out_dtype.size()];
            pack_into(&w, &layout, &packed, out_dtype, &mut got);
            let want = reference_pack(&w, &layout, &packed, out_dtype);
            assert!(got == want, "case {case_no}: {:?} -> {out_dtype:?} differs at byte {:?}", case.dtype, got.iter().zip(&want).position(|(a, b)| a != b));
            // The same weights one byte off alignment take the byte-wise conversions: same bytes.
            let mut shifted = vec![0u8; case.data.len() + 1];
            shifted[1..].copy_from_slice(&case.data);
            let w1 = WeightsView::new(case.dtype, &[case.cfg.len(), case.width], &shifted[1..]).unwrap();
            let mut got1 = vec![0x5Au8; got.len()];
            pack_into(&w1, &layout, &packed, out_dtype, &mut got1);
            assert!(got1 == want, "case {case_no} unaligned: {:?} -> {out_dtype:?}", case.dtype);
        }
    }
}

#[test]
fn parallel_checks_report_the_first_fault_a_row_by_row_scan_meets() {
    let s = spec();
    let mut rng = StdRng::seed_from_u64(12);
    let mut kinds = std::collections::BTreeSet::new();
    for case_no in 0..60 {
        let mut case = random_case(&mut rng, &s);
        inject_faults(&mut rng, &mut case, &s);
        let w = WeightsView::new(case.dtype, &[case.cfg.len(), case.width], &case.data).unwrap();
        for serving in [WeightsDtype::F16, WeightsDtype::BF16] {
            let want = reference_check(&w, &case.cfg, &s, serving);
            let got = pass_check(&w, &case.cfg, &s, serving);
            // Debug strings: a NaN value is equal to itself there.
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "case {case_no}, serving {serving:?}");
            if let Err(e) = want {
                kinds.insert(format!("{e:?}").split([' ', '{']).next().unwrap().to_string());
            }
        }
    }
    // The generator reached every value-level class (and the too-short row between them).
    for kind in ["NonFinite", "NotRepresentable", "DoraNotNormalized", "RowTooShort"] {
        assert!(kinds.contains(kind), "{kind} never produced: {kinds:?}");
    }
}

#[test]
fn digest_is_deterministic_and_sees_every_chunk() {
    let s = spec();
    let mut rng = StdRng::seed_from_u64(13);
    let mut case = random_case(&mut rng, &s);
    case.cfg = vec![[6, 0, 16, 0]]; // mlp_4h_to_h: A is 16 * 5632 values, several chunks
    let width = 16 * (5632 + 2048);
    case.data = (0..width).flat_map(|i| encode((i % 13) as f32 * 0.125, case.dtype)).collect();
    let w = WeightsView::new(case.dtype, &[1, width], &case.data).unwrap();
    let layout = validate(&w, &case.cfg, &s, ValidateOptions::default()).unwrap();
    let d = scan_digest_pack(&w, &layout, ValueChecks::default(), None, true).unwrap();
    assert_eq!(d, scan_digest_pack(&w, &layout, ValueChecks::default(), None, true).unwrap());
    let es = case.dtype.size();
    for column in [0, 40_000, width - 1] {
        let mut changed = case.data.clone();
        changed[column * es..(column + 1) * es].copy_from_slice(&encode(7.5, case.dtype));
        let w2 = WeightsView::new(case.dtype, &[1, width], &changed).unwrap();
        assert_ne!(scan_digest_pack(&w2, &layout, ValueChecks::default(), None, true).unwrap(), d, "column {column}");
    }
}
