"""The two-level LoRA adapter cache (logic in rust/src/cache/): a host tier of packed adapters and a
device tier of fixed-size pages in one pool tensor, with the slot table the kernels read.

Python owns the memory (the pool and the table are torch tensors, docs/internals.md); Rust writes
into them. ``put`` validates and packs once; ``acquire`` makes a batch resident and pins it.
"""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch

import loramux._core as _core
from loramux.errors import LoraCacheError, LoraCudaError
from loramux.format import adapter_input
from loramux.layout import DTYPES, table_shape

#: torch dtype -> the core's name for it, for every dtype the cache serves in
_DTYPE_NAMES = {getattr(torch, name): name for name in DTYPES}


def _task_id(task_id) -> int:
    """A bad id is a bad argument: TypeError when it is not an integer, ValueError out of range."""
    if type(task_id) is int and 0 <= task_id < 1 << 64:  # the common case, checked cheaply
        return task_id
    if isinstance(task_id, bool) or not isinstance(task_id, numbers.Integral):
        raise TypeError(f"task_id must be an integer in [0, 2**64), got {task_id!r}")
    if not 0 <= int(task_id) < 1 << 64:
        raise ValueError(f"task_id must be an integer in [0, 2**64), got {task_id!r}")
    return int(task_id)


def _cuda_device(device: torch.device) -> torch.device:
    """The CUDA device asked for, with its index; LoraCudaError when torch cannot reach it (torch
    itself would raise a RuntimeError deep inside the first allocation)."""
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU or driver was found"
        raise LoraCudaError(f"device={str(device)!r} asks for a CUDA pool, but {why} (torch.cuda.is_available() "
                            "is False); use device=None for a host-memory pool")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise LoraCudaError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _as_numpy(array) -> np.ndarray:
    """numpy view of weights/config; torch tensors are moved to the CPU (bf16 as a uint16 view)."""
    if isinstance(array, torch.Tensor):
        t = array.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    return array


class AcquiredBatch:
    """Adapters pinned for one batch: ``slots[i]`` is the slot of the i-th requested task id."""

    def __init__(self, cache: "LoraCache", batch_id: int, task_ids: List[int], slots: List[int]):
        self._cache = cache
        self.batch_id = batch_id
        self.task_ids = task_ids
        self.slots = slots
        self.released = False

    @property
    def table(self) -> torch.Tensor:
        return self._cache.table

    @property
    def pool(self) -> torch.Tensor:
        return self._cache.pool

    def slot_tensor(self, device=None) -> torch.Tensor:
        """The slots as an int32 tensor (e.g. to build ``slot_of_token``)."""
        return torch.tensor(self.slots, dtype=torch.int32, device=device or self._cache.pool.device)

    def release(self) -> None:
        self._cache.release(self)

    def __enter__(self) -> "AcquiredBatch":
        return self

    def __exit__(self, *exc) -> None:
        if not self.released:
            self.release()

    def __repr__(self) -> str:
        return f"AcquiredBatch(task_ids={self.task_ids}, slots={self.slots}, released={self.released})"


class LoraCache:
    """Fixed-size two-level LoRA cache keyed by task_id (the TensorRT-LLM LoRA
    documentation, "LoraCache configuration").

    ``device=None``/"cpu" keeps the "device" pool in host memory (tests, CPU serving), of
    ``device_cache_bytes`` or ``device_cache_fraction`` (default 1.0) of ``host_cache_bytes``; a CUDA
    device allocates the pool there up front: ``device_cache_bytes``, or ``device_cache_fraction``
    (default 0.1) of the GPU memory free now (after the model is loaded).

    The host tier's memory is allocated by the constructor too, all of it, as the TensorRT-LLM
    host cache is: ``host_cache_bytes`` plus a staging reserve of a quarter of it (at most 1 GiB),
    in whole pages (``LoraCache.host_pool_bytes(host_cache_bytes, page_bytes)`` bytes). With a
    CUDA device it is page-locked (cuMemHostAlloc), otherwise pre-faulted, so the constructor
    takes as long as the host needs to pin or map that much memory (``stats()["host_pool_alloc_seconds"]``)
    and that memory is resident from then on; more than the host has available is refused with
    LoraCacheError. In exchange no put allocates: each packs into the pool (into the reserve,
    beside the images it will evict) at the speed of a pass over mapped memory, and evicted or
    removed adapters give their pages back. Size ``host_cache_bytes`` to the packed adapters you
    want ready on the host (``stats()["host_bytes"]`` after a few puts says what they take) and to
    the memory you can lock. An adapter larger than the reserve, on a full tier, is checked before
    anything is evicted and then packed in place (two passes over its weights instead of one).

    ``served``: the (module_id, layer) pairs the model applies (``attach`` passes its wrapped
    layers'); a put whose config has a row outside them raises LoraFormatError naming the row
    (after the format's own checks of the config), except a fused row (attn_qkv, mlp_gate_up,
    cross_attn_qkv) whose parts are all served at its layer: it is cached as those part rows (A
    shared, B and DoRA scales cut per part), and refused, naming both rows, if the adapter also
    gives one of those parts for that layer. None accepts every module-layer the spec has.
    """

    def __init__(
        self,
        spec: _core.ModelSpec,
        *,
        dtype: torch.dtype = torch.float16,
        host_cache_bytes: int = 1 << 30,
        device: Union[None, str, torch.device] = None,
        device_cache_bytes: Optional[int] = None,
        device_cache_fraction: Optional[float] = None,
        max_slots: int = 64,
        page_bytes: int = 64 << 10,
        dora_allowed: bool = True,
        served: Optional[Iterable[Tuple[int, int]]] = None,
    ):
        # Bad arguments are TypeError / ValueError; LoraCacheError is for what the cache refuses.
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, got {dtype}")
        for name, value, low in (("host_cache_bytes", host_cache_bytes, 0), ("max_slots", max_slots, 1), ("page_bytes", page_bytes, 1),
                                 ("device_cache_bytes", 0 if device_cache_bytes is None else device_cache_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer >= {low}, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if page_bytes % 256:
            raise ValueError(f"page_bytes must be a positive multiple of 256, got {page_bytes}")
        if device_cache_bytes is not None and device_cache_fraction is not None:
            raise ValueError("give device_cache_bytes or device_cache_fraction, not both")
        try:
            device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device!r} ({e})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device}")
        if device.type == "cuda":
            device = _cuda_device(device)
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.max_slots = max_slots
        self.page_bytes = page_bytes
        pool_bytes = self._pool_bytes(device, host_cache_bytes, device_cache_bytes, device_cache_fraction)
        pool_bytes -= pool_bytes % page_bytes
        table_bytes = _core.AdapterCache.table_bytes(max_slots, spec.num_layers)
        try:
            # Unused pool bytes are never read, so the pool is left uninitialized (no eager touch of
            # a large host region); the table must start zeroed (rank 0 = absent).
            self.pool = torch.empty(pool_bytes, dtype=torch.uint8, device=device)
            self.table = torch.zeros(table_bytes // 8, dtype=torch.int64, device=device).view(table_shape(max_slots, spec.num_layers))
        except (torch.OutOfMemoryError, RuntimeError) as e:  # torch's CPU allocator raises RuntimeError
            error = LoraCudaError if device.type == "cuda" else LoraCacheError
            raise error(f"could not allocate a pool of {pool_bytes} bytes and a slot table of {table_bytes} bytes on {device}: {e}") from None
        self._copy_stream = None
        cuda_device = None
        if device.type == "cuda":
            if not _core.AdapterCache.cuda_driver_present():
                raise LoraCudaError("a CUDA pool needs the CUDA driver library (libcuda), which could not be loaded")
            self._copy_stream = torch.cuda.Stream(device=device)
            # The copy stream writes both tensors: torch must not reuse their memory, once freed,
            # before the copies queued there have finished.
            self.pool.record_stream(self._copy_stream)
            self.table.record_stream(self._copy_stream)
            cuda_device = device.index
            torch.cuda.synchronize(device)  # the zeroed table is visible to every stream
        self._core = _core.AdapterCache(
            spec,
            _DTYPE_NAMES[dtype],
            int(host_cache_bytes),
            self.pool.data_ptr(),
            pool_bytes,
            self.table.data_ptr(),
            max_slots,
            page_bytes,
            cuda_device,
            self._copy_stream.cuda_stream if self._copy_stream is not None else 0,
            dora_allowed,
            None if served is None else [(int(m), int(layer)) for m, layer in served],
        )

    @staticmethod
    def _pool_bytes(device: torch.device, host_cache_bytes, device_cache_bytes, device_cache_fraction) -> int:
        if device_cache_fraction is not None:
            if isinstance(device_cache_fraction, bool) or not isinstance(device_cache_fraction, numbers.Real):
                raise TypeError(f"device_cache_fraction must be a number in (0, 1], got {device_cache_fraction!r}")
            if not 0.0 < float(device_cache_fraction) <= 1.0:
                raise ValueError(f"device_cache_fraction must be in (0, 1], got {device_cache_fraction}")
        if device.type == "cpu":
            # No GPU memory to take a share of: a host pool is sized like the host tier, or a
            # fraction of it, so the same call works for CPU and GPU models.
            if device_cache_bytes is not None:
                return int(device_cache_bytes)
            return int(host_cache_bytes * (1.0 if device_cache_fraction is None else float(device_cache_fraction)))
        free, total = torch.cuda.mem_get_info(device)
        if device_cache_bytes is None:
            return int(free * (0.1 if device_cache_fraction is None else float(device_cache_fraction)))
        if device_cache_bytes > free:
            raise LoraCudaError(
                f"device_cache_bytes={device_cache_bytes} is more than the {free} bytes free on {device} "
                f"(GPU total {total} bytes); give a smaller pool or device_cache_fraction"
            )
        return int(device_cache_bytes)

    @staticmethod
    def host_pool_bytes(host_cache_bytes: int, page_bytes: int = 64 << 10) -> int:
        """Host bytes the constructor allocates (pins, with a CUDA device) for a ``host_cache_bytes`` tier."""
        return _core.AdapterCache.host_pool_bytes(int(host_cache_bytes), int(page_bytes))

    # --- adapters -------------------------------------------------------------------------------

    def put(self, task_id: int, weights, config, replace: bool = False) -> str:
        """Caches an adapter (validated and packed once into ``dtype``). Putting the same weights
        again is a no-op ("cached"); different weights raise LoraTaskConflictError unless
        ``replace=True`` ("replaced"). Returns "inserted", "cached" or "replaced". The GIL is released
        meanwhile; the checks, digest and packing run on every core (one pass over the weights)."""
        task_id = _task_id(task_id)
        return self._core.put(task_id, adapter_input(_as_numpy(weights), _as_numpy(config)), bool(replace))

    def remove(self, task_id: int) -> None:
        """Drops an adapter from both tiers (a server's unload): its host bytes, device pages and
        slot are freed. Raises LoraNotCachedError for an id that is not cached and LoraCacheError
        while an in-flight batch holds it; either way the cache is left as it was."""
        self._core.remove(_task_id(task_id))

    def __contains__(self, task_id) -> bool:
        try:
            return self._core.contains(_task_id(task_id))
        except (TypeError, ValueError):
            return False

    def __len__(self) -> int:
        return len(self._core)

    def task_ids(self) -> List[int]:
        """Cached task ids, most recently used first."""
        return self._core.task_ids()

    # --- batches --------------------------------------------------------------------------------

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def acquire(self, task_ids: Iterable[int]) -> AcquiredBatch:
        """Makes the adapters resident and pins them until ``release``; the current CUDA stream
        waits for their copies. The same id always gets the same slot within a batch."""
        ids = [_task_id(t) for t in task_ids]
        batch_id, slots = self._core.acquire(ids, self._stream())
        return AcquiredBatch(self, batch_id, ids, slots)

    def release(self, batch: AcquiredBatch) -> None:
        """Unpins a batch; its pages are reused only after work already queued on the current
        stream has finished with them."""
        if not isinstance(batch, AcquiredBatch) or batch._cache is not self:
            raise ValueError(f"release takes a batch acquired from this cache, got {batch!r}")
        self._core.release(batch.batch_id, self._stream())
        batch.released = True

    def prefetch(self, task_ids: Iterable[int]) -> None:
        """Starts loading adapters into the device tier without pinning them."""
        self._core.prefetch([_task_id(t) for t in task_ids])

    def synchronize(self) -> None:
        """Blocks until every issued load has landed in the pool."""
        self._core.synchronize()

    # --- inspection -----------------------------------------------------------------------------

    @property
    def pool_version(self) -> int:
        """Changes whenever adapter data is written into the device pool (it counts the loads), so
        what a caller derived from the pool stays valid while it is unchanged."""
        return self._core.stats()["loads"]

    def stats(self) -> Dict[str, Union[int, float]]:
        """hits, misses, evictions, bytes/counts per tier, pinned vs pageable, load GB/s, fragmentation;
        the host pool: ``host_pool_bytes`` (allocated; ``host_pool_pinned_bytes`` of them pinned), ``host_spare_bytes`` (free), ``host_pool_grows``
        (chunks added after construction: only concurrent puts can cause one), ``host_compactions``,
        ``host_fragmentation`` (share of free bytes outside the largest free run), ``host_pool_alloc_seconds``."""
        return self._core.stats()

    def slot_of(self, task_id: int) -> Optional[int]:
        return self._core.slot_of(_task_id(task_id))

    def resident_ids(self) -> List[int]:
        """Task ids on the device tier, most recently used first."""
        return self._core.resident_ids()

    def pinned_ids(self) -> List[int]:
        return self._core.pinned_ids()

    def check_invariants(self) -> None:
        """Raises LoraCacheError if any structural invariant of the cache is broken."""
        broken = self._core.check_invariants()
        if broken is not None:
            raise LoraCacheError(f"cache invariant broken: {broken}")

    def segments(self, task_id: int, slot: int) -> List[dict]:
        """Per module-layer of a resident adapter: the table entry and the host image's bytes
        (``a``, ``b``, ``scale``) that the pool must hold there."""
        image = self._core.host_image(_task_id(task_id))
        if image is None:
            raise LoraCacheError(f"task_id {task_id} is not cached")
        data, segs = image
        es = torch.tensor([], dtype=self.dtype).element_size()
        table = self.table.cpu()
        out = []
        for module_id, layer, rank, off, b_off, s_off in segs:
            hi, ho = self.spec.module_dims(module_id)
            entry = table[slot, layer, module_id].tolist()
            seg = {"module_id": module_id, "layer": layer, "rank": rank, "entry": entry}
            seg["a"] = data[off : off + rank * hi * es]
            seg["b"] = data[off + b_off : off + b_off + ho * rank * es]
            seg["scale"] = data[off + s_off : off + s_off + ho * es] if s_off >= 0 else b""
            out.append(seg)
        return out

    def __repr__(self) -> str:
        return (
            f"LoraCache(dtype={self.dtype}, device={self.device}, adapters={len(self)}, "
            f"pool_bytes={self.pool.numel()}, max_slots={self.max_slots}, page_bytes={self.page_bytes})"
        )


__all__ = ["LoraCache", "AcquiredBatch"]
