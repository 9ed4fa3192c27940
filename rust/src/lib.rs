//! loramux core: the TensorRT-LLM LoRA format, the two-level adapter cache, tensor-parallel
//! slicing and the CUDA launchers. Pure Rust; the Python bindings live behind the `python` feature.

pub mod cache;
pub mod cuda;
pub mod error;
pub mod format;
pub mod fused_rows;
pub mod modules;
pub mod tp;

#[cfg(feature = "python")]
mod bindings;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// The `loramux._core` extension module: registration only, each binding file owns its part.
#[cfg(feature = "python")]
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    bindings::modules::register(m)?;
    bindings::spec::register(m)?;
    bindings::format::register(m)?;
    bindings::cache::register(m)?;
    bindings::tp::register(m)?;
    bindings::ops::register(m)?;
    Ok(())
}
