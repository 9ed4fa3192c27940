"""The exceptions loramux raises. The Rust bindings raise each core error as one of these classes
(rust/src/bindings/errors.rs), so a Python caller catches by meaning, not by message."""

from __future__ import annotations

from typing import Optional


class LoraError(Exception):
    """Base of every loramux error. `row` is the config/weights row at fault, when there is one."""

    def __init__(self, message: str, *, row: Optional[int] = None, task_id: Optional[int] = None):
        super().__init__(message)
        self.row = row
        self.task_id = task_id

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class LoraFormatError(LoraError, ValueError):
    """The (weights, config) pair, or a file holding it, does not follow the format."""


class LoraConvertError(LoraError, ValueError):
    """A PEFT adapter holds something the TensorRT-LLM format cannot represent."""


class LoraDoraError(LoraFormatError):
    """A DoRA row that cannot be served (no base weights, or scales not normalized)."""


class LoraParallelError(LoraError, ValueError):
    """An adapter or model that cannot be split for the requested tensor/pipeline layout."""


class LoraCacheError(LoraError, RuntimeError):
    """The adapter cache refused an operation."""


class LoraNotCachedError(LoraCacheError, KeyError):
    """A request named a task_id the cache does not hold, without weights to load it."""


class LoraTaskConflictError(LoraCacheError, ValueError):
    """A task_id was put again with different weights, without replace=True."""


class LoraCacheFullError(LoraCacheError):
    """An adapter or a batch does not fit a cache tier."""


class LoraCudaError(LoraError, RuntimeError):
    """CUDA, the driver or NVRTC failed (or is missing)."""


class LoraRequestError(LoraError, ValueError):
    """A served request that cannot run: a prompt the tokenizer refuses or the model cannot hold,
    one that could never fit the KV-cache budget, or options the model cannot serve."""


class LoraNonFiniteError(LoraRequestError):
    """A served request whose logits (or sampling probabilities) came out NaN or infinite: its
    adapter's weights overflow the model's dtype, or its temperature is too small for logits that
    large. That request fails alone; the others in its steps go on."""


class LoraStepError(LoraError, RuntimeError):
    """A forward step failed (out of memory, a CUDA error, ...); the requests it carried fail with
    this error (the cause chained), the others go on."""


__all__ = [
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
    "LoraRequestError",
    "LoraNonFiniteError",
    "LoraStepError",
]
