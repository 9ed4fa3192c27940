//! The shrink's split of the reduction dim (`ShrinkPlan`), planned on the host or sized on the
//! device, and the fp32 buffers it writes (partials, u).

use super::*;

/// Enough blocks to keep every SM of an H100 (132) busy several times over.
pub(super) const TARGET_BLOCKS: usize = 4 * 132;

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
pub(super) fn plan_shrink_with(
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
pub(super) const PIPE_MAX_SPLIT_DEFAULT: usize = 16;
pub(super) fn pipe_max_split() -> usize {
    env_usize("LORAMUX_PIPE_MAX_SPLIT").unwrap_or(PIPE_MAX_SPLIT_DEFAULT)
}

/// Blocks along the items a decode launch is planned for: only known on the device (the
/// segments), so a middle count: a few adapters' items (a single tenant's 64 tokens are 8 items,
/// 64 adapters' are 64); more items only add blocks.
pub(super) fn planned_items(tokens: usize, num_slots: usize) -> usize {
    tokens.div_ceil(DECODE_ITEM).max(tokens.min(num_slots) / 2).min(grid_items(tokens, num_slots, true)).max(1)
}

/// Reduction elements one split of the decode shrink holds (DECODE_MAX_CHUNK, lora_shrink_decode.cuh).
pub(super) const DECODE_MAX_CHUNK: usize = 1024;

/// The split of the reduction dim that gives about `target` shrink blocks.
pub(super) fn split_for(
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
pub(super) fn device_sized_split(tokens: usize, hi: usize, num_slices: usize, num_slots: usize, target: usize) -> ShrinkPlan {
    let most = max_items(tokens, num_slots, true);
    ShrinkPlan {
        ksplit: decode_split(1, num_slices, hi, target).ksplit,
        kchunk: decode_split(most, num_slices, hi, target).kchunk,
        split_target: target,
    }
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

/// Elements of the fp32 partial buffer a shrink with this plan writes: [S, ksplit, T, max_rank].
pub fn partial_len(plan: &ShrinkPlan, num_slices: usize, tokens: usize, max_rank: usize) -> usize {
    num_slices * plan.ksplit * tokens * max_rank
}

/// Elements of u [S, T, max_rank] (fp32), which the pipelined prefill shrink writes after the
/// partials when the buffer has room for it.
pub fn u_len(num_slices: usize, tokens: usize, max_rank: usize) -> usize {
    num_slices * tokens * max_rank
}
