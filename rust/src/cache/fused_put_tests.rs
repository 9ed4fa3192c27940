//! Putting fused rows (attn_qkv, mlp_gate_up) into the cache of a model whose layers are their
//! parts: cached as the parts (the same pool bytes as the adapter written with part rows), value
//! errors naming the caller's row and column, and a fused row beside its own part refused with
//! nothing changed.

use rand::{Rng, SeedableRng};

use super::tests::{fixture_serving, spec, Fixture};
use super::*;
use crate::error::LoraError;
use crate::format::{ConfigRow, WeightsDtype, WeightsView};

/// A Llama-like model: attn_q, k, v, dense, mlp_h_to_4h, mlp_gate on every layer; nothing fused.
fn split_model() -> Fixture {
    let pairs: Vec<(i64, i64)> = (0..3).flat_map(|l| [1, 2, 3, 4, 5, 7].map(|m| (m, l))).collect();
    fixture_serving(1 << 20, 1 << 18, 256, 4, Some(ServedModules::new(&pairs, 3).unwrap()))
}

/// One row's values: A (rank x hi), B (ho x rank), then ho DoRA scales if `dora`.
struct Row {
    cfg: ConfigRow,
    a: Vec<f32>,
    b: Vec<f32>,
    scales: Vec<f32>,
}

fn random_row(rng: &mut rand::rngs::StdRng, module: i64, layer: i64, rank: usize, dora: bool) -> Row {
    let (hi, ho) = spec().module_dims(crate::modules::LoraModule::from_id(module).unwrap()).unwrap();
    let mut vals = |n: usize, lo: f32| (0..n).map(|_| rng.random_range(lo..1.0f32)).collect::<Vec<_>>();
    let (a, b) = (vals(rank * hi, -1.0), vals(ho * rank, -1.0));
    let scales = if dora { vals(ho, 0.5) } else { Vec::new() };
    Row { cfg: [module, layer, rank as i64, dora as i64], a, b, scales }
}

/// The fused row written as its parts by hand: A shared, B's rows and the scales cut at `hos`.
fn by_hand(r: &Row, parts: &[i64], hos: &[usize]) -> Vec<Row> {
    let rank = r.cfg[2] as usize;
    let mut at = 0;
    parts
        .iter()
        .zip(hos)
        .map(|(&m, &ho)| {
            let part = Row {
                cfg: [m, r.cfg[1], r.cfg[2], r.cfg[3]],
                a: r.a.clone(),
                b: r.b[at * rank..(at + ho) * rank].to_vec(),
                scales: if r.scales.is_empty() { Vec::new() } else { r.scales[at..at + ho].to_vec() },
            };
            at += ho;
            part
        })
        .collect()
}

/// (f32 bytes, width, config) of rows, each padded to the longest.
fn array(rows: &[Row]) -> (Vec<u8>, usize, Vec<ConfigRow>) {
    let width = rows.iter().map(|r| r.a.len() + r.b.len() + r.scales.len()).max().unwrap() + 5;
    let mut bytes = Vec::new();
    for r in rows {
        let mut v: Vec<f32> = r.a.iter().chain(&r.b).chain(&r.scales).copied().collect();
        v.resize(width, 0.25);
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    (bytes, width, rows.iter().map(|r| r.cfg).collect())
}

fn put(f: &Fixture, id: u64, rows: &[Row]) -> crate::error::Result<PutOutcome> {
    let (bytes, width, cfg) = array(rows);
    f.cache.put(id, &WeightsView::new(WeightsDtype::F32, &[cfg.len(), width], &bytes).unwrap(), &cfg, false)
}

/// The pool bytes of one (layer, module) of a slot: A, B and scales as the table points at them.
fn segment(f: &Fixture, slot: usize, layer: usize, module: usize, hi: usize, ho: usize) -> Vec<u8> {
    let [a, b, scale, rank] = f.cache.table_entry(slot, layer, module);
    let read = |addr: i64, n: usize| unsafe { std::slice::from_raw_parts(addr as *const u8, n * 2).to_vec() };
    let rank = rank as usize;
    let mut out = read(a, rank * hi);
    out.extend(read(b, ho * rank));
    if scale != 0 {
        out.extend(read(scale, ho));
    }
    out
}

#[test]
fn fused_rows_are_cached_as_the_part_rows_they_equal() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for dora in [false, true] {
        let f = split_model();
        let fused = [random_row(&mut rng, 0, 0, 4, dora), random_row(&mut rng, 18, 1, 2, dora), random_row(&mut rng, 4, 2, 3, dora)];
        let s = spec();
        let (q, kv, ffn) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.ffn_size);
        let mut parts = by_hand(&fused[0], &[1, 2, 3], &[q, kv, kv]);
        parts.extend(by_hand(&fused[1], &[5, 7], &[ffn, ffn]));
        parts.push(Row { cfg: fused[2].cfg, a: fused[2].a.clone(), b: fused[2].b.clone(), scales: fused[2].scales.clone() });

        assert_eq!(put(&f, 1, &fused), Ok(PutOutcome::Inserted));
        assert_eq!(put(&f, 1, &parts), Ok(PutOutcome::AlreadyCached), "the same adapter, the same digest");
        assert_eq!(put(&f, 2, &parts), Ok(PutOutcome::Inserted));
        let b = f.cache.acquire(&[1, 2], 0).unwrap();
        for r in &parts {
            let (layer, module) = (r.cfg[1] as usize, r.cfg[0] as usize);
            let (hi, ho) = s.module_dims(crate::modules::LoraModule::from_id(r.cfg[0]).unwrap()).unwrap();
            let got = segment(&f, b.slots[0], layer, module, hi, ho);
            assert!(!got.is_empty() && got == segment(&f, b.slots[1], layer, module, hi, ho), "module {module} layer {layer}");
        }
        assert_eq!(f.cache.table_entry(b.slots[0], 0, 0)[3], 0, "no fused entry is served");
        f.cache.check_invariants().unwrap();
    }
}

#[test]
fn a_fused_row_beside_its_own_part_is_refused_and_changes_nothing() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let f = split_model();
    put(&f, 1, &[random_row(&mut rng, 1, 0, 2, false)]).unwrap();
    let held = f.cache.stats().host_bytes;
    let rows = [random_row(&mut rng, 0, 1, 2, false), random_row(&mut rng, 5, 2, 2, false), random_row(&mut rng, 18, 2, 2, false)];
    let err = put(&f, 2, &rows).unwrap_err();
    assert_eq!(err, LoraError::FusedRowBesidePart { row: 2, module: "mlp_gate_up", layer: 2, part_row: 1, part: "mlp_h_to_4h" });
    assert_eq!((f.cache.len(), f.cache.stats().host_bytes, f.cache.contains(2)), (1, held, false));
    f.cache.check_invariants().unwrap();
}

#[test]
fn bad_values_in_a_fused_row_name_its_row_and_column() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let f = split_model();
    let mut rows = [random_row(&mut rng, 4, 0, 2, false), random_row(&mut rng, 0, 1, 3, true)];
    let (b_start, b_len) = (rows[1].a.len(), rows[1].b.len());
    rows[1].b[b_len - 2] = f32::NAN; // in v's block
    let err = put(&f, 1, &rows).unwrap_err();
    assert!(matches!(err, LoraError::NonFinite { row: 1, column, .. } if column == b_start + b_len - 2), "{err:?}");
    rows[1].b[b_len - 2] = 0.5;
    rows[1].scales[40] = -1.0; // a scale of k's block
    let err = put(&f, 1, &rows).unwrap_err();
    assert!(matches!(err, LoraError::DoraNotNormalized { row: 1, column, .. } if column == b_start + b_len + 40), "{err:?}");
    assert_eq!((f.cache.len(), f.cache.stats().host_bytes), (0, 0));
}
