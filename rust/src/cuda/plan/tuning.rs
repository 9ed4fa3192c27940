//! Launch choices a measured tuning table passes in (`Tuning`, `ExpandKind`).

/// Launch choices a measured tuning table made for one launch geometry (python/loramux/ops/
/// tuning.py reads benchmarks/tune.py's table and passes them in); `None` keeps the built-in rule.
/// An environment override (`LORAMUX_*`, for A/B runs and the tuning sweep itself) wins over both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Blocks the shrink's split-K aims for (ksplit = target / blocks without a split).
    pub shrink_target_blocks: Option<usize>,
    /// Which expand kernel runs, where the path allows it.
    pub expand: Option<ExpandKind>,
    /// Whether a decode batch sizes its split on the device (`decode_split_from_device`): the sweep
    /// times each choice with the split sized both ways, so the entry says which it measured.
    pub device_split: Option<bool>,
}

/// The expand kernels a launch can choose between: the flat decode kernel, the small-item kernel
/// in its three instantiations, the tensor-core tile kernel at 1 or 4 tiles a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpandKind {
    /// shrink and expand in one launch (cuda/lora_fused.cu), decode batches only; the shrink's A in registers
    Fused,
    /// the same at 3 blocks an SM (fewer, fatter: long column spans contend less)
    Fused3,
    /// the shrink's A staged in shared memory by cp.async (the `_sa` instantiations), 5 blocks an SM
    /// where shared memory lets them reside
    FusedStaged,
    /// the same at 4 blocks an SM
    FusedStaged4,
    Flat,
    SmallO1,
    SmallO1w,
    SmallO4,
    TileC1,
    TileC4,
    /// the pipelined prefill kernels (cuda/lora_prefill.cu), the expand's column span planned
    Pipe,
    /// the pipelined prefill kernels, 2, 4, 6, 8 or 16 64-column tiles an expand block
    Pipe2,
    Pipe4,
    Pipe6,
    Pipe8,
    Pipe16,
}

impl ExpandKind {
    pub const ALL: [ExpandKind; 16] = [
        ExpandKind::Fused,
        ExpandKind::Fused3,
        ExpandKind::FusedStaged,
        ExpandKind::FusedStaged4,
        ExpandKind::Flat,
        ExpandKind::SmallO1,
        ExpandKind::SmallO1w,
        ExpandKind::SmallO4,
        ExpandKind::TileC1,
        ExpandKind::TileC4,
        ExpandKind::Pipe,
        ExpandKind::Pipe2,
        ExpandKind::Pipe4,
        ExpandKind::Pipe6,
        ExpandKind::Pipe8,
        ExpandKind::Pipe16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExpandKind::Fused => "fused",
            ExpandKind::Fused3 => "fused3",
            ExpandKind::FusedStaged => "fuseds",
            ExpandKind::FusedStaged4 => "fuseds4",
            ExpandKind::Flat => "flat",
            ExpandKind::SmallO1 => "o1",
            ExpandKind::SmallO1w => "o1w",
            ExpandKind::SmallO4 => "o4",
            ExpandKind::TileC1 => "c1",
            ExpandKind::TileC4 => "c4",
            ExpandKind::Pipe => "p",
            ExpandKind::Pipe2 => "p2",
            ExpandKind::Pipe4 => "p4",
            ExpandKind::Pipe6 => "p6",
            ExpandKind::Pipe8 => "p8",
            ExpandKind::Pipe16 => "p16",
        }
    }

    /// The fused decode kernel in one of its forms.
    pub fn is_fused(self) -> bool {
        matches!(self, ExpandKind::Fused | ExpandKind::Fused3 | ExpandKind::FusedStaged | ExpandKind::FusedStaged4)
    }

    /// The pipelined expand's span (64-column tiles a block) a `p<N>` kind fixes.
    pub fn pipe_span(self) -> Option<usize> {
        match self {
            ExpandKind::Pipe2 => Some(2),
            ExpandKind::Pipe4 => Some(4),
            ExpandKind::Pipe6 => Some(6),
            ExpandKind::Pipe8 => Some(8),
            ExpandKind::Pipe16 => Some(16),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<ExpandKind> {
        ExpandKind::ALL.into_iter().find(|k| k.name() == name)
    }
}
