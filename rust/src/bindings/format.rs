//! The format's validation and tables for Python: `validate` and the dtype table (logic in
//! rust/src/format.rs).

use pyo3::prelude::*;

use crate::bindings::adapter::AdapterInput;
use crate::bindings::errors::IntoPyResult;
use crate::bindings::spec::PyModelSpec;
use crate::cuda::launch;
use crate::format::{self, ValidateOptions, WeightsDtype};
use crate::modules::LoraModule;

/// One validated row: (module_id, layer, rank, hi, ho, is_dora).
type RowTuple = (u32, usize, usize, usize, usize, bool);

/// Validates an adapter (`format.adapter_input(weights, config)`) against `spec`; returns the
/// row layouts or raises LoraFormatError.
#[pyfunction]
#[pyo3(signature = (adapter, spec, dora_allowed=true, check_finite=true))]
fn validate(py: Python<'_>, adapter: AdapterInput<'_>, spec: &PyModelSpec, dora_allowed: bool, check_finite: bool) -> PyResult<Vec<RowTuple>> {
    let (weights, rows) = adapter.core()?;
    let opts = ValidateOptions { dora_allowed, check_finite };
    let layout = py.detach(|| format::validate(&weights, &rows, &spec.core, opts)).py()?;
    Ok(layout.rows.iter().map(|r| (r.module.id(), r.layer, r.rank, r.hi, r.ho, r.is_dora)).collect())
}

#[pyfunction]
fn module_name(module_id: i64) -> Option<&'static str> {
    LoraModule::from_id(module_id).map(LoraModule::name)
}

/// `[(name, bytes per element, the CUDA kernels take it), ...]` for every dtype adapters arrive
/// and are served in; names are torch's and numpy's (`float16`, `bfloat16`, `float32`).
#[pyfunction]
fn dtype_table() -> Vec<(&'static str, usize, bool)> {
    WeightsDtype::ALL
        .iter()
        .map(|&d| (d.name(), d.size(), launch::Dtype::ALL.iter().any(|k| k.weights_dtype() == d)))
        .collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(module_name, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_table, m)?)?;
    Ok(())
}
