//! Cache benchmarks on a host-memory pool: lookups (contains; acquire + release of resident
//! adapters) on one and several threads, and put throughput of a Llama-8B rank-16 adapter by phase
//! beside a plain memcpy of the same bytes. Run: `cargo bench --bench cache` (criterion prints bytes/s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use loramux::cache::adapter_image::{self, ImageLayout};
use loramux::cache::host_memory::HostBuffer;
use loramux::cache::{CacheConfig, HostMemcpy, PoolRegion, SlotTable, TwoLevelCache};
use loramux::format::{ConfigRow, ModelSpec, ValidateOptions, WeightsDtype, WeightsView};

/// Llama-like shapes (hidden 4096, 32 heads, 8 kv heads, ffn 14336), 4 layers to keep it small.
fn spec() -> ModelSpec {
    ModelSpec { num_layers: 4, hidden_size: 4096, num_heads: 32, num_kv_heads: 8, head_dim: 128, ffn_size: 14336, expert_ffn_size: 0, num_experts: 0, encoder_hidden_size: 0, max_rank: 64 }
}

struct Bench {
    cache: TwoLevelCache,
    _pool: Box<[u128]>,
    _table: Box<[u128]>,
}

fn bench_cache(host_budget_bytes: u64, pool_bytes: usize, max_slots: usize) -> Bench {
    let pool = vec![0u128; pool_bytes / 16].into_boxed_slice();
    let table = vec![0u128; SlotTable::table_bytes(max_slots, spec().num_layers) / 16].into_boxed_slice();
    let cfg = CacheConfig { spec: spec(), dtype: WeightsDtype::F16, host_budget_bytes, page_bytes: 64 << 10, max_slots, validate: ValidateOptions::default(), served: None };
    let region = PoolRegion { pool_addr: pool.as_ptr() as u64, pool_bytes: pool_bytes as u64, table_addr: table.as_ptr() as u64 };
    // SAFETY: the boxes live beside the cache in `Bench`.
    let cache = unsafe { TwoLevelCache::new(cfg, region, Box::new(HostMemcpy::default())).unwrap() };
    Bench { cache, _pool: pool, _table: table }
}

/// attn_q + attn_v at `rank` on every layer, f16 values (2 MiB of input at rank 16).
fn adapter(rank: i64) -> (Vec<u8>, usize, Vec<ConfigRow>) {
    let cfg: Vec<ConfigRow> = (0..4).flat_map(|l| [[1, l, rank, 0], [3, l, rank, 0]]).collect();
    let width = (rank as usize) * (4096 + 4096);
    let data: Vec<u8> = (0..cfg.len() * width).flat_map(|i| half::f16::from_f32(((i % 97) as f32 - 48.0) / 64.0).to_bits().to_le_bytes()).collect();
    (data, width, cfg)
}

fn lookups(c: &mut Criterion) {
    let b = bench_cache(1 << 30, 256 << 20, 64);
    let (data, width, cfg) = adapter(8);
    let w = WeightsView::new(WeightsDtype::F16, &[cfg.len(), width], &data).unwrap();
    for id in 0..32u64 {
        b.cache.put(id, &w, &cfg, false).unwrap();
    }
    b.cache.prefetch(&(0..32).collect::<Vec<_>>()).unwrap();
    let mut g = c.benchmark_group("cache_lookup");
    g.throughput(Throughput::Elements(1));
    g.bench_function("contains", |bench| {
        let mut id = 0u64;
        bench.iter(|| {
            id = (id + 1) & 31;
            b.cache.contains(id)
        })
    });
    g.bench_function("acquire_release_1", |bench| {
        let mut id = 0u64;
        bench.iter(|| {
            id = (id + 1) & 31;
            let a = b.cache.acquire(&[id], 0).unwrap();
            b.cache.release(a.batch_id, 0).unwrap();
        })
    });
    g.throughput(Throughput::Elements(8));
    g.bench_function("acquire_release_batch_of_8", |bench| {
        let mut at = 0u64;
        bench.iter(|| {
            at = (at + 8) & 31;
            let ids: Vec<u64> = (at..at + 8).collect();
            let a = b.cache.acquire(&ids, 0).unwrap();
            b.cache.release(a.batch_id, 0).unwrap();
        })
    });
    g.finish();

    let shared = Arc::new(b);
    let mut g = c.benchmark_group("cache_lookup_threads");
    for threads in [1usize, 2, 4, 8] {
        g.throughput(Throughput::Elements(threads as u64));
        for (name, batch) in [("contains", 0usize), ("acquire_release_1", 1)] {
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |bench, &threads| {
                bench.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let b = Arc::clone(&shared);
                            s.spawn(move || {
                                let mut id = t as u64;
                                for _ in 0..iters {
                                    id = (id + 1) & 31;
                                    if batch == 0 {
                                        std::hint::black_box(b.cache.contains(id));
                                    } else {
                                        let a = b.cache.acquire(&[id], 0).unwrap();
                                        b.cache.release(a.batch_id, 0).unwrap();
                                    }
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            });
        }
    }
    g.finish();
}

/// The Llama-8B adapter of issue-sized puts: rank 16 on q, k, v, o, gate, up, down of 32 layers
/// (82 MiB as a 2-byte image), with small finite values in `dtype`.
fn llama8b_adapter(dtype: WeightsDtype) -> (ModelSpec, Vec<u8>, usize, Vec<ConfigRow>) {
    let spec = ModelSpec { num_layers: 32, ..spec() };
    let rank = 16i64;
    let cfg: Vec<ConfigRow> = (0..32).flat_map(|l| [1, 2, 3, 4, 5, 6, 7].map(|m| [m, l, rank, 0])).collect();
    let width = 16 * (4096 + 14336);
    let value = |i: usize| ((i % 97) as f32 - 48.0) / 512.0;
    let n = cfg.len() * width;
    let data: Vec<u8> = match dtype {
        WeightsDtype::F32 => (0..n).flat_map(|i| value(i).to_le_bytes()).collect(),
        _ => (0..n).flat_map(|i| half::f16::from_f32(value(i)).to_bits().to_le_bytes()).collect(),
    };
    (spec, data, width, cfg)
}

fn llama8b_cache(spec: &ModelSpec, dtype: WeightsDtype, adapters: u64) -> Bench {
    let image_bytes = 82u64 << 20;
    let pool = vec![0u128; (image_bytes / 16) as usize].into_boxed_slice();
    let table = vec![0u128; SlotTable::table_bytes(4, spec.num_layers) / 16].into_boxed_slice();
    let cfg = CacheConfig { spec: spec.clone(), dtype, host_budget_bytes: image_bytes * adapters, page_bytes: 64 << 10, max_slots: 4, validate: ValidateOptions::default(), served: None };
    let region = PoolRegion { pool_addr: pool.as_ptr() as u64, pool_bytes: image_bytes, table_addr: table.as_ptr() as u64 };
    // SAFETY: the boxes live beside the cache in `Bench`.
    let cache = unsafe { TwoLevelCache::new(cfg, region, Box::new(HostMemcpy::default())).unwrap() };
    Bench { cache, _pool: pool, _table: table }
}

fn puts(c: &mut Criterion) {
    for (in_dtype, out_dtype) in [(WeightsDtype::F16, WeightsDtype::F16), (WeightsDtype::F32, WeightsDtype::BF16)] {
        let (spec, data, width, cfg) = llama8b_adapter(in_dtype);
        let w = WeightsView::new(in_dtype, &[cfg.len(), width], &data).unwrap();
        let layout = loramux::format::validate(&w, &cfg, &spec, ValidateOptions::default()).unwrap();
        let image = ImageLayout::new(&layout, out_dtype, 64 << 10);
        let mut g = c.benchmark_group(format!("cache_put/{}->{}", in_dtype.name(), out_dtype.name()));
        // Bytes of the image the put produces (what the host tier holds and a load copies).
        g.throughput(Throughput::Bytes(image.held_bytes() as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(3));
        // A fresh id every time into a full tier: each put packs into the host pool's staging
        // reserve (1/4 of 4 images: one image) and evicts the oldest, whose pages the next reuses.
        let b = llama8b_cache(&spec, out_dtype, 4);
        let mut id = 0u64;
        g.bench_function("put_new_adapter", |bench| {
            bench.iter(|| {
                id += 1;
                b.cache.put(id, &w, &cfg, false).unwrap()
            })
        });
        g.bench_function("put_same_weights_again", |bench| bench.iter(|| b.cache.put(id, &w, &cfg, false).unwrap()));
        // Where a put's time goes, one phase at a time.
        g.bench_function("phase_validate", |bench| bench.iter(|| loramux::format::validate(&w, &cfg, &spec, ValidateOptions::default()).unwrap()));
        g.bench_function("phase_check_representable", |bench| bench.iter(|| loramux::format::check_representable(&w, &layout, out_dtype).unwrap()));
        g.bench_function("phase_digest", |bench| bench.iter(|| adapter_image::digest(&w, &layout)));
        let mut out = HostBuffer::pageable(image.held_bytes()).expect("host memory");
        g.bench_function("phase_pack_mapped", |bench| bench.iter(|| image.pack(&w, &layout, out.as_mut_slice())));
        g.bench_function("phase_pack_fresh_memory", |bench| {
            bench.iter(|| {
                let mut fresh = HostBuffer::pageable(image.held_bytes()).expect("host memory");
                image.pack(&w, &layout, fresh.as_mut_slice());
                fresh
            })
        });
        let mut dst = vec![0u8; image.held_bytes()];
        let src = &data[..image.held_bytes()];
        g.bench_function("memcpy_same_bytes", |bench| {
            bench.iter(|| {
                dst.copy_from_slice(std::hint::black_box(src));
                std::hint::black_box(&dst);
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20);
    targets = lookups, puts
}
criterion_main!(benches);
