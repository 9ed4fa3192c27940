"""Test and benchmark fixtures for the CUDA kernels: a device pool holding adapters at 16-byte
aligned addresses and the slot table pointing at them, built by hand the way the cache lays them
out (docs/internals.md), plus a float64 per-token oracle computed from the original weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from loramux.ops import BatchMeta


@dataclass
class Entry:
    a: torch.Tensor  # [rank, Hi] float64 (values as rounded to the serving dtype)
    b: torch.Tensor  # [Ho, rank]
    scale: Optional[torch.Tensor]  # [Ho] or None


@dataclass
class Adapters:
    pool: torch.Tensor
    table: torch.Tensor
    dtype: torch.dtype
    max_rank: int
    entries: Dict[Tuple[int, int, int], Entry] = field(default_factory=dict)

    def meta(self, slot_of_token: torch.Tensor) -> BatchMeta:
        return BatchMeta(table=self.table, pool=self.pool, dtype=self.dtype,
                         slot_of_token=slot_of_token, max_rank=self.max_rank)


def _align(n: int) -> int:
    return (n + 15) // 16 * 16


def build_adapters(
    specs: Dict[Tuple[int, int, int], Tuple[int, int, int, bool]],
    *, num_slots: int, num_layers: int, max_rank: int, dtype: torch.dtype, device, gen: torch.Generator,
    b_std: float = 1.0,
) -> Adapters:
    """specs: (slot, layer, module_id) -> (rank, Hi, Ho, is_dora). Unused pool bytes are 0xFF (NaN
    in both 16-bit float types), so a read outside an adapter's segment poisons the result."""
    esize = torch.empty((), dtype=dtype).element_size()
    layout, total = [], 0
    for key, (rank, hi, ho, dora) in specs.items():
        a_off = total
        b_off = _align(a_off + rank * hi * esize)
        s_off = _align(b_off + ho * rank * esize)
        total = _align(s_off + (ho * esize if dora else 0)) + 16
        layout.append((key, rank, hi, ho, dora, a_off, b_off, s_off))
    pool = torch.full((max(total, 16),), 0xFF, dtype=torch.uint8, device=device)
    table = torch.zeros((num_slots, num_layers, 19, 4), dtype=torch.int64)
    ad = Adapters(pool=pool, table=table, dtype=dtype, max_rank=max_rank)
    base = pool.data_ptr()
    for key, rank, hi, ho, dora, a_off, b_off, s_off in layout:
        a = (torch.randn(rank, hi, generator=gen, dtype=torch.float64) / hi ** 0.5).to(dtype)
        b = (torch.randn(ho, rank, generator=gen, dtype=torch.float64) * b_std / rank ** 0.5).to(dtype)
        pool[a_off:a_off + a.numel() * esize] = a.reshape(-1).view(torch.uint8).to(device)
        pool[b_off:b_off + b.numel() * esize] = b.reshape(-1).view(torch.uint8).to(device)
        scale = None
        if dora:
            scale = (0.5 + torch.rand(ho, generator=gen, dtype=torch.float64)).to(dtype)
            pool[s_off:s_off + ho * esize] = scale.view(torch.uint8).to(device)
        slot, layer, mid = key
        table[slot, layer, mid] = torch.tensor([base + a_off, base + b_off, base + s_off if dora else 0, rank])
        ad.entries[key] = Entry(a.double(), b.double(), None if scale is None else scale.double())
    ad.table = table.to(device)
    return ad


def _tokens_by_slot(slots: Sequence[int]) -> Dict[int, torch.Tensor]:
    """slot -> the indices of its tokens (no-adapter tokens left out)."""
    by_slot: Dict[int, list] = {}
    for t, slot in enumerate(slots):
        if slot >= 0:
            by_slot.setdefault(int(slot), []).append(t)
    return {slot: torch.tensor(idx) for slot, idx in by_slot.items()}


# The oracles take each slot's tokens in one float64 matmul: token by token they made thousands of
# tiny CPU ops, which took a minute for 8192 tokens on the device host with test files in parallel.
def oracle_u(ad: Adapters, x: torch.Tensor, slots: Sequence[int], layer: int, module_ids: Sequence[int]) -> torch.Tensor:
    """float64 [S, T, max_rank]: u[s, t, :rank] = A x[t] for each token's adapter, 0 elsewhere."""
    xd = x.double().cpu()
    u = torch.zeros(len(module_ids), x.shape[0], ad.max_rank, dtype=torch.float64)
    for slot, idx in _tokens_by_slot(slots).items():
        for s, mid in enumerate(module_ids):
            e = ad.entries.get((slot, layer, mid))
            if e is not None:
                u[s, idx, : e.a.shape[0]] = xd[idx] @ e.a.T
    return u


def oracle_apply(ad: Adapters, x, y, slots, layer, module_ids, out_sizes) -> torch.Tensor:
    """float64 y after lora_apply: y[t, slice s] += B u[s, t] (times the DoRA scale where there is one)."""
    u = oracle_u(ad, x, slots, layer, module_ids)
    out = y.double().cpu().clone()
    for slot, idx in _tokens_by_slot(slots).items():
        c0 = 0
        for s, (mid, ho) in enumerate(zip(module_ids, out_sizes)):
            e = ad.entries.get((slot, layer, mid))
            if e is not None:
                r = e.a.shape[0]
                cur = out[idx, c0:c0 + ho] + u[s, idx, :r] @ e.b.T
                out[idx, c0:c0 + ho] = cur * e.scale if e.scale is not None else cur
            c0 += ho
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    """||got - want|| / ||want - base||: the error relative to the LoRA term itself."""
    g, w, b = got.double().cpu(), want.double().cpu(), base.double().cpu()
    return float((g - w).norm() / (w - b).norm().clamp_min(1e-30))


def captured(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of step(): run once on a side stream first (kernel compile and load, allocator
    warm-up, off the capture stream as torch asks), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
