"""What the benchmarks share: one timer (CUDA events on a GPU, the wall clock on the CPU), one
ceiling measurement (device copy bandwidth, pinned host-to-device bandwidth, dense matmul peak,
taken in the same process as the figures they bound), CUDA graph capture, and adapters built
through the public API: random (weights, config) pairs put into a real LoraCache and acquired, so a
benchmark reads the pool and slot table the serving path reads.

A script in benchmarks/ imports it as `from _common import ...` (Python puts the script's folder
first on sys.path)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

import loramux
from loramux.cache import AcquiredBatch, LoraCache
from loramux.ops import BatchMeta

__all__ = [
    "median_seconds",
    "capture",
    "Ceilings",
    "copy_bandwidth",
    "h2d_bandwidth",
    "matmul_peak",
    "measure_ceilings",
    "llama_spec",
    "LLAMA_8B",
    "random_adapter",
    "adapter_value_bytes",
    "ResidentAdapters",
    "resident_adapters",
]


# --- timing -------------------------------------------------------------------------------------

@contextlib.contextmanager
def env_set(env: Dict[str, str]):
    """The environment variables in `env` set for the block, then put back as they were (a launch
    variant of the kernels reads them at each launch)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def median_seconds(fn: Callable[[], object], *, reps: int = 20, warmup: int = 1, device="cuda",
                   before: Optional[Callable[[], object]] = None) -> float:
    """Median seconds of one fn() call over `reps` calls, after `warmup` untimed ones. On a CUDA
    device each call is bracketed by events on the current stream (GPU time, no host sync inside);
    on the CPU by the wall clock. `before` runs untimed ahead of each call (e.g. a barrier)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def capture(step: Callable[[], object], before: Optional[Callable[[], object]] = None):
    """(graph, output) of a CUDA graph of step(): warmed up on a side stream first, as torch
    requires; `before` runs between warm-up and capture (e.g. to rebuild per-batch metadata)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    if before is not None:
        before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def graph_time(calls: Sequence[Callable[[], object]], per_graph: int = 32, reps: int = 7) -> float:
    """Seconds per call: `calls` (e.g. one per weight set, so a set is not read back from L2)
    repeated to about `per_graph` calls in one CUDA graph; median over `reps` replays."""
    n = max(1, -(-per_graph // len(calls)))

    def all_calls():
        for c in calls:
            c()

    graph, _ = capture(lambda: [all_calls() for _ in range(n)])
    return median_seconds(graph.replay, reps=reps) / (n * len(calls))


# --- ceilings -----------------------------------------------------------------------------------

def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy rate, bytes read plus bytes written per second: the ceiling for kernels
    that stream weights out of HBM."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), reps=reps, warmup=3)


def h2d_bandwidth(nbytes: int = 256 << 20, reps: int = 5, stream: Optional[torch.cuda.Stream] = None) -> float:
    """torch's copy of a pinned host buffer to the GPU on a side stream, bytes per second: the
    ceiling for adapter loads."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(stream or torch.cuda.Stream()):
        return nbytes / median_seconds(lambda: dst.copy_(src, non_blocking=True), reps=reps, warmup=1)


def matmul_peak(n: int = 8192, dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> float:
    """FLOP/s of one n^3 matmul in `dtype` (cuBLAS on the tensor cores): the compute ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: torch.matmul(a, b), reps=reps, warmup=2)


@dataclass(frozen=True)
class Ceilings:
    gpu: str
    copy_bytes_per_s: float  # device copy, read + write counted
    h2d_bytes_per_s: float  # pinned host -> device
    matmul_flops_per_s: float  # dense n^3 matmul in `dtype`
    dtype: str

    def roofline_seconds(self, nbytes: float, flops: float = 0.0) -> float:
        """max(bytes / copy rate, flops / matmul peak): the floor an op's time is a ratio to."""
        return max(nbytes / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def measure_ceilings(dtype: torch.dtype = torch.bfloat16, matmul_n: int = 8192) -> Ceilings:
    """Every ceiling, measured now on the current GPU (about a second)."""
    return Ceilings(gpu=torch.cuda.get_device_name(), copy_bytes_per_s=copy_bandwidth(), h2d_bytes_per_s=h2d_bandwidth(),
                    matmul_flops_per_s=matmul_peak(matmul_n, dtype), dtype=str(dtype).replace("torch.", ""))


# --- adapters through the public API ------------------------------------------------------------

#: Llama-3-8B's projection shapes (hidden 4096, 32 heads, 8 KV heads of 128, FFN 14336)
LLAMA_8B = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, ffn_size=14336)


def llama_spec(num_layers: int, max_rank: int, **shape) -> loramux.ModelSpec:
    """A ModelSpec of Llama-8B shapes (or `shape`'s) with `num_layers` layers."""
    return loramux.ModelSpec(num_layers=num_layers, max_rank=max_rank, **{**LLAMA_8B, **shape})


def random_adapter(spec: loramux.ModelSpec, modules: Sequence[int], layers: Iterable[int], rank: int, *,
                   dtype: torch.dtype = torch.bfloat16, seed: int = 0, std: float = 0.01,
                   dora: bool = False) -> Tuple[torch.Tensor, np.ndarray]:
    """(weights [N, W] in `dtype` on the CPU, config int64 [N, 3|4]): one row per (layer, module)
    with random A and B of `rank` (and DoRA scales near 1 when `dora`), in the TensorRT-LLM format."""
    rows = [(m, layer) for layer in layers for m in modules]
    dims = [spec.module_dims(m) for m, _ in rows]
    width = max(rank * (hi + ho) + (ho if dora else 0) for hi, ho in dims)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(rows), width, generator=gen) * std
    if dora:
        for i, (hi, ho) in enumerate(dims):
            start = rank * (hi + ho)
            weights[i, start:start + ho] = 0.5 + torch.rand(ho, generator=gen)
    config = np.array([[m, layer, rank] + ([int(dora)] if dora else []) for m, layer in rows], dtype=np.int64)
    return weights.to(dtype), config


def adapter_value_bytes(spec: loramux.ModelSpec, config: np.ndarray, element_bytes: int) -> int:
    """Bytes of the values an adapter holds (A, B and DoRA scales of every row, no padding): what
    one application of it must read at least."""
    total = 0
    for mid, _, rank, *dora in np.asarray(config).tolist():
        hi, ho = spec.module_dims(mid)
        total += (rank * (hi + ho) + (ho if dora and dora[0] else 0)) * element_bytes
    return total


@dataclass
class ResidentAdapters:
    """Adapters put into a LoraCache and acquired: `slots[i]` is the slot of the i-th adapter; the
    pool and slot table are the cache's, as the kernels read them when serving."""

    cache: LoraCache
    batch: AcquiredBatch
    slots: List[int]
    value_bytes: int  # A, B, scales of every adapter, no padding

    def slot_of_token(self, adapter_of_token: Sequence[Optional[int]], device="cuda") -> torch.Tensor:
        """int32 [T]: each token's slot (None: no adapter, -1)."""
        return torch.tensor([-1 if a is None else self.slots[a] for a in adapter_of_token], dtype=torch.int32, device=device)

    def meta(self, adapter_of_token: Sequence[Optional[int]]) -> BatchMeta:
        """The ops' BatchMeta for tokens using adapters `adapter_of_token` (indices into the list given)."""
        return BatchMeta(table=self.cache.table, pool=self.cache.pool, dtype=self.cache.dtype,
                         slot_of_token=self.slot_of_token(adapter_of_token, self.cache.device), max_rank=self.cache.spec.max_rank)


def resident_adapters(spec: loramux.ModelSpec, adapters: Sequence[Tuple[torch.Tensor, np.ndarray]], *,
                      dtype: torch.dtype = torch.bfloat16, device="cuda", page_bytes: int = 4 << 10) -> ResidentAdapters:
    """Puts every adapter into a new LoraCache sized to hold them all on `device` and acquires them
    all at once (loaded on the copy stream; the current stream waits)."""
    esize = torch.empty((), dtype=dtype).element_size()
    value_bytes = sum(adapter_value_bytes(spec, c, esize) for _, c in adapters)
    rows = sum(len(c) for _, c in adapters)
    # every module-layer segment is A, B and scales, each 16-byte aligned, rounded up to whole pages
    pool_bytes = value_bytes + rows * (3 * 16 + page_bytes) + page_bytes
    cache = LoraCache(spec, dtype=dtype, host_cache_bytes=2 * pool_bytes + (64 << 20), device=device,
                      device_cache_bytes=pool_bytes, page_bytes=page_bytes, max_slots=max(1, len(adapters)))
    for task_id, (weights, config) in enumerate(adapters):
        cache.put(task_id, weights, config)
    batch = cache.acquire(list(range(len(adapters))))
    return ResidentAdapters(cache=cache, batch=batch, slots=list(batch.slots), value_bytes=value_bytes)
