//! Tensor/pipeline-parallel slicing for Python (logic in rust/src/tp.rs).

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::bindings::errors::IntoPyResult;
use crate::bindings::format::{adapter_arrays, PyModelSpec};
use crate::format;
use crate::tp::{self, ParallelLayout};

fn py_spec(s: &format::ModelSpec, max_rank: usize) -> PyModelSpec {
    PyModelSpec {
        num_layers: s.num_layers,
        hidden_size: s.hidden_size,
        num_heads: s.num_heads,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.head_dim,
        ffn_size: s.ffn_size,
        expert_ffn_size: s.expert_ffn_size,
        num_experts: s.num_experts,
        encoder_hidden_size: s.encoder_hidden_size,
        max_rank,
    }
}

fn layout(tp_size: usize, tp_rank: usize, layers: Option<(usize, usize)>) -> ParallelLayout {
    ParallelLayout::new(tp_size, tp_rank, layers.map(|(a, b)| a..b))
}

/// One rank's slice: (flat uint8 weights, rows, width, flat int64 config [rows * 4], rank spec).
#[pyfunction]
#[pyo3(signature = (raw_weights, dtype, weights_shape, config, config_shape, spec, tp_size, tp_rank, layers=None))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn tp_slice_adapter<'py>(
    py: Python<'py>,
    raw_weights: PyReadonlyArray1<'py, u8>,
    dtype: &str,
    weights_shape: Vec<usize>,
    config: PyReadonlyArray1<'py, i64>,
    config_shape: Vec<usize>,
    spec: &PyModelSpec,
    tp_size: usize,
    tp_rank: usize,
    layers: Option<(usize, usize)>,
) -> PyResult<(Bound<'py, PyArray1<u8>>, usize, usize, Vec<i64>, PyModelSpec)> {
    let (weights, rows) = adapter_arrays(raw_weights.as_slice()?, dtype, weights_shape, config.as_slice()?, &config_shape)?;
    let core = spec.core();
    let lay = layout(tp_size, tp_rank, layers);
    let sliced = py.detach(|| tp::slice_adapter(&weights, &rows, &core, &lay)).py()?;
    let n = sliced.config.len();
    let flat_config = sliced.config.iter().flatten().copied().collect();
    Ok((PyArray1::from_vec(py, sliced.data), n, sliced.width, flat_config, py_spec(&sliced.spec, spec.max_rank)))
}

/// The ModelSpec of one rank's shard (heads and FFN widths / tp_size, the stage's layers).
#[pyfunction]
#[pyo3(signature = (spec, tp_size, layers=None))]
fn tp_rank_spec(spec: &PyModelSpec, tp_size: usize, layers: Option<(usize, usize)>) -> PyResult<PyModelSpec> {
    let s = tp::rank_spec(&spec.core(), &layout(tp_size, 0, layers)).py()?;
    Ok(py_spec(&s, spec.max_rank))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tp_slice_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(tp_rank_spec, m)?)?;
    Ok(())
}
