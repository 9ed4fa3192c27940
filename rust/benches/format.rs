//! Validation and packing throughput of one adapter (Llama-8B module shapes, rank 16 on all seven
//! projections of 8 layers), beside a plain memcpy of the same used bytes measured in the same run.
//! Run: `cargo bench --bench format`. Throughput is over the bytes the rows use (padding excluded).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use loramux::format::{self, ConfigRow, ModelSpec, ValidateOptions, WeightsDtype, WeightsView};
use loramux::modules::LoraModule;

const LAYERS: usize = 8;
const RANK: usize = 16;

fn llama8b_spec() -> ModelSpec {
    ModelSpec {
        num_layers: LAYERS,
        hidden_size: 4096,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        ffn_size: 14336,
        expert_ffn_size: 0,
        num_experts: 0,
        encoder_hidden_size: 0,
        max_rank: 64,
    }
}

/// (config rows, row width in values, weights as little-endian bytes of `dtype`) with small finite values.
fn adapter(spec: &ModelSpec, dtype: WeightsDtype) -> (Vec<ConfigRow>, usize, Vec<u8>) {
    use LoraModule::*;
    let modules = [AttnQ, AttnK, AttnV, AttnDense, MlpGate, MlpHTo4h, Mlp4hToH];
    let config: Vec<ConfigRow> =
        (0..LAYERS).flat_map(|l| modules.iter().map(move |m| [m.id() as i64, l as i64, RANK as i64, 0])).collect();
    let layout = format::layout_from_config(&config, spec, ValidateOptions::default()).unwrap();
    let width = layout.rows.iter().map(|r| r.needed()).max().unwrap();
    let n = config.len() * width;
    let bytes: Vec<u8> = match dtype {
        WeightsDtype::F16 => (0..n).flat_map(|i| f16::from_f32(((i % 97) as f32 - 48.0) / 512.0).to_le_bytes()).collect(),
        WeightsDtype::F32 => (0..n).flat_map(|i| (((i % 97) as f32 - 48.0) / 512.0).to_le_bytes()).collect(),
        WeightsDtype::BF16 => unreachable!("not benchmarked as input"),
    };
    (config, width, bytes)
}

fn bench_format(c: &mut Criterion) {
    let spec = llama8b_spec();
    for (in_dtype, out_dtype) in [(WeightsDtype::F16, WeightsDtype::F16), (WeightsDtype::F32, WeightsDtype::BF16)] {
        let (config, width, bytes) = adapter(&spec, in_dtype);
        let weights = WeightsView::new(in_dtype, &[config.len(), width], &bytes).unwrap();
        let layout = format::validate(&weights, &config, &spec, ValidateOptions::default()).unwrap();
        let used_bytes = layout.total_values() * in_dtype.size();
        let packed = format::packed_layout(&layout);
        let mut out = vec![0u8; packed.total_elems * out_dtype.size()];
        let mut copy_dst = vec![0u8; used_bytes];
        let copy_src = &bytes[..used_bytes];

        let mut group = c.benchmark_group(format!("format/{}->{}", in_dtype.name(), out_dtype.name()));
        group.throughput(Throughput::Bytes(used_bytes as u64));
        group.sample_size(20);
        group.bench_function("memcpy (same bytes, ceiling)", |b| {
            b.iter(|| copy_dst.copy_from_slice(black_box(copy_src)))
        });
        group.bench_function("validate (config + NaN/Inf scan)", |b| {
            b.iter(|| format::validate(black_box(&weights), &config, &spec, ValidateOptions::default()).unwrap())
        });
        group.bench_function("check_representable (serving-dtype range scan)", |b| {
            b.iter(|| format::check_representable(black_box(&weights), &layout, out_dtype).unwrap())
        });
        group.bench_function("validate + pack", |b| {
            b.iter(|| {
                let layout = format::validate(black_box(&weights), &config, &spec, ValidateOptions::default()).unwrap();
                format::pack_into(&weights, &layout, &format::packed_layout(&layout), out_dtype, &mut out);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_format);
criterion_main!(benches);
