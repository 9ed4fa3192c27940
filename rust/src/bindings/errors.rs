//! Raises a `LoraError` as the matching class of the Python `loramux.errors` hierarchy.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::LoraError;

/// Converts a core error into the `loramux.errors` class it belongs to, with `row` set when known.
pub fn to_py(err: LoraError) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            let module = py.import("loramux.errors")?;
            let class = module.getattr(err.python_class())?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("row", err.row())?;
            kwargs.set_item("task_id", err.task_id())?;
            let instance = class.call((err.to_string(),), Some(&kwargs))?;
            Ok(PyErr::from_value(instance))
        };
        build().unwrap_or_else(|e| e)
    })
}

pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, LoraError> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
