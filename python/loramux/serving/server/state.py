"""What the running server holds: the executor, the tokenizer, the adapter registry, the metrics,
its limits, and how many requests it has admitted; prompt checks that need the model's sizes."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

from loramux.serving.server.adapters_registry import AdapterRegistry
from loramux.serving.server.errors import QueueFullError, RequestError
from loramux.serving.server.server_metrics import ServerMetrics


@dataclass
class ServerConfig:
    base_name: str
    adapter_root: Optional[str] = None
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_pending: int = 256  # requests admitted (queued or running) at once; more get 429
    unload_timeout_s: float = 30.0


class ServerState:
    def __init__(self, executor: Any, engine: Any, tokenizer: Any, registry: AdapterRegistry, config: ServerConfig):
        self.executor = executor
        self.engine = engine
        self.tokenizer = tokenizer
        self.registry = registry
        self.config = config
        self.metrics = ServerMetrics()
        self.pending = 0
        self.started = int(time.time())
        self._lock = threading.Lock()
        model_config = engine.model.config
        self.context_len = next((int(v) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                                 if (v := getattr(model_config, k, None))), 1 << 30)
        embeddings = engine.model.get_input_embeddings()
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or model_config.vocab_size)

    # --- admission ------------------------------------------------------------------------------
    def admit(self, n: int) -> None:
        """Counts a call of `n` requests in; QueueFullError (429, retry later) while the server is full,
        RequestError (400) for a call that alone is over --max-pending: no retry would ever get it in."""
        if n > self.config.max_pending:
            raise RequestError(f"this call asks for {n} completions (prompts x n), more than the server admits at "
                               f"once ({self.config.max_pending}, --max-pending)")
        with self._lock:
            if self.pending + n > self.config.max_pending:
                raise QueueFullError(f"the server holds {self.pending} requests and admits at most "
                                     f"{self.config.max_pending} at once (--max-pending); retry later")
            self.pending += n

    def finish(self, n: int = 1) -> None:
        with self._lock:
            self.pending -= n

    # --- prompts --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Union[str, Sequence[int], List[Dict[str, str]]]) -> List[int]:
        """The prompt's token ids as the executor will see them (chat messages through the
        tokenizer's chat template); RequestError names what the tokenizer or vocabulary refused."""
        tok = self.tokenizer
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            if not getattr(tok, "chat_template", None):
                raise RequestError(f"the model `{self.config.base_name}` has no chat template: use /v1/completions")
            try:
                prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # the template's own checks (roles, order) raise what they like
                raise RequestError(f"the chat template refused these messages: {err}") from None
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty")
            return list(tok(prompt)["input_ids"])
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if not ids or bad:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size}) and not empty; "
                               f"got {bad[:4] or ids}")
        return ids

    def check_length(self, prompt_tokens: int, max_tokens: Optional[int]) -> int:
        """max_new_tokens for a prompt of `prompt_tokens`: `max_tokens`, or what the context leaves
        (up to the server's limit) when None; RequestError when the two do not fit the model."""
        limit = self.config.max_tokens_limit
        room = self.context_len - prompt_tokens
        if max_tokens is not None and max_tokens > limit:
            raise RequestError(f"max_tokens is {max_tokens}, over this server's limit of {limit} "
                               "(--max-tokens-limit)")
        wanted = max_tokens if max_tokens is not None else min(limit, room)
        if prompt_tokens + wanted > self.context_len or room < 1:
            raise RequestError(f"This model's maximum context length is {self.context_len} tokens; the prompt has "
                                  f"{prompt_tokens} and the completion asks for {wanted} (max_tokens): "
                                  "shorten the prompt or lower max_tokens")
        return wanted


__all__ = ["ServerConfig", "ServerState"]
