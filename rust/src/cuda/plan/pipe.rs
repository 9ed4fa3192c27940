//! The pipelined tensor-core kernels (cuda/lora_prefill.cu): which batches take them, the expand's
//! span, merged items, per-item signals, shared memory and kernel names.

use super::*;

/// Whether a prefill batch (past the small items) takes the pipelined tensor-core kernels
/// (cuda/lora_prefill.cu: cp.async rings over x/A and y/B) rather than the register-staged
/// shrink_tile / reduce / expand_tile. `LORAMUX_PREFILL=legacy|pipe` forces one for A/B runs; a
/// forced or tabled tile expand (c1, c4) keeps the register-staged path it was measured with.
/// The launcher still takes the register-staged kernels where 16-byte copies are not allowed
/// (x or y unaligned, Hi or an output width not a multiple of 8).
pub fn prefill_is_pipelined(tuning: &Tuning) -> bool {
    match std::env::var("LORAMUX_PREFILL").as_deref() {
        Ok("legacy") => false,
        Ok("pipe") => true,
        _ if std::env::var("LORAMUX_EXPAND_TILE_COLS").is_ok() => false,
        _ => !matches!(tuning.expand, Some(ExpandKind::TileC1 | ExpandKind::TileC4)),
    }
}

/// Whether a batch of the small-item path (65..=ITEMS_BY_ADAPTERS_MAX_T tokens, `small_items`) runs the pipelined
/// tensor-core kernels over its items of 8 tokens instead of the CUDA-core ones.
/// `LORAMUX_PIPE_SMALL=1|0` forces it for A/B runs; else a tuning table's choice (p / p2 .. p16:
/// pipelined, o1 / o1w / o4: CUDA cores); else ranks PIPE_SMALL_RANKS take it. Measured on the H200
/// at T = 256 (docs/kernel-notes.md, prefill-5, run 3): at rank 64 the pipelined kernels were 1.28x
/// faster (geomean of 12 cases, 0.87-1.67x: faster at 1-32 adapters in all three shapes, slower at
/// 128 adapters in two), at rank 16 0.72x (the CUDA cores' shuffle reductions are cheap there); with
/// the rank tiles fixed at compile time (s11) rank 16 turned too (PIPE_SMALL_RANKS). Decode batches
/// (DECODE_TILES_MIN_T..=TILE_T tokens) take it by their adapter count instead
/// (PIPE_DECODE_TOKENS_PER_ADAPTER), never by the table, whose entries were timed on other kernels.
pub fn pipe_on_small_items(tokens: usize, small: bool, adapters: Option<usize>, max_rank: usize, tuning: &Tuning) -> bool {
    if !small {
        return false;
    }
    if tokens <= TILE_T {
        let by_count = match std::env::var("LORAMUX_PIPE_SMALL_DECODE").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => adapters.is_some_and(|n| tokens >= PIPE_DECODE_TOKENS_PER_ADAPTER * n.max(1)),
        };
        return tokens >= DECODE_TILES_MIN_T && by_count && PIPE_SMALL_RANKS.contains(&max_rank);
    }
    match std::env::var("LORAMUX_PIPE_SMALL").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => match tuning.expand {
            Some(k) if k.pipe_span().is_some() || k == ExpandKind::Pipe => true,
            Some(ExpandKind::SmallO1 | ExpandKind::SmallO1w | ExpandKind::SmallO4) => false,
            _ => PIPE_SMALL_RANKS.contains(&max_rank),
        },
    }
}

/// Fewest tokens the counted adapters of a decode batch (DECODE_TILES_MIN_T..=TILE_T tokens, small
/// items) must average for it to take the pipelined kernels rather than the fused decode kernel (at
/// 16 tokens: the two-kernel decode path)
/// (`LORAMUX_PIPE_SMALL_DECODE=1|0` forces either way for A/B runs; no count, a captured graph:
/// the fused kernel). Measured on the H200 (docs/kernel-notes.md, s12; ops.py, same run, 3 shapes x
/// r16/64, both orders, pipelined / fused time): 4 adapters at T = 32 0.61x geomean (0.46-0.86),
/// 8 at 32 0.83x (0.69-1.05), 8 at 64 0.65x (0.48-0.88), 16 at 64 0.82x (0.65-1.06); at 2 tokens an
/// adapter the fused kernel wins at rank 16 (32 adapters at T = 32: 1.28x geomean, up to 1.72x). At
/// T = 16 (the two-kernel decode path before): 2 adapters 0.58x, 4 adapters 0.80x (0.55-1.15).
pub const PIPE_DECODE_TOKENS_PER_ADAPTER: usize = 4;

/// Max ranks whose small-item batches take the pipelined kernels by default. Rank 64 since prefill-5
/// (above); ranks up to 32 since the kernels fixed their rank tiles at compile time (s11, H200,
/// ops.py T = 256, both orders, 3 shapes): at rank 16 over 32 adapters 0.75-0.84x the CUDA-core
/// kernels' time, over 128 adapters 0.84-1.07x (4096 -> 4096 the two slower rows), geomean 0.87x.
/// 128 was not measured.
pub const PIPE_SMALL_RANKS: std::ops::RangeInclusive<usize> = 1..=64;

/// Whether this batch's shrink and expand are the pipelined tensor-core kernels (where the launcher
/// finds 16-byte copies allowed): past the small items by default, on them where chosen.
pub fn takes_pipelined(tokens: usize, small: bool, adapters: Option<usize>, max_rank: usize, tuning: &Tuning) -> bool {
    if small {
        pipe_on_small_items(tokens, small, adapters, max_rank, tuning)
    } else {
        prefill_is_pipelined(tuning)
    }
}

/// Expand blocks the pipelined prefill expand aims for when nothing else decides its span: two a SM
/// of an H200, each streaming a span of 64-column tiles of one work item.
pub(super) const PIPE_EXPAND_TARGET_BLOCKS: usize = 2 * 132;
/// Longest span (in 64-column tiles) of one pipelined expand block.
pub const PIPE_MAX_SPAN_TILES: usize = 64;
/// Longest span the built-in rule takes past the small items: gate|up at T = 2048 (224 tiles a
/// slice) ran 119 us at 16 tiles against 144 at the 55 the block count alone asked for (prefill-6).
pub(super) const PIPE_RULE_MAX_SPAN: usize = 16;
/// A block's fixed cost in tiles' worth of time in the span rule (item, u, the wait on the shrink).
pub(super) const PIPE_BLOCK_COST_TILES: usize = 1;

/// 64-column tiles one pipelined expand block streams: `LORAMUX_EXPAND_SPAN_TILES`, else the
/// tuning's p2 .. p16 (`ExpandKind::pipe_span`), else the built-in rule (`pipe_span_rule`; on small items, and everywhere under
/// `LORAMUX_PIPE_SPAN_RULE=old`, prefill-6's: about PIPE_EXPAND_TARGET_BLOCKS blocks counting the
/// widest slice's tiles once a slice).
pub fn pipe_expand_tiles(tokens: usize, small: bool, out_sizes: &[usize], tuning: &Tuning) -> usize {
    let col_tiles = out_sizes.iter().copied().max().unwrap_or(0).div_ceil(64).max(1);
    let wanted = env_usize("LORAMUX_EXPAND_SPAN_TILES").or(tuning.expand.and_then(ExpandKind::pipe_span));
    let items = tokens.div_ceil(item_tokens(small));
    let old_rule = small || std::env::var("LORAMUX_PIPE_SPAN_RULE").as_deref() == Ok("old");
    let auto = || {
        if old_rule {
            (col_tiles * items * out_sizes.len().max(1)).div_ceil(PIPE_EXPAND_TARGET_BLOCKS)
        } else {
            pipe_span_rule(out_sizes, items)
        }
    };
    wanted.unwrap_or_else(auto).clamp(1, col_tiles.min(PIPE_MAX_SPAN_TILES))
}

/// The span (tiles) of least modelled time for `items` work items over slices `out_sizes` wide:
/// blocks run in waves of PIPE_EXPAND_TARGET_BLOCKS, a wave as long as its longest block (span +
/// PIPE_BLOCK_COST_TILES), at most PIPE_RULE_MAX_SPAN; ties go to the shorter span. Every slice
/// counts its own tiles: the old rule's widest-slice x slices made q|k|v at T = 2048 stream
/// 24-tile spans (q in 3 blocks, k and v in one each). It reproduces the launch table's sweep
/// (prefill-6, H200) on Llama-8B's shapes: q|k|v 4 at T = 512 and 2048 (the table's p4), o and
/// down 2 / 8 (the old rule's, which won there), gate|up 14 at T = 512 (the old rule's) and 14 at
/// 2048 (the table's p16 beat 4 and 55; 14 divides 224 as 16 does).
pub fn pipe_span_rule(out_sizes: &[usize], items: usize) -> usize {
    let tiles: Vec<usize> = out_sizes.iter().map(|&o| o.div_ceil(64).max(1)).collect();
    let widest = tiles.iter().copied().max().unwrap_or(1);
    let items = items.max(1);
    let mut best = (usize::MAX, 1);
    for span in 1..=widest.min(PIPE_RULE_MAX_SPAN) {
        let blocks: usize = items * tiles.iter().map(|t| t.div_ceil(span)).sum::<usize>();
        let cost = blocks.div_ceil(PIPE_EXPAND_TARGET_BLOCKS) * (span + PIPE_BLOCK_COST_TILES);
        if cost < best.0 {
            best = (cost, span);
        }
    }
    best.1
}

/// Small items of one slot a pipelined block merges into its 64-token tile (cuda/lora_prefill.cu
/// pf_item): TILE_T / DECODE_ITEM on the small items where chosen, else 1 (past the small items the
/// items are the tile already; the other kernels ignore it). Off by default: measured on the H200
/// (docs/kernel-notes.md, prefill7) it was not faster. Both kernels merged (run 1): 14336 -> 4096
/// rank 64 at T = 256 1.08-1.20x faster at 1-8 adapters (A read once, not 32 times), 4096 -> 4096
/// and 4096 -> 14336 0.80-0.90x (8x fewer expand blocks); shrink only, both or neither (run 2,
/// tune.measure_count): equal within 0.5 % on every Llama-8B projection at 1-128 adapters.
/// `LORAMUX_PIPE_MERGE=shrink|both` merges for A/B runs. u is per token, so the two kernels need
/// not merge alike: rows are computed on their own either way (bit for bit equal).
pub fn pipe_merge_items(tokens: usize, small: bool, shrink: bool) -> usize {
    if !(small && tokens > TILE_T) {
        return 1;
    }
    let merge = match std::env::var("LORAMUX_PIPE_MERGE").as_deref() {
        Ok("both") => true,
        Ok("shrink") => shrink,
        _ => false,
    };
    if merge {
        TILE_T / DECODE_ITEM
    } else {
        1
    }
}

/// Rank rows a pipelined tile holds: the launch's max rank padded to the mma's 16.
pub(super) fn pipe_rank_rows(max_rank: usize) -> usize {
    max_rank.div_ceil(16).max(1) * 16
}
/// Halves a row of an x / A / y tile of the pipelined kernels (PF_PITCH).
pub(super) const PIPE_PITCH: usize = 72;
/// Ring depths of cuda/lora_prefill.cu (PF_SHRINK_STAGES, PF_EXPAND_STAGES). A deeper expand ring
/// (5 tiles up to rank 16, 4 up to 48: still 3 blocks an SM) was measured on the H200 and taken
/// back: no faster at T = 2048 (1.00x), 3 % slower at T = 512 (docs/kernel-notes.md, prefill-6).
pub(super) const PIPE_SHRINK_STAGES: usize = 4;
pub(super) const PIPE_EXPAND_STAGES: usize = 3;

/// k-steps in the ring of the pipelined shrink for ranks up to `max_rank` (cuda/lora_prefill.cu
/// pf_shrink_stages of the rank-tile kernel it launches): 6 up to rank 16, 5 up to 32, else
/// PIPE_SHRINK_STAGES, so the ring holds more of a split's k-steps and 3 blocks an SM still reside.
/// Measured on the H200 (docs/kernel-notes.md, s15): rank 16 over 128 adapters at T = 2048 0.82-0.91x
/// the time, other rows 0.96-1.04x.
pub(super) fn pipe_shrink_stages(max_rank: usize) -> usize {
    match pipe_rank_rows(max_rank) {
        16 => 6,
        32 => 5,
        _ => PIPE_SHRINK_STAGES,
    }
}

/// Whether a pipelined apply's expand waits on each item's signal (the shrink's last split of the
/// item bumps it once u is summed: `launch::apply_signalled`) rather than on the whole shrink grid.
/// `LORAMUX_PIPE_SIGNAL=1|0` forces either (A/B runs, tests); else batches of more than
/// PIPE_SIGNAL_AFTER_TOKENS tokens. `max_rank`: the expand reads u a float4 at a time at L2 only
/// where its ranks come in fours (the other form's plain loads could hit a stale L1 line).
pub fn pipe_signals(tokens: usize, max_rank: usize) -> bool {
    !pipe_fragments_lds32() && max_rank % 4 == 0
        && match std::env::var("LORAMUX_PIPE_SIGNAL").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => tokens > PIPE_SIGNAL_AFTER_TOKENS,
        }
}

/// Batches up to this many tokens keep the grid wait. Measured on the H200 (docs/kernel-notes.md,
/// s17 run B; ops.py quick grid, same run, signalled / grid wait): T = 1024 and 2048 0.98x the time
/// geomean over 96 rows (0.92-1.06x); T = 256 1.00-1.02x; one adapter at T = 16 / 64 1.09x / 1.10x
/// (up to 1.27x).
pub const PIPE_SIGNAL_AFTER_TOKENS: usize = 512;

/// Shared memory one block may opt into on a GPU of this arch (sm_80/87: 163 KB, sm_90/100/103:
/// 227 KB; sm_86/89, the sm_12x parts and any arch not listed: 99 KB, the smallest of them).
pub fn block_smem_optin(arch: u32) -> usize {
    match arch {
        80 | 87 => 163 * 1024,
        90 | 100 | 103 => 227 * 1024,
        _ => 99 * 1024,
    }
}

/// Static shared memory of the pipelined kernels (a work item's 64 token indices and a flag),
/// rounded up: the driver counts it with the dynamic bytes against the block's limit.
pub(super) const PIPE_STATIC_SMEM: usize = 1024;

/// Whether a pipelined launch of `dynamic` bytes of shared memory fits a block on this arch; one
/// that does not takes the register-staged kernels.
pub fn pipe_smem_fits(dynamic: usize, arch: u32) -> bool {
    dynamic + PIPE_STATIC_SMEM <= block_smem_optin(arch)
}

/// Dynamic shared memory of a pipelined shrink: its ring of x and A k-steps.
pub fn pipe_shrink_smem(max_rank: usize) -> usize {
    pipe_shrink_stages(max_rank) * (TILE_T + pipe_rank_rows(max_rank)) * PIPE_PITCH * 2
}

/// Dynamic shared memory of a pipelined expand: u, then its ring of B and y tiles.
pub fn pipe_expand_smem(max_rank: usize) -> usize {
    let bpitch = pipe_rank_rows(max_rank) + 8;
    (TILE_T * bpitch + PIPE_EXPAND_STAGES * (64 * bpitch + TILE_T * PIPE_PITCH)) * 2
}

/// The pipelined shrink's kernel for a dtype suffix: u summed 4 ranks a float4 with every split's
/// partial in flight where an item holds more than PF_USUM_SERIAL_MAX (512) u elements, element by
/// element below (cuda/lora_prefill.cu); `LORAMUX_PIPE_USUM=serial` element by element everywhere
/// (prefill-5's form), `=float4` a float4 wherever ranks allow (prefill-6's), for A/B runs.
/// `LORAMUX_PIPE_FRAGMENTS=lds32`: the form of prefill-5..7 (32-bit shared loads a fragment, copy
/// indices recomputed a copy), for A/B runs against the ldmatrix form; bit for bit the same sums.
pub fn pipe_shrink_kernel(dtype: &str, max_rank: usize) -> String {
    match std::env::var("LORAMUX_PIPE_USUM").as_deref() {
        Ok("serial") => format!("lora_prefill_shrink_{dtype}_serial"),
        Ok("float4") => format!("lora_prefill_shrink_{dtype}_f4"),
        _ => format!("lora_prefill_shrink_{dtype}{}", pipe_kernel_suffix(max_rank)),
    }
}

/// The pipelined expand's kernel for a dtype suffix and the launch's max rank (as the shrink's).
pub fn pipe_expand_kernel(dtype: &str, max_rank: usize) -> String {
    format!("lora_prefill_expand_{dtype}{}", pipe_kernel_suffix(max_rank))
}

/// Launches whose max rank pads to at most this many rows take the kernels with their rank tiles
/// fixed at compile time (`_w1`..`_w4`: 16 rows each), the rest the per-item form.
pub const PIPE_FIXED_RANK_ROWS: usize = 64;

/// `LORAMUX_PIPE_FRAGMENTS=lds32`: the pipelined kernels of prefill-5..7's form (A/B runs), whose
/// expand reads u by plain loads.
pub(super) fn pipe_fragments_lds32() -> bool {
    std::env::var("LORAMUX_PIPE_FRAGMENTS").as_deref() == Ok("lds32")
}

/// `_lds32` under `LORAMUX_PIPE_FRAGMENTS=lds32`; else `_w{rows / 16}` where the max rank pads to
/// PIPE_FIXED_RANK_ROWS rows or fewer, unless `LORAMUX_PIPE_RANK_TILES=item` asks for the per-item
/// form (A/B runs); else none (the per-item form).
pub(super) fn pipe_kernel_suffix(max_rank: usize) -> String {
    let rows = pipe_rank_rows(max_rank);
    if pipe_fragments_lds32() {
        "_lds32".into()
    } else if rows <= PIPE_FIXED_RANK_ROWS && std::env::var("LORAMUX_PIPE_RANK_TILES").as_deref() != Ok("item") {
        format!("_w{}", rows / 16)
    } else {
        String::new()
    }
}
