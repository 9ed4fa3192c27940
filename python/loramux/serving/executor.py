"""The in-flight batching Executor: a step loop over the attached model's forward where requests
join and leave at every step, each row with its own adapter, streamed through handles.

Each step: submitted requests enter the queue; waiting ones are admitted in order (scheduler.py:
the TensorRT-LLM task_id rules, KV rows, adapters loaded when scheduled); admitted prompts are
prefilled in chunks within `max_tokens_per_step`, the chunks of several requests packed into one
forward; every running request decodes one token in one batched forward (a captured CUDA graph on
GPU); finished, cancelled and failed requests leave and free their KV row and adapter hold at once.
An exception inside a forward fails the requests of that forward only, and a row whose logits
come out NaN or infinite (an adapter overflowing the model's dtype) fails its request alone. The
loop runs in a background thread (`with Executor(...) as ex:`) or in the caller's (`run()`).
Encoder-decoder models are served in static greedy batches (static_batch.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional

import torch

from loramux.errors import LoraError, LoraStepError
from loramux.serving.handle import RequestHandle
from loramux.serving.kv_cache import RowKVCache, model_positions
from loramux.serving.metrics import Metrics
from loramux.serving.model_step import ModelStep
from loramux.serving.openmp_workers import release_this_threads_workers
from loramux.serving.request import Delta, Request, Result
from loramux.serving.sampling import choose, new_generator, non_finite_error
from loramux.serving.scheduler import AdapterGate, Scheduler, admission_error
from loramux.serving.sequence import Sequence
from loramux.serving.static_batch import StaticExecutor, check_batch_size
from loramux.serving.text import check_token_ids, end_token_ids, model_vocab, pad_token_id

_CPU_KV_BYTES = 2 << 30  # default KV budget of a CPU model (the buffers grow to it as needed)
_CUDA_KV_FRACTION = 0.3  # default share of the GPU memory free at construction


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class Executor:
    """Serves requests through an attached model (loramux.attach) with in-flight batching.

    max_batch_size: running requests at once (KV rows). max_tokens_per_step: prompt tokens prefilled
    per step, beside the decode tokens (longer prompts are prefilled in chunks). KV memory:
    `kv_cache_bytes`, or `kv_cache_fraction` of the GPU memory free now (default 0.3 on CUDA, 2 GiB
    on the CPU); `max_seq_len` caps one request's prompt + max_new_tokens (default: the model's).
    cuda_graphs: replay captured decode graphs (default: on for CUDA models).
    """

    def __init__(self, engine, tokenizer, max_batch_size: int = 64, max_tokens_per_step: int = 2048,
                 kv_cache_bytes: Optional[int] = None, kv_cache_fraction: Optional[float] = None,
                 max_seq_len: Optional[int] = None, cuda_graphs: Optional[bool] = None):
        self.max_batch_size = check_batch_size(max_batch_size)
        self.max_tokens_per_step = _positive_int("max_tokens_per_step", max_tokens_per_step)
        self.engine, self.tokenizer = engine, tokenizer
        model = engine.model
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: Deque[Sequence] = deque()
        # every request submitted and not ended, wherever it is (an interrupt can leave one between
        # the queue and the running rows): what _cancel_all must end
        self._live: Dict[int, Sequence] = {}
        self._unreturned: List[RequestHandle] = []
        self._running: List[Sequence] = []  # _running[i] holds KV row i
        self._next_id = 0
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._loop_ended = False  # the background loop has left (closing, or it died) and serves nothing more
        self._cancel_on_stop = False
        self._metrics = Metrics()
        self._end_ids = end_token_ids(tokenizer, model)
        self._vocab = model_vocab(model)
        self._end_key = None
        self._static: Optional[StaticExecutor] = None
        self._progress = None
        if model.config.is_encoder_decoder:
            self._static = StaticExecutor(engine, tokenizer, max_batch_size)
            self.kv, self._step, self._waiting = None, None, deque()
            return
        device = engine.device
        budget = self._kv_budget(device, kv_cache_bytes, kv_cache_fraction)
        positions = model_positions(model)
        limit = f"the model's {positions} positions"
        if max_seq_len is not None and _positive_int("max_seq_len", max_seq_len) < positions:
            positions, limit = max_seq_len, f"max_seq_len={max_seq_len}"
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool or None, got {cuda_graphs!r}")
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs a model on a CUDA device")
        dtype = next(model.parameters()).dtype
        self.kv = RowKVCache(model.config, dtype, device, self.max_batch_size, budget, positions,
                             grow=device.type != "cuda")
        self._step = ModelStep(engine, self.kv, pad_token_id(tokenizer), cuda_graphs)
        self._gate = AdapterGate(engine.cache)
        self._scheduler = Scheduler(self.kv, self._gate, tokenizer, model, self.max_batch_size, positions, limit)
        self._waiting = self._scheduler.waiting

    @staticmethod
    def _kv_budget(device, kv_cache_bytes, kv_cache_fraction) -> int:
        if kv_cache_bytes is not None and kv_cache_fraction is not None:
            raise ValueError("give kv_cache_bytes or kv_cache_fraction, not both")
        if kv_cache_bytes is not None:
            return _positive_int("kv_cache_bytes", kv_cache_bytes)
        if kv_cache_fraction is not None:
            if isinstance(kv_cache_fraction, bool) or not isinstance(kv_cache_fraction, (int, float)):
                raise TypeError(f"kv_cache_fraction must be a number, got {kv_cache_fraction!r}")
            if not 0.0 < kv_cache_fraction <= 1.0:
                raise ValueError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
            if device.type != "cuda":
                raise ValueError("kv_cache_fraction is a share of free GPU memory: give kv_cache_bytes on the CPU")
        if device.type != "cuda":
            return _CPU_KV_BYTES
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (kv_cache_fraction or _CUDA_KV_FRACTION))

    def capture_graphs(self, max_len: Optional[int] = None) -> int:
        """Captures the decode-step CUDA graphs ahead of serving (every batch-size bucket, with and
        without adapters, for rows attending up to `max_len` positions: default the longest row),
        so that no step pays a capture. Call it before the first request; returns how many were
        captured (0 without CUDA graphs)."""
        if self._step is None or self._step.graphs is None:
            return 0
        with self._lock:
            busy = bool(self._running) or self._thread is not None
        if busy:
            raise RuntimeError("capture_graphs runs before serving: its warm-up writes into free KV rows")
        return self._step.graphs.capture_ahead(self.kv.max_seq_len if max_len is None else
                                               _positive_int("max_len", max_len))

    # --- submitting --------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queues a request (thread-safe); returns its handle at once. A prompt of token ids outside
        the model's vocabulary raises LoraRequestError here, before anything is queued; so does a
        background loop that has ended (RuntimeError), which would never serve it."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a loramux.Request, got {type(request).__name__}")
        if isinstance(request.prompt, (list, tuple)) and not isinstance(request.prompt[0], dict):
            check_token_ids(request.prompt, self._vocab)  # ids the embedding cannot take: refused here
        with self._lock:
            if self._thread is not None and self._loop_ended:
                raise RuntimeError("this executor's step loop has ended (closed, or it died: see alive()); "
                                   "after close() returns, start() it again or step with run()")
            handle = RequestHandle(self._next_id, request.lora.task_id if request.lora else None, self._cancelled)
            self._next_id += 1
            seq = Sequence(request, handle, self.tokenizer)
            self._incoming.append(seq)
            self._live[handle.request_id] = seq
            self._unreturned.append(handle)
            self._wake.notify_all()
            background = self._thread is not None and self._thread is not threading.current_thread()
        if background:
            release_this_threads_workers()  # torch work here since start() would slow the loop thread
        self._metrics.add(requests_submitted=1)
        return handle

    def _cancelled(self, handle: RequestHandle) -> None:
        with self._lock:
            self._wake.notify_all()

    # --- running -------------------------------------------------------------------------------------
    def __enter__(self) -> "Executor":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)

    def start(self) -> None:
        """Starts the step loop in a background thread."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this executor's loop is already running")
            self._stopping = self._cancel_on_stop = self._loop_ended = False
            self._thread = threading.Thread(target=self._loop, name="loramux-executor", daemon=True)
        # this thread's idle OpenMP workers (it loaded the model) would make every parallel CPU op of
        # the loop thread sleep and wake its own (serving/openmp_workers.py)
        release_this_threads_workers()
        self._thread.start()

    def close(self, cancel: bool = False) -> None:
        """Stops the background loop: after every submitted request has finished, or at once with
        the unfinished ones cancelled."""
        with self._lock:
            thread = self._thread
            self._stopping, self._cancel_on_stop = True, cancel
            self._wake.notify_all()
        if thread is not None:
            thread.join()
        with self._lock:
            self._thread = None

    def alive(self) -> bool:
        """Whether submitted requests get served: no background loop was started (run() steps in
        the caller's thread), or its thread is still running (False once it died)."""
        thread = self._thread
        return thread is None or thread.is_alive()

    def _has_work(self) -> bool:
        return bool(self._incoming or self._waiting or self._running)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping and (self._cancel_on_stop or not self._has_work()):
                        break
                self._step_once()
        finally:
            with self._lock:  # from here on submit refuses: a request queued now would never be served
                self._loop_ended = True
            self._cancel_all()

    def run(self, progress: Any = None) -> List[Result]:
        """Runs everything submitted since the last run() and returns their Results in submission
        order. Without a background loop it steps in this thread; Ctrl-C stops it and returns what
        finished (the rest cancelled). `progress`: a tqdm-like bar, advanced per generated token."""
        with self._lock:
            handles, self._unreturned = self._unreturned, []
            background = self._thread is not None
        if background:
            return [h.result() for h in handles]
        self._progress = progress
        try:
            while not all(h.done() for h in handles):
                self._step_once()
        except KeyboardInterrupt:
            self._cancel_all()
        finally:
            self._progress = None
        return [h.result() for h in handles]

    # --- one step ------------------------------------------------------------------------------------
    def _step_once(self) -> None:
        with self._lock:
            incoming, self._incoming = list(self._incoming), deque()
        self._waiting.extend(incoming)
        if self._static is not None:
            self._static_step()
            return
        self._refresh_end_ids()
        made = 0
        try:
            self._sweep_cancelled()
            self._retire()
            admitted, failed = self._scheduler.admit(self._running)
            self._end(failed)
            if admitted:
                self._start_admitted(admitted)
            made += self._prefill()
            self._retire()
            made += self._decode()
            self._retire()
        except Exception as err:  # noqa: BLE001 - a fault outside one forward: fail what runs, go on
            self._fail(list(self._running), err)
            self._retire()
        self._metrics.step_done(made)
        if self._progress is not None and made:
            self._progress.update(made)
        if not made and not self._running:
            time.sleep(0.0005)  # only waiting for an adapter load (or nothing): do not spin hot

    def _start_admitted(self, admitted: List[Sequence]) -> None:
        """Admitted requests join the running rows, their KV memory reserved. Whatever fails here
        fails the requests it concerns (their adapter holds released), never the running ones."""
        starting: List[Sequence] = []
        for seq in admitted:
            try:
                seq.generator = new_generator(seq.request, self.kv.device)
            except Exception as err:  # noqa: BLE001 - this request alone
                seq.row = None
                seq.finish("error", admission_error(seq, err))
                self._end([seq])
                continue
            seq.row = len(self._running) + len(starting)  # nothing written in its row yet
            starting.append(seq)
        if not starting:
            return
        try:
            self.kv.reserve(len(self._running) + len(starting), max(s.need for s in self._running + starting))
        except Exception as err:  # noqa: BLE001 - e.g. no memory for the rows of these requests
            for seq in starting:
                seq.row = None
            self._fail(starting, err)
            self._end(starting)
            return
        for seq in starting:
            self._metrics.add(prompt_tokens=len(seq.prompt_ids))
        self._running.extend(starting)

    def _refresh_end_ids(self) -> None:
        """The end tokens, recomputed only when the model's generation_config changed them."""
        config = getattr(self.engine.model, "generation_config", None)
        key = (id(config), repr(getattr(config, "eos_token_id", None)), getattr(self.tokenizer, "eos_token_id", None))
        if key != self._end_key:
            self._end_key, self._end_ids = key, end_token_ids(self.tokenizer, self.engine.model)

    def _sweep_cancelled(self) -> None:
        for seq in self._running:
            if seq.handle.cancel_requested:
                seq.finish("cancelled")
        gone = [s for s in self._waiting if s.handle.cancel_requested]
        if gone:
            for seq in gone:
                self._waiting.remove(seq)
                seq.finish("cancelled")
            self._end(gone)

    def _prefill(self) -> int:
        """Prompt chunks of admitted requests within the step's token budget, all in one forward;
        returns the first tokens made (of the requests whose prompt this completed)."""
        decoding = sum(1 for s in self._running if s.decoding)
        budget = self.max_tokens_per_step - decoding if decoding else self.max_tokens_per_step
        seqs, chunks = [], []
        for seq in self._running:
            if budget <= 0:
                break
            if seq.finished or seq.prefilled == len(seq.prompt_ids):
                continue
            chunk = seq.prompt_ids[seq.prefilled: seq.prefilled + budget]
            seqs.append(seq)
            chunks.append((seq.row, seq.prefilled, chunk, seq.slot))
            budget -= len(chunk)
        if not seqs:
            return 0
        try:
            logits = self._step.prefill(chunks)
            finite = self._isolate_non_finite(chunks, logits)
        except Exception as err:  # noqa: BLE001 - the requests of this forward fail, the loop goes on
            self._fail(seqs, err)
            return 0
        self._metrics.add(prefill_chunks=len(seqs), prefill_forwards=1)
        complete = []
        for i, (seq, (_, _, chunk, _)) in enumerate(zip(seqs, chunks)):
            seq.prefilled += len(chunk)
            if not finite[i]:  # its row holds NaN or infinity now: no later chunk can mend it
                seq.finish("error", non_finite_error(seq.request, "logits"))
            elif seq.prefilled == len(seq.prompt_ids):
                complete.append(i)
        if not complete:
            return 0
        picked = logits if len(complete) == len(seqs) else logits[complete]
        return self._take_tokens([seqs[i] for i in complete], picked)

    def _isolate_non_finite(self, chunks, logits: torch.Tensor) -> List[bool]:
        """Whether each chunk's logits are finite, each chunk judged alone. One masked attention over
        a pack (the GPU's) lets a chunk whose adapter overflows turn every chunk beside it NaN (its
        NaN keys reach them as NaN x weight 0): when several come out non-finite, each is prefilled
        again alone (into the same positions), and takes those logits."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        suspects = [i for i, ok in enumerate(finite) if not ok]
        if len(suspects) > 1:
            for i in suspects:
                alone = self._step.prefill([chunks[i]])
                logits[i] = alone[0]
                finite[i] = bool(torch.isfinite(alone).all())
        return finite

    def _decode(self) -> int:
        rows = self._running
        if not any(s.decoding and not s.finished for s in rows):
            return 0
        live = [s.decoding and not s.finished for s in rows]
        # rows still prefilling ride along as padding: their write lands at their next prompt
        # position, which their next chunk overwrites
        tokens = [s.tokens[-1] if ok else self._step.pad_id for s, ok in zip(rows, live)]
        positions = [s.length if ok else s.prefilled for s, ok in zip(rows, live)]
        slots = [s.slot for s in rows]
        try:
            logits = self._step.decode(tokens, positions, slots)
        except Exception as err:  # noqa: BLE001 - the requests of this step fail, the loop goes on
            self._fail([s for s, ok in zip(rows, live) if ok], err)
            return 0
        picked = [i for i, ok in enumerate(live) if ok]
        return self._take_tokens([rows[i] for i in picked], logits[picked] if len(picked) < len(rows) else logits)

    def _take_tokens(self, seqs: List[Sequence], logits: torch.Tensor) -> int:
        """Each row's next token into its request; returns how many were made. A row whose logits
        are not finite fails its request alone."""
        try:
            picks = choose(logits, [s.request for s in seqs], [s.generator for s in seqs])
        except Exception as err:  # noqa: BLE001 - the requests of these rows fail, the loop goes on
            self._fail(seqs, err)
            return 0
        made = 0
        for seq, token, logprob, top, fault in zip(seqs, *picks):
            if fault is not None:
                seq.finish("error", non_finite_error(seq.request, fault))
                continue
            try:
                seq.add_token(token, logprob, self._end_ids, top)
                made += 1
            except Exception as err:  # noqa: BLE001 - e.g. the tokenizer failing on this answer
                self._fail([seq], err)
        return made

    def _fail(self, seqs: List[Sequence], err: BaseException) -> None:
        self._metrics.add(step_errors=1)
        if isinstance(err, LoraError):
            error = err
        else:
            error = LoraStepError(f"a step failed for {len(seqs)} request(s): {type(err).__name__}: {err}")
            error.__cause__ = err
        for seq in seqs:
            seq.finish("error", error)
        if torch.cuda.is_available() and isinstance(err, torch.OutOfMemoryError):
            torch.cuda.empty_cache()

    def _retire(self) -> None:
        """Ends finished requests: frees their adapter hold and KV row (the last row moves into a
        freed one, so running rows stay 0..n-1; a failed request's row is zeroed first) and
        completes their handles."""
        done = sorted((s for s in self._running if s.finished), key=lambda s: -s.row)
        for seq in done:
            if seq.error is not None:  # it may have left NaN or infinity in its row
                self.kv.clear_row(seq.row, seq.need)
            last = len(self._running) - 1
            if seq.row != last:
                mover = self._running[last]
                self.kv.move_row(last, seq.row, mover.length)
                mover.row = seq.row
                self._running[seq.row] = mover
            self._running.pop()
            seq.row = None
        self._end(done)

    def _end(self, seqs: List[Sequence]) -> None:
        for seq in seqs:
            with self._lock:
                self._live.pop(seq.request_id, None)
            if self._static is None:
                self._gate.release(seq)
            outcome = {"error": "requests_failed", "cancelled": "requests_cancelled"}.get(seq.finish_reason,
                                                                                          "requests_finished")
            self._metrics.add(**{outcome: 1})
            seq.handle._finish(seq.result())

    def _cancel_all(self) -> None:
        """Ends every request not finished (cancelled), releasing what it holds: those queued, those
        running and any an interrupt left in between (taken off the queue, not yet running)."""
        with self._lock:
            self._incoming.clear()
            live = list(self._live.values())
        running = set(map(id, self._running))
        for seq in live:
            seq.finish("cancelled")
        self._waiting.clear()
        self._end([seq for seq in live if id(seq) not in running])
        if self._static is None:
            self._retire()
            self.engine.clear_batch()

    def _static_step(self) -> None:
        """Encoder-decoder models: the next max_batch_size waiting requests through generate."""
        batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
        for seq in batch:
            self._static.submit(seq.request)
        try:
            results = self._static.run(progress=self._progress)
        except Exception as err:  # noqa: BLE001 - this batch's requests fail, the loop goes on
            self._fail(batch, err)
            self._end(batch)
            return
        for seq, r in zip(batch, results):
            seq.prompt_ids = [0] * r.prompt_tokens
            if not r.ok:
                seq.finish("error", r.error)
                continue
            try:
                for token in r.token_ids:
                    seq.add_token(token, None, set())
                if not seq.finished:
                    seq.finish(r.finish_reason)
            except Exception as err:  # noqa: BLE001 - e.g. the tokenizer failing on this answer
                self._fail([seq], err)
        self._end(batch)
        self._metrics.step_done(sum(len(r.token_ids) for r in results))

    # --- figures -------------------------------------------------------------------------------------
    @property
    def generated_tokens(self) -> int:
        return self._metrics.totals["generated_tokens"]

    def metrics(self) -> Dict[str, Any]:
        """Live figures (queue depth, running requests, tokens/s, KV memory, adapter cache) and totals."""
        stats = self.engine.cache.stats()
        running = list(self._running)
        out: Dict[str, Any] = {
            "queue_depth": len(self._incoming) + len(self._waiting),
            "running": len(running),
            "tokens_per_s": self._metrics.tokens_per_s(),
            "kv_bytes_in_use": sum(s.length for s in running) * self.kv.bytes_per_token if self.kv else 0,
            "kv_bytes_allocated": self.kv.bytes_allocated if self.kv else 0,
            "kv_bytes_budget": self.kv.budget_bytes if self.kv else 0,
            "cache_hits": stats["hits"],
            "cache_misses": stats["misses"],
            "cache_loads": stats["loads"],
            "cache_evictions": stats["evictions"],
            "cache_device_adapters": stats["device_adapters"],
        }
        graphs = self._step.graphs if self._step is not None else None
        out["cuda_graphs_captured"] = graphs.captured if graphs is not None else 0
        out["cuda_graph_replays"] = graphs.replays if graphs is not None else 0
        out["cuda_graphs_error"] = graphs.error if graphs is not None else None
        out.update(self._metrics.snapshot())
        return out


__all__ = ["Executor"]
