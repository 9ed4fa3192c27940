//! `ModelSpec` and the format's validation / packing for Python. Weights arrive as a flat uint8
//! view plus dtype name and shape (python/loramux/format.py makes that view without copying).

use numpy::PyReadonlyArray1;
use pyo3::prelude::*;

use crate::bindings::errors::IntoPyResult;
use crate::format::{self, ModelSpec, ValidateOptions, WeightsDtype, WeightsView};
use crate::modules::LoraModule;

#[pyclass(name = "ModelSpec", module = "loramux._core", eq, get_all, set_all)]
#[derive(Clone, PartialEq)]
pub struct PyModelSpec {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub expert_ffn_size: usize,
    pub num_experts: usize,
    pub encoder_hidden_size: usize,
    pub max_rank: usize,
}

impl PyModelSpec {
    pub fn core(&self) -> ModelSpec {
        ModelSpec {
            num_layers: self.num_layers,
            hidden_size: self.hidden_size,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            ffn_size: self.ffn_size,
            expert_ffn_size: self.expert_ffn_size,
            num_experts: self.num_experts,
            encoder_hidden_size: self.encoder_hidden_size,
            max_rank: self.max_rank,
        }
    }
}

#[pymethods]
impl PyModelSpec {
    #[new]
    #[pyo3(signature = (*, num_layers, hidden_size, num_heads, num_kv_heads=None, head_dim=None, ffn_size=0, expert_ffn_size=0, num_experts=0, encoder_hidden_size=0, max_rank=64))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_layers: usize,
        hidden_size: usize,
        num_heads: usize,
        num_kv_heads: Option<usize>,
        head_dim: Option<usize>,
        ffn_size: usize,
        expert_ffn_size: usize,
        num_experts: usize,
        encoder_hidden_size: usize,
        max_rank: usize,
    ) -> Self {
        PyModelSpec {
            num_layers,
            hidden_size,
            num_heads,
            num_kv_heads: num_kv_heads.unwrap_or(num_heads),
            head_dim: head_dim.unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
            ffn_size,
            expert_ffn_size,
            num_experts,
            encoder_hidden_size,
            max_rank,
        }
    }

    /// (Hi, Ho) of a module id in this model; LoraFormatError if the model lacks it.
    fn module_dims(&self, module_id: i64) -> PyResult<(usize, usize)> {
        let config = [[module_id, 0, 1, 0]];
        let mut spec = self.core();
        spec.num_layers = spec.num_layers.max(1);
        spec.max_rank = spec.max_rank.max(1);
        let layout = format::layout_from_config(&config, &spec, ValidateOptions::default()).py()?;
        Ok((layout.rows[0].hi, layout.rows[0].ho))
    }

    fn __repr__(&self) -> String {
        format!(
            "ModelSpec(num_layers={}, hidden_size={}, num_heads={}, num_kv_heads={}, head_dim={}, ffn_size={}, expert_ffn_size={}, num_experts={}, encoder_hidden_size={}, max_rank={})",
            self.num_layers, self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.ffn_size, self.expert_ffn_size, self.num_experts, self.encoder_hidden_size, self.max_rank
        )
    }
}

/// One validated row: (module_id, layer, rank, hi, ho, is_dora).
type RowTuple = (u32, usize, usize, usize, usize, bool);

/// The (weights, config) pair as the core reads it: a borrowed weights view and normalized config rows.
pub fn adapter_arrays<'a>(
    raw: &'a [u8],
    dtype: &str,
    weights_shape: Vec<usize>,
    config: &[i64],
    config_shape: &[usize],
) -> PyResult<(WeightsView<'a>, Vec<format::ConfigRow>)> {
    let dtype = WeightsDtype::from_name(dtype).py()?;
    let weights = WeightsView::new(dtype, &weights_shape, raw).py()?;
    let rows = format::config_rows(config_shape, config).py()?;
    Ok((weights, rows))
}

/// Validates (weights, config) against `spec`; returns the row layouts or raises LoraFormatError.
#[pyfunction]
#[pyo3(signature = (raw_weights, dtype, weights_shape, config, config_shape, spec, dora_allowed=true, check_finite=true))]
#[allow(clippy::too_many_arguments)]
fn validate(
    py: Python<'_>,
    raw_weights: PyReadonlyArray1<'_, u8>,
    dtype: &str,
    weights_shape: Vec<usize>,
    config: PyReadonlyArray1<'_, i64>,
    config_shape: Vec<usize>,
    spec: &PyModelSpec,
    dora_allowed: bool,
    check_finite: bool,
) -> PyResult<Vec<RowTuple>> {
    let (weights, rows) = adapter_arrays(raw_weights.as_slice()?, dtype, weights_shape, config.as_slice()?, &config_shape)?;
    let core = spec.core();
    let opts = ValidateOptions { dora_allowed, check_finite };
    let layout = py.detach(|| format::validate(&weights, &rows, &core, opts)).py()?;
    Ok(layout.rows.iter().map(|r| (r.module.id(), r.layer, r.rank, r.hi, r.ho, r.is_dora)).collect())
}

#[pyfunction]
fn module_name(module_id: i64) -> Option<&'static str> {
    LoraModule::from_id(module_id).map(LoraModule::name)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModelSpec>()?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(module_name, m)?)?;
    Ok(())
}
