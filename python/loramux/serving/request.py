"""What a user submits and gets back: Request (prompt, generation limits, sampling, the adapter),
LoraConfig (task_id, with weights and config the first time), Delta (a streamed piece) and Result."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from loramux.errors import LoraError, LoraFormatError, LoraRequestError

#: a request ends for one of these reasons (the OpenAI API's finish_reason values, plus two)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class LoraConfig:
    """The adapter a request uses: `task_id` alone once cached, with (weights, config) the first time."""

    task_id: int
    weights: Optional[np.ndarray] = None
    config: Optional[np.ndarray] = None

    def __post_init__(self):
        if not _is_int(self.task_id):
            raise TypeError(f"task_id must be an int, got {type(self.task_id).__name__} {self.task_id!r}")
        self.task_id = int(self.task_id)  # a numpy integer too: the cache and the results take ints
        if not 0 <= self.task_id < 1 << 64:  # the adapter cache's ids (a u64 in the core)
            raise LoraRequestError(f"task_id must be an int in [0, 2**64), got {self.task_id!r}")
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


#: temperatures below this are greedy: dividing float32 logits by a smaller one overflows (or divides
#: by zero where it rounds to 0) and the NaN probabilities would fail the step of every request in the
#: batch; the answer it asks for is the argmax anyway (vLLM draws the same line)
GREEDY_BELOW_TEMPERATURE = 1e-5

#: most alternatives a request may ask for at each step (the OpenAI API's limit for top_logprobs)
MAX_TOP_LOGPROBS = 20

#: a prompt: text, chat messages ([{"role": ..., "content": ...}], templated by the tokenizer) or token ids
Prompt = Union[str, List[Dict[str, str]], List[int]]


@dataclass
class Request:
    """One generation. Sampling as in the OpenAI API: temperature 0 (the default; anything below
    GREEDY_BELOW_TEMPERATURE) is greedy; top_k 0
    and top_p 1 keep every token; `seed` makes a sampled answer reproducible; the answer ends at
    max_new_tokens, the model's end token, one of `stop_token_ids` (neither is returned) or one of
    the `stop` strings (the text is cut before it). `logprobs`: the log-probability of each chosen
    token under the model (before temperature and filtering); `top_logprobs` (with `logprobs`): also
    that many most likely tokens at each step, as (token id, log-probability) pairs."""

    prompt: Prompt
    max_new_tokens: int = 32
    lora: Optional[LoraConfig] = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.prompt, (np.ndarray, torch.Tensor)) and self.prompt.ndim == 1:
            self.prompt = self.prompt.tolist()  # token ids as an array (truth value ambiguous below)
        p = self.prompt
        if not isinstance(p, (str, list, tuple)) or not (
                isinstance(p, str) or all(_is_int(t) for t in p) or all(isinstance(m, dict) for m in p)):
            raise TypeError("a prompt must be text, chat messages ({'role', 'content'} dicts) or a list of token ids, "
                            f"got {type(p).__name__} {str(p)[:40]!r}")
        if not p or (not isinstance(p, str) and isinstance(p[0], dict) and not all("content" in m for m in p)):
            raise LoraRequestError(f"a prompt must not be empty, and chat messages need 'content'; got {str(p)[:40]!r}")
        if not _is_int(self.max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int, got {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise LoraRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise TypeError(f"lora must be a loramux.LoraConfig or None, got {type(self.lora).__name__}")
        self._check_sampling()

    def _check_sampling(self) -> None:
        for name, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_real(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not (low <= value <= high) or math.isnan(value) or (name == "top_p" and value == 0):
                raise LoraRequestError(f"{name} must be in {'(0, 1]' if name == 'top_p' else '[0, inf)'}, got {value}")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < 0:
            raise LoraRequestError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if self.seed is not None and not _is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise LoraRequestError(f"seed must be in [0, 2**64), got {self.seed}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if any(s == "" for s in self.stop):
                raise LoraRequestError("stop strings must not be empty")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) for t in self.stop_token_ids):
                raise TypeError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if not isinstance(self.logprobs, bool):
            raise TypeError(f"logprobs must be a bool, got {type(self.logprobs).__name__}")
        if not _is_int(self.top_logprobs):
            raise TypeError(f"top_logprobs must be an int, got {type(self.top_logprobs).__name__}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise LoraRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise LoraRequestError("top_logprobs needs logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass
class Delta:
    """What one step added to an answer: the new token ids, the text they completed (held back
    while it could still turn into a stop string or an incomplete character) and, when asked
    for, the chosen tokens' log-probabilities."""

    text: str
    token_ids: List[int]
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None  # per token, most likely first


@dataclass
class Result:
    """The outcome of one request: its generated text and token ids, or the error that failed it.
    finish_reason: "stop" (end token, stop token or string), "length" (max_new_tokens),
    "cancelled" (the tokens up to the cancel are kept) or "error". ttft_s: seconds from submit to
    the first token; tpot_s: mean seconds per output token after the first (None below 2 tokens)."""

    request_id: int
    task_id: Optional[int]
    text: Optional[str] = None
    token_ids: List[int] = field(default_factory=list)
    error: Optional[LoraError] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.error is None


__all__ = ["Delta", "FINISH_REASONS", "GREEDY_BELOW_TEMPERATURE", "LoraConfig", "MAX_TOP_LOGPROBS", "Prompt", "Request", "Result"]
