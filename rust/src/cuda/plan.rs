//! Launch planning: which kernel path a batch takes and how the shrink splits its reduction
//! dimension so decode batches spread over every SM. Pure arithmetic, no CUDA.

use super::launch::MAX_SLICES;

/// Tokens of one tensor-core tile (a prefill work item); decode batches (up to this many tokens)
/// may take the flat expand.
pub const TILE_T: usize = 64;

/// Batches up to this many tokens take the CUDA-core kernels over small work items (8 tokens of
/// one adapter) where the host gave no adapter count (`small_items`; with one, the count decides up
/// to ITEMS_BY_ADAPTERS_MAX_T): with many adapters a mid-size batch gives each only a few tokens, which a 64-token
/// tensor-core tile would mostly pad. Measured on the H200 (docs/kernel-notes.md, passes 2-3):
/// at T=256 small items win for 1, 32 and 128 adapters (4096->4096: 21/23/58 us vs 23/38/117 on
/// tiles) except one adapter into 14336 columns (41 vs 29); at T=512 tiles win unless the batch
/// spreads over ~128 adapters. `LORAMUX_SMALL_ITEMS_MAX_T` overrides it for A/B runs.
pub const SMALL_ITEMS_MAX_T: usize = 256;

pub fn small_items_max_t() -> usize {
    std::env::var("LORAMUX_SMALL_ITEMS_MAX_T").ok().and_then(|v| v.parse().ok()).unwrap_or(SMALL_ITEMS_MAX_T)
}

/// Whether a batch of `tokens` tokens is cut into small items (CUDA-core, split-K kernels; the
/// pipelined ones where chosen) rather than tensor-core tiles: decided once per step, when its
/// segments are built, and every launch of the step plans with the same answer. `adapters`: the
/// distinct adapter slots among the tokens where the host knows them (StepBatch does), None where
/// it does not (a captured graph serves any mix: T alone decides, small items up to
/// SMALL_ITEMS_MAX_T). With the count, a batch of DECODE_TILES_MIN_T..=ITEMS_BY_ADAPTERS_MAX_T tokens
/// stays on small items where its adapters average SMALL_ITEM_TOKENS_PER_ADAPTER tokens or fewer,
/// else tiles (below 16 tokens, small items whatever the count).
pub fn small_items(tokens: usize, adapters: Option<usize>) -> bool {
    let by_count = if tokens <= TILE_T {
        tokens >= DECODE_TILES_MIN_T && decode_tiles_by_adapters()
    } else {
        tokens <= ITEMS_BY_ADAPTERS_MAX_T && items_follow_adapters()
    };
    let per_adapter = if tokens <= TILE_T { decode_tile_tokens() } else { SMALL_ITEM_TOKENS_PER_ADAPTER };
    match adapters {
        Some(n) if by_count => tokens <= per_adapter * n.max(1),
        _ => tokens <= TILE_T || tokens <= small_items_max_t(),
    }
}

/// Most tokens an adapter may average for a batch whose adapter count is known to stay on small
/// items. Measured on the H200 (docs/kernel-notes.md, items8; ops.py, same runs, 4096->4096,
/// 4096->14336, 14336->4096 at ranks 16 and 64), tiles against small items by tokens an adapter:
/// T = 256: 256 (1 adapter) 1.39-2.34x faster, 32 1.06-1.88x, 21 and 16 1.26x / 1.15x geomean, 8
/// 0.58-0.94x, 2 0.39-0.90x; T = 512: 512 and 64 1.9-3.4x, 16 1.1-1.8x, 12.8 and 10.7 1.45x / 1.47x
/// geomean (small items' r64 rows up to 2.4x slower there), 8 0.84x, 4 0.75x; T = 128, one adapter:
/// 0.84-1.69x (geomean 1.14x). Every measured case takes the faster layout under `<= 8`.
pub const SMALL_ITEM_TOKENS_PER_ADAPTER: usize = 8;

/// Smallest decode batch (T <= TILE_T) that the adapter count cuts into 64-token tiles (the
/// pipelined tensor-core kernels) where its adapters average more than SMALL_ITEM_TOKENS_PER_ADAPTER
/// tokens: one adapter's 16..64 tokens were 2..8 small items, each re-reading its weights through the
/// fused decode kernel. Measured on the H200 (docs/kernel-notes.md, s11; ops.py, same run, one
/// adapter at T = 16 and 64, 3 shapes x r16/64, both orders): tiles 1.08-2.6x faster in all 24 rows
/// (r64 at T = 64: 23.0 / 32.5 / 37.2 -> 12.1 / 13.8 / 17.6 us, the PEFT loop 14.2 / 22.1 / 17.7);
/// 8 adapters at T = 16 and 64 average <= 8 tokens and stay on small items.
pub const DECODE_TILES_MIN_T: usize = 16;

/// Most tokens the adapters of a decode batch (DECODE_TILES_MIN_T..=TILE_T tokens) may average for it
/// to stay on small items: SMALL_ITEM_TOKENS_PER_ADAPTER; `LORAMUX_DECODE_TILE_TOKENS` for A/B runs.
fn decode_tile_tokens() -> usize {
    env_usize("LORAMUX_DECODE_TILE_TOKENS").unwrap_or(SMALL_ITEM_TOKENS_PER_ADAPTER).max(1)
}

/// `LORAMUX_DECODE_TILES=0` keeps every decode batch on small items whatever its adapter count (A/B).
fn decode_tiles_by_adapters() -> bool {
    std::env::var("LORAMUX_DECODE_TILES").as_deref() != Ok("0")
}

/// Largest batch the adapter count may keep on small items: at T = 2048 tiles won at every count
/// measured (small items 0.24-0.72x, 128 adapters of 16 tokens included).
pub const ITEMS_BY_ADAPTERS_MAX_T: usize = 512;

/// `LORAMUX_ITEMS_BY_ADAPTERS=0` ignores the host's adapter count (A/B runs): T alone decides.
fn items_follow_adapters() -> bool {
    std::env::var("LORAMUX_ITEMS_BY_ADAPTERS").as_deref() != Ok("0")
}
/// Enough blocks to keep every SM of an H100 (132) busy several times over.
const TARGET_BLOCKS: usize = 4 * 132;

/// Launch choices a measured tuning table made for one launch geometry (python/loramux/ops/
/// tuning.py reads benchmarks/tune.py's table and passes them in); `None` keeps the built-in rule.
/// An environment override (`LORAMUX_*`, for A/B runs and the tuning sweep itself) wins over both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Blocks the shrink's split-K aims for (ksplit = target / blocks without a split).
    pub shrink_target_blocks: Option<usize>,
    /// Which expand kernel runs, where the path allows it.
    pub expand: Option<ExpandKind>,
    /// Whether a decode batch sizes its split on the device (`decode_split_from_device`): the sweep
    /// times each choice with the split sized both ways, so the entry says which it measured.
    pub device_split: Option<bool>,
}

/// The expand kernels a launch can choose between: the flat decode kernel, the small-item kernel
/// in its three instantiations, the tensor-core tile kernel at 1 or 4 tiles a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandKind {
    /// shrink and expand in one launch (cuda/lora_fused.cu), decode batches only; the shrink's A in registers
    Fused,
    /// the same at 3 blocks an SM (fewer, fatter: long column spans contend less)
    Fused3,
    /// the shrink's A staged in shared memory by cp.async (the `_sa` instantiations), 5 blocks an SM
    /// where shared memory lets them reside
    FusedStaged,
    /// the same at 4 blocks an SM
    FusedStaged4,
    Flat,
    SmallO1,
    SmallO1w,
    SmallO4,
    TileC1,
    TileC4,
    /// the pipelined prefill kernels (cuda/lora_prefill.cu), the expand's column span planned
    Pipe,
    /// the pipelined prefill kernels, 2, 4, 6, 8 or 16 64-column tiles an expand block
    Pipe2,
    Pipe4,
    Pipe6,
    Pipe8,
    Pipe16,
}

impl ExpandKind {
    pub const ALL: [ExpandKind; 16] = [
        ExpandKind::Fused,
        ExpandKind::Fused3,
        ExpandKind::FusedStaged,
        ExpandKind::FusedStaged4,
        ExpandKind::Flat,
        ExpandKind::SmallO1,
        ExpandKind::SmallO1w,
        ExpandKind::SmallO4,
        ExpandKind::TileC1,
        ExpandKind::TileC4,
        ExpandKind::Pipe,
        ExpandKind::Pipe2,
        ExpandKind::Pipe4,
        ExpandKind::Pipe6,
        ExpandKind::Pipe8,
        ExpandKind::Pipe16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExpandKind::Fused => "fused",
            ExpandKind::Fused3 => "fused3",
            ExpandKind::FusedStaged => "fuseds",
            ExpandKind::FusedStaged4 => "fuseds4",
            ExpandKind::Flat => "flat",
            ExpandKind::SmallO1 => "o1",
            ExpandKind::SmallO1w => "o1w",
            ExpandKind::SmallO4 => "o4",
            ExpandKind::TileC1 => "c1",
            ExpandKind::TileC4 => "c4",
            ExpandKind::Pipe => "p",
            ExpandKind::Pipe2 => "p2",
            ExpandKind::Pipe4 => "p4",
            ExpandKind::Pipe6 => "p6",
            ExpandKind::Pipe8 => "p8",
            ExpandKind::Pipe16 => "p16",
        }
    }

    /// The fused decode kernel in one of its forms.
    pub fn is_fused(self) -> bool {
        matches!(self, ExpandKind::Fused | ExpandKind::Fused3 | ExpandKind::FusedStaged | ExpandKind::FusedStaged4)
    }

    /// The pipelined expand's span (64-column tiles a block) a `p<N>` kind fixes.
    pub fn pipe_span(self) -> Option<usize> {
        match self {
            ExpandKind::Pipe2 => Some(2),
            ExpandKind::Pipe4 => Some(4),
            ExpandKind::Pipe6 => Some(6),
            ExpandKind::Pipe8 => Some(8),
            ExpandKind::Pipe16 => Some(16),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<ExpandKind> {
        ExpandKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0)
}

/// Decode shrink target when the flat expand follows (measured best of 528 / 264 / 132;
/// docs/kernel-notes.md, "Where the per-apply time goes").
const FLAT_TARGET_BLOCKS: usize = 132;

/// Whether a decode batch's expand takes the flat kernel (every block all tokens of a column
/// chunk) rather than the grouped one (a block per adapter). Measured on the H100
/// (docs/kernel-notes.md, "Where the per-apply time goes"): flat wins for multi-slice launches (q|k|v, gate|up) at 32..64 tokens
/// and loses for single slices and at 8 tokens, where it has too few blocks or re-reads too many
/// partials. `LORAMUX_EXPAND_DECODE=flat|grouped` forces one (benchmarks/decode_ab.py).
/// A tuning table's `expand` choice decides when the environment does not. `small`: the step's
/// segments are small items (`small_items`); tiles never take it.
pub fn decode_expand_is_flat(tokens: usize, small: bool, adapters: Option<usize>, num_slices: usize, max_rank: usize, tuning: &Tuning) -> bool {
    if !small || tokens > TILE_T || pipe_on_small_items(tokens, small, adapters, max_rank, tuning) {
        return false;
    }
    match std::env::var("LORAMUX_EXPAND_DECODE").as_deref() {
        Ok("flat") => true,
        Ok("grouped") => false,
        _ => match tuning.expand {
            Some(ExpandKind::Flat) => true,
            Some(ExpandKind::SmallO1 | ExpandKind::SmallO1w | ExpandKind::SmallO4) => false,
            _ => tokens >= 32 && num_slices > 1,
        },
    }
}

/// Tokens of one work item of the step's token segments (cuda/lora_common.cuh): a block takes one
/// item. Decode items are small so one adapter's tokens spread over several blocks (a single
/// tenant's 64 tokens are 8 items, not one block); prefill items are the tensor-core tile.
pub fn item_tokens(small: bool) -> usize {
    if small {
        DECODE_ITEM
    } else {
        TILE_T
    }
}

/// Decode work-item size: the decode kernels stage this many tokens (DECODE_TOKENS, EXPAND_ITEM).
pub const DECODE_ITEM: usize = 8;

/// Work items the segments of `tokens` tokens over `num_slots` slots can hold at most: every slot
/// used adds at most one partial item, and no item is empty.
pub fn max_items(tokens: usize, num_slots: usize, small: bool) -> usize {
    let chunk = item_tokens(small);
    (tokens.div_ceil(chunk) + tokens.min(num_slots)).min(tokens).max(1)
}

/// Blocks along the items of a launch: every item bound for decode batches (at most 64), else
/// capped (blocks loop over items with stride gridDim.y) so a launch is not mostly blocks that find
/// no item: the bound counts one extra item per slot of the table, most mappings use few.
pub fn grid_items(tokens: usize, num_slots: usize, small: bool) -> usize {
    let m = max_items(tokens, num_slots, small);
    if tokens <= TILE_T {
        m
    } else {
        m.min(tokens.div_ceil(item_tokens(small)).max(64))
    }
}

/// int32 elements of the segments buffer: header, three item arrays, token list, slot scratch,
/// the fused decode kernel's workspace (a ticket and a completion count per slice and item). A
/// batch cut otherwise than T alone would cut it (`small_items` with the adapter count) gets one
/// unused word more: where slots outnumber tokens both layouts would otherwise have one length, and
/// the length is what tells a launch that its segments were cut the way it plans (kernels.py checks it).
pub fn segments_len(tokens: usize, num_slots: usize, small: bool) -> usize {
    let m = max_items(tokens, num_slots, small);
    let by_count_word = usize::from(small != small_items(tokens, None));
    SEG_HEADER + 3 * m + tokens + num_slots + FUSED_WS_WORDS * MAX_SLICES * m + by_count_word
}

pub const SEG_HEADER: usize = 4;
/// int32s of the fused workspace per (slice, item): the block group's ticket and completion count.
pub const FUSED_WS_WORDS: usize = 2;

/// How the shrink splits its reduction dim: `ksplit` partial sums of `kchunk` elements each.
/// `split_target > 0` (decode batches, `decode_split_from_device`): the kernels take the split
/// `decode_split` gives the step's real item count for that target, and ksplit / kchunk are the
/// most either can be over every count (the grid, the partials' stride, the staged x rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkPlan {
    pub ksplit: usize,
    pub kchunk: usize,
    pub split_target: usize,
}

/// `LORAMUX_SHRINK_TARGET_BLOCKS`, else the tuning's target, else the built-in one; at most
/// PIPE_MAX_SPLIT_DEFAULT splits where the pipelined kernels run (`max_rank` decides that on small
/// items). `small`: how the step's segments cut the tokens (`small_items`).
#[allow(clippy::too_many_arguments)]
pub fn plan_shrink(
    tokens: usize, small: bool, adapters: Option<usize>, hi: usize, num_slices: usize, num_slots: usize, max_rank: usize, tuning: &Tuning,
) -> ShrinkPlan {
    plan_shrink_with(tokens, small, adapters, hi, num_slices, num_slots, max_rank, tuning, decode_split_from_device(tokens, tuning))
}

/// `plan_shrink` with the split planned on the host whatever the batch (the standalone shrink: its
/// reduce sums every planned split).
#[allow(clippy::too_many_arguments)]
pub fn plan_shrink_on_host(
    tokens: usize, small: bool, adapters: Option<usize>, hi: usize, num_slices: usize, num_slots: usize, max_rank: usize, tuning: &Tuning,
) -> ShrinkPlan {
    plan_shrink_with(tokens, small, adapters, hi, num_slices, num_slots, max_rank, tuning, false)
}

#[allow(clippy::too_many_arguments)]
fn plan_shrink_with(
    tokens: usize, small: bool, adapters: Option<usize>, hi: usize, num_slices: usize, num_slots: usize, max_rank: usize, tuning: &Tuning,
    device_split: bool,
) -> ShrinkPlan {
    // the flat expand re-reads every token's partials in each block: fewer, fatter splits pay there
    let built_in = if decode_expand_is_flat(tokens, small, adapters, num_slices, max_rank, tuning) { FLAT_TARGET_BLOCKS } else { TARGET_BLOCKS };
    let pipelined = takes_pipelined(tokens, small, adapters, max_rank, tuning);
    // a decode batch takes the pipelined kernels by its adapter count, never by the table, whose
    // split target was timed on the decode kernel it names: measured on the H200 (kernel-notes s16),
    // 8 adapters of 8 tokens ran 1.12-1.22x slower under a fused entry's target of 264
    let tabled = if pipelined && tokens <= TILE_T { None } else { tuning.shrink_target_blocks };
    let target = env_usize("LORAMUX_SHRINK_TARGET_BLOCKS").or(tabled).unwrap_or(built_in).max(1);
    // the pipelined shrink's grid and its last-split count are the planned ksplit: no device sizing
    let plan = split_for(tokens, small, hi, num_slices, num_slots, target, device_split && !pipelined);
    let max_split = pipe_max_split();
    if !pipelined || plan.ksplit <= max_split {
        return plan;
    }
    // the pipelined shrink streams long chunks; the last split of an item sums all the partials.
    // On small items the decode shrink runs this plan where 16-byte copies are not allowed, and it
    // holds at most DECODE_MAX_CHUNK elements a split: past Hi = 16384 the split count grows instead.
    let mut kchunk = hi.div_ceil(max_split).div_ceil(64) * 64;
    if small {
        kchunk = kchunk.min(DECODE_MAX_CHUNK);
    }
    ShrinkPlan { ksplit: hi.div_ceil(kchunk), kchunk, split_target: 0 }
}

/// Splits of the reduction dim the pipelined prefill shrink takes at most (`LORAMUX_PIPE_MAX_SPLIT`
/// for A/B runs): the item's last split sums ksplit partials a u element, on the way to the expand.
/// 16 is what the T = 2048 plans of the H200 run 1 used (docs/kernel-notes.md, prefill-5), where
/// the pipelined path won everywhere; at T = 512 the planner's 56 splits of Hi = 14336 lost.
const PIPE_MAX_SPLIT_DEFAULT: usize = 16;
fn pipe_max_split() -> usize {
    env_usize("LORAMUX_PIPE_MAX_SPLIT").unwrap_or(PIPE_MAX_SPLIT_DEFAULT)
}

/// Blocks along the items a decode launch is planned for: only known on the device (the
/// segments), so a middle count: a few adapters' items (a single tenant's 64 tokens are 8 items,
/// 64 adapters' are 64); more items only add blocks.
fn planned_items(tokens: usize, num_slots: usize) -> usize {
    tokens.div_ceil(DECODE_ITEM).max(tokens.min(num_slots) / 2).min(grid_items(tokens, num_slots, true)).max(1)
}

/// Reduction elements one split of the decode shrink holds (DECODE_MAX_CHUNK, lora_shrink_decode.cuh).
const DECODE_MAX_CHUNK: usize = 1024;

/// The split of the reduction dim that gives about `target` shrink blocks.
fn split_for(
    tokens: usize, small: bool, hi: usize, num_slices: usize, num_slots: usize, target: usize, device_split: bool,
) -> ShrinkPlan {
    if small {
        // decode: the kernels' split (decode_split), for the step's item count on the device or for
        // the planned number of items on the host
        if tokens <= TILE_T && device_split {
            return device_sized_split(tokens, hi, num_slices, num_slots, target);
        }
        return decode_split(planned_items(tokens, num_slots), num_slices, hi, target);
    }
    // prefill: the tensor core kernel steps 64 at a time, splits only to fill the SMs, and no finer
    // than 256 (the partials it adds stay small next to x)
    let blocks_wo_split = (tokens.div_ceil(TILE_T) * num_slices).max(1);
    let want = target.div_ceil(blocks_wo_split).max(1);
    let ksplit = want.min(hi.div_ceil(256)).max(1);
    let kchunk = hi.div_ceil(ksplit).div_ceil(64).max(1) * 64;
    ShrinkPlan { ksplit: hi.div_ceil(kchunk).max(1), kchunk, split_target: 0 }
}

/// Whether a decode batch of `tokens` tokens (T <= 64) takes its split, and the fused kernel its
/// column steps, from the step's real item count on the device (the segments' seg[0]) rather than
/// from `planned_items`: the decode step's 32 one-token items were split as for 16, and 8 adapters
/// of 8 tokens over a large slot table as for 32 (128 blocks on 132 SMs).
/// `LORAMUX_DECODE_DEVICE_SPLIT=1|0` forces either (A/B runs, the sweep); else the tuning table's
/// entry, which was timed with the split it names; else above DEVICE_SPLIT_MIN_TOKENS.
pub fn decode_split_from_device(tokens: usize, tuning: &Tuning) -> bool {
    match std::env::var("LORAMUX_DECODE_DEVICE_SPLIT").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => tuning.device_split.unwrap_or(tokens > DEVICE_SPLIT_MIN_TOKENS),
    }
}

/// Decode batches above this many tokens size their split on the device by default. Measured on the
/// H200 (docs/kernel-notes.md, decode-6; same run, ops.py decode rows): at 16 tokens the host's
/// guess is at most ~2x off and the device sizing lost (geomean 0.93x over 24 cases: the table's
/// split targets were tuned for the host's count, and an item count other than the most the
/// segments hold costs every block one more trip); at 64 tokens it was 1.07x faster (8 adapters
/// over a large slot table 1.35-1.68x; 4-8 % slower at 32 and 128) and the decode step's LoRA
/// overhead (batch 32) 353-360 us against 368.
pub const DEVICE_SPLIT_MIN_TOKENS: usize = 16;

/// The decode split for `items` items (cuda/lora_common.cuh decode_split, which the kernels run
/// with the step's count): about `target` shrink blocks, 256-element granules, at most 1024.
pub fn decode_split(items: usize, num_slices: usize, hi: usize, target: usize) -> ShrinkPlan {
    let hi = hi.max(1); // an empty input width plans one 256-element chunk (the launchers return before any launch)
    let groups = (items * num_slices).max(1);
    let want = target.div_ceil(groups).max(1);
    let ksplit = want.min(hi.div_ceil(256).max(1));
    let kchunk = (hi.div_ceil(ksplit).div_ceil(256) * 256).min(DECODE_MAX_CHUNK);
    ShrinkPlan { ksplit: hi.div_ceil(kchunk).max(1), kchunk, split_target: 0 }
}

/// A decode split the device sizes: room for every item count the segments can hold. The split
/// count only grows as the items get fewer (one item: the most), the chunk as they get more.
fn device_sized_split(tokens: usize, hi: usize, num_slices: usize, num_slots: usize, target: usize) -> ShrinkPlan {
    let most = max_items(tokens, num_slots, true);
    ShrinkPlan {
        ksplit: decode_split(1, num_slices, hi, target).ksplit,
        kchunk: decode_split(most, num_slices, hi, target).kchunk,
        split_target: target,
    }
}

/// Ranks up to this take the fused decode kernel: its expand stages two 256-column tiles of B in
/// shared memory (75 KB at rank 64; rank 128 would need 140 KB, past what sm_86/89 offer a block).
pub const FUSED_MAX_RANK: usize = 64;

/// Shrink blocks the fused decode kernel aims for. Its expand blocks each re-read their tokens'
/// ksplit partials, so it splits coarser than the two-kernel path (TARGET_BLOCKS).
const FUSED_SHRINK_TARGET: usize = 264;
/// Expand blocks the fused decode kernel aims for: about three resident blocks on each of 132 SMs;
/// fewer blocks stream longer column spans with the next tile in flight.
const FUSED_EXPAND_TARGET: usize = 3 * 132;

/// Decode batches above this many tokens take the fused kernel when no table entry decides. Measured
/// on the H200 (docs/kernel-notes.md, fused pass): at 1..16 tokens the fused kernel's ticket and
/// count trips cost more than the two-kernel path's launch boundary (T = 1: ~1 us an apply); at 64
/// tokens over 32 adapters it wins where B is large (gate|up r16 36.9 vs 47.4 us).
pub const FUSED_MIN_TOKENS: usize = 16;

/// Whether a lora_apply of `tokens` tokens takes the fused decode kernel (one launch: shrink and
/// expand, cuda/lora_fused.cu) rather than shrink + expand. `LORAMUX_DECODE_FUSED=1|0` forces it
/// either way for A/B runs (where the batch allows it); else a tuning table's choice of expand
/// kernel decides; else decode batches of more than FUSED_MIN_TOKENS tokens take it. Past TILE_T
/// tokens `fused_past_decode` alone decides. `small`: the step's segments are small items
/// (`small_items`), the only layout the fused kernel reads.
pub fn decode_is_fused(tokens: usize, small: bool, adapters: Option<usize>, max_rank: usize, tuning: &Tuning) -> bool {
    if !small || tokens == 0 || max_rank > FUSED_MAX_RANK {
        return false;
    }
    if tokens > TILE_T {
        return fused_past_decode(tokens, adapters, max_rank);
    }
    if pipe_on_small_items(tokens, small, adapters, max_rank, tuning) {
        return false;
    }
    match std::env::var("LORAMUX_DECODE_FUSED").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => match tuning.expand {
            Some(k) => k.is_fused(),
            None => tokens > FUSED_MIN_TOKENS,
        },
    }
}

/// Whether a small-item batch of more than TILE_T tokens (up to ITEMS_BY_ADAPTERS_MAX_T: only a
/// counted batch stays on small items past SMALL_ITEMS_MAX_T) takes the fused decode kernel instead
/// of the pipelined ones: ranks up to FUSED_PAST_DECODE_MAX_RANK, its counted adapters averaging
/// fewer than FUSED_PAST_DECODE_TOKENS tokens (past SMALL_ITEMS_MAX_T tokens: at most
/// FUSED_PAST_DECODE_TOKENS_LONG). Many adapters of a token or a few: the fused kernel reads each
/// adapter's weights once, with no 64-row tensor-core tile of mostly empty rows. No count (a
/// captured graph serves any mix): no.
/// `LORAMUX_FUSED_PAST_DECODE=1|0` forces it either way for a counted batch (A/B runs, tests).
pub fn fused_past_decode(tokens: usize, adapters: Option<usize>, max_rank: usize) -> bool {
    let Some(n) = adapters else { return false };
    if tokens > ITEMS_BY_ADAPTERS_MAX_T {
        return false;
    }
    let n = n.max(1);
    match std::env::var("LORAMUX_FUSED_PAST_DECODE").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ if max_rank > FUSED_PAST_DECODE_MAX_RANK => false,
        _ if tokens > SMALL_ITEMS_MAX_T => tokens <= FUSED_PAST_DECODE_TOKENS_LONG * n,
        _ => tokens < FUSED_PAST_DECODE_TOKENS * n,
    }
}

/// Tokens the counted adapters of a small-item batch of TILE_T + 1..=SMALL_ITEMS_MAX_T tokens must
/// average fewer than for it to take the fused decode kernel (`fused_past_decode`). Measured on the
/// H200 (docs/kernel-notes.md, s14; ops.py, same run, 3 shapes, fused / pipelined time) at rank 16,
/// by tokens an adapter: 1-2 (T = 128 and 256 over 64-128 adapters) 0.41-0.71x, 2.7-3.2 0.80-0.90x,
/// 4 (T = 256 over 64) 0.98-1.07x, 5.3 (T = 128 over 24) 1.11-1.24x, 6.4 1.16-1.21x.
pub const FUSED_PAST_DECODE_TOKENS: usize = 4;

/// Past SMALL_ITEMS_MAX_T tokens the bound is higher: the adapters may average up to this many
/// tokens. Measured as above at T = 512: 4 tokens an adapter 0.62-0.88x, 5.3 0.65-0.96x, 8 1.03-1.26x.
pub const FUSED_PAST_DECODE_TOKENS_LONG: usize = 6;

/// Highest rank whose batches take the fused decode kernel past TILE_T by the adapter count. Measured
/// as above at rank 64: 1-1.3 tokens an adapter (T = 128 over 96-128 adapters) 0.82-0.93x in
/// 4096->4096 and 4096->14336 but 0.99-1.15x in 14336->4096; 2-2.7 tokens 0.87-1.45x; 4 and more
/// 0.95-1.98x.
pub const FUSED_PAST_DECODE_MAX_RANK: usize = 32;

/// Whether the fused decode kernel is launched as a programmatic dependent of the kernel before it
/// (sm_90): its launch and block dispatch overlap that kernel's tail, and it waits in-kernel
/// (griddepcontrol.wait) before reading anything. `LORAMUX_FUSED_PDL=0` launches it plainly.
pub fn fused_is_dependent() -> bool {
    std::env::var("LORAMUX_FUSED_PDL").as_deref() != Ok("0")
}

/// Ranks up to this take the register-A fused kernel at 4 blocks an SM by default (its shared
/// memory, 41 KB a block at rank 32, lets 4 or 5 reside; 74 KB at rank 64 only 3).
pub const FUSED_M4_MAX_RANK: usize = 32;

/// Shared memory an sm_90 SM gives its blocks (228 KB, 1 KB of it reserved per block). On GPUs with
/// less (sm_80: 164 KB, sm_86/89: 100 KB) more blocks an SM than fit only cost the `_m4`/`_m5`
/// instantiations their spills: the launch runs at the occupancy the SM allows.
const SM_SHARED_BYTES: usize = 228 * 1024;

/// Blocks an SM the staged-A fused kernel aims for by default (cuda/lora_fused.cu `_sa5`: 48
/// registers, a few bytes spilled), fewer where its shared memory does not let them reside.
pub const FUSED_STAGED_BLOCKS_PER_SM: usize = 5;

/// Whether the fused kernel's shrink stages its A rows in shared memory by cp.async (the `_sa`
/// instantiations: no registers hold loads in flight) rather than in registers.
/// `LORAMUX_FUSED_STAGE_A=1|0` forces either (A/B, the sweep); else the tuning table's kind
/// ("fuseds", "fuseds4"); else registers: measured on the H200 (docs/kernel-notes.md, decode5), the in-order
/// decode step took 368 us with A in registers against 378 staged (5 blocks an SM), 373 (4).
pub fn fused_stages_a(tuning: &Tuning) -> bool {
    match std::env::var("LORAMUX_FUSED_STAGE_A").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => matches!(tuning.expand, Some(ExpandKind::FusedStaged | ExpandKind::FusedStaged4)),
    }
}

/// Blocks an SM the tuning table's fused kind asks for ("fused3", "fuseds4"); None: the form's
/// built-in number (`fused_form_for`).
pub fn fused_kind_blocks_per_sm(tuning: &Tuning) -> Option<usize> {
    match tuning.expand {
        Some(ExpandKind::Fused3) => Some(3),
        Some(ExpandKind::FusedStaged4) => Some(4),
        _ => None,
    }
}

/// How one fused launch runs: which instantiation (blocks an SM, A staged or not) and its dynamic
/// shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedForm {
    pub blocks_per_sm: usize,
    pub staged_a: bool,
    /// rounds of 16 A rows the staged shrink has room for, up to 4 (the kernel derives the same
    /// from smem_bytes and takes at most the item's rank's rounds)
    pub a_stages: usize,
    pub smem_bytes: usize,
}

impl FusedForm {
    /// The kernel's name for a dtype suffix ("bf16", "f16").
    pub fn kernel_name(&self, dtype: &str) -> String {
        match (self.staged_a, self.blocks_per_sm) {
            (true, m) => format!("lora_fused_decode_{dtype}_sa{m}"),
            (false, 4) => format!("lora_fused_decode_{dtype}_m4"),
            (false, 5) => format!("lora_fused_decode_{dtype}_m5"),
            (false, _) => format!("lora_fused_decode_{dtype}"),
        }
    }
}

fn blocks_that_fit(smem_bytes: usize) -> usize {
    SM_SHARED_BYTES / (smem_bytes + 1024)
}

/// The fused launch's form for ranks up to `max_rank`, reduction chunks of `kchunk` elements, the
/// shrink's A staged in shared memory or not (`FusedPlan::staged_a`).
/// `LORAMUX_FUSED_BLOCKS_PER_SM=3|4|5` picks the blocks an SM for A/B runs, else the plan's (the
/// table's kind);
/// else A staged: FUSED_STAGED_BLOCKS_PER_SM; A in registers: 4 up to rank 32 (measured on the
/// H200: the decode step's LoRA overhead 410 -> 360 us against 3), 3 above. Never more than the
/// launch's shared memory lets reside (nor fewer than 3: the instantiations' floor). The staged
/// shrink gets a second round of A in flight (ranks above 16) where that keeps the blocks an SM.
pub fn fused_form(max_rank: usize, kchunk: usize, staged_a: bool, planned_blocks_per_sm: Option<usize>) -> FusedForm {
    let forced = match std::env::var("LORAMUX_FUSED_BLOCKS_PER_SM").as_deref() {
        Ok("3") => Some(3),
        Ok("4") => Some(4),
        Ok("5") => Some(5),
        _ => planned_blocks_per_sm,
    };
    fused_form_for(max_rank, kchunk, staged_a, forced)
}

/// `fused_form` with the environment's choices passed in.
pub fn fused_form_for(max_rank: usize, kchunk: usize, staged_a: bool, blocks_per_sm: Option<usize>) -> FusedForm {
    let wanted = match (blocks_per_sm, staged_a) {
        (Some(m), _) => m.clamp(3, 5),
        (None, true) => FUSED_STAGED_BLOCKS_PER_SM,
        (None, false) if max_rank <= FUSED_M4_MAX_RANK => 4,
        (None, false) => 3,
    };
    let expand = fused_expand_smem_bytes(max_rank);
    let (a_stages, smem_bytes) = if staged_a {
        let rounds = max_rank.div_ceil(16).max(1);
        let one = expand.max(fused_staged_shrink_smem_bytes(kchunk, 1));
        let two = expand.max(fused_staged_shrink_smem_bytes(kchunk, 2));
        let smem = if rounds > 1 && blocks_that_fit(two) >= wanted.min(blocks_that_fit(one)) { two } else { one };
        (((smem - FUSED_SMEM_HEAD - DECODE_ITEM * kchunk * 2) / (32 * kchunk)).min(4), smem)
    } else {
        (0, fused_smem_bytes(max_rank))
    };
    FusedForm { blocks_per_sm: wanted.min(blocks_that_fit(smem_bytes).max(3)), staged_a, a_stages, smem_bytes }
}

/// Launch geometry of the fused decode kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedPlan {
    pub shrink: ShrinkPlan,
    /// 256-column steps one expand block streams
    pub col_steps: usize,
    /// expand blocks per item of the widest slice (each slice has its own: `fused_col_groups`)
    pub col_groups: usize,
    /// the shrink's A rows staged in shared memory (`fused_stages_a`)
    pub staged_a: bool,
    /// blocks an SM the table's kind asks for (`fused_kind_blocks_per_sm`), else None
    pub blocks_per_sm: Option<usize>,
    /// > 0 (the split sized on the device): expand blocks the device's column steps aim for
    pub expand_target: usize,
}

/// Output columns of one expand step of the fused kernel (a column a thread).
pub const FUSED_COLS: usize = 256;

/// The fused kernel's plan for `tokens` tokens, Hi = `hi`, widest slice `max_out`. Shrink split:
/// `LORAMUX_SHRINK_TARGET_BLOCKS`, else the tuning's target, else FUSED_SHRINK_TARGET; expand:
/// `LORAMUX_FUSED_EXPAND_BLOCKS`, else FUSED_EXPAND_TARGET, spread over the planned items (where the
/// split is device-sized, the kernel takes its column steps from the step's real item count; the
/// host's figure sizes the grid).
pub fn plan_fused(tokens: usize, hi: usize, max_out: usize, num_slices: usize, num_slots: usize, tuning: &Tuning) -> FusedPlan {
    let target =
        env_usize("LORAMUX_SHRINK_TARGET_BLOCKS").or(tuning.shrink_target_blocks).unwrap_or(FUSED_SHRINK_TARGET).max(1);
    let device_split = decode_split_from_device(tokens, tuning);
    let shrink = if tokens > TILE_T && device_split {
        // past decode (`fused_past_decode`) as within it: sized from the step's item count
        device_sized_split(tokens, hi, num_slices, num_slots, target)
    } else {
        split_for(tokens, true, hi, num_slices, num_slots, target, device_split)
    };
    let expand_target = env_usize("LORAMUX_FUSED_EXPAND_BLOCKS").unwrap_or(FUSED_EXPAND_TARGET).max(1);
    let units = max_out.div_ceil(FUSED_COLS).max(1);
    // sized on the device: the host's steps are the most items' (a check on the plan, not used)
    let items = if shrink.split_target > 0 { max_items(tokens, num_slots, true) } else { planned_items(tokens, num_slots) };
    let col_steps = fused_col_steps(units, items * num_slices.max(1), expand_target);
    FusedPlan {
        shrink,
        col_steps,
        col_groups: units.div_ceil(col_steps),
        staged_a: fused_stages_a(tuning),
        blocks_per_sm: fused_kind_blocks_per_sm(tuning),
        expand_target: if shrink.split_target > 0 { expand_target } else { 0 },
    }
}

/// 256-column steps of a fused expand block: about `expand_target` expand blocks over `pairs`
/// (slice, item) pairs of `units` steps each (cuda/lora_fused.cu fused_shape does the same on the
/// device with the step's item count).
fn fused_col_steps(units: usize, pairs: usize, expand_target: usize) -> usize {
    (units * pairs.max(1)).div_ceil(expand_target.max(1)).clamp(1, units.max(1))
}

/// The fused kernel's shape for `items` work items, `(ksplit, kchunk, col_steps)`, as
/// cuda/lora_fused.cu fused_shape computes it: the host-planned one, or, sized on the device, the
/// decode split of the count (kept within the planned split) and the column steps it gives.
pub fn fused_shape(plan: &FusedPlan, hi: usize, out_sizes: &[usize], items: usize) -> (usize, usize, usize) {
    let sp = &plan.shrink;
    if sp.split_target == 0 {
        return (sp.ksplit, sp.kchunk, plan.col_steps);
    }
    let s = out_sizes.len();
    let d = decode_split(items, s, hi, sp.split_target);
    let (ksplit, kchunk) = if d.ksplit <= sp.ksplit && d.kchunk <= sp.kchunk { (d.ksplit, d.kchunk) } else { (sp.ksplit, sp.kchunk) };
    let units = out_sizes.iter().copied().max().unwrap_or(0).div_ceil(FUSED_COLS).max(1);
    (ksplit, kchunk, fused_col_steps(units, items * s, plan.expand_target))
}

/// Blocks of a fused launch: a group of ksplit + col_groups(slice) blocks per (slice, item). With
/// the shape sized on the device, the most any item count up to the segments' bound can take
/// (cuda/lora_fused.cu fused_shape / fused_block_item); blocks past the step's count leave.
pub fn fused_grid_blocks(plan: &FusedPlan, hi: usize, out_sizes: &[usize], max_items: usize) -> usize {
    let groups = |items: usize, ksplit: usize, col_steps: usize| -> usize {
        out_sizes.iter().map(|&o| items * (ksplit + fused_col_groups(o, col_steps))).sum()
    };
    if plan.shrink.split_target == 0 {
        return groups(max_items, plan.shrink.ksplit, plan.col_steps);
    }
    (1..=max_items.max(1))
        .map(|n| {
            let (ksplit, _, col_steps) = fused_shape(plan, hi, out_sizes, n);
            groups(n, ksplit, col_steps)
        })
        .max()
        .unwrap_or(0)
}

/// Expand blocks per item of a slice `out_size` wide (cuda/lora_fused.cu fused_col_groups).
pub fn fused_col_groups(out_size: usize, col_steps: usize) -> usize {
    out_size.div_ceil(FUSED_COLS).div_ceil(col_steps.max(1))
}

/// Bytes of dynamic shared memory before the roles' buffers (cuda/lora_fused.cu FUSED_SMEM_HEAD).
const FUSED_SMEM_HEAD: usize = 64;

/// The fused expand role's shared memory with ranks up to `max_rank`: tokens, u, two B tiles of
/// odd-chunk rows.
pub fn fused_expand_smem_bytes(max_rank: usize) -> usize {
    let rc = max_rank.div_ceil(8) * 8;
    let pitch = ((rc / 8) | 1) * 8;
    FUSED_SMEM_HEAD + DECODE_ITEM * rc * 4 + 2 * FUSED_COLS * pitch * 2
}

/// The staged shrink role's shared memory (cuda/lora_fused.cu shrink_decode_item_staged): tokens,
/// the item's x rows at a pitch of kchunk, `a_stages` rounds of 16 A rows of kchunk elements.
pub fn fused_staged_shrink_smem_bytes(kchunk: usize, a_stages: usize) -> usize {
    FUSED_SMEM_HEAD + DECODE_ITEM * kchunk * 2 + a_stages * 16 * kchunk * 2
}

/// Dynamic shared memory of a register-A fused launch with ranks up to `max_rank`: the larger of
/// the shrink role's (tokens, x chunk) and the expand role's.
pub fn fused_smem_bytes(max_rank: usize) -> usize {
    fused_expand_smem_bytes(max_rank).max(FUSED_SMEM_HEAD + DECODE_ITEM * DECODE_MAX_CHUNK * 2)
}

/// Whether lora_apply sums the partials into u (the reduce kernel) before the expand where the shrink
/// did not (prefill, ksplit > 1): in the register-staged tile path every 64-column expand block
/// would otherwise re-read all ksplit partials of its tokens (measured: most of the expand's time
/// at T = 2048, docs/kernel-notes.md). The pipelined prefill shrink sums them into u itself (its
/// last split an item; `launch::shrink` returns u's offset then), so what ran decides, not whether
/// the pipelined path was chosen: where it fell back (16-byte copies not allowed), the reduce runs.
pub fn apply_reduces_first(small: bool, plan: &ShrinkPlan) -> bool {
    !small && plan.ksplit > 1
}

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
const PIPE_EXPAND_TARGET_BLOCKS: usize = 2 * 132;
/// Longest span (in 64-column tiles) of one pipelined expand block.
pub const PIPE_MAX_SPAN_TILES: usize = 64;
/// Longest span the built-in rule takes past the small items: gate|up at T = 2048 (224 tiles a
/// slice) ran 119 us at 16 tiles against 144 at the 55 the block count alone asked for (prefill-6).
const PIPE_RULE_MAX_SPAN: usize = 16;
/// A block's fixed cost in tiles' worth of time in the span rule (item, u, the wait on the shrink).
const PIPE_BLOCK_COST_TILES: usize = 1;

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
fn pipe_rank_rows(max_rank: usize) -> usize {
    max_rank.div_ceil(16).max(1) * 16
}
/// Halves a row of an x / A / y tile of the pipelined kernels (PF_PITCH).
const PIPE_PITCH: usize = 72;
/// Ring depths of cuda/lora_prefill.cu (PF_SHRINK_STAGES, PF_EXPAND_STAGES). A deeper expand ring
/// (5 tiles up to rank 16, 4 up to 48: still 3 blocks an SM) was measured on the H200 and taken
/// back: no faster at T = 2048 (1.00x), 3 % slower at T = 512 (docs/kernel-notes.md, prefill-6).
const PIPE_SHRINK_STAGES: usize = 4;
const PIPE_EXPAND_STAGES: usize = 3;

/// k-steps in the ring of the pipelined shrink for ranks up to `max_rank` (cuda/lora_prefill.cu
/// pf_shrink_stages of the rank-tile kernel it launches): 6 up to rank 16, 5 up to 32, else
/// PIPE_SHRINK_STAGES, so the ring holds more of a split's k-steps and 3 blocks an SM still reside.
/// Measured on the H200 (docs/kernel-notes.md, s15): rank 16 over 128 adapters at T = 2048 0.82-0.91x
/// the time, other rows 0.96-1.04x.
fn pipe_shrink_stages(max_rank: usize) -> usize {
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
const PIPE_STATIC_SMEM: usize = 1024;

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
fn pipe_fragments_lds32() -> bool {
    std::env::var("LORAMUX_PIPE_FRAGMENTS").as_deref() == Ok("lds32")
}

/// `_lds32` under `LORAMUX_PIPE_FRAGMENTS=lds32`; else `_w{rows / 16}` where the max rank pads to
/// PIPE_FIXED_RANK_ROWS rows or fewer, unless `LORAMUX_PIPE_RANK_TILES=item` asks for the per-item
/// form (A/B runs); else none (the per-item form).
fn pipe_kernel_suffix(max_rank: usize) -> String {
    let rows = pipe_rank_rows(max_rank);
    if pipe_fragments_lds32() {
        "_lds32".into()
    } else if rows <= PIPE_FIXED_RANK_ROWS && std::env::var("LORAMUX_PIPE_RANK_TILES").as_deref() != Ok("item") {
        format!("_w{}", rows / 16)
    } else {
        String::new()
    }
}

/// Which small-item expand instantiation runs: "1" (a column a thread, 16 ranks of B prefetched,
/// 3 blocks an SM), "1w" (64 ranks prefetched, 2 blocks an SM) or "4" (4 columns a thread: fewer,
/// fatter blocks; measured slower below ~256 tokens). `LORAMUX_EXPAND_OPT` picks one for A/B runs.
/// A tuning table's choice decides when the environment does not.
pub fn expand_variant(tuning: &Tuning) -> &'static str {
    match std::env::var("LORAMUX_EXPAND_OPT").as_deref() {
        Ok("4") => "4",
        Ok("1w") => "1w",
        Ok("1") => "1",
        _ => match tuning.expand {
            Some(ExpandKind::SmallO4) => "4",
            Some(ExpandKind::SmallO1w) => "1w",
            _ => "1",
        },
    }
}

/// 64-column tiles one block of the tensor-core expand covers (1 or 4; `LORAMUX_EXPAND_TILE_COLS`
/// for A/B runs): 4 pays the item lookup, the u load and the wait on the shrink once per 256 columns.
pub fn expand_tiles_per_block(tuning: &Tuning) -> usize {
    match std::env::var("LORAMUX_EXPAND_TILE_COLS").as_deref() {
        Ok("4") => 4,
        Ok("1") => 1,
        _ => match tuning.expand {
            Some(ExpandKind::TileC4) => 4,
            _ => 1,
        },
    }
}

/// Output columns a thread of that variant covers.
pub fn expand_columns_per_thread(tuning: &Tuning) -> usize {
    if expand_variant(tuning) == "4" {
        4
    } else {
        1
    }
}

/// Output columns per block of the flat decode expand: each thread takes one column of at most
/// 4 token rows (its prefetch registers), so 256 / columns row groups must cover the batch.
pub fn flat_expand_columns(tokens: usize) -> usize {
    let groups = tokens.div_ceil(4).max(1).next_power_of_two();
    256 / groups.min(256)
}

/// Elements of the fp32 partial buffer a shrink with this plan writes: [S, ksplit, T, max_rank].
pub fn partial_len(plan: &ShrinkPlan, num_slices: usize, tokens: usize, max_rank: usize) -> usize {
    num_slices * plan.ksplit * tokens * max_rank
}

/// Elements of u [S, T, max_rank] (fp32), which the pipelined prefill shrink writes after the
/// partials when the buffer has room for it.
pub fn u_len(num_slices: usize, tokens: usize, max_rank: usize) -> usize {
    num_slices * tokens * max_rank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_the_reduction_dim() {
        let cases = [(1, 4096, 1, 8), (32, 14336, 3, 64), (64, 576, 2, 4), (2048, 4096, 3, 128), (8192, 1536, 1, 2), (1, 7, 1, 1),
                     (128, 14336, 1, 32), (200, 28672, 2, 32), (65, 65536, 1, 8), (512, 28672, 1, 8)];
        for &(t, hi, s, slots) in &cases {
            // rank 64 takes the pipelined kernels on small items, rank 16 the CUDA-core ones
            for max_rank in [16, 64] {
                let p = plan_shrink_on_host(t, small_items(t, None), None, hi, s, slots, max_rank, &Tuning::default());
                assert!(p.ksplit >= 1 && p.kchunk * p.ksplit >= hi, "{t} {hi}: {p:?}");
                assert!(p.kchunk * (p.ksplit - 1) < hi, "empty split {p:?}");
                if small_items(t, None) {
                    // the decode shrink may run any small-item plan (the pipelined one's fallback)
                    assert!(p.kchunk <= DECODE_MAX_CHUNK, "{t} {hi} r{max_rank}: {p:?}");
                }
                let granule = if small_items(t, None) && !takes_pipelined(t, small_items(t, None), None, max_rank, &Tuning::default()) { 256 } else { 64 };
                assert!(p.kchunk % granule == 0, "{t} {hi} r{max_rank}: {p:?}");
            }
        }
    }

    #[test]
    fn mid_size_batches_are_cut_by_their_adapter_count() {
        if ["LORAMUX_SMALL_ITEMS_MAX_T", "LORAMUX_ITEMS_BY_ADAPTERS"].iter().any(|v| std::env::var(v).is_ok()) {
            return;
        }
        // unknown adapter count (a captured graph): T alone decides, as before
        assert!(small_items(64, None) && small_items(256, None) && !small_items(257, None));
        // past ITEMS_BY_ADAPTERS_MAX_T tiles whatever the count; decode batches of 16..64 tokens by it
        assert!(!small_items(513, Some(100_000)) && !small_items(2048, Some(512)));
        if std::env::var("LORAMUX_DECODE_TILES").is_err() {
            assert!(!small_items(64, Some(1)) && !small_items(16, Some(1)) && !small_items(64, Some(7)) && small_items(64, Some(8)));
            assert!(small_items(15, Some(1)) && small_items(1, Some(1)) && small_items(32, Some(4)) && !small_items(33, Some(4)));
        }
        assert!(!small_items(256, Some(1)) && !small_items(256, Some(31)) && small_items(256, Some(32)));
        assert!(!small_items(512, Some(48)) && small_items(512, Some(64)) && small_items(300, Some(128)));
        assert!(!small_items(128, Some(15)) && small_items(128, Some(16)) && small_items(65, Some(9)));
        assert!(!small_items(65, Some(0)), "no adapter counts as one");
        // the two layouts of one batch never have one length (a mismatch is caught by it)
        for t in DECODE_TILES_MIN_T..=ITEMS_BY_ADAPTERS_MAX_T {
            for slots in (1..900).step_by(7) {
                assert_ne!(segments_len(t, slots, false), segments_len(t, slots, true), "T{t} slots {slots}");
            }
        }
        assert_eq!(item_tokens(small_items(256, Some(2))), TILE_T);
    }

    #[test]
    fn a_device_sized_split_has_room_for_every_item_count() {
        if ["LORAMUX_DECODE_DEVICE_SPLIT", "LORAMUX_SHRINK_TARGET_BLOCKS", "LORAMUX_FUSED_EXPAND_BLOCKS"].iter().any(|v| std::env::var(v).is_ok()) {
            return;
        }
        let d = Tuning::default();
        // up to 16 tokens the host plans the split (measured), above it the device
        assert_eq!(plan_shrink(16, small_items(16, None), None, 4096, 1, 64, 16, &d).split_target, 0);
        assert_eq!(plan_fused(8, 4096, 4096, 1, 64, &d).expand_target, 0);
        for &(t, hi, s, slots) in &[(17, 4096, 1, 8), (32, 4096, 3, 64), (32, 14336, 1, 33), (64, 576, 2, 4), (64, 4096, 2, 200), (20, 100, 3, 3), (64, 65536, 1, 8)] {
            for max_rank in [16, 64] {
                let p = plan_shrink(t, small_items(t, None), None, hi, s, slots, max_rank, &d);
                assert!(p.split_target > 0 && p.kchunk % 256 == 0 && p.kchunk <= DECODE_MAX_CHUNK, "{p:?}");
                for n in 1..=max_items(t, slots, small_items(t, None)) {
                    let q = decode_split(n, s, hi, p.split_target);
                    // the device's split covers Hi with no empty split, within the grid and partials
                    assert!(q.ksplit * q.kchunk >= hi && q.kchunk * (q.ksplit - 1) < hi, "{n}: {q:?}");
                    assert!(q.ksplit <= p.ksplit && q.kchunk <= p.kchunk, "{t} {hi} {s} {slots} n={n}: {q:?} vs {p:?}");
                }
            }
            let outs = vec![hi.max(300); s];
            let f = plan_fused(t, hi, hi.max(300), s, slots, &d);
            assert!(f.expand_target > 0 && f.shrink.split_target > 0);
            // the grid holds every count's blocks; the count the host planned for before is one of them
            let grid = fused_grid_blocks(&f, hi, &outs, max_items(t, slots, small_items(t, None)));
            for n in 1..=max_items(t, slots, small_items(t, None)) {
                let q = decode_split(n, s, hi, f.shrink.split_target);
                let cs = fused_col_steps(hi.max(300).div_ceil(FUSED_COLS), n * s, f.expand_target);
                assert!(n * s * (q.ksplit + fused_col_groups(hi.max(300), cs)) <= grid);
                // the shape the launcher hands the kernel for a count (FusedArgs.placed_*) is that split
                assert_eq!(fused_shape(&f, hi, &outs, n), (q.ksplit, q.kchunk, cs), "{t} {hi} {s} {slots} n={n}");
            }
        }
        // the decode step: 32 one-token items of q|k|v are split as for 32 items, not 16
        let q = decode_split(32, 3, 4096, FUSED_SHRINK_TARGET);
        assert_eq!((q.ksplit, q.kchunk), (4, 1024));
        assert_eq!(split_for(32, true, 4096, 3, 32, FUSED_SHRINK_TARGET, false).ksplit, 6);
        // 8 adapters of 8 tokens over a large table: 16 splits, not 8
        assert_eq!(decode_split(8, 1, 4096, FUSED_SHRINK_TARGET).ksplit, 16);
        assert_eq!(split_for(64, true, 4096, 1, 128, FUSED_SHRINK_TARGET, false).ksplit, 8);
        // an empty input width plans, it does not divide by zero (the launchers then launch nothing)
        for tokens in [1, 32, 64] {
            let p = split_for(tokens, true, 0, 1, 8, FUSED_SHRINK_TARGET, true);
            assert_eq!((p.ksplit, p.kchunk), (1, 256));
        }
    }

    #[test]
    fn only_batches_past_512_tokens_with_ranks_in_fours_signal_their_items() {
        if ["LORAMUX_PIPE_SIGNAL", "LORAMUX_PIPE_FRAGMENTS"].iter().any(|v| std::env::var(v).is_ok()) {
            return;
        }
        assert!(pipe_signals(2048, 16) && pipe_signals(513, 64) && pipe_signals(600, 128));
        assert!(!pipe_signals(512, 16) && !pipe_signals(64, 16) && !pipe_signals(1, 64));
        // ranks not in fours: the expand would read u by plain loads
        assert!(!pipe_signals(2048, 18) && !pipe_signals(2048, 33));
    }

    #[test]
    fn pipelined_kernels_fix_their_rank_tiles_up_to_rank_64() {
        // the kernel's rows (16 a tile pair) are exactly what pipe_shrink_smem / pipe_expand_smem size
        for (max_rank, kernel) in [(1, "_w1"), (16, "_w1"), (17, "_w2"), (32, "_w2"), (48, "_w3"), (49, "_w4"), (64, "_w4"), (65, ""), (128, "")] {
            assert_eq!(pipe_shrink_kernel("bf16", max_rank), format!("lora_prefill_shrink_bf16{kernel}"));
            assert_eq!(pipe_expand_kernel("f16", max_rank), format!("lora_prefill_expand_f16{kernel}"));
            if !kernel.is_empty() {
                assert_eq!(format!("_w{}", pipe_rank_rows(max_rank) / 16), kernel);
            }
        }
    }

    #[test]
    fn pipelined_launches_leave_room_for_static_shared_memory() {
        for max_rank in 1..=128 {
            // the H200 takes both pipelined kernels at every rank, 99 KB parts up to rank 96
            assert!(pipe_smem_fits(pipe_shrink_smem(max_rank), 90) && pipe_smem_fits(pipe_expand_smem(max_rank), 90));
            assert_eq!(pipe_smem_fits(pipe_shrink_smem(max_rank), 86), max_rank <= 96, "rank {max_rank}");
        }
        // 99 KB parts: ranks 97..112 fill the shrink's ring to the byte, the static bytes tip it over
        assert_eq!(pipe_shrink_smem(112), 99 * 1024);
        assert!(!pipe_smem_fits(pipe_shrink_smem(112), 86) && !pipe_smem_fits(pipe_shrink_smem(112), 120));
    }

    #[test]
    fn flat_expand_only_for_multi_slice_decode_of_32_to_64_tokens() {
        if std::env::var("LORAMUX_EXPAND_DECODE").is_ok() {
            return; // forced by the environment: nothing to check
        }
        let d = Tuning::default();
        assert!(decode_expand_is_flat(32, true, None, 3, 16, &d) && decode_expand_is_flat(64, true, None, 2, 16, &d));
        assert!(!decode_expand_is_flat(32, true, None, 1, 16, &d) && !decode_expand_is_flat(16, true, None, 3, 16, &d) && !decode_expand_is_flat(65, true, None, 2, 16, &d));
        // the flat path's shrink splits coarser (on the device: for the same count, a smaller target)
        assert!(plan_shrink_on_host(32, small_items(32, None), None, 4096, 3, 32, 16, &d).ksplit < plan_shrink_on_host(32, small_items(32, None), None, 4096, 1, 32, 16, &d).ksplit);
        if decode_split_from_device(32, &d) {
            assert_eq!((plan_shrink(32, small_items(32, None), None, 4096, 3, 32, 16, &d).split_target, plan_shrink(32, small_items(32, None), None, 4096, 1, 32, 16, &d).split_target), (132, 528));
        }
    }

    #[test]
    fn a_tuning_choice_decides_where_the_path_allows_it() {
        if ["LORAMUX_EXPAND_DECODE", "LORAMUX_EXPAND_OPT", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_SHRINK_TARGET_BLOCKS"]
            .iter()
            .any(|v| std::env::var(v).is_ok())
        {
            return; // forced by the environment: nothing to check
        }
        let flat = Tuning { expand: Some(ExpandKind::Flat), ..Default::default() };
        let o1w = Tuning { expand: Some(ExpandKind::SmallO1w), ..Default::default() };
        assert!(decode_expand_is_flat(8, true, None, 1, 16, &flat) && !decode_expand_is_flat(128, true, None, 1, 16, &flat));
        assert!(!decode_expand_is_flat(64, true, None, 3, 16, &o1w));
        assert_eq!(expand_variant(&o1w), "1w");
        assert_eq!(expand_tiles_per_block(&Tuning { expand: Some(ExpandKind::TileC4), ..Default::default() }), 4);
        // more target blocks split the reduction finer
        let few = Tuning { shrink_target_blocks: Some(132), ..Default::default() };
        let many = Tuning { shrink_target_blocks: Some(1056), ..Default::default() };
        assert!(plan_shrink_on_host(64, small_items(64, None), None, 4096, 1, 64, 16, &few).ksplit < plan_shrink_on_host(64, small_items(64, None), None, 4096, 1, 64, 16, &many).ksplit);
        if decode_split_from_device(64, &few) {
            assert_eq!(plan_shrink(64, small_items(64, None), None, 4096, 1, 64, 16, &few).split_target, 132);
        }
        // a table entry names the split it was timed with (unless the environment forces one)
        if std::env::var("LORAMUX_DECODE_DEVICE_SPLIT").is_err() {
            let on = Tuning { device_split: Some(true), ..few };
            let off = Tuning { device_split: Some(false), ..few };
            assert_eq!((plan_shrink(16, small_items(16, None), None, 4096, 1, 64, 16, &on).split_target, plan_shrink(64, small_items(64, None), None, 4096, 1, 64, 16, &off).split_target), (132, 0));
            assert_eq!(plan_fused(16, 4096, 4096, 1, 64, &on).shrink.split_target, 132);
        }
        // a decode batch on the pipelined kernels by its adapter count plans as with no table entry
        if std::env::var("LORAMUX_SHRINK_TARGET_BLOCKS").is_err() && std::env::var("LORAMUX_PIPE_SMALL_DECODE").is_err() {
            let fused = Tuning { expand: Some(ExpandKind::FusedStaged), shrink_target_blocks: Some(264), ..Default::default() };
            let plan = |t: &Tuning, n: usize| plan_shrink(64, small_items(64, Some(n)), Some(n), 4096, 1, 64, 64, t);
            assert!(takes_pipelined(64, small_items(64, Some(8)), Some(8), 64, &fused));
            assert_eq!(plan(&fused, 8), plan(&Tuning::default(), 8));
            assert!(!takes_pipelined(64, small_items(64, Some(32)), Some(32), 64, &fused));
            assert_ne!(plan(&fused, 32), plan(&Tuning::default(), 32));
        }
    }

    #[test]
    fn every_expand_kind_parses_from_its_table_name() {
        for k in ExpandKind::ALL {
            assert_eq!(ExpandKind::parse(k.name()), Some(k));
        }
        assert_eq!(ExpandKind::parse("o2"), None);
    }

    #[test]
    fn items_bound_covers_every_mapping() {
        // worst case: every slot used, the counts as uneven as the chunk allows
        for &(t, slots) in &[(1, 1), (7, 3), (64, 1), (64, 128), (65, 2), (2048, 8), (2048, 4096), (100, 3)] {
            let chunk = item_tokens(small_items(t, None));
            let used = slots.min(t);
            // one slot takes the remainder, the others one token each
            let worst = (t - (used - 1)).div_ceil(chunk) + (used - 1);
            assert!(max_items(t, slots, small_items(t, None)) >= worst, "{t} {slots}");
            assert!(max_items(t, slots, small_items(t, None)) <= t.max(1));
            assert_eq!(segments_len(t, slots, small_items(t, None)), SEG_HEADER + 3 * max_items(t, slots, small_items(t, None)) + t + slots + FUSED_WS_WORDS * MAX_SLICES * max_items(t, slots, small_items(t, None)));
        }
    }

    #[test]
    fn fused_plan_covers_every_column_and_fits_shared_memory() {
        if ["LORAMUX_DECODE_FUSED", "LORAMUX_FUSED_EXPAND_BLOCKS", "LORAMUX_SHRINK_TARGET_BLOCKS"].iter().any(|v| std::env::var(v).is_ok()) {
            return; // forced by the environment: nothing to check
        }
        let d = Tuning::default();
        for &(t, hi, ho, s, slots) in &[(1, 4096, 4096, 1, 8), (32, 4096, 14336, 2, 64), (64, 14336, 4096, 1, 200), (5, 100, 37, 3, 3)] {
            let p = plan_fused(t, hi, ho, s, slots, &d);
            assert!(p.col_steps >= 1 && p.col_groups * p.col_steps * FUSED_COLS >= ho, "{p:?}");
            assert!((p.col_groups - 1) * p.col_steps * FUSED_COLS < ho, "an expand block past the slice: {p:?}");
            assert!(p.shrink.kchunk % 256 == 0 && p.shrink.kchunk <= 1024 && p.shrink.ksplit * p.shrink.kchunk >= hi);
        }
        // longer spans where there are many items, one step a block for a single token
        assert!(plan_fused(32, 4096, 14336, 2, 64, &d).col_steps > plan_fused(1, 4096, 14336, 2, 64, &d).col_steps);
        assert_eq!(plan_fused(1, 4096, 4096, 1, 8, &d).col_steps, 1);
        // under the 99 KB a block may take on sm_86/89 (rank 64), and 48 KB up to rank 32
        assert!(fused_smem_bytes(FUSED_MAX_RANK) <= 99 * 1024 && fused_smem_bytes(32) <= 48 * 1024);
        let fused = Tuning { expand: Some(ExpandKind::Fused), ..Default::default() };
        for k in [ExpandKind::Fused3, ExpandKind::FusedStaged, ExpandKind::FusedStaged4] {
            let t = Tuning { expand: Some(k), ..Default::default() };
            assert!(decode_is_fused(8, true, None, 16, &t));
            let p = plan_fused(32, 4096, 4096, 1, 32, &t);
            assert_eq!(p.staged_a, k != ExpandKind::Fused3);
            assert_eq!(p.blocks_per_sm, [None, Some(3), None, Some(4)][[ExpandKind::Fused, ExpandKind::Fused3, ExpandKind::FusedStaged, ExpandKind::FusedStaged4].iter().position(|&x| x == k).unwrap()]);
        }
        assert!(decode_is_fused(64, true, None, 64, &d) && !decode_is_fused(65, true, None, 16, &d) && !decode_is_fused(8, true, None, 128, &fused));
        assert!(!decode_is_fused(8, true, None, 16, &d) && decode_is_fused(8, true, None, 16, &fused));
        // a decode batch cut into tiles (small_items with the count) takes neither decode kernel
        assert!(!decode_is_fused(64, false, None, 16, &fused) && !decode_expand_is_flat(32, false, None, 3, 16, &d));
        assert!(!decode_is_fused(8, true, None, 16, &Tuning { expand: Some(ExpandKind::SmallO1), ..Default::default() }));
        // counted adapters averaging 4+ tokens: the pipelined kernels, a host-planned split, not flat
        if std::env::var("LORAMUX_PIPE_SMALL_DECODE").is_err() {
            assert!(pipe_on_small_items(32, true, Some(8), 64, &d) && takes_pipelined(64, true, Some(16), 16, &fused));
            assert!(!pipe_on_small_items(32, true, Some(9), 64, &d) && !pipe_on_small_items(32, true, None, 64, &d));
            assert!(pipe_on_small_items(16, true, Some(4), 64, &d) && !pipe_on_small_items(15, true, Some(1), 64, &d));
            assert!(!pipe_on_small_items(64, true, Some(4), 128, &d));
            assert!(!decode_is_fused(64, true, Some(16), 16, &fused) && decode_is_fused(64, true, Some(17), 16, &d));
            assert!(!decode_expand_is_flat(64, true, Some(16), 3, 16, &d) && decode_expand_is_flat(64, true, Some(17), 3, 16, &d));
            assert_eq!(plan_shrink(64, true, Some(16), 4096, 3, 64, 16, &d).split_target, 0);
        }
        // past 64 tokens: a counted small-item batch of ranks up to 32 whose adapters average fewer
        // than 4 tokens (past 256 tokens: at most 6), its split sized on the device
        if std::env::var("LORAMUX_FUSED_PAST_DECODE").is_err() {
            assert!(decode_is_fused(512, true, Some(86), 32, &d) && !decode_is_fused(512, true, Some(85), 32, &d));
            assert!(decode_is_fused(257, true, Some(43), 32, &d) && !decode_is_fused(256, true, Some(64), 32, &d));
            assert!(decode_is_fused(255, true, Some(64), 16, &d) && decode_is_fused(65, true, Some(17), 16, &d));
            assert!(!decode_is_fused(65, true, None, 16, &d) && !decode_is_fused(128, true, Some(128), 64, &d));
            assert!(!decode_is_fused(513, true, Some(512), 16, &d) && !decode_is_fused(128, false, Some(128), 16, &d));
            let p = plan_fused(256, 4096, 4096, 1, 128, &d);
            assert!(p.shrink.split_target > 0 && p.shrink.kchunk <= DECODE_MAX_CHUNK);
        }
    }

    #[test]
    fn fused_forms_fit_shared_memory() {
        // A staged: 5 blocks an SM where 768-element chunks (36 KB) or the expand's rank-32 tiles
        // (42 KB) leave room, 4 at 1024-element chunks (48 KB), 3 at rank 64 (74 KB)
        assert_eq!(fused_form_for(16, 768, true, None).blocks_per_sm, 5);
        assert_eq!(fused_form_for(16, 1024, true, None).blocks_per_sm, 4);
        assert_eq!(fused_form_for(32, 512, true, None).blocks_per_sm, 5);
        assert_eq!(fused_form_for(64, 1024, true, None).blocks_per_sm, 3);
        assert_eq!(fused_form_for(16, 1024, true, None).kernel_name("bf16"), "lora_fused_decode_bf16_sa4");
        for r in [1, 8, 16, 24, 32, 33, 48, 64] {
            for kchunk in [256, 512, 768, 1024] {
                let f = fused_form_for(r, kchunk, true, None);
                assert!(f.staged_a && f.a_stages >= 1, "rank {r} chunk {kchunk}: {f:?}");
                assert!(f.smem_bytes >= fused_staged_shrink_smem_bytes(kchunk, f.a_stages));
                assert!(f.smem_bytes >= fused_expand_smem_bytes(r) && f.smem_bytes <= 99 * 1024, "{f:?}");
                assert!(f.blocks_per_sm == 3 || f.blocks_per_sm * (f.smem_bytes + 1024) <= SM_SHARED_BYTES, "{f:?}");
                // a second round of A never costs a block an SM
                let one = fused_expand_smem_bytes(r).max(fused_staged_shrink_smem_bytes(kchunk, 1));
                assert!(f.blocks_per_sm >= FUSED_STAGED_BLOCKS_PER_SM.min(blocks_that_fit(one)).max(3), "{f:?}");
            }
        }
        // rank 32 at 512-element chunks: both rounds of A in flight, 5 blocks an SM
        assert!(fused_form_for(32, 512, true, None).a_stages >= 2);
    }

    #[test]
    fn register_fused_forms_as_measured() {
        let form = |r| fused_form_for(r, 1024, false, None);
        let (r16, r32, r64) = (form(16), form(32), form(64));
        assert_eq!(fused_form_for(16, 768, true, Some(6)).blocks_per_sm, 5);
        assert_eq!((r16.blocks_per_sm, r32.blocks_per_sm, r64.blocks_per_sm), (4, 4, 3));
        assert_eq!(r16.kernel_name("f16"), "lora_fused_decode_f16_m4");
        assert_eq!(r64.kernel_name("f16"), "lora_fused_decode_f16");
        assert_eq!(r64.smem_bytes, fused_smem_bytes(64));
    }

    #[test]
    fn pipelined_prefill_spans_and_shared_memory() {
        if ["LORAMUX_PREFILL", "LORAMUX_EXPAND_TILE_COLS", "LORAMUX_EXPAND_SPAN_TILES"].iter().any(|v| std::env::var(v).is_ok()) {
            return;
        }
        let d = Tuning::default();
        let c4 = Tuning { expand: Some(ExpandKind::TileC4), ..Default::default() };
        let p16 = Tuning { expand: Some(ExpandKind::Pipe16), ..Default::default() };
        assert!(prefill_is_pipelined(&d) && prefill_is_pipelined(&p16) && !prefill_is_pipelined(&c4));
        // a p<N> kind (by its table name) fixes the expand's span at N tiles
        for (name, span) in [("p2", 2), ("p4", 4), ("p6", 6), ("p8", 8), ("p16", 16)] {
            let t = Tuning { expand: ExpandKind::parse(name), ..Default::default() };
            assert_eq!(pipe_expand_tiles(2048, false, &[4096], &t), span, "{name}");
            assert!(pipe_on_small_items(300, true, None, 16, &t) || std::env::var("LORAMUX_PIPE_SMALL").is_ok());
        }
        let plan = plan_shrink(2048, small_items(2048, None), None, 4096, 1, 8, 16, &d);
        // the reduce runs wherever the shrink did not sum u itself: lora_apply asks only when
        // launch::shrink returned no u (the register-staged path, or the pipelined one's fallback)
        assert!(plan.ksplit > 1 && apply_reduces_first(small_items(2048, None), &plan));
        assert!(!apply_reduces_first(small_items(2048, None), &ShrinkPlan { ksplit: 1, kchunk: 4096, split_target: 0 }) && !apply_reduces_first(small_items(200, None), &plan));
        assert_eq!(pipe_expand_tiles(2048, small_items(2048, None), &[4096], &p16), 16);
        // at most 16 splits on the pipelined path (the register-staged one splits to 56 here)
        let pipe = plan_shrink(512, small_items(512, None), None, 14336, 1, 8, 64, &d);
        assert!(pipe.ksplit <= 16 && pipe.ksplit * pipe.kchunk >= 14336 && pipe.kchunk % 64 == 0, "{pipe:?}");
        assert!(plan_shrink(512, small_items(512, None), None, 14336, 1, 8, 64, &c4).ksplit > 16);
        // small items take the pipelined kernels up to rank 64 unless the table says otherwise; decode
        // batches only by their adapter count (none here), never by the table
        if std::env::var("LORAMUX_PIPE_SMALL").is_err() && std::env::var("LORAMUX_PIPE_SMALL_DECODE").is_err() {
            assert!(takes_pipelined(200, small_items(200, None), None, 16, &d) && takes_pipelined(200, small_items(200, None), None, 16, &p16) && !takes_pipelined(64, small_items(64, None), None, 64, &p16));
            assert!(takes_pipelined(200, small_items(200, None), None, 64, &d) && !takes_pipelined(200, small_items(200, None), None, 128, &d));
            let o1 = Tuning { expand: Some(ExpandKind::SmallO1), ..Default::default() };
            assert!(!takes_pipelined(200, small_items(200, None), None, 64, &o1));
            assert!(takes_pipelined(300, small_items(300, None), None, 16, &d) && !takes_pipelined(300, small_items(300, None), None, 16, &c4));
        }
        assert_eq!(pipe_expand_tiles(2048, small_items(2048, None), &[100], &p16), 2); // never past the slice
        for &(t, ho, s) in &[(300, 4096, 1), (2048, 4096, 1), (2048, 14336, 2), (8192, 1024, 3)] {
            let n = pipe_expand_tiles(t, small_items(t, None), &vec![ho; s], &d);
            assert!(n >= 1 && n <= ho.div_ceil(64) && n <= PIPE_MAX_SPAN_TILES, "{t} {ho} {s}: {n}");
        }
        // two blocks an SM fit at every rank the kernels take (227 KB a block on sm_90, 163 on sm_80)
        for r in [1, 16, 64, 128] {
            assert!(2 * (pipe_shrink_smem(r) + 1024) <= SM_SHARED_BYTES && pipe_shrink_smem(r) <= 163 * 1024, "{r}");
            assert!(2 * (pipe_expand_smem(r) + 1024) <= SM_SHARED_BYTES && pipe_expand_smem(r) <= 163 * 1024, "{r}");
        }
        // the shrink's deeper rings (ranks up to 32) keep the 3 blocks an SM of its launch bounds
        for r in [1, 16, 17, 32, 48, 64] {
            assert!(3 * (pipe_shrink_smem(r) + 1024 + PIPE_STATIC_SMEM) <= SM_SHARED_BYTES, "{r}");
        }
        assert_eq!((pipe_shrink_stages(16), pipe_shrink_stages(32), pipe_shrink_stages(64)), (6, 5, 4));
    }

    #[test]
    fn span_rule_reproduces_the_launch_sweep_on_llama_shapes() {
        if ["LORAMUX_EXPAND_SPAN_TILES", "LORAMUX_PIPE_SPAN_RULE", "LORAMUX_SMALL_ITEMS_MAX_T"].iter().any(|v| std::env::var(v).is_ok()) {
            return;
        }
        let d = Tuning::default();
        let (qkv, o, gu) = (&[4096, 1024, 1024][..], &[4096][..], &[14336, 14336][..]);
        // (out sizes, tokens, span): the table's p4 for q|k|v, the old rule's 2 / 8 for one slice
        // and 14 for gate|up at T = 512 (each won its sweep), 14 for the table's p16 at T = 2048
        for &(outs, t, span) in &[(qkv, 512, 4), (qkv, 2048, 4), (o, 512, 2), (o, 2048, 8), (gu, 512, 14), (gu, 2048, 14)] {
            assert_eq!(pipe_expand_tiles(t, small_items(t, None), outs, &d), span, "{outs:?} T{t}");
        }
        // every slice's tiles count: the widest slice x slices gave q|k|v 24 tiles at T = 2048
        assert_eq!((64usize * 32 * 3).div_ceil(PIPE_EXPAND_TARGET_BLOCKS), 24);
        // small items keep prefill-6's rule (its spans were measured there)
        assert_eq!(pipe_expand_tiles(256, small_items(256, None), gu, &d), (224usize * 32 * 2).div_ceil(PIPE_EXPAND_TARGET_BLOCKS));
        for outs in [&[3584, 512, 512][..], &[18944, 18944], &[5120, 1024, 1024], &[13824, 13824], &[100], &[8, 8, 8]] {
            for t in [257, 300, 512, 1000, 2048, 4096, 8192] {
                let n = pipe_expand_tiles(t, small_items(t, None), outs, &d);
                assert!(n >= 1 && n <= PIPE_RULE_MAX_SPAN && n <= outs.iter().max().unwrap().div_ceil(64), "{outs:?} {t}: {n}");
            }
        }
        // small items of one slot merge into a tile only where chosen (A/B runs)
        if std::env::var("LORAMUX_PIPE_MERGE").is_err() {
            assert_eq!((pipe_merge_items(65, small_items(65, None), true), pipe_merge_items(256, small_items(256, None), false)), (1, 1)); // off unless chosen
        }
    }

    #[test]
    fn flat_expand_rows_cover_the_batch() {
        for t in 1..=TILE_T {
            let oc = flat_expand_columns(t);
            assert!(oc >= 16 && 256 % oc == 0, "{t}: {oc}");
            assert!((256 / oc) * 4 >= t, "{t}: {oc} columns leave tokens uncovered");
        }
        assert_eq!(flat_expand_columns(1), 256);
        assert_eq!(flat_expand_columns(32), 32);
        assert_eq!(flat_expand_columns(64), 16);
    }
}
