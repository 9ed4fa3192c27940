//! Raises a core `LoraError` as the matching class of the Python `loramux.errors` hierarchy. The
//! mapping lives here, not in the core: the core's errors know nothing of Python.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::LoraError;

/// The classes of python/loramux/errors.py that the bindings raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PyErrorClass {
    Format,
    Dora,
    Parallel,
    Cache,
    NotCached,
    TaskConflict,
    CacheFull,
    Cuda,
}

impl PyErrorClass {
    fn name(self) -> &'static str {
        match self {
            PyErrorClass::Format => "LoraFormatError",
            PyErrorClass::Dora => "LoraDoraError",
            PyErrorClass::Parallel => "LoraParallelError",
            PyErrorClass::Cache => "LoraCacheError",
            PyErrorClass::NotCached => "LoraNotCachedError",
            PyErrorClass::TaskConflict => "LoraTaskConflictError",
            PyErrorClass::CacheFull => "LoraCacheFullError",
            PyErrorClass::Cuda => "LoraCudaError",
        }
    }

    /// The class a core error is raised as: what kind of mistake it is, for `except` clauses.
    pub fn of(err: &LoraError) -> PyErrorClass {
        use LoraError::*;
        match err {
            UnknownModuleName(_)
            | BadShape { .. }
            | BadDtype { .. }
            | RowCountMismatch { .. }
            | UnknownModuleId { .. }
            | ModuleNotInModel { .. }
            | ModuleNotApplied { .. }
            | FusedRowBesidePart { .. }
            | LayerOutOfRange { .. }
            | BadRank { .. }
            | BadIsDora { .. }
            | DuplicateModuleLayer { .. }
            | RowTooShort { .. }
            | NonFinite { .. }
            | NotRepresentable { .. }
            | TooLarge { .. } => PyErrorClass::Format,
            DoraWithoutBase { .. } | DoraNotNormalized { .. } => PyErrorClass::Dora,
            TpIndivisible { .. } | BadParallelLayout(_) => PyErrorClass::Parallel,
            NotCached { .. } => PyErrorClass::NotCached,
            TaskConflict { .. } => PyErrorClass::TaskConflict,
            AdapterTooLarge { .. } | TierFull { .. } | BatchDoesNotFit { .. } => PyErrorClass::CacheFull,
            UnknownBatch { .. } | TaskInUse { .. } | BadCacheConfig(_) => PyErrorClass::Cache,
            Cuda(_) | Compile { .. } => PyErrorClass::Cuda,
        }
    }

    /// An instance of this class with `message` and the optional row / task id it is about.
    pub fn err(self, message: String, row: Option<usize>, task_id: Option<u64>) -> PyErr {
        Python::attach(|py| {
            let build = || -> PyResult<PyErr> {
                let class = py.import("loramux.errors")?.getattr(self.name())?;
                let kwargs = PyDict::new(py);
                kwargs.set_item("row", row)?;
                kwargs.set_item("task_id", task_id)?;
                Ok(PyErr::from_value(class.call((message,), Some(&kwargs))?))
            };
            build().unwrap_or_else(|e| e)
        })
    }
}

/// Converts a core error into the `loramux.errors` class it belongs to, with `row` and `task_id`
/// set when known.
pub fn to_py(err: LoraError) -> PyErr {
    PyErrorClass::of(&err).err(err.to_string(), err.row(), err.task_id())
}

pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, LoraError> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
