//! `ModelSpec` for Python: the core's `ModelSpec`, held as is (no second copy of its fields to
//! convert), with every size checked on the way in so that a bad one raises a typed error that
//! names the field (PyO3 alone would raise OverflowError for -1, TypeError for 2.5).

use pyo3::exceptions::PyAttributeError;
use pyo3::prelude::*;
use pyo3::types::PyBool;

use crate::bindings::errors::{IntoPyResult, PyErrorClass};
use crate::format::{self, ModelSpec, ValidateOptions};

#[pyclass(name = "ModelSpec", module = "loramux._core", eq)]
#[derive(Clone, PartialEq)]
pub struct PyModelSpec {
    pub core: ModelSpec,
}

impl From<ModelSpec> for PyModelSpec {
    fn from(core: ModelSpec) -> Self {
        PyModelSpec { core }
    }
}

/// A size argument as given: extraction never fails, so that the check below can raise a typed
/// error naming the field (PyO3's own would be an OverflowError or TypeError naming neither).
pub enum SizeArg {
    Given(usize),
    Bad(String),
}

impl<'a, 'py> FromPyObject<'a, 'py> for SizeArg {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let bad = || SizeArg::Bad(obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "?".into()));
        if obj.is_instance_of::<PyBool>() {
            return Ok(bad());
        }
        // Through __index__: Python and numpy integers pass, floats and strings do not.
        Ok(match obj.extract::<i64>().ok().and_then(|n| usize::try_from(n).ok()) {
            Some(n) => SizeArg::Given(n),
            None => bad(),
        })
    }
}

impl SizeArg {
    /// The size, or LoraFormatError (a ValueError) naming `field`.
    fn get(self, field: &str) -> PyResult<usize> {
        match self {
            SizeArg::Given(n) => Ok(n),
            SizeArg::Bad(shown) => Err(PyErrorClass::Format.err(format!("ModelSpec {field} must be an integer in [0, 2**63), got {shown}"), None, None)),
        }
    }
}

impl PyModelSpec {
    /// Every field by name, in declaration order (what repr shows).
    fn fields(&self) -> [(&'static str, usize); 10] {
        let s = &self.core;
        [
            ("num_layers", s.num_layers),
            ("hidden_size", s.hidden_size),
            ("num_heads", s.num_heads),
            ("num_kv_heads", s.num_kv_heads),
            ("head_dim", s.head_dim),
            ("ffn_size", s.ffn_size),
            ("expert_ffn_size", s.expert_ffn_size),
            ("num_experts", s.num_experts),
            ("encoder_hidden_size", s.encoder_hidden_size),
            ("max_rank", s.max_rank),
        ]
    }

    fn field_mut(&mut self, name: &str) -> Option<&mut usize> {
        let s = &mut self.core;
        Some(match name {
            "num_layers" => &mut s.num_layers,
            "hidden_size" => &mut s.hidden_size,
            "num_heads" => &mut s.num_heads,
            "num_kv_heads" => &mut s.num_kv_heads,
            "head_dim" => &mut s.head_dim,
            "ffn_size" => &mut s.ffn_size,
            "expert_ffn_size" => &mut s.expert_ffn_size,
            "num_experts" => &mut s.num_experts,
            "encoder_hidden_size" => &mut s.encoder_hidden_size,
            "max_rank" => &mut s.max_rank,
            _ => return None,
        })
    }
}

#[pymethods]
impl PyModelSpec {
    #[new]
    #[pyo3(
        signature = (*, num_layers, hidden_size, num_heads, num_kv_heads=None, head_dim=None, ffn_size=SizeArg::Given(0), expert_ffn_size=SizeArg::Given(0), num_experts=SizeArg::Given(0), encoder_hidden_size=SizeArg::Given(0), max_rank=SizeArg::Given(64)),
        text_signature = "(*, num_layers, hidden_size, num_heads, num_kv_heads=None, head_dim=None, ffn_size=0, expert_ffn_size=0, num_experts=0, encoder_hidden_size=0, max_rank=64)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_layers: SizeArg,
        hidden_size: SizeArg,
        num_heads: SizeArg,
        num_kv_heads: Option<SizeArg>,
        head_dim: Option<SizeArg>,
        ffn_size: SizeArg,
        expert_ffn_size: SizeArg,
        num_experts: SizeArg,
        encoder_hidden_size: SizeArg,
        max_rank: SizeArg,
    ) -> PyResult<Self> {
        let hidden_size = hidden_size.get("hidden_size")?;
        let num_heads = num_heads.get("num_heads")?;
        Ok(PyModelSpec {
            core: ModelSpec {
                num_layers: num_layers.get("num_layers")?,
                hidden_size,
                num_heads,
                num_kv_heads: num_kv_heads.map(|v| v.get("num_kv_heads")).transpose()?.unwrap_or(num_heads),
                head_dim: head_dim.map(|v| v.get("head_dim")).transpose()?.unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0)),
                ffn_size: ffn_size.get("ffn_size")?,
                expert_ffn_size: expert_ffn_size.get("expert_ffn_size")?,
                num_experts: num_experts.get("num_experts")?,
                encoder_hidden_size: encoder_hidden_size.get("encoder_hidden_size")?,
                max_rank: max_rank.get("max_rank")?,
            },
        })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.core.num_layers
    }
    #[getter]
    fn hidden_size(&self) -> usize {
        self.core.hidden_size
    }
    #[getter]
    fn num_heads(&self) -> usize {
        self.core.num_heads
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.core.num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.core.head_dim
    }
    #[getter]
    fn ffn_size(&self) -> usize {
        self.core.ffn_size
    }
    #[getter]
    fn expert_ffn_size(&self) -> usize {
        self.core.expert_ffn_size
    }
    #[getter]
    fn num_experts(&self) -> usize {
        self.core.num_experts
    }
    #[getter]
    fn encoder_hidden_size(&self) -> usize {
        self.core.encoder_hidden_size
    }
    #[getter]
    fn max_rank(&self) -> usize {
        self.core.max_rank
    }

    /// Assigning a field checks the value as the constructor does.
    fn __setattr__(&mut self, name: &str, value: SizeArg) -> PyResult<()> {
        let field = self.field_mut(name).ok_or_else(|| PyAttributeError::new_err(format!("ModelSpec has no field {name:?}")))?;
        *field = value.get(name)?;
        Ok(())
    }

    /// (Hi, Ho) of a module id in this model; LoraFormatError if the model lacks it.
    fn module_dims(&self, module_id: i64) -> PyResult<(usize, usize)> {
        let config = [[module_id, 0, 1, 0]];
        let mut spec = self.core.clone();
        spec.num_layers = spec.num_layers.max(1);
        spec.max_rank = spec.max_rank.max(1);
        let layout = format::layout_from_config(&config, &spec, ValidateOptions::default()).py()?;
        Ok((layout.rows[0].hi, layout.rows[0].ho))
    }

    fn __repr__(&self) -> String {
        let fields: Vec<String> = self.fields().iter().map(|(name, value)| format!("{name}={value}")).collect();
        format!("ModelSpec({})", fields.join(", "))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModelSpec>()
}
