//! The format's validation and tables for Python: `validate`, the storage check of rows being
//! built, and the dtype table (logic in rust/src/format.rs).

use pyo3::prelude::*;

use crate::bindings::adapter::{AdapterInput, WeightsInput};
use crate::bindings::errors::{to_py, IntoPyResult};
use crate::bindings::spec::PyModelSpec;
use crate::cuda::launch;
use crate::error::LoraError;
use crate::format::{self, RowShape, ValidateOptions, WeightsDtype};
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

/// One row being built: (module_id, layer, rank, hi, ho, is_dora).
type RowShapeTuple = (i64, usize, usize, usize, usize, bool);

/// The first used value of `weights` (`format.raw_weights` of the rows' values, one row shape
/// each) that is NaN / Inf or would be once stored as `storage_type`: `(row, column, value)`, or
/// None when every value can be stored. An unknown module id or a row too short raises
/// LoraFormatError.
#[pyfunction]
fn first_unstorable(
    py: Python<'_>,
    weights: WeightsInput<'_>,
    rows: Vec<RowShapeTuple>,
    storage_type: &str,
) -> PyResult<Option<(usize, usize, f32)>> {
    let weights = weights.core()?;
    let storage = WeightsDtype::from_name(storage_type).py()?;
    let shapes: Vec<RowShape> =
        rows.into_iter().map(|(module_id, layer, rank, hi, ho, is_dora)| RowShape { module_id, layer, rank, hi, ho, is_dora }).collect();
    let checked = py.detach(|| format::layout_from_shapes(&weights, &shapes).and_then(|layout| format::check_storable(&weights, &layout, storage)));
    match checked {
        Ok(()) => Ok(None),
        Err(LoraError::NonFinite { row, column, value } | LoraError::NotRepresentable { row, column, value, .. }) => Ok(Some((row, column, value))),
        Err(other) => Err(to_py(other)),
    }
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
    m.add_function(wrap_pyfunction!(first_unstorable, m)?)?;
    m.add_function(wrap_pyfunction!(module_name, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_table, m)?)?;
    Ok(())
}
