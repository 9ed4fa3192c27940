"""The LoRA tensor format on numpy arrays: validation and row layouts (logic in rust/src/format.rs).

``config`` is int ``[N, 3]`` (module_id, layer_idx, rank) or ``[N, 4]`` (+ is_dora); ``weights`` is
``[N, W]`` (or ``[1, N, W]``) float16 / bfloat16 / float32, row i = A_i (D x Hi), B_i (Ho x D), then
Ho DoRA scales, then padding.
"""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import numpy as np

from loramux import _core
from loramux._core import ModelSpec
from loramux.errors import LoraFormatError

WEIGHT_DTYPES = ("float16", "bfloat16", "float32")


class RowLayout(NamedTuple):
    module_id: int
    layer: int
    rank: int
    hi: int
    ho: int
    is_dora: bool

    @property
    def a_slice(self) -> slice:
        return slice(0, self.rank * self.hi)

    @property
    def b_slice(self) -> slice:
        start = self.rank * self.hi
        return slice(start, start + self.ho * self.rank)

    @property
    def scale_slice(self) -> slice:
        start = self.rank * self.hi + self.ho * self.rank
        return slice(start, start + (self.ho if self.is_dora else 0))

    @property
    def needed(self) -> int:
        return self.scale_slice.stop


def weights_dtype_name(weights: np.ndarray) -> str:
    """float16 / bfloat16 / float32; bfloat16 is ml_dtypes' dtype or a uint16 bit view."""
    dt = weights.dtype
    if dt == np.float16:
        return "float16"
    if dt == np.float32:
        return "float32"
    if dt == np.uint16 or dt.name == "bfloat16":
        return "bfloat16"
    raise LoraFormatError(f"weights has dtype {dt}, expected float16, bfloat16 (ml_dtypes or uint16 view) or float32")


def raw_weights(weights) -> Tuple[np.ndarray, str, List[int]]:
    """(flat uint8 view, dtype name, shape) of a weights array; copies only if not C-contiguous."""
    if not isinstance(weights, np.ndarray):
        raise LoraFormatError(f"weights must be a numpy array, got {type(weights).__name__}")
    dtype = weights_dtype_name(weights)
    arr = np.ascontiguousarray(weights)
    return arr.reshape(-1).view(np.uint8), dtype, list(arr.shape)


def raw_config(config) -> Tuple[np.ndarray, List[int]]:
    """(flat int64 values, shape) of a config array; int32/int64 accepted."""
    arr = np.asarray(config)
    if arr.dtype.kind not in "iu":
        raise LoraFormatError(f"config has dtype {arr.dtype}, expected int32 or int64")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1), list(arr.shape)


def validate(weights, config, spec: ModelSpec, *, dora_allowed: bool = True, check_finite: bool = True) -> List[RowLayout]:
    """Checks (weights, config) against the model; returns one RowLayout per row.

    Raises LoraFormatError (a ValueError) naming the row and field at fault.
    """
    raw, dtype, wshape = raw_weights(weights)
    cvals, cshape = raw_config(config)
    rows = _core.validate(raw, dtype, wshape, cvals, cshape, spec, dora_allowed, check_finite)
    return [RowLayout(*r) for r in rows]


def row_width(rows: List[RowLayout]) -> int:
    """The narrowest W that holds every row."""
    return max((r.needed for r in rows), default=0)


__all__ = ["ModelSpec", "RowLayout", "validate", "raw_weights", "raw_config", "row_width", "weights_dtype_name", "WEIGHT_DTYPES"]
