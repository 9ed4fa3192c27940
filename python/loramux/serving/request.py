"""What a user submits and gets back: Request (prompt, generation limits, the adapter), LoraConfig
(task_id, with weights and config the first time) and Result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from loramux.errors import LoraError, LoraFormatError


@dataclass
class LoraConfig:
    """The adapter a request uses: `task_id` alone once cached, with (weights, config) the first time."""

    task_id: int
    weights: Optional[np.ndarray] = None
    config: Optional[np.ndarray] = None

    def __post_init__(self):
        if not isinstance(self.task_id, (int, np.integer)) or isinstance(self.task_id, bool) or self.task_id < 0:
            raise LoraFormatError(f"task_id must be a non-negative int, got {self.task_id!r}")
        if (self.weights is None) != (self.config is None):
            raise LoraFormatError(f"task_id {self.task_id}: weights and config come together (one of them is missing)")

    @classmethod
    def from_peft(cls, task_id: int, path: str, storage_type: Optional[str] = None,
                  base_model: Any = None) -> "LoraConfig":
        """Converts the PEFT adapter folder at `path` (loramux.convert.from_peft). Stored as float32
        unless `storage_type` says otherwise: the cache packs it into the model's dtype on put, so
        nothing is rounded twice. `base_model` (an HF model or a saved model dir) is needed for
        DoRA adapters and encoder-decoder models."""
        from loramux.convert import from_peft

        weights, config = from_peft(path, storage_type=storage_type or "float32", base_model=base_model)
        return cls(task_id, weights, config)

    @property
    def carries_weights(self) -> bool:
        return self.weights is not None


#: a prompt: text, chat messages ([{"role": ..., "content": ...}], templated by the tokenizer) or token ids
Prompt = Union[str, List[Dict[str, str]], List[int]]


@dataclass
class Request:
    prompt: Prompt
    max_new_tokens: int = 32
    lora: Optional[LoraConfig] = None

    def __post_init__(self):
        if isinstance(self.prompt, (np.ndarray, torch.Tensor)) and self.prompt.ndim == 1:
            self.prompt = self.prompt.tolist()  # token ids as an array (truth value ambiguous below)
        p = self.prompt
        if not isinstance(p, (str, list, tuple)) or not p or not (
                isinstance(p, str) or all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in p)
                or all(isinstance(m, dict) and "content" in m for m in p)):
            raise LoraFormatError("a prompt must be text, chat messages ({'role', 'content'} dicts) or a non-empty "
                                  f"list of token ids, got {type(p).__name__} {str(p)[:40]!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise LoraFormatError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise LoraFormatError(f"lora must be a loramux.LoraConfig or None, got {type(self.lora).__name__}")


@dataclass
class Result:
    """The outcome of one request: its generated text and token ids, or the error that failed it."""

    request_id: int
    task_id: Optional[int]
    text: Optional[str] = None
    token_ids: List[int] = field(default_factory=list)
    error: Optional[LoraError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


__all__ = ["LoraConfig", "Prompt", "Request", "Result"]
