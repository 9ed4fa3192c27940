"""loramux: serve many LoRA adapters at once over one torch model, in the TensorRT-LLM LoRA format.

The numpy-only parts (format, modules, convert, dora, parallel slicing) import without torch; the
torch-facing names (attach, LoraCache, Executor, ...) load on first use.
"""

from loramux import convert, dora, errors, format, layout, modules
from loramux._core import ModelSpec, __version__
from loramux.errors import (
    LoraCacheError,
    LoraCacheFullError,
    LoraConvertError,
    LoraCudaError,
    LoraDoraError,
    LoraError,
    LoraFormatError,
    LoraNonFiniteError,
    LoraNotCachedError,
    LoraParallelError,
    LoraRequestError,
    LoraStepError,
    LoraTaskConflictError,
)

# name -> the module that defines it; imported on first use, so numpy-only users never import torch
_LAZY = {
    "attach": "loramux.models",
    "detach": "loramux.models",
    "Engine": "loramux.models",
    "LoraCache": "loramux.cache",
    "AcquiredBatch": "loramux.cache",
    "Executor": "loramux.serving",
    "Request": "loramux.serving",
    "LoraConfig": "loramux.serving",
    "Result": "loramux.serving",
    "Delta": "loramux.serving",
    "RequestHandle": "loramux.serving",
    "StaticExecutor": "loramux.serving",
    "cache": "loramux.cache",
    "models": "loramux.models",
    "ops": "loramux.ops",
    "parallel": "loramux.parallel",
    "serving": "loramux.serving",
    "demo": "loramux.demo",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"loramux.{name}" else getattr(module, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'loramux' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    # numpy-facing modules
    "errors",
    "format",
    "layout",
    "modules",
    "convert",
    "dora",
    "ModelSpec",
    # torch-facing modules and names (lazy)
    "cache",
    "models",
    "ops",
    "parallel",
    "serving",
    "demo",
    "attach",
    "detach",
    "Engine",
    "LoraCache",
    "AcquiredBatch",
    "Executor",
    "Request",
    "LoraConfig",
    "Result",
    "Delta",
    "RequestHandle",
    "StaticExecutor",
    # errors: every name of loramux.errors
    *errors.__all__,
]
