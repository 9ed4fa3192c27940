//! The 19 LoRA module ids of the TensorRT-LLM contract: their names, and whether the base layer
//! they adapt is column- or row-parallel (which decides how tensor parallelism slices them).

use crate::error::LoraError;

/// How tensor parallelism splits the base layer a module adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParallelKind {
    /// Output features split across ranks: LoRA's B is split along Ho, A kept whole.
    Column,
    /// Input features split across ranks: LoRA's A is split along Hi, B kept whole.
    Row,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum LoraModule {
    AttnQkv = 0,
    AttnQ = 1,
    AttnK = 2,
    AttnV = 3,
    AttnDense = 4,
    MlpHTo4h = 5,
    Mlp4hToH = 6,
    MlpGate = 7,
    CrossAttnQkv = 8,
    CrossAttnQ = 9,
    CrossAttnK = 10,
    CrossAttnV = 11,
    CrossAttnDense = 12,
    MoeHTo4h = 13,
    Moe4hToH = 14,
    MoeGate = 15,
    MoeRouter = 16,
    MlpRouter = 17,
    MlpGateUp = 18,
}

pub const NUM_MODULES: usize = 19;

impl LoraModule {
    pub const ALL: [LoraModule; NUM_MODULES] = [
        LoraModule::AttnQkv,
        LoraModule::AttnQ,
        LoraModule::AttnK,
        LoraModule::AttnV,
        LoraModule::AttnDense,
        LoraModule::MlpHTo4h,
        LoraModule::Mlp4hToH,
        LoraModule::MlpGate,
        LoraModule::CrossAttnQkv,
        LoraModule::CrossAttnQ,
        LoraModule::CrossAttnK,
        LoraModule::CrossAttnV,
        LoraModule::CrossAttnDense,
        LoraModule::MoeHTo4h,
        LoraModule::Moe4hToH,
        LoraModule::MoeGate,
        LoraModule::MoeRouter,
        LoraModule::MlpRouter,
        LoraModule::MlpGateUp,
    ];

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn from_id(id: i64) -> Option<LoraModule> {
        usize::try_from(id).ok().and_then(|i| Self::ALL.get(i).copied())
    }

    /// The name used by TensorRT-LLM's `--lora_target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            LoraModule::AttnQkv => "attn_qkv",
            LoraModule::AttnQ => "attn_q",
            LoraModule::AttnK => "attn_k",
            LoraModule::AttnV => "attn_v",
            LoraModule::AttnDense => "attn_dense",
            LoraModule::MlpHTo4h => "mlp_h_to_4h",
            LoraModule::Mlp4hToH => "mlp_4h_to_h",
            LoraModule::MlpGate => "mlp_gate",
            LoraModule::CrossAttnQkv => "cross_attn_qkv",
            LoraModule::CrossAttnQ => "cross_attn_q",
            LoraModule::CrossAttnK => "cross_attn_k",
            LoraModule::CrossAttnV => "cross_attn_v",
            LoraModule::CrossAttnDense => "cross_attn_dense",
            LoraModule::MoeHTo4h => "moe_h_to_4h",
            LoraModule::Moe4hToH => "moe_4h_to_h",
            LoraModule::MoeGate => "moe_gate",
            LoraModule::MoeRouter => "moe_router",
            LoraModule::MlpRouter => "mlp_router",
            LoraModule::MlpGateUp => "mlp_gate_up",
        }
    }

    pub fn from_name(name: &str) -> Result<LoraModule, LoraError> {
        Self::ALL
            .iter()
            .copied()
            .find(|m| m.name() == name)
            .ok_or_else(|| LoraError::UnknownModuleName(name.to_string()))
    }

    /// The modules a fused module holds side by side along its output, in TensorRT-LLM's order
    /// (q | k | v; mlp_h_to_4h | mlp_gate, HF's gate | up); None for a module that is not fused.
    pub fn fused_parts(self) -> Option<&'static [LoraModule]> {
        use LoraModule::*;
        match self {
            AttnQkv => Some(&[AttnQ, AttnK, AttnV]),
            MlpGateUp => Some(&[MlpHTo4h, MlpGate]),
            CrossAttnQkv => Some(&[CrossAttnQ, CrossAttnK, CrossAttnV]),
            _ => None,
        }
    }

    pub fn parallel_kind(self) -> ParallelKind {
        match self {
            LoraModule::AttnDense
            | LoraModule::Mlp4hToH
            | LoraModule::CrossAttnDense
            | LoraModule::Moe4hToH => ParallelKind::Row,
            _ => ParallelKind::Column,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_round_trip() {
        for (i, m) in LoraModule::ALL.iter().enumerate() {
            assert_eq!(m.id() as usize, i);
            assert_eq!(LoraModule::from_id(i as i64), Some(*m));
            assert_eq!(LoraModule::from_name(m.name()).unwrap(), *m);
        }
        assert_eq!(LoraModule::from_id(19), None);
        assert_eq!(LoraModule::from_id(-1), None);
        assert!(LoraModule::from_name("attn_x").is_err());
    }

    #[test]
    fn fused_modules_are_the_three_with_parts() {
        let fused: Vec<&str> = LoraModule::ALL.iter().filter(|m| m.fused_parts().is_some()).map(|m| m.name()).collect();
        assert_eq!(fused, ["attn_qkv", "cross_attn_qkv", "mlp_gate_up"]);
        let names = |m: LoraModule| m.fused_parts().unwrap().iter().map(|p| p.name()).collect::<Vec<_>>();
        assert_eq!(names(LoraModule::MlpGateUp), ["mlp_h_to_4h", "mlp_gate"]);
        assert_eq!(names(LoraModule::CrossAttnQkv), ["cross_attn_q", "cross_attn_k", "cross_attn_v"]);
    }

    #[test]
    fn row_parallel_modules_are_the_four_down_projections() {
        let rows: Vec<u32> = LoraModule::ALL
            .iter()
            .filter(|m| m.parallel_kind() == ParallelKind::Row)
            .map(|m| m.id())
            .collect();
        assert_eq!(rows, vec![4, 6, 12, 14]);
    }
}
