//! Launch planning: which kernel path a batch takes and how the shrink splits its reduction
//! dimension so decode batches spread over every SM. Pure arithmetic, no CUDA.

use super::launch::MAX_SLICES;

mod items;
mod tuning;
mod shrink;
mod expand;
mod fused;
mod pipe;

pub use items::*;
pub use tuning::*;
pub use shrink::*;
pub use expand::*;
pub use fused::*;
pub use pipe::*;

/// A positive integer from the environment (A/B overrides), else None.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|&v| v > 0)
}

#[cfg(test)]
mod tests;
