//! The adapter input every binding that takes an adapter reads: `(flat uint8 weights, dtype name,
//! weights shape, flat int64 config, config shape)`, as python/loramux/format.py `adapter_input`
//! builds it without copying (or its first three, `raw_weights`, where there is no config yet).
//! Turned into the core's borrowed weights view and config rows here only.

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
        let weights = weights_view(raw, dtype, weights_shape)?;
        let rows = format::config_rows(config_shape, config.as_slice()?).py()?;
        Ok((weights, rows))
    }
}

/// A weights array alone: `(flat uint8 weights, dtype name, shape)`.
#[derive(FromPyObject)]
pub struct WeightsInput<'py>(PyReadonlyArray1<'py, u8>, String, Vec<usize>);

impl WeightsInput<'_> {
    /// The weights as the core reads them: a borrowed view.
    pub fn core(&self) -> PyResult<WeightsView<'_>> {
        let WeightsInput(raw, dtype, shape) = self;
        weights_view(raw, dtype, shape)
    }
}

fn weights_view<'a>(raw: &'a PyReadonlyArray1<'_, u8>, dtype: &str, shape: &[usize]) -> PyResult<WeightsView<'a>> {
    let dtype = WeightsDtype::from_name(dtype).py()?;
    WeightsView::new(dtype, shape, raw.as_slice()?).py()
}
