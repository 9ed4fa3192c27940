//! Which (module, layer) pairs the attached model applies. The format checks rows against the
//! model's dimensions only, and those allow modules no layer applies (attn_qkv on a Llama, whose
//! q, k and v are separate layers): such rows would be cached and served without effect, an
//! adapter silently doing less than it says. A cache told what its model applies refuses them.

use crate::error::{LoraError, Result};
use crate::format::AdapterLayout;
use crate::modules::{LoraModule, NUM_MODULES};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedModules {
    /// per layer, bit `module_id` set where a layer of the model applies that module
    applied: Vec<u32>,
}

impl ServedModules {
    /// From `(module_id, layer)` pairs of a `num_layers`-layer model.
    pub fn new(pairs: &[(i64, i64)], num_layers: usize) -> Result<Self> {
        let mut applied = vec![0u32; num_layers];
        for &(module_id, layer) in pairs {
            let module = LoraModule::from_id(module_id);
            if module.is_none() || layer < 0 || layer as usize >= num_layers {
                return Err(LoraError::BadCacheConfig(format!(
                    "served pair ({module_id}, {layer}) is not a (module_id, layer) of a {num_layers}-layer model"
                )));
            }
            applied[layer as usize] |= 1 << module_id;
        }
        Ok(ServedModules { applied })
    }

    pub fn applies(&self, module: LoraModule, layer: usize) -> bool {
        self.applied.get(layer).is_some_and(|bits| bits & (1 << module.id()) != 0)
    }

    /// The first row of a layout (already checked against the model) that no layer applies.
    pub fn check(&self, layout: &AdapterLayout) -> Result<()> {
        match layout.rows.iter().enumerate().find(|(_, r)| !self.applies(r.module, r.layer)) {
            Some((row, r)) => Err(LoraError::ModuleNotApplied { row, module: r.module.name(), layer: r.layer }),
            None => Ok(()),
        }
    }
}

const _: () = assert!(NUM_MODULES <= 32, "a layer's served modules are one u32 of bits");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::RowLayout;

    fn row(module: LoraModule, layer: usize) -> RowLayout {
        RowLayout { module, layer, rank: 1, hi: 4, ho: 4, is_dora: false }
    }

    #[test]
    fn names_the_first_row_no_layer_applies() {
        let served = ServedModules::new(&[(1, 0), (2, 0), (3, 0), (1, 1)], 2).unwrap();
        assert!(served.applies(LoraModule::AttnQ, 1) && !served.applies(LoraModule::AttnK, 1));
        let ok = AdapterLayout { rows: vec![row(LoraModule::AttnQ, 0), row(LoraModule::AttnV, 0), row(LoraModule::AttnQ, 1)] };
        assert!(served.check(&ok).is_ok());
        let bad = AdapterLayout { rows: vec![row(LoraModule::AttnQ, 0), row(LoraModule::AttnQkv, 0), row(LoraModule::AttnK, 1)] };
        let err = served.check(&bad).unwrap_err();
        assert!(matches!(err, LoraError::ModuleNotApplied { row: 1, module: "attn_qkv", layer: 0 }), "{err}");
        assert_eq!(err.row(), Some(1));
    }

    #[test]
    fn refuses_pairs_outside_the_model() {
        for pair in [(19, 0), (-1, 0), (1, 2), (1, -1)] {
            let err = ServedModules::new(&[(1, 0), pair], 2).unwrap_err();
            assert!(matches!(err, LoraError::BadCacheConfig(ref m) if m.contains("served pair")), "{err}");
        }
    }
}
