//! How a step's tokens are cut into work items (small items of 8 tokens, or 64-token tensor-core
//! tiles) and the length of the segments buffer that lists them.

use super::*;

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
pub(super) fn decode_tile_tokens() -> usize {
    env_usize("LORAMUX_DECODE_TILE_TOKENS").unwrap_or(SMALL_ITEM_TOKENS_PER_ADAPTER).max(1)
}

/// `LORAMUX_DECODE_TILES=0` keeps every decode batch on small items whatever its adapter count (A/B).
pub(super) fn decode_tiles_by_adapters() -> bool {
    std::env::var("LORAMUX_DECODE_TILES").as_deref() != Ok("0")
}

/// Largest batch the adapter count may keep on small items: at T = 2048 tiles won at every count
/// measured (small items 0.24-0.72x, 128 adapters of 16 tokens included).
pub const ITEMS_BY_ADAPTERS_MAX_T: usize = 512;

/// `LORAMUX_ITEMS_BY_ADAPTERS=0` ignores the host's adapter count (A/B runs): T alone decides.
pub(super) fn items_follow_adapters() -> bool {
    std::env::var("LORAMUX_ITEMS_BY_ADAPTERS").as_deref() != Ok("0")
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
