//! Module ids, names and parallel kinds for Python.

use pyo3::prelude::*;

use crate::bindings::errors::IntoPyResult;
use crate::modules::{LoraModule, ParallelKind};

/// `[(module_id, name, "column" | "row"), ...]` for all 19 modules, in id order.
#[pyfunction]
fn module_table() -> Vec<(u32, &'static str, &'static str)> {
    LoraModule::ALL
        .iter()
        .map(|m| {
            let kind = match m.parallel_kind() {
                ParallelKind::Column => "column",
                ParallelKind::Row => "row",
            };
            (m.id(), m.name(), kind)
        })
        .collect()
}

#[pyfunction]
fn module_id(name: &str) -> PyResult<u32> {
    LoraModule::from_name(name).map(LoraModule::id).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(module_table, m)?)?;
    m.add_function(wrap_pyfunction!(module_id, m)?)?;
    Ok(())
}
