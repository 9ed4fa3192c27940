//! Tensor/pipeline-parallel slicing for Python (logic in rust/src/tp.rs).

use numpy::PyArray1;
use pyo3::prelude::*;

use crate::bindings::adapter::AdapterInput;
use crate::bindings::errors::IntoPyResult;
use crate::bindings::spec::PyModelSpec;
use crate::cache::ServedModules;
use crate::error::LoraError;
use crate::tp::{self, ParallelLayout};

fn layout(tp_size: usize, tp_rank: usize, layers: Option<(usize, usize)>) -> ParallelLayout {
    ParallelLayout::new(tp_size, tp_rank, layers.map(|(a, b)| a..b))
}

/// One rank's slice of an adapter (`format.adapter_input(weights, config)`): (flat uint8
/// weights, rows, width, flat int64 config [rows * 4], rank spec). `served`: the full model's
/// (module_id, layer) pairs its layers apply; rows outside them are refused.
#[pyfunction]
#[pyo3(signature = (adapter, spec, tp_size, tp_rank, layers=None, served=None))]
#[allow(clippy::type_complexity)]
fn tp_slice_adapter<'py>(
    py: Python<'py>,
    adapter: AdapterInput<'py>,
    spec: &PyModelSpec,
    tp_size: usize,
    tp_rank: usize,
    layers: Option<(usize, usize)>,
    served: Option<Vec<(i64, i64)>>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, usize, usize, Vec<i64>, PyModelSpec)> {
    let (weights, rows) = adapter.core()?;
    let lay = layout(tp_size, tp_rank, layers);
    // A bad pair is a bad description of the parallel model here, not of a cache.
    let served = served
        .map(|pairs| ServedModules::new(&pairs, spec.core.num_layers))
        .transpose()
        .map_err(|e| match e {
            LoraError::BadCacheConfig(why) => LoraError::BadParallelLayout(why),
            other => other,
        })
        .py()?;
    let sliced = py.detach(|| tp::slice_adapter(&weights, &rows, &spec.core, &lay, served.as_ref())).py()?;
    let n = sliced.config.len();
    let flat_config = sliced.config.iter().flatten().copied().collect();
    Ok((PyArray1::from_vec(py, sliced.data), n, sliced.width, flat_config, sliced.spec.into()))
}

/// The ModelSpec of one rank's shard (heads and FFN widths / tp_size, the stage's layers).
#[pyfunction]
#[pyo3(signature = (spec, tp_size, layers=None))]
fn tp_rank_spec(spec: &PyModelSpec, tp_size: usize, layers: Option<(usize, usize)>) -> PyResult<PyModelSpec> {
    tp::rank_spec(&spec.core, &layout(tp_size, 0, layers)).map(PyModelSpec::from).py()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tp_slice_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(tp_rank_spec, m)?)?;
    Ok(())
}
