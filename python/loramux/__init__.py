"""loramux: serve many LoRA adapters at once over one torch model, in the TensorRT-LLM LoRA format."""

from loramux import errors, format, modules
from loramux import convert, dora, spec  # PEFT <-> format converter, DoRA scales, HF module map
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

# torch-facing parts load on first use, so numpy-only users (format, convert) never import torch
_LAZY = {
    "attach": "loramux.models",
    "detach": "loramux.models",
    "Engine": "loramux.models",
    "cache": "loramux.cache",
    "LoraCache": "loramux.cache",
    "AcquiredBatch": "loramux.cache",
    "Executor": "loramux.runtime",
    "Request": "loramux.runtime",
    "LoraConfig": "loramux.runtime",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if module.__name__ == f"loramux.{name}" else getattr(module, name)
    raise AttributeError(f"module 'loramux' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ModelSpec",
    "errors",
    "format",
    "modules",
    "convert",
    "dora",
    "spec",
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
