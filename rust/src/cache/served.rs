//! Which (module, layer) pairs the attached model applies. The format checks rows against the
//! model's dimensions only, and those allow modules no layer applies (mlp_router on a Llama,
//! mlp_gate_up on GPT-2, whose MLP has no gate): such rows would be cached and served without
//! effect, an adapter silently doing less than it says. A cache told what its model applies
//! refuses them, except fused rows whose parts the model applies (attn_qkv on a Llama, whose q, k
//! and v are separate layers): those it keeps as their parts (fused_rows.rs).

use std::collections::HashMap;

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

    /// The rows of a layout (already checked against the model) that the model applies as their
    /// parts: fused rows it does not apply whole, at a layer where it applies every part (an
    /// attn_qkv row on a Llama's q_proj, k_proj, v_proj). Refuses, at the first row in config
    /// order, a row applied neither way, and a fused row to split beside a row for one of its
    /// parts at that layer (the two would be summed; the adapter means one or the other).
    pub fn check(&self, layout: &AdapterLayout) -> Result<Vec<usize>> {
        // where each (module, layer) row is, built only once a row needs splitting (most puts have none)
        let mut row_of: Option<HashMap<(LoraModule, usize), usize>> = None;
        let mut split = Vec::new();
        for (row, r) in layout.rows.iter().enumerate() {
            if self.applies(r.module, r.layer) {
                continue;
            }
            let parts = r.module.fused_parts().filter(|parts| parts.iter().all(|&p| self.applies(p, r.layer)));
            let Some(parts) = parts else {
                return Err(LoraError::ModuleNotApplied { row, module: r.module.name(), layer: r.layer });
            };
            let row_of = row_of.get_or_insert_with(|| layout.rows.iter().enumerate().map(|(i, r)| ((r.module, r.layer), i)).collect());
            if let Some((&part, &part_row)) = parts.iter().find_map(|p| row_of.get(&(*p, r.layer)).map(|row| (p, row))) {
                return Err(LoraError::FusedRowBesidePart { row, module: r.module.name(), layer: r.layer, part_row, part: part.name() });
            }
            split.push(row);
        }
        Ok(split)
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
        // attn_qkv on layer 1, where only q is applied: neither whole nor as its parts.
        let bad = AdapterLayout { rows: vec![row(LoraModule::AttnQ, 0), row(LoraModule::AttnQkv, 1), row(LoraModule::AttnK, 1)] };
        let err = served.check(&bad).unwrap_err();
        assert!(matches!(err, LoraError::ModuleNotApplied { row: 1, module: "attn_qkv", layer: 1 }), "{err}");
        assert_eq!(err.row(), Some(1));
    }

    /// A Llama-like model: q, k, v and gate, up as separate layers on both layers, nothing fused.
    fn split_model() -> ServedModules {
        ServedModules::new(&[(1, 0), (2, 0), (3, 0), (5, 0), (7, 0), (1, 1), (2, 1), (3, 1), (5, 1)], 2).unwrap()
    }

    #[test]
    fn fused_rows_whose_parts_the_model_applies_are_split() {
        let ok = AdapterLayout { rows: vec![row(LoraModule::AttnQ, 0), row(LoraModule::MlpGateUp, 0), row(LoraModule::AttnQkv, 1)] };
        assert_eq!(split_model().check(&ok), Ok(vec![1, 2]));
        // A fused row the model applies whole stays whole.
        let fused = ServedModules::new(&[(0, 0), (1, 0), (2, 0), (3, 0)], 1).unwrap();
        assert_eq!(fused.check(&AdapterLayout { rows: vec![row(LoraModule::AttnQkv, 0)] }), Ok(vec![]));
    }

    #[test]
    fn a_fused_row_beside_its_part_names_both_rows() {
        let layout = AdapterLayout { rows: vec![row(LoraModule::MlpGate, 0), row(LoraModule::AttnV, 1), row(LoraModule::MlpGateUp, 0)] };
        let err = split_model().check(&layout).unwrap_err();
        assert_eq!(err, LoraError::FusedRowBesidePart { row: 2, module: "mlp_gate_up", layer: 0, part_row: 0, part: "mlp_gate" });
        assert_eq!(err.row(), Some(2));
        assert!(err.to_string().starts_with("config rows 2 and 0: "), "{err}");
    }

    #[test]
    fn a_fused_row_with_a_part_the_layer_lacks_is_not_applied() {
        // Layer 1 has no mlp_gate: its mlp_gate_up row cannot be served as parts.
        let layout = AdapterLayout { rows: vec![row(LoraModule::MlpGateUp, 0), row(LoraModule::MlpGateUp, 1)] };
        let err = split_model().check(&layout).unwrap_err();
        assert_eq!(err, LoraError::ModuleNotApplied { row: 1, module: "mlp_gate_up", layer: 1 });
        let cross = AdapterLayout { rows: vec![row(LoraModule::CrossAttnQkv, 0)] };
        assert!(matches!(split_model().check(&cross), Err(LoraError::ModuleNotApplied { row: 0, .. })));
    }

    #[test]
    fn refuses_pairs_outside_the_model() {
        for pair in [(19, 0), (-1, 0), (1, 2), (1, -1)] {
            let err = ServedModules::new(&[(1, 0), pair], 2).unwrap_err();
            assert!(matches!(err, LoraError::BadCacheConfig(ref m) if m.contains("served pair")), "{err}");
        }
    }
}
