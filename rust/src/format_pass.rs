//! One pass over an adapter's used values, cut into chunks that run on all cores (rayon): the value
//! checks (NaN / Inf, DoRA scales, serving-dtype range), a digest of what the rows mean, and packing.
//! Chunks are independent; faults are ranked so the one reported is the one a row-by-row scan finds.

use std::sync::Arc;

use parking_lot::Mutex;
use rayon::prelude::*;

use super::scan::{any_bad, first_nonfinite, first_overflow};
use super::{copy_convert, AdapterLayout, PackedLayout, WeightsDtype, WeightsView};
use crate::error::{LoraError, Result};

/// Which value checks the pass makes (config and row widths are checked before it).
#[derive(Clone, Copy, Debug, Default)]
pub struct ValueChecks {
    /// NaN / Inf anywhere in a row's used values.
    pub finite: bool,
    /// DoRA scales finite and > 0.
    pub dora_scales: bool,
    /// Every used value stays finite once converted to this dtype.
    pub representable_in: Option<WeightsDtype>,
}

/// Where the pass packs to: `packed.total_elems` elements of `dtype` in `out`.
pub struct PackTarget<'o> {
    pub packed: &'o PackedLayout,
    pub dtype: WeightsDtype,
    pub out: &'o mut [u8],
}

/// Source elements per chunk: large enough that scheduling is noise, small enough that a chunk's
/// several reads (scans, digest, conversion) hit the core's cache and the cores share the work.
const CHUNK_ELEMS: usize = 1 << 15;

/// A fault's place in the order a sequential scan reports them: validation (every row, in order:
/// NaN / Inf before DoRA scales) before the serving-dtype range check, then the first column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Fault {
    phase: u8,
    row: usize,
    kind: u8,
    column: usize,
}

const NON_FINITE: (u8, u8) = (0, 0);
const DORA_SCALE: (u8, u8) = (0, 1);
const NOT_REPRESENTABLE: (u8, u8) = (1, 0);

impl Fault {
    fn new((phase, kind): (u8, u8), row: usize, column: usize) -> Fault {
        Fault { phase, row, kind, column }
    }

    fn into_error(self, weights: &WeightsView, checks: &ValueChecks) -> LoraError {
        let (row, column) = (self.row, self.column);
        let value = weights.dtype.read(weights.row_bytes(row), column);
        match (self.phase, self.kind) {
            NON_FINITE => LoraError::NonFinite { row, column, value },
            DORA_SCALE => LoraError::DoraNotNormalized { row, column, value },
            _ => LoraError::NotRepresentable { row, column, value, dtype: checks.representable_in.unwrap().name() },
        }
    }
}

/// A piece of one row's A, B or scale segment, and the bytes of the packed output it fills:
/// `gap` zero bytes (alignment or page tail before the segment), then `len` converted values.
struct Chunk<'o> {
    row: usize,
    column: usize,
    len: usize,
    is_scale: bool,
    gap: usize,
    dst: Option<&'o mut [u8]>,
}

/// Runs the checks (the first fault by the order above is the error), packs into `target` if
/// given, and with `digest` returns a digest of the used values with each row's (module, layer,
/// rank, DoRA), else 0. `layout` must come from the config checks (every row holds its values).
pub fn scan_digest_pack(weights: &WeightsView, layout: &AdapterLayout, checks: ValueChecks, target: Option<PackTarget<'_>>, digest: bool) -> Result<u64> {
    let (chunks, out_dtype) = match target {
        Some(t) => (cut_chunks(layout, Some(t.packed), t.dtype, Some(t.out)), Some(t.dtype)),
        None => (cut_chunks(layout, None, weights.dtype, None), None),
    };
    let results: Vec<(u64, Option<Fault>)> =
        pool().install(|| chunks.into_par_iter().map(|c| run_chunk(weights, &checks, out_dtype, digest, c)).collect());
    if let Some(fault) = results.iter().filter_map(|r| r.1).min() {
        return Err(fault.into_error(weights, &checks));
    }
    if !digest {
        return Ok(0);
    }
    // Chunk hashes fold in row order; chunk bounds depend only on the layout, so equal adapters
    // always fold the same sequence.
    let mut all = Digest::new();
    all.word(weights.dtype as u64);
    let mut hashes = results.iter().map(|r| r.0);
    for r in &layout.rows {
        all.word(r.module.id() as u64 | (r.layer as u64) << 8 | (r.rank as u64) << 32 | (r.is_dora as u64) << 63);
        for _ in 0..chunks_in(r.a_len()) + chunks_in(r.b_len()) + chunks_in(r.scale_len()) {
            all.word(hashes.next().unwrap());
        }
    }
    Ok(all.finish())
}

/// Threads the pass spreads over (RAYON_NUM_THREADS, else one per logical CPU).
pub fn pass_threads() -> usize {
    pool().current_num_threads()
}

/// The pass's thread pool. Threads do not survive fork(): a forked child (a pre-forking server's
/// worker) builds its own pool rather than wait on threads that only exist in its parent.
fn pool() -> Arc<rayon::ThreadPool> {
    static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut guard = POOL.lock();
    if let Some((owner, pool)) = &*guard {
        if *owner == pid {
            return pool.clone();
        }
    }
    // A parent's pool: dropping it would signal threads this process does not have.
    std::mem::forget(guard.take());
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("loramux-pass-{i}"))
            .build()
            .expect("could not start the adapter packing threads"),
    );
    *guard = Some((pid, pool.clone()));
    pool
}

fn chunks_in(len: usize) -> usize {
    len.div_ceil(CHUNK_ELEMS)
}

/// The chunks in output order, each with its own disjoint slice of `out` (gaps included), and the
/// output's tail past the last segment zeroed here.
fn cut_chunks<'o>(
    layout: &AdapterLayout,
    packed: Option<&PackedLayout>,
    out_dtype: WeightsDtype,
    out: Option<&'o mut [u8]>,
) -> Vec<Chunk<'o>> {
    let es = out_dtype.size();
    let mut rest = out.map(|o| {
        let total = packed.unwrap().total_elems * es;
        assert!(o.len() >= total, "pack: output buffer too small");
        &mut o[..total]
    });
    let mut at = 0; // output bytes handed out so far
    let mut chunks = Vec::new();
    for (row, r) in layout.rows.iter().enumerate() {
        let p = packed.map(|p| p.rows[row]);
        let segs = [
            (r.a_offset(), p.map_or(0, |p| p.a), r.a_len(), false),
            (r.b_offset(), p.map_or(0, |p| p.b), r.b_len(), false),
            (r.scale_offset(), p.map_or(0, |p| p.scale), r.scale_len(), true),
        ];
        for (column, dst_elem, len, is_scale) in segs {
            for start in (0..len).step_by(CHUNK_ELEMS) {
                let n = CHUNK_ELEMS.min(len - start);
                let (dst, gap) = match rest.take() {
                    Some(buf) => {
                        let begin = (dst_elem + start) * es;
                        let end = begin + n * es;
                        let (mine, tail) = buf.split_at_mut(end - at);
                        let gap = begin - at;
                        at = end;
                        rest = Some(tail);
                        (Some(mine), gap)
                    }
                    None => (None, 0),
                };
                chunks.push(Chunk { row, column: column + start, len: n, is_scale, gap, dst });
            }
        }
    }
    if let Some(tail) = rest {
        tail.fill(0);
    }
    chunks
}

fn run_chunk(weights: &WeightsView, checks: &ValueChecks, out_dtype: Option<WeightsDtype>, digest: bool, c: Chunk<'_>) -> (u64, Option<Fault>) {
    let dtype = weights.dtype;
    let size = dtype.size();
    let bytes = &weights.row_bytes(c.row)[c.column * size..(c.column + c.len) * size];
    let at = |kind, i: Option<usize>| i.map(|i| Fault::new(kind, c.row, c.column + i));
    let mut fault = None;
    if any_bad(dtype, bytes, c.len, checks.finite, checks.representable_in) {
        fault = first_fault(dtype, bytes, &c, checks);
    }
    if c.is_scale && checks.dora_scales {
        let bad_scale = at(DORA_SCALE, (0..c.len).position(|i| !(dtype.read(bytes, i).is_finite() && dtype.read(bytes, i) > 0.0)));
        fault = fault.into_iter().chain(bad_scale).min();
    }
    let hash = if digest {
        let mut h = Digest::new();
        h.bytes(bytes);
        h.finish()
    } else {
        0
    };
    if let (Some(dst), Some(out_dtype)) = (c.dst, out_dtype) {
        dst[..c.gap].fill(0);
        copy_convert(bytes, dtype, &mut dst[c.gap..], out_dtype, c.len);
    }
    (hash, fault)
}

/// The first value of a chunk that `any_bad` flagged, by the ranking of `Fault`.
fn first_fault(dtype: WeightsDtype, bytes: &[u8], c: &Chunk<'_>, checks: &ValueChecks) -> Option<Fault> {
    let at = |kind, i: Option<usize>| i.map(|i| Fault::new(kind, c.row, c.column + i));
    let non_finite = if checks.finite { at(NON_FINITE, first_nonfinite(dtype, bytes, c.len)) } else { None };
    let beyond = checks.representable_in.and_then(|serving| at(NOT_REPRESENTABLE, first_overflow(dtype, bytes, c.len, serving)));
    non_finite.into_iter().chain(beyond).min()
}

/// Multiply-rotate mixing over 8-byte words: fast (several GB/s a core) and well spread; not meant
/// to resist a caller crafting collisions against their own task id.
struct Digest(u64);

impl Digest {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    fn new() -> Self {
        Digest(0x243F_6A88_85A3_08D3)
    }
    #[inline]
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(Self::K).rotate_left(31);
    }
    fn bytes(&mut self, b: &[u8]) {
        // Four independent lanes over 32-byte blocks so the multiplies overlap, then folded in.
        let mut lanes = [self.0, self.0 ^ 1, self.0 ^ 2, self.0 ^ 3];
        let mut blocks = b.chunks_exact(32);
        for block in &mut blocks {
            for (lane, w) in lanes.iter_mut().zip(block.chunks_exact(8)) {
                *lane = (*lane ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(Self::K).rotate_left(31);
            }
        }
        lanes.iter().for_each(|&l| self.word(l));
        let mut words = blocks.remainder().chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().unwrap()));
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        self.word(u64::from_le_bytes(tail) ^ (b.len() as u64) << 56);
    }
    fn finish(self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^ (x >> 33)
    }
}

#[cfg(test)]
#[path = "format_pass_tests.rs"]
mod tests;
