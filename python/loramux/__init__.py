"""loramux: serve many LoRA adapters at once over one torch model, in the TensorRT-LLM LoRA format."""

from loramux import errors, format, modules
from loramux._core import ModelSpec, __version__
from loramux.errors import (
    LoraCacheError,
    LoraCacheFullError,
    LoraConvertError,
    LoraCudaError,
    LoraDoraError,
    LoraError,
    LoraFormatError,
    LoraNotCachedError,
    LoraParallelError,
    LoraTaskConflictError,
)

__all__ = [
    "__version__",
    "ModelSpec",
    "errors",
    "format",
    "modules",
    "LoraError",
    "LoraFormatError",
    "LoraConvertError",
    "LoraDoraError",
    "LoraParallelError",
    "LoraCacheError",
    "LoraNotCachedError",
    "LoraTaskConflictError",
    "LoraCacheFullError",
    "LoraCudaError",
]
