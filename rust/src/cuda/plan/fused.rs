//! The fused decode kernel (cuda/lora_fused.cu): which batches take it, its form (shared memory,
//! blocks an SM) and its grid.

use super::*;

/// Ranks up to this take the fused decode kernel: its expand stages two 256-column tiles of B in
/// shared memory (75 KB at rank 64; rank 128 would need 140 KB, past what sm_86/89 offer a block).
pub const FUSED_MAX_RANK: usize = 64;

/// Shrink blocks the fused decode kernel aims for. Its expand blocks each re-read their tokens'
/// ksplit partials, so it splits coarser than the two-kernel path (TARGET_BLOCKS).
pub(super) const FUSED_SHRINK_TARGET: usize = 264;
/// Expand blocks the fused decode kernel aims for: about three resident blocks on each of 132 SMs;
/// fewer blocks stream longer column spans with the next tile in flight.
pub(super) const FUSED_EXPAND_TARGET: usize = 3 * 132;

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
pub(super) const SM_SHARED_BYTES: usize = 228 * 1024;

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

pub(super) fn blocks_that_fit(smem_bytes: usize) -> usize {
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
pub(super) fn fused_col_steps(units: usize, pairs: usize, expand_target: usize) -> usize {
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
pub(super) const FUSED_SMEM_HEAD: usize = 64;

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
