//! The adapter input every binding that takes an adapter reads: `(flat uint8 weights, dtype name,
//! weights shape, flat int64 config, config shape)`, as python/loramux/format.py `adapter_input`
//! builds it without copying. Turned into the core's borrowed weights view and config rows here only.

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;

use crate::bindings::errors::IntoPyResult;
use crate::format::{self, ConfigRow, WeightsDtype, WeightsView};

#[derive(FromPyObject)]
pub struct AdapterInput<'py>(PyReadonlyArray1<'py, u8>, String, Vec<usize>, PyReadonlyArray1<'py, i64>, Vec<usize>);

impl AdapterInput<'_> {
    /// The (weights, config) pair as the core reads it: a borrowed view and normalized rows.
    pub fn core(&self) -> PyResult<(WeightsView<'_>, Vec<ConfigRow>)> {
        let AdapterInput(raw, dtype, weights_shape, config, config_shape) = self;
        let dtype = WeightsDtype::from_name(dtype).py()?;
        let weights = WeightsView::new(dtype, weights_shape, raw.as_slice()?).py()?;
        let rows = format::config_rows(config_shape, config.as_slice()?).py()?;
        Ok((weights, rows))
    }
}
