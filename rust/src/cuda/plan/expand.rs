//! Which expand kernel of the two-kernel paths a launch takes: the flat decode kernel, the
//! small-item variants, the tensor-core tile width.

use super::*;

/// Decode shrink target when the flat expand follows (measured best of 528 / 264 / 132;
/// docs/kernel-notes.md, "Where the per-apply time goes").
pub(super) const FLAT_TARGET_BLOCKS: usize = 132;

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
