"""The static batcher: requests cut into batches of max_batch_size, each run through HF generate
(greedy) until its longest answer ends, with the TensorRT-LLM task_id rules applied per batch. The
in-flight Executor's baseline in benchmarks/serving.py, and how it serves encoder-decoder models.

Requests run in submission order, in batches of up to max_batch_size mixing adapters and
no-adapter rows; a batch whose adapters do not fit the device tier at once is split, not failed;
so is one whose adapters (carried by its requests) do not fit the host tier at once.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from loramux.errors import LoraCacheFullError, LoraError, LoraNotCachedError, LoraRequestError, LoraStepError
from loramux.serving.attention import serving_attention
from loramux.serving.request import Request, Result
from loramux.serving.sampling import non_finite_error
from loramux.serving.text import end_token_ids, pad_token_id, prompt_token_ids


def check_batch_size(max_batch_size) -> int:
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)):
        raise TypeError(f"max_batch_size must be an int, got {type(max_batch_size).__name__} {max_batch_size!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return int(max_batch_size)


def unsupported_options(request: Request) -> Optional[str]:
    """What a greedy generate batch cannot honour in this request (None: nothing)."""
    if not request.greedy:
        return "sampling (temperature > 0)"
    if request.stop or request.stop_token_ids:
        return "stop strings / stop token ids"
    if request.logprobs:
        return "logprobs"
    return None


class StaticExecutor:
    """Serves queued requests through an attached model (loramux.attach) in static greedy batches."""

    def __init__(self, engine, tokenizer, max_batch_size: int = 8):
        max_batch_size = check_batch_size(max_batch_size)
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._queue: List[Request] = []
        self._upcoming = None  # (next batch's request ids, queue, results) until it is admitted
        self._upcoming_admitted: Optional[List[int]] = None
        self._prompt_ids: Dict[int, List[int]] = {}  # this run's request index -> its prompt's token ids
        self._readmit: List[int] = []  # requests of the batch being admitted that go to a batch of their own
        self._queued_at: List[float] = []  # perf_counter() at each queued request's submit
        self._submitted_at: Dict[int, float] = {}  # this run's request index -> its submit time
        self.generated_tokens = 0  # over the executor's life, for throughput figures
        self.batches_run = 0

    def submit(self, request: Request) -> int:
        """Queues a request; returns its id (its index in the next run()'s results)."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a loramux.Request, got {type(request).__name__}")
        self._queue.append(request)
        self._queued_at.append(time.perf_counter())
        return len(self._queue) - 1

    def run(self, progress: Any = None) -> List[Result]:
        """Runs every queued request; returns one Result per request, in submission order.
        `progress`: a tqdm-like bar, advanced by one per generated token step of each batch."""
        queue, self._queue = self._queue, []
        self._submitted_at, self._queued_at = dict(enumerate(self._queued_at)), []
        self._prompt_ids = {}
        results = [Result(i, r.lora.task_id if r.lora else None) for i, r in enumerate(queue)]
        for i, r in enumerate(queue):
            option = unsupported_options(r)
            if option is not None:
                results[i].error = LoraRequestError(f"a static generate batch cannot serve {option}")
                results[i].finish_reason = "error"
        queue_ok = [i for i, r in enumerate(results) if r.error is None]
        chunks = [queue_ok[s: s + self.max_batch_size] for s in range(0, len(queue_ok), self.max_batch_size)]
        admitted: Optional[List[int]] = None
        for k, chunk in enumerate(chunks):
            runnable = admitted if admitted is not None else self._admit(chunk, queue, results)
            if self._readmit:  # requests whose adapters this batch's own puts evicted: run them next
                chunks.insert(k + 1, self._readmit)
                self._readmit = []
            # the next batch is admitted (and its adapters prefetched) once this batch holds its
            # own, so the copies overlap this batch's compute and cannot evict what it needs
            self._upcoming = (chunks[k + 1], queue, results) if k + 1 < len(chunks) else None
            self._upcoming_admitted = None
            if runnable:
                self._run_fitting(runnable, queue, results, progress)
            admitted = self._upcoming_admitted
        self._prompt_ids = {}
        for r in results:
            if r.error is not None:
                r.finish_reason = "error"
        return results

    def _admit_upcoming(self) -> None:
        upcoming, self._upcoming = self._upcoming, None
        if upcoming is None:
            return
        chunk, queue, results = upcoming
        self._upcoming_admitted = self._admit(chunk, queue, results, defer_when_full=True)
        if self._upcoming_admitted is None:
            return  # the host tier is held by this batch: admit that batch at its own turn
        wanted = list(dict.fromkeys(queue[i].lora.task_id for i in self._upcoming_admitted if queue[i].lora is not None))
        if wanted:
            try:
                self.engine.cache.prefetch(wanted)
            except LoraError:
                pass  # only a hint: acquire loads (or splits) for real when that batch runs

    # --- scheduling --------------------------------------------------------------------------------
    def _admit(self, ids: List[int], queue: List[Request], results: List[Result],
               defer_when_full: bool = False) -> Optional[List[int]]:
        """Loads the adapters this batch's requests carry (in order), then keeps the requests whose
        adapter is cached; the others fail with the error that names why. With defer_when_full, a
        full host tier returns None instead (the caller admits the batch again later)."""
        cache = self.engine.cache
        errors: Dict[int, LoraError] = {}
        for i in ids:  # a prompt that cannot run fails its request before its adapter is cached
            if i not in self._prompt_ids:
                try:
                    self._prompt_ids[i] = prompt_token_ids(self.tokenizer, self.engine.model, queue[i].prompt)
                except LoraRequestError as err:
                    errors[i] = err
        # ids this batch had in the host tier: one missing after the puts was evicted by them
        held = {queue[i].lora.task_id for i in ids if queue[i].lora is not None and queue[i].lora.task_id in cache}
        for i in ids:
            lora = queue[i].lora
            if lora is not None and lora.carries_weights and i not in errors:
                try:
                    cache.put(lora.task_id, lora.weights, lora.config)
                    held.add(lora.task_id)
                except LoraCacheFullError as err:
                    if defer_when_full:
                        return None
                    errors[i] = err
                except LoraError as err:
                    errors[i] = err
        # adapters put here and evicted by later puts here (a host tier smaller than the batch's
        # adapters): their requests carry the weights, so they are put again in a batch of their own
        evicted = {queue[i].lora.task_id for i in ids if i not in errors and queue[i].lora is not None
                   and queue[i].lora.carries_weights and queue[i].lora.task_id not in cache}
        if evicted and defer_when_full:
            return None
        for i, err in errors.items():
            results[i].error = err
        runnable = []
        for i in ids:
            lora = queue[i].lora
            if results[i].error is not None:
                continue
            if lora is not None and lora.task_id in evicted:
                self._readmit.append(i)
                continue
            if lora is not None and lora.task_id in held and lora.task_id not in cache:
                results[i].error = LoraCacheFullError(
                    f"task_id {lora.task_id} was evicted from the host tier by the adapters other requests of its "
                    f"batch carry: the host tier holds fewer adapters than a batch of {len(ids)} requests needs "
                    "(raise host_cache_bytes or lower max_batch_size)", task_id=lora.task_id)
                continue
            if lora is not None and lora.task_id not in cache:
                results[i].error = LoraNotCachedError(
                    f"task_id {lora.task_id} is not cached: its first request must carry weights and config",
                    task_id=lora.task_id)
                continue
            runnable.append(i)
        return runnable

    def _run_fitting(self, ids: List[int], queue, results, progress, admit_next: bool = True) -> None:
        """Runs `ids` as one batch, or splits it in two (by distinct adapters) if the device tier
        cannot hold its adapters at once. Only the last part admits the next batch: admitted
        earlier, its puts could evict (host tier) the adapters of a part still waiting to run."""
        task_ids = [queue[i].lora.task_id if queue[i].lora else None for i in ids]
        try:
            with self.engine.batch(task_ids):
                if admit_next:
                    self._admit_upcoming()
                self._generate(ids, queue, results, progress)
            return
        except LoraCacheFullError as err:
            distinct = sorted({t for t in task_ids if t is not None}, key=task_ids.index)
            if len(distinct) <= 1:  # this adapter alone does not fit: its rows fail, the others run
                plain = [i for i, t in zip(ids, task_ids) if t is None]
                for i, t in zip(ids, task_ids):
                    if t is not None:
                        results[i].error = err
                if plain:
                    self._run_fitting(plain, queue, results, progress, admit_next)
                return
            first = set(distinct[: len(distinct) // 2])
            self._run_fitting([i for i, t in zip(ids, task_ids) if t is None or t in first], queue, results, progress,
                              admit_next=False)
            self._run_fitting([i for i, t in zip(ids, task_ids) if t is not None and t not in first], queue, results,
                              progress, admit_next)
        except LoraError as err:  # anything else loramux refuses fails this batch's requests only
            for i in ids:
                results[i].error = err

    # --- generation --------------------------------------------------------------------------------
    def _encode(self, rows: Sequence[List[int]]) -> Dict[str, torch.Tensor]:
        """The prompts' token ids padded on the left for a decoder-only model (generation continues
        from the last column) and on the right for an encoder-decoder (the encoder's positions start
        at 0 in every row)."""
        left = not self.engine.model.config.is_encoder_decoder
        width, pad = max(len(p) for p in rows), pad_token_id(self.tokenizer)
        ids, mask = [], []
        for p in rows:
            fill = width - len(p)
            ids.append([pad] * fill + p if left else p + [pad] * fill)
            mask.append([0] * fill + [1] * len(p) if left else [1] * len(p) + [0] * fill)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def _generate(self, ids: List[int], queue, results, progress) -> None:
        model = self.engine.model
        inputs = {k: v.to(self.engine.device) for k, v in self._encode([self._prompt_ids[i] for i in ids]).items()}
        steps = max(queue[i].max_new_tokens for i in ids)
        kwargs: Dict[str, Any] = dict(max_new_tokens=steps, do_sample=False, pad_token_id=pad_token_id(self.tokenizer))
        clock = _StepClock(progress)
        kwargs["stopping_criteria"] = [clock]
        non_finite = _NonFiniteRows()
        kwargs["logits_processor"] = [non_finite]
        with torch.no_grad(), serving_attention(self.engine.device):
            out = model.generate(**inputs, **kwargs)
        new = out if model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
        stops = end_token_ids(self.tokenizer, model)
        for row, i in enumerate(ids):
            if non_finite.rows[row]:  # its greedy tokens are the argmax of NaN: no answer
                results[i].error = non_finite_error(queue[i], "logits")
                continue
            tokens = new[row].tolist()
            if model.config.is_encoder_decoder and tokens and tokens[0] == model.config.decoder_start_token_id:
                tokens = tokens[1:]
            tokens = tokens[: queue[i].max_new_tokens]
            end = next((k for k, t in enumerate(tokens) if t in stops), None)
            if end is not None:  # generate stopped this row there (and padded it after)
                tokens = tokens[:end]
            results[i].token_ids = tokens
            results[i].prompt_tokens = len(self._prompt_ids[i])
            results[i].finish_reason = "stop" if end is not None else "length"
            try:
                results[i].text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            except Exception as err:  # noqa: BLE001 - the tokenizer failing on this answer fails it alone
                results[i].error = LoraStepError(f"decoding the answer failed: {type(err).__name__}: {err}",
                                                 task_id=results[i].task_id)
                results[i].error.__cause__ = err
            # the token times as generate made them (a static batch returns them all at its end)
            made = clock.times[: max(1, len(tokens))]
            if made and i in self._submitted_at:
                results[i].ttft_s = made[0] - self._submitted_at[i]
                if len(tokens) > 1:
                    results[i].tpot_s = (made[-1] - made[0]) / (len(tokens) - 1)
            self.generated_tokens += len(tokens)
        self.batches_run += 1


class _NonFiniteRows:
    """A logits processor that notes the rows whose scores were ever NaN or infinite (on the device,
    no copy per step) and passes the scores on unchanged."""

    def __init__(self):
        self._seen: Optional[torch.Tensor] = None

    def __call__(self, input_ids, scores):
        bad = ~torch.isfinite(scores).all(dim=-1)
        self._seen = bad if self._seen is None else self._seen | bad
        return scores

    @property
    def rows(self) -> List[bool]:
        return [] if self._seen is None else self._seen.tolist()


class _StepClock:
    """A stopping criterion that never stops: it notes when each token step ended and advances a
    progress bar (if given) once per step."""

    def __init__(self, bar):
        self.bar = bar
        self.times: List[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        if self.bar is not None:
            self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


__all__ = ["StaticExecutor", "check_batch_size", "unsupported_options"]
