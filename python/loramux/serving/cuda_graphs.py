"""CUDA graphs of the decode step: one per (batch-size bucket, attended-length bucket, adapters or
not), captured the first time a step needs it and replayed after with the step's tokens,
positions and adapter slots written into the graph's static input tensors. The LoRA kernels read
the slots from device memory, so one graph serves any adapter mix (and -1 rows). Rows past the
step's real ones are free KV rows: they decode a pad token at position 0 and are ignored."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


def buckets(limit: int, first: int) -> List[int]:
    """first, 2*first, 4*first, ... below limit, then limit itself."""
    out, size = [], first
    while size < limit:
        out.append(size)
        size *= 2
    return out + [limit]


def _kernels_refuse(engine) -> Optional[str]:
    """Why adapter steps cannot be captured (the torch reference of the LoRA ops reads the batch's
    slots on the host), or None when the CUDA kernels take them."""
    from loramux.ops import apply

    kernels = apply._kernels
    if kernels is None or not kernels.available():
        return "the CUDA LoRA kernels are not available here: adapter steps run eagerly"
    if not kernels.supports(engine.dtype, engine.max_rank, 3):
        return f"the CUDA LoRA kernels do not take {engine.dtype} (max_rank {engine.max_rank}): adapter steps run eagerly"
    return None


class _Statics:
    """The static inputs of every graph of one batch-size bucket: token ids, positions and adapter
    slots, written for each replay from one pinned host buffer by one asynchronous copy (no host
    sync, no tensor built per step)."""

    def __init__(self, rows: int, device):
        self.rows = rows
        self.inputs = torch.zeros(3, rows, dtype=torch.long, device=device)  # ids, positions, slots
        self.ids = self.inputs[0].view(rows, 1)
        self.pos = self.inputs[1]
        self.slots = torch.full((rows,), -1, dtype=torch.int32, device=device)  # the kernels read int32
        self.host = torch.zeros(3, rows, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        self.copied = torch.cuda.Event()  # the last copy out of `host` (rewritten only after it ran)
        self.copied.record(torch.cuda.current_stream(device))

    def write(self, tokens: List[int], positions: List[int], slots: List[int], pad_id: int) -> None:
        n = len(tokens)
        self.copied.synchronize()  # done long ago: the previous step's logits were read since
        h = self.host_np
        h[0, :n], h[0, n:] = tokens, pad_id
        h[1, :n], h[1, n:] = positions, 0
        h[2, :n], h[2, n:] = slots, -1
        self.inputs.copy_(self.host, non_blocking=True)
        self.copied.record(torch.cuda.current_stream(self.inputs.device))
        self.slots.copy_(self.inputs[2])


class DecodeGraphs:
    """Captures and replays decode-step graphs for a ModelStep. A capture that fails turns that kind
    of graph (with adapters, or without) off and its steps run eagerly from then on; `error` says
    why (e.g. float32 adapters take the torch reference of the LoRA ops, which is not capturable)."""

    def __init__(self, step, max_rows: int):
        self.step = step
        self.device = step.device
        self.batch_buckets = buckets(max_rows, 1)
        self.span_buckets = buckets(step.kv.capacity, 64)
        self.pool = torch.cuda.graph_pool_handle()
        self._statics: Dict[int, _Statics] = {}
        self._graphs: Dict[Tuple[int, int, bool], Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: Dict[bool, str] = {}  # adapters or not -> why its capture failed
        self.replays = 0
        why = _kernels_refuse(step.engine)
        if why is not None:
            self.failed[True] = why

    @property
    def error(self) -> Optional[str]:
        return "; ".join(f"{'adapter' if k else 'base'} graphs: {v}" for k, v in self.failed.items()) or None

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def _statics_for(self, rows: int) -> _Statics:
        statics = self._statics.get(rows)
        if statics is None:
            statics = self._statics[rows] = _Statics(rows, self.device)
        return statics

    def _get(self, key: Tuple[int, int, bool], statics: _Statics):
        """The graph of `key`, captured now if it is not yet (None when that capture fails)."""
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(statics, key[1], key[2])
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager steps
                self.failed[key[2]] = f"{type(err).__name__}: {err}"[:300]
                torch.cuda.synchronize(self.device)
                return None
        return entry

    def capture_ahead(self, max_span: int) -> int:
        """Captures the graph of every batch-size bucket and attended-length bucket up to the one
        of `max_span`, with adapters and without, before serving (as vLLM does at start-up), so
        no step pays a capture. Only while no request holds a KV row: each capture's warm-up
        writes a pad token at position 0 of its rows. Returns the graphs captured now."""
        before = len(self._graphs)
        last = next((s for s in self.span_buckets if s >= max_span), self.span_buckets[-1])
        for rows in self.batch_buckets:
            statics = self._statics_for(rows)
            statics.write([], [], [], self.step.pad_id)
            for span in self.span_buckets:
                if span > last:
                    break
                for lora in (False, True):
                    if lora not in self.failed:
                        self._get((rows, span, lora), statics)
        return len(self._graphs) - before

    def run(self, tokens: List[int], positions: List[int], slots: List[int], span: int) -> Optional[torch.Tensor]:
        """Logits [len(tokens), vocab] from a graph replay; None when graphs are off or too small."""
        lora = any(s >= 0 for s in slots)
        if lora in self.failed:
            return None
        n = len(tokens)
        rows = next((b for b in self.batch_buckets if b >= n), None)
        span_b = next((s for s in self.span_buckets if s >= span), None)
        if rows is None or span_b is None:
            return None
        statics = self._statics_for(rows)
        statics.write(tokens, positions, slots, self.step.pad_id)
        entry = self._get((rows, span_b, lora), statics)
        if entry is None:
            return None
        graph, logits = entry
        graph.replay()
        self.replays += 1
        return logits[:n].clone()

    def _forward(self, statics: _Statics, span: int) -> torch.Tensor:
        view = self.step.kv.decode_view(statics.pos, span)
        return self.step.forward(view, statics.ids, statics.pos[:, None])

    def _capture(self, statics: _Statics, span: int, lora: bool):
        """Warm-up on a side stream (as torch requires), then the capture. The warm-up runs the very
        step being served with its real inputs, so its KV writes are the ones the replay repeats."""
        engine, cache = self.step.engine, self.step.engine.cache

        def fresh_batch() -> None:
            # drops the BatchMetas (and their token segments) built so far
            if lora:
                engine.set_static_batch(statics.slots, cache.table, cache.pool)
            else:
                engine.clear_batch()

        fresh_batch()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):
                    self._forward(statics, span)
            torch.cuda.current_stream(self.device).wait_stream(side)
            # The step's token segments must be built inside the capture: a meta the warm-up built
            # would be replayed with the warm-up's segments, in memory freed when the batch clears.
            fresh_batch()
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(statics, span)
            return graph, logits
        finally:
            engine.clear_batch()


__all__ = ["DecodeGraphs", "buckets"]
