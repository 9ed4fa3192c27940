"""One API call's generation: its requests (one per prompt and per `n`) submitted to the executor
with their adapter held, their deltas merged into one ordered event stream, and the cleanup that
cancels what is still running when the caller goes away."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from loramux.errors import LoraError, LoraNotCachedError
from loramux.serving.server.adapters_registry import Adapter
from loramux.serving.server.state import ServerState


@dataclass
class Choice:
    """One request of the call: the prompt it was made from and what came back."""

    index: int
    prompt: List[int]  # the prompt's token ids (one list per prompt, shared by its n choices)
    prompt_tokens: int  # counted by the server's tokenizer (the executor's count wins when it gives one)
    max_new_tokens: int
    seed: Optional[int]
    handle: Any = None
    result: Any = None
    error: Optional[BaseException] = None
    text: List[str] = field(default_factory=list)
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[list] = field(default_factory=list)  # per token: (id, logprob) pairs, likeliest first

    @property
    def finish_reason(self) -> Optional[str]:
        reason = getattr(self.result, "finish_reason", None)
        return reason if reason in ("stop", "length") else ("stop" if self.result is not None else None)


#: an event of the merged stream: (choice, a Delta) while it runs, (choice, None) when it finished
Event = Tuple[Choice, Any]


class Generation:
    """Submits every choice at start(); events() yields them as they come; close() cancels the rest."""

    def __init__(self, state: ServerState, sampling: Any, choices: List[Choice], adapter_name: Optional[str],
                 logprobs: bool, top_logprobs: int = 0):
        self.state = state
        self.sampling = sampling  # the validated OpenAI request (temperature, top_p, stop, ...)
        self.choices = choices
        self.adapter_name = adapter_name  # None: the base model
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs  # alternatives a token, with logprobs
        self.adapter: Optional[Adapter] = None
        self._queue: "asyncio.Queue[Event]" = asyncio.Queue()
        self._tasks: List[asyncio.Task] = []
        self._admitted = False
        self._closed = False

    # --- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Admits the call (QueueFullError when the server is full), holds its adapter
        (UnknownModelError when not loaded) and submits every choice; nothing is left behind
        when one of these fails."""
        self.state.admit(len(self.choices))
        self._admitted = True
        try:
            if self.adapter_name is not None:
                self.adapter = self.state.registry.hold(self.adapter_name)
            for choice in self.choices:
                choice.handle = self.state.executor.submit(self._request(choice, with_weights=False))
        except BaseException:
            self.close()
            raise
        self._tasks = [asyncio.ensure_future(self._drive(c)) for c in self.choices]

    def _request(self, choice: Choice, with_weights: bool):
        from loramux.serving import LoraConfig, Request

        lora = None
        if self.adapter is not None:
            a = self.adapter
            # TensorRT-LLM's rule: an adapter the cache does not hold travels with its request
            carry = with_weights or a.task_id not in self.state.engine.cache
            lora = LoraConfig(a.task_id, a.weights, a.config) if carry else LoraConfig(a.task_id)
        s = self.sampling
        return Request(choice.prompt, max_new_tokens=choice.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                       top_k=max(s.top_k, 0), seed=choice.seed, stop=s.stops,
                       stop_token_ids=list(s.stop_token_ids or []), logprobs=self.logprobs,
                       top_logprobs=self.top_logprobs if self.logprobs else 0, lora=lora)

    # --- run -----------------------------------------------------------------------------------
    async def _drive(self, choice: Choice) -> None:
        """Forwards one choice's deltas to the merged queue, then its end. An id-only request whose
        adapter left the host tier between the check and its admission is sent again with weights."""
        retried = False
        while True:
            try:
                async for delta in choice.handle:
                    choice.text.append(delta.text or "")
                    choice.token_ids += list(delta.token_ids or [])
                    choice.logprobs += list(delta.logprobs or [])
                    choice.top_logprobs += list(delta.top_logprobs or [])
                    self._queue.put_nowait((choice, delta))
                result = choice.handle.result()
                error = getattr(result, "error", None)
            except Exception as err:  # a handle may raise its request's error instead of returning it
                result, error = None, err
            if isinstance(error, LoraNotCachedError) and not retried and not choice.token_ids:
                retried = True
                try:
                    choice.handle = self.state.executor.submit(self._request(choice, with_weights=True))
                    continue
                except Exception as err:
                    error = err
            break
        choice.result = result
        if error is not None:
            choice.error = error if isinstance(error, BaseException) else LoraError(str(error))
        if result is not None:
            self.state.metrics.observe_result(result)
        self._queue.put_nowait((choice, None))

    async def events(self) -> AsyncIterator[Event]:
        """Every choice's deltas in the order they came, and one (choice, None) as each finishes."""
        left = len(self.choices)
        while left:
            choice, delta = await self._queue.get()
            if delta is None:
                left -= 1
            yield choice, delta

    async def wait(self) -> List[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    # --- end -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Cancels every choice still running (the executor frees its KV memory and adapter hold
        at its next step) and gives back the call's admission and adapter hold. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for choice in self.choices:
            if choice.handle is not None and not choice.handle.done():
                choice.handle.cancel()
                self.state.metrics.cancelled.inc()
        if self.adapter is not None:
            self.state.registry.release(self.adapter)
        if self._admitted:
            self.state.finish(len(self.choices))


def prompt_count(choices: List[Choice]) -> int:
    """Prompt tokens of the call: each prompt once, whatever `n` (as the OpenAI API counts them)."""
    seen: Dict[int, int] = {}
    for c in choices:
        count = getattr(c.result, "prompt_tokens", None) or c.prompt_tokens
        seen.setdefault(id(c.prompt), int(count))
    return sum(seen.values())


__all__ = ["Choice", "Generation", "Event", "prompt_count"]
