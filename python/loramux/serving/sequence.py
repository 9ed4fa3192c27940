"""Sequence: one request's state inside the step loop (prompt ids, KV row, adapter hold, tokens,
text, timings), turned into Deltas while it runs and into its Result when it ends."""

from __future__ import annotations

import time
from typing import List, Optional

from loramux.errors import LoraError
from loramux.serving.handle import RequestHandle
from loramux.serving.request import Delta, Request, Result
from loramux.serving.text import IncrementalText


class Sequence:
    """A request from submit to its end. `row` is its KV row while it holds one; `prefilled` counts
    the prompt positions already in that row; `hold` is its pinned adapter (an AcquiredBatch)."""

    def __init__(self, request: Request, handle: RequestHandle, tokenizer):
        self.request = request
        self.handle = handle
        self.task_id = request.lora.task_id if request.lora is not None else None
        self.submitted = time.perf_counter()
        self.prompt_ids: Optional[List[int]] = None
        self.row: Optional[int] = None
        self.slot = -1  # the adapter's slot in the cache's table (-1: none)
        self.hold = None
        self.resolved = False  # its adapter was put (or found cached) under the task_id rules
        self.prefilled = 0
        self.generator = None
        self.tokens: List[int] = []
        self.logprobs: Optional[List[float]] = [] if request.logprobs else None
        self.top_logprobs: Optional[List[list]] = [] if request.top_logprobs else None  # (id, logprob) pairs a token
        self.text = IncrementalText(tokenizer, request.stop)
        # checked against every token it generates: a set once, not a scan of the request's list each step
        self.stop_token_ids = frozenset(request.stop_token_ids or ())
        self.first_token_at: Optional[float] = None
        self.last_token_at: Optional[float] = None
        self.finish_reason: Optional[str] = None
        self.error: Optional[LoraError] = None

    @property
    def request_id(self) -> int:
        return self.handle.request_id

    @property
    def need(self) -> int:
        """KV positions this request may use: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.request.max_new_tokens

    @property
    def length(self) -> int:
        """Positions of its row written so far."""
        return self.prefilled + max(0, len(self.tokens) - 1)

    @property
    def decoding(self) -> bool:
        """Prompt done and a token made: the next step feeds that token."""
        return self.prompt_ids is not None and self.prefilled == len(self.prompt_ids) and bool(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: int, logprob: Optional[float], end_ids: set, top: Optional[list] = None) -> None:
        """Takes the step's token: ends the answer at an end token (not kept), a stop string or
        max_new_tokens, and streams what it completed."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if token in end_ids or token in self.stop_token_ids:
            self.finish("stop")
            return
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top or [])
        piece = self.text.add(token)
        self.handle._push(Delta(piece, [token], [logprob] if self.logprobs is not None else None,
                                [top or []] if self.top_logprobs is not None else None))
        if self.text.stopped:
            self.finish("stop")
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str, error: Optional[LoraError] = None) -> None:
        if self.finished:
            return
        self.finish_reason, self.error = reason, error
        if error is None:
            rest = self.text.flush()
            if rest:
                self.handle._push(Delta(rest, [], [] if self.logprobs is not None else None,
                                        [] if self.top_logprobs is not None else None))

    def result(self) -> Result:
        tpot = None
        n = len(self.tokens)
        if n > 1 and self.first_token_at is not None:
            tpot = (self.last_token_at - self.first_token_at) / (n - 1)
        return Result(
            request_id=self.request_id,
            task_id=self.task_id,
            text=self.text.text if self.error is None else None,
            token_ids=list(self.tokens),
            error=self.error,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids) if self.prompt_ids is not None else 0,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.submitted,
            tpot_s=tpot,
        )


__all__ = ["Sequence"]
