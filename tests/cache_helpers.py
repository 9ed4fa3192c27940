"""Shared by the cache tests: a tiny model spec, adapters built from a random seed, and what each costs."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

import loramux

# hidden 32, q 32, kv 16, ffn 48: every shape below is a few 256-byte pages
SPEC = loramux.ModelSpec(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_size=48, max_rank=8)
PAGE = 256

# (module_id, layer, rank, is_dora) rows; mixed modules, ranks and DoRA
SHAPES: List[List[Tuple[int, int, int, int]]] = [
    [(1, 0, 1, 0), (1, 1, 1, 0)],  # attn_q r1 on both layers: 2 pages
    [(1, 0, 8, 0), (3, 0, 2, 0), (1, 1, 8, 0), (3, 1, 2, 0)],  # q r8 + v r2: 10 pages
    [(6, 0, 4, 0)],  # mlp_4h_to_h r4 on layer 0: 3 pages
    [(2, 1, 3, 1)],  # attn_k r3 with DoRA scales on layer 1: 2 pages
    [(18, 0, 8, 0), (18, 1, 8, 0), (1, 0, 1, 0), (1, 1, 1, 0)],  # gate_up r8 + q r1: 18 pages
]


def make_adapter(seed: int, rows: Sequence[Tuple[int, int, int, int]], dtype=np.float32, spec=SPEC):
    """(weights [N, W], config [N, 4]) with values from `seed`; DoRA scales positive."""
    rng = np.random.default_rng(seed)
    dims = [spec.module_dims(m) for m, _, _, _ in rows]
    needed = [r * hi + ho * r + (ho if d else 0) for (_, _, r, d), (hi, ho) in zip(rows, dims)]
    width = max(needed) + 3  # some padding
    weights = rng.uniform(-1, 1, size=(len(rows), width)).astype(np.float32)
    for i, ((_, _, r, d), (hi, ho)) in enumerate(zip(rows, dims)):
        if d:
            weights[i, r * hi + ho * r : r * hi + ho * r + ho] = rng.uniform(0.5, 2.0, size=ho)
    return weights.astype(dtype), np.array(rows, dtype=np.int64)


def segment_pages(rows, elem_bytes: int = 2, page: int = PAGE, spec=SPEC) -> List[int]:
    """Pages per module-layer segment: A, B, scales each padded to 16 bytes, rounded up to pages."""
    align = lambda n: -(-n // 16) * 16  # noqa: E731
    out = []
    for m, _, r, d in rows:
        hi, ho = spec.module_dims(m)
        used = align(r * hi * elem_bytes) + align(ho * r * elem_bytes) + (align(ho * elem_bytes) if d else 0)
        out.append(max(1, math.ceil(used / page)))
    return out


def pool_view(cache, addr: int, nbytes: int) -> np.ndarray:
    """Bytes of a CPU pool at an absolute address taken from the slot table."""
    off = addr - cache.pool.data_ptr()
    assert 0 <= off and off + nbytes <= cache.pool.numel(), "table address outside the pool"
    return cache.pool[off : off + nbytes].numpy()
