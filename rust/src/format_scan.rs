//! Value scans over a weights row, by bit pattern so they vectorize: NaN / Inf (the format's own
//! check) and values the serving dtype cannot hold (checked before a cache packs into it).

use super::{le_bits, WeightsDtype};
#[cfg(test)]
use crate::error::{LoraError, Result};

/// Index of the first of `len` values that is NaN or Inf.
pub(super) fn first_nonfinite(dtype: WeightsDtype, bytes: &[u8], len: usize) -> Option<usize> {
    // Exponent-all-ones is NaN or Inf in every IEEE-like format; test bits, not floats, for speed.
    let all_ones = |mask: u32| move |bits: u32| bits & mask == mask;
    match dtype {
        WeightsDtype::F32 => first_hit::<4>(bytes, len, all_ones(0x7f80_0000)),
        WeightsDtype::F16 => first_hit::<2>(bytes, len, all_ones(0x7c00)),
        WeightsDtype::BF16 => first_hit::<2>(bytes, len, all_ones(0x7f80)),
    }
}

/// The NaN / Inf scan of one row, as the error that names it.
#[cfg(test)]
pub(super) fn check_finite(dtype: WeightsDtype, bytes: &[u8], len: usize, row: usize) -> Result<()> {
    match first_nonfinite(dtype, bytes, len) {
        Some(column) => Err(LoraError::NonFinite { row, column, value: dtype.read(bytes, column) }),
        None => Ok(()),
    }
}

/// Whether any of `len` values fails either check (NaN / Inf when `finite`; beyond `serving`'s
/// range): one read of the values for both, in the common case where none does.
pub(super) fn any_bad(dtype: WeightsDtype, bytes: &[u8], len: usize, finite: bool, serving: Option<WeightsDtype>) -> bool {
    use WeightsDtype::*;
    let limit = serving.and_then(|dst| overflow_limit(dtype, dst));
    // One monomorphic, branch-free test per case, so each scan vectorizes.
    match (dtype, finite, limit) {
        (_, false, None) => false,
        (F32, true, None) => first_nonfinite(dtype, bytes, len).is_some(),
        (F32, false, Some(limit)) => first_hit::<4>(bytes, len, move |bits| bits & 0x7fff_ffff >= limit).is_some(),
        (F32, true, Some(limit)) => {
            first_hit::<4>(bytes, len, move |bits| (bits & 0x7f80_0000 == 0x7f80_0000) | (bits & 0x7fff_ffff >= limit)).is_some()
        }
        (F16 | BF16, true, None) => first_nonfinite(dtype, bytes, len).is_some(),
        (F16 | BF16, false, Some(limit)) => first_hit::<2>(bytes, len, move |bits| (bits & 0x7fff) << 16 >= limit).is_some(),
        (F16 | BF16, true, Some(limit)) => {
            let exp = if dtype == F16 { 0x7c00 } else { 0x7f80 };
            first_hit::<2>(bytes, len, move |bits| (bits & exp == exp) | ((bits & 0x7fff) << 16 >= limit)).is_some()
        }
    }
}

/// Smallest |v| (as f32 bits) that converts to inf from `src` to `dst`, None when `dst` holds every
/// `src` value. Halfway past the largest finite value rounds to even, which is inf (65520 for
/// float16; 0x7f7f8000 for bfloat16).
fn overflow_limit(src: WeightsDtype, dst: WeightsDtype) -> Option<u32> {
    use WeightsDtype::*;
    match (src, dst) {
        (F32 | BF16, F16) => Some(65520.0f32.to_bits()),
        (F32, BF16) => Some(0x7f7f_8000),
        _ => None,
    }
}

/// Index of the first of `len` values whose magnitude rounds to inf in `dst` (None when `dst`
/// holds every value of `src`). Compares float32 bit patterns of |v|, which order like the values.
pub(super) fn first_overflow(src: WeightsDtype, bytes: &[u8], len: usize, dst: WeightsDtype) -> Option<usize> {
    let limit = overflow_limit(src, dst)?;
    match src {
        WeightsDtype::F32 => first_hit::<4>(bytes, len, move |bits| bits & 0x7fff_ffff >= limit),
        _ => first_hit::<2>(bytes, len, move |bits| (bits & 0x7fff) << 16 >= limit),
    }
}

/// Index of the first of `len` elements (N bytes each, as u32 bits) that `hit` accepts. Each block
/// is tested branch-free (so the compiler vectorizes it); only a block that has one is searched.
fn first_hit<const N: usize>(bytes: &[u8], len: usize, hit: impl Fn(u32) -> bool + Copy) -> Option<usize> {
    const BLOCK: usize = 512;
    let bytes = &bytes[..len * N];
    if cfg!(target_endian = "little") {
        // SAFETY: every bit pattern is a valid u16 / u32; align_to only reinterprets the aligned middle.
        let aligned = if N == 4 {
            match unsafe { bytes.align_to::<u32>() } {
                ([], words, []) => Some(first_hit_in(words, BLOCK, |&w| hit(w))),
                _ => None,
            }
        } else {
            match unsafe { bytes.align_to::<u16>() } {
                ([], words, []) => Some(first_hit_in(words, BLOCK, |&w| hit(w as u32))),
                _ => None,
            }
        };
        if let Some(found) = aligned {
            return found;
        }
    }
    for (b, block) in bytes.chunks(BLOCK * N).enumerate() {
        if block.chunks_exact(N).fold(false, |any, c| any | hit(le_bits::<N>(c))) {
            return block.chunks_exact(N).position(|c| hit(le_bits::<N>(c))).map(|i| b * BLOCK + i);
        }
    }
    None
}

/// `first_hit` over typed words: blocks tested branch-free, the one that hits searched.
#[inline(always)]
fn first_hit_in<T>(words: &[T], block: usize, hit: impl Fn(&T) -> bool + Copy) -> Option<usize> {
    for (b, chunk) in words.chunks(block).enumerate() {
        if chunk.iter().fold(false, |any, w| any | hit(w)) {
            return chunk.iter().position(hit).map(|i| b * block + i);
        }
    }
    None
}
