//! Every failure loramux reports, defined once, grouped by what went wrong (adapter format,
//! parallel layout, cache, CUDA). How a caller sees each one is the callers' business.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum LoraError {
    // --- format: (weights, config) rejected ---
    #[error("unknown LoRA module name {0:?}")]
    UnknownModuleName(String),
    #[error("{what} must be {expected}, got shape {shape:?}")]
    BadShape { what: &'static str, expected: &'static str, shape: Vec<usize> },
    #[error("{what} has dtype {dtype}, expected one of {expected}")]
    BadDtype { what: &'static str, dtype: String, expected: &'static str },
    #[error("config has {config_rows} rows but weights has {weight_rows}: one weights row per config row")]
    RowCountMismatch { config_rows: usize, weight_rows: usize },
    #[error("config row {row}: module_id {module_id} is not one of the 19 module ids (0..=18)")]
    UnknownModuleId { row: usize, module_id: i64 },
    #[error("config row {row}: module {module} is not present in this model ({reason})")]
    ModuleNotInModel { row: usize, module: &'static str, reason: &'static str },
    #[error("config row {row}: module {module} layer {layer} is not applied by any layer of this model (its weights would be ignored)")]
    ModuleNotApplied { row: usize, module: &'static str, layer: usize },
    #[error("config rows {row} and {part_row}: this model applies {module} layer {layer} as its parts, and row {part_row} gives its part {part} too; give the fused row or its parts, not both")]
    FusedRowBesidePart { row: usize, module: &'static str, layer: usize, part_row: usize, part: &'static str },
    #[error("config row {row}: layer_idx {layer} is out of range for a model of {layers} layers")]
    LayerOutOfRange { row: usize, layer: i64, layers: usize },
    #[error("config row {row}: adapter_size (rank) {rank} must be in 1..={max_rank}")]
    BadRank { row: usize, rank: i64, max_rank: usize },
    #[error("config row {row}: is_dora must be 0 or 1, got {value}")]
    BadIsDora { row: usize, value: i64 },
    #[error("config row {row}: ({module}, layer {layer}) already given by row {first_row}")]
    DuplicateModuleLayer { row: usize, first_row: usize, module: &'static str, layer: usize },
    #[error("weights row {row}: {module} layer {layer} with rank {rank} needs {needed} values (D*Hi + Ho*D{dora}), the row holds {width}")]
    RowTooShort { row: usize, module: &'static str, layer: usize, rank: usize, needed: usize, width: usize, dora: &'static str },
    #[error("weights row {row}: value at column {column} is not finite ({value})")]
    NonFinite { row: usize, column: usize, value: f32 },
    #[error("weights row {row}: value {value} at column {column} is beyond the range of the serving dtype {dtype} (it would be served as inf)")]
    NotRepresentable { row: usize, column: usize, value: f32, dtype: &'static str },
    #[error("config row {row}: a DoRA row needs the model's base weights to be normalized against, and none were given")]
    DoraWithoutBase { row: usize },
    #[error("weights row {row}: DoRA scale at column {column} is {value}, not a normalized scale (finite and > 0); run loramux.dora.normalize first")]
    DoraNotNormalized { row: usize, column: usize, value: f32 },
    #[error("{what}: {size} bytes is over the limit of {limit} bytes")]
    TooLarge { what: &'static str, size: u64, limit: u64 },

    // --- tensor / pipeline parallel ---
    #[error("config row {row}: {module} has {dim} = {size}, which does not divide by tp_size {tp_size}")]
    TpIndivisible { row: usize, module: &'static str, dim: &'static str, size: usize, tp_size: usize },
    #[error("bad parallel layout: {0}")]
    BadParallelLayout(String),

    // --- cache ---
    #[error("task_id {task_id} is not cached: its first request must carry weights and config")]
    NotCached { task_id: u64 },
    #[error("task_id {task_id} is cached with different weights; pass replace=True to replace it")]
    TaskConflict { task_id: u64 },
    #[error("task_id {task_id} needs {needed} bytes, more than the whole {tier} tier ({capacity} bytes)")]
    AdapterTooLarge { task_id: u64, needed: u64, tier: &'static str, capacity: u64 },
    #[error("{tier} tier is full: {needed} bytes needed, {evictable} evictable (the rest is held by in-flight batches)")]
    TierFull { tier: &'static str, needed: u64, evictable: u64 },
    #[error("batch needs {requested} adapters on the device tier but only {fits} fit at once; split the batch")]
    BatchDoesNotFit { requested: usize, fits: usize },
    #[error("batch {batch_id} is not held: it was already released or never acquired")]
    UnknownBatch { batch_id: u64 },
    #[error("task_id {task_id} is held by an in-flight batch; release it before {action}")]
    TaskInUse { task_id: u64, action: &'static str },
    #[error("bad cache configuration: {0}")]
    BadCacheConfig(String),

    // --- CUDA ---
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("NVRTC could not compile {kernel}: {log}")]
    Compile { kernel: String, log: String },
}

pub type Result<T> = std::result::Result<T, LoraError>;

impl LoraError {
    /// The task the error is about, if any.
    pub fn task_id(&self) -> Option<u64> {
        use LoraError::*;
        match self {
            NotCached { task_id } | TaskConflict { task_id } | AdapterTooLarge { task_id, .. } | TaskInUse { task_id, .. } => Some(*task_id),
            _ => None,
        }
    }

    /// The config/weights row the error is about, if any.
    pub fn row(&self) -> Option<usize> {
        use LoraError::*;
        match self {
            UnknownModuleId { row, .. }
            | ModuleNotInModel { row, .. }
            | ModuleNotApplied { row, .. }
            | FusedRowBesidePart { row, .. }
            | LayerOutOfRange { row, .. }
            | BadRank { row, .. }
            | BadIsDora { row, .. }
            | DuplicateModuleLayer { row, .. }
            | RowTooShort { row, .. }
            | NonFinite { row, .. }
            | NotRepresentable { row, .. }
            | DoraWithoutBase { row }
            | DoraNotNormalized { row, .. }
            | TpIndivisible { row, .. } => Some(*row),
            _ => None,
        }
    }
}
