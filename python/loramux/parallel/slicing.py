"""Tensor- and pipeline-parallel LoRA: each rank's slice of a full adapter (logic in rust/src/tp.rs).

A request carries the full adapter; ``slice_adapter`` cuts what one rank of a (tp, pp) layout keeps.
Per-rank layout: ColumnLinear modules keep A whole and rank r's block of B's rows (and of the DoRA
scales); fused attn_qkv / mlp_gate_up split each part (q|k|v, gate|up) separately and keep
``q_r|k_r|v_r`` / ``gate_r|up_r``; RowLinear modules (attn_dense, mlp_4h_to_h, cross_attn_dense,
moe_4h_to_h) keep rank r's block of A's columns and B and the DoRA scales whole; the routers are
replicated. A pipeline stage keeps its layers' rows, renumbered from 0. Given the model's served
(module, layer) pairs, every rank refuses a row no layer applies, whichever stage holds its layer;
fused rows whose parts the model applies stay fused in the slice, for the rank's cache to split.
The torch.distributed forward for the Llama family lives in ``loramux.parallel.llama``.
"""

from __future__ import annotations

import numbers
from typing import Iterable, NamedTuple, Optional, Tuple

import numpy as np

import loramux._core as _core
from loramux._core import ModelSpec
from loramux.errors import LoraParallelError
from loramux.format import adapter_input


class RankAdapter(NamedTuple):
    """One rank's adapter: weights ``[N', W']`` (input dtype), config ``[N', 3|4]``, its ModelSpec."""

    weights: np.ndarray
    config: np.ndarray
    spec: ModelSpec


def _count(name: str, value) -> int:
    """A size or index as a non-negative int (the core takes unsigned ints: say so, typed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise LoraParallelError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _layers(layers: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if layers is None:
        return None
    start, end = layers
    return (_count("layers start", start), _count("layers end", end))


def slice_adapter(weights, config, spec: ModelSpec, tp_size: int, tp_rank: int, layers: Optional[Tuple[int, int]] = None,
                  served: Optional[Iterable[Tuple[int, int]]] = None) -> RankAdapter:
    """Rank ``tp_rank`` of ``tp_size``'s slice of a full adapter, for the pipeline stage owning
    global layers ``[layers[0], layers[1])`` (all layers when None; rows renumbered from 0).

    ``served``: the (module_id, global layer) pairs the whole model applies (as ``LoraCache``'s
    ``served``, before any stage's renumbering). A row outside them raises LoraFormatError naming
    the caller's row on every rank, also where the row's layer belongs to another stage; a fused
    row whose parts are all served is kept fused (the rank's cache splits it). None checks no pair.

    Raises LoraFormatError for an invalid adapter, LoraParallelError (a ValueError) when a split
    size does not divide by tp_size (naming the row, module and dimension) or the layout (or a
    served pair) is bad.
    """
    adapter = adapter_input(weights, config)
    cshape = adapter[4]
    pairs = None if served is None else [(int(m), int(layer)) for m, layer in served]
    data, rows, width, flat_config, rank_spec_ = _core.tp_slice_adapter(
        adapter, spec, _count("tp_size", tp_size), _count("tp_rank", tp_rank), _layers(layers), pairs
    )
    out_weights = data.view(np.asarray(weights).dtype).reshape(rows, width)
    out_config = np.asarray(flat_config, dtype=np.int64).reshape(rows, 4)
    if cshape[-1] == 3:  # keep the caller's config shape: [N, 3] means no DoRA
        out_config = out_config[:, :3].copy()
    return RankAdapter(out_weights, out_config, rank_spec_)


def rank_spec(spec: ModelSpec, tp_size: int, layers: Optional[Tuple[int, int]] = None) -> ModelSpec:
    """The ModelSpec of one rank's shard: heads and FFN widths divided by tp_size, the stage's layers."""
    return _core.tp_rank_spec(spec, _count("tp_size", tp_size), _layers(layers))


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> Tuple[int, int]:
    """Global layers ``[start, end)`` of pipeline stage ``pp_rank``: contiguous, earlier stages take
    the remainder one layer each."""
    if not 0 <= pp_rank < pp_size or pp_size > num_layers:
        raise LoraParallelError(f"pipeline stage {pp_rank} of {pp_size} over {num_layers} layers is not a valid layout")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


__all__ = ["RankAdapter", "slice_adapter", "rank_spec", "stage_layers"]
