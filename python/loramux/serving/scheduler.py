"""Admission: which waiting requests join the running batch at a step, in submission order, with the
TensorRT-LLM task_id rules applied when a request is scheduled (the first request of a task carries
weights and config and puts them in the host tier; later ones name the id; an unknown id fails
that request alone) and its adapter loaded as the TensorRT-LLM cache does: a request whose adapter
is not resident is admitted once its load (on the cache's copy stream) has landed, and requests
behind it go ahead meanwhile. A request waits (never fails) for a KV row, host-tier room or
device-tier room that running requests hold; it fails alone when it could never get them."""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import torch

from loramux.errors import LoraCacheFullError, LoraError, LoraNotCachedError, LoraRequestError
from loramux.serving.sequence import Sequence
from loramux.serving.text import prompt_token_ids


class AdapterGate:
    """The task_id rules over the engine's cache, and each adapter's load tracked until it lands."""

    def __init__(self, cache):
        self.cache = cache
        self._loads: Dict[int, object] = {}  # task_id -> CUDA event recorded after its prefetch
        self._put_here: set = set()  # task ids this executor put (one gone and not removed was evicted)
        self.pinned = 0  # adapter holds of running requests

    def resolve(self, seq: Sequence) -> None:
        """Puts the adapter a request carries (a no-op when cached with the same weights) or checks
        its id is cached. Raises the request's error; LoraCacheFullError when the host tier is full."""
        lora = seq.request.lora
        if lora.carries_weights:
            self.cache.put(lora.task_id, lora.weights, lora.config)
            self._put_here.add(lora.task_id)
        elif lora.task_id not in self.cache:
            if self.cache.was_removed(lora.task_id):
                raise LoraNotCachedError(
                    f"task_id {lora.task_id} was removed from the cache (LoraCache.remove, or a server's unload) "
                    "after it was put: send its weights and config again", task_id=lora.task_id)
            if lora.task_id in self._put_here:
                raise LoraCacheFullError(
                    f"task_id {lora.task_id} was evicted from the host tier by adapters later requests carried "
                    "(raise host_cache_bytes, or send its weights again)", task_id=lora.task_id)
            raise LoraNotCachedError(f"task_id {lora.task_id} is not cached: its first request must carry weights "
                                     "and config", task_id=lora.task_id)

    def loaded(self, task_id: int) -> bool:
        """Whether the adapter is resident with its copy landed; starts its load otherwise (on a
        CPU pool the load is done when prefetch returns)."""
        pending = self._loads.get(task_id)
        if pending is not None:
            if not pending.query():
                return False
            del self._loads[task_id]
        if self.cache.slot_of(task_id) is not None:
            return True
        self.cache.prefetch([task_id])
        stream = self.cache._copy_stream
        if stream is None:
            return True
        event = torch.cuda.Event()
        event.record(stream)
        self._loads[task_id] = event
        return False

    def acquire(self, seq: Sequence) -> None:
        hold = self.cache.acquire([seq.task_id])
        seq.hold, seq.slot = hold, hold.slots[0]
        self.pinned += 1

    def release(self, seq: Sequence) -> None:
        if seq.hold is not None:
            hold, seq.hold, seq.slot = seq.hold, None, -1
            self.pinned -= 1
            self.cache.release(hold)


def _asked(seq: Sequence) -> str:
    """What a request asks of the KV cache, as its errors say it."""
    return f"its prompt of {len(seq.prompt_ids)} tokens and max_new_tokens={seq.request.max_new_tokens}"


def admission_error(seq: Sequence, err: BaseException) -> LoraError:
    """The typed error a request fails with when admitting it raised `err`: the LoraError it was,
    or a LoraRequestError with `err` chained (the cache refusing its id, a tokenizer bug, ...)."""
    if isinstance(err, LoraError):
        return err
    error = LoraRequestError(f"request {seq.request_id} could not be admitted: {type(err).__name__}: {err}",
                             task_id=seq.task_id)
    error.__cause__ = err
    return error


class Scheduler:
    """The waiting queue and the admission of its head requests at each step."""

    def __init__(self, kv, gate: Optional[AdapterGate], tokenizer, model, max_rows: int, max_positions: int,
                 positions_limit: Optional[str] = None):
        self.kv, self.gate, self.tokenizer, self.model = kv, gate, tokenizer, model
        self.max_rows, self.max_positions = max_rows, max_positions
        # what sets max_positions, as the error names it: the model, or the Executor's max_seq_len
        self.positions_limit = positions_limit or f"the model's {max_positions} positions"
        self.waiting: Deque[Sequence] = deque()

    def admit(self, running: List[Sequence]) -> Tuple[List[Sequence], List[Sequence]]:
        """(admitted, failed) this step. Admitted requests get the next free KV rows in order."""
        admitted: List[Sequence] = []
        failed: List[Sequence] = []
        skipped: List[Sequence] = []  # waiting for their adapter's load; keep their place
        longest = max((s.need for s in running), default=0)
        while self.waiting and len(running) + len(admitted) < self.max_rows:
            seq = self.waiting.popleft()
            if seq.handle.cancel_requested:
                seq.finish("cancelled")
                failed.append(seq)
                continue
            try:
                verdict = self._check(seq, running, admitted, longest, behind_a_load=bool(skipped))
            except Exception as err:  # noqa: BLE001 - whatever admitting one request raises fails it alone
                verdict = admission_error(seq, err)
            if verdict == "wait":
                self.waiting.appendleft(seq)
                break
            if verdict == "loading":
                skipped.append(seq)
                continue
            if isinstance(verdict, LoraError):
                seq.finish("error", verdict)
                failed.append(seq)
                continue
            seq.row = len(running) + len(admitted)
            longest = max(longest, seq.need)
            admitted.append(seq)
        self.waiting.extendleft(reversed(skipped))
        return admitted, failed

    def _check(self, seq: Sequence, running, admitted, longest, behind_a_load: bool):
        """'ok' (the adapter is acquired), 'wait', 'loading' or the request's error. Behind a request
        whose adapter is loading, only requests whose adapter is resident go ahead (a put or load
        for another could evict the one in flight)."""
        if seq.prompt_ids is None:
            try:
                seq.prompt_ids = prompt_token_ids(self.tokenizer, self.model, seq.request.prompt)
            except LoraRequestError as err:
                return err
            if seq.need > self.max_positions:
                return LoraRequestError(f"request {seq.request_id}: {_asked(seq)} exceed {self.positions_limit}")
            why = self.kv.never_fits(seq.need)
            if why is not None:
                return LoraRequestError(f"request {seq.request_id} can never fit the KV cache: {_asked(seq)} {why}")
        busy = bool(running or admitted)
        if not self.kv.fits(len(running) + len(admitted) + 1, max(longest, seq.need)):
            if busy:
                return "wait"
            return LoraRequestError(f"request {seq.request_id} does not fit the KV cache alone: {_asked(seq)} "
                                    f"need {seq.need} KV positions; at most {self.kv.max_seq_len} fit")
        if seq.task_id is None:
            return "ok"
        gate = self.gate
        if behind_a_load and (seq.task_id not in gate.cache or gate.cache.slot_of(seq.task_id) is None):
            return "loading"
        try:
            if not seq.resolved:
                gate.resolve(seq)
                seq.resolved = True
            if not gate.loaded(seq.task_id):
                return "loading"
            gate.acquire(seq)
        except LoraCacheFullError as err:
            # a tier full of adapters running requests hold frees up as they finish; with none
            # held, this adapter alone is larger than the tier
            if gate.pinned:
                return "wait"
            return err
        except LoraNotCachedError as err:
            # evicted between its put and its load: put again at the next step
            if seq.request.lora.carries_weights:
                seq.resolved = False
                return "wait"
            return err
        except LoraError as err:
            return err
        return "ok"


__all__ = ["AdapterGate", "Scheduler", "admission_error"]
