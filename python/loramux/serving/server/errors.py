"""The server's own refusals, as typed loramux errors: an unknown model name, an adapter path
outside the adapter root, an adapter folder that is not there, a name already taken, an adapter busy with requests, a full queue."""

from __future__ import annotations

from loramux.errors import LoraError


class UnknownModelError(LoraError, KeyError):
    """A request named a model that is neither the base model nor a loaded adapter."""


class AdapterPathError(LoraError, PermissionError):
    """An adapter path that resolves outside the adapter root, or runtime loading without a root."""


class AdapterNotFoundError(LoraError, FileNotFoundError):
    """An adapter path (inside the adapter root, where one is set) with no folder there."""


class AdapterConflictError(LoraError, ValueError):
    """A name or task id already in use by a loaded adapter (or the base model's name)."""


class AdapterBusyError(LoraError, RuntimeError):
    """An adapter still serving requests when its unload's wait ran out."""


class QueueFullError(LoraError, RuntimeError):
    """The server already holds as many requests as it admits at once."""


class RequestError(LoraError, ValueError):
    """A request refused before it reaches the executor: a prompt the tokenizer refuses or the
    model's context cannot hold, a max_tokens over the server's limit, a bad adapter name."""


class ModelSourceError(LoraError, ValueError):
    """`loramux serve MODEL` got something that is not a model folder, a GGUF file or `smollm2`."""


__all__ = ["UnknownModelError", "AdapterPathError", "AdapterNotFoundError", "AdapterConflictError", "AdapterBusyError", "QueueFullError",
           "RequestError", "ModelSourceError"]
