"""The LoRA tensor format on numpy arrays: validation and row layouts (logic in rust/src/format.rs).

``config`` is int ``[N, 3]`` (module_id, layer_idx, rank) or ``[N, 4]`` (+ is_dora); ``weights`` is
``[N, W]`` (or ``[1, N, W]``) float16 / bfloat16 / float32, row i = A_i (D x Hi), B_i (Ho x D), then
Ho DoRA scales, then padding.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Type

import numpy as np

import loramux._core as _core
from loramux._core import ModelSpec
from loramux.errors import LoraFormatError
from loramux.layout import DTYPES

#: the dtypes a weights array may have (names as numpy and torch spell them)
WEIGHT_DTYPES = DTYPES


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
    try:
        arr = np.ascontiguousarray(weights)
    except MemoryError:  # a strided view (e.g. broadcast) far larger than the memory behind it
        raise LoraFormatError(f"weights {list(weights.shape)} {dtype} are not contiguous, and their "
                              f"{weights.size * weights.itemsize} bytes do not fit in memory to copy") from None
    return arr.reshape(-1).view(np.uint8), dtype, list(arr.shape)


def raw_config(config) -> Tuple[np.ndarray, List[int]]:
    """(flat int64 values, shape) of a config array; int32/int64 accepted."""
    arr = np.asarray(config)
    if arr.dtype.kind not in "iu":
        raise LoraFormatError(f"config has dtype {arr.dtype}, expected int32 or int64")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise LoraFormatError(f"config value {int(arr.max())} is out of range (the cast to int64 would wrap it)")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1), list(arr.shape)


#: (flat uint8 weights, dtype name, weights shape, flat int64 config, config shape)
AdapterInput = Tuple[np.ndarray, str, List[int], np.ndarray, List[int]]


def adapter_input(weights, config) -> AdapterInput:
    """An adapter as every binding of the core takes it (rust/src/bindings/adapter.rs): raw views
    of weights and config, copied only when not C-contiguous (or config not int64)."""
    raw, dtype, wshape = raw_weights(weights)
    cvals, cshape = raw_config(config)
    return raw, dtype, wshape, cvals, cshape


def validate(weights, config, spec: ModelSpec, *, dora_allowed: bool = True, check_finite: bool = True) -> List[RowLayout]:
    """Checks (weights, config) against the model; returns one RowLayout per row.

    Raises LoraFormatError (a ValueError) naming the row and field at fault.
    """
    rows = _core.validate(adapter_input(weights, config), spec, dora_allowed, check_finite)
    return [RowLayout(*r) for r in rows]


def row_width(rows: List[RowLayout]) -> int:
    """The narrowest W that holds every row."""
    return max((r.needed for r in rows), default=0)


# --- building and reading the arrays row by row -------------------------------------------------


class AdapterRow(NamedTuple):
    """One module-layer of an adapter as float32 arrays: A [rank, Hi], B [Ho, rank] (scaling folded
    in), and the normalized DoRA scales [Ho] or None."""

    module_id: int
    layer: int
    a: np.ndarray
    b: np.ndarray
    dora_scale: Optional[np.ndarray] = None


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def to_float32(weights: np.ndarray) -> np.ndarray:
    """Weights of any format dtype as float32 (a uint16 array is read as bfloat16 bits)."""
    name = weights_dtype_name(weights)
    if name == "bfloat16":
        return (np.ascontiguousarray(weights).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return weights.astype(np.float32)


def _row_values(rows: Sequence[AdapterRow]) -> np.ndarray:
    """float32 [N, W]: each row's A, B and DoRA scales, flattened, then zeros up to the longest."""
    lengths = [r.a.size + r.b.size + (0 if r.dora_scale is None else r.dora_scale.size) for r in rows]
    values = np.zeros((len(rows), max(lengths, default=0)), dtype=np.float32)
    for i, r in enumerate(rows):
        if np.ndim(r.a) != 2 or np.ndim(r.b) != 2 or r.b.shape[1] != r.a.shape[0]:
            raise LoraFormatError(f"row {i}: A {np.shape(r.a)} and B {np.shape(r.b)} are not [rank, Hi] and [Ho, rank]", row=i)
        if r.dora_scale is not None and np.size(r.dora_scale) != r.b.shape[0]:
            raise LoraFormatError(f"row {i}: {np.size(r.dora_scale)} DoRA scales for B with Ho = {r.b.shape[0]} rows", row=i)
        if r.layer < 0:
            raise LoraFormatError(f"row {i}: layer {r.layer} is negative", row=i)
        parts = [r.a.reshape(-1), r.b.reshape(-1)] + ([] if r.dora_scale is None else [r.dora_scale.reshape(-1)])
        values[i, : lengths[i]] = np.concatenate(parts)
    return values


#: the largest finite value of each half-precision storage type, for messages (the bound a value
#: is checked against is the core's: rust/src/format_scan.rs)
_LARGEST = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


class StorageFault(NamedTuple):
    """A value `from_rows` cannot store: NaN / Inf, or beyond the storage type's range (numpy
    would store it as inf with only a warning). `factor` is lora_A, lora_B or DoRA scale."""

    row: int
    module_id: int
    layer: int
    factor: str
    value: float
    storage_type: str

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def detail(self) -> str:
        """What is wrong with the value, without the row that holds it."""
        if not self.finite:
            return f"{self.factor} holds {self.value:g}, not finite (storage type {self.storage_type} needs finite values)"
        wider = "bfloat16 or float32" if self.storage_type == "float16" else "float32"
        return (f"{self.factor} holds {self.value:g}, too large for storage type {self.storage_type} "
                f"(largest {_LARGEST[self.storage_type]:g}); use {wider}")

    def __str__(self) -> str:
        return f"row {self.row} ({_core.module_name(self.module_id)} layer {self.layer}): {self.detail()}"


def _first_fault(values: np.ndarray, rows: Sequence[AdapterRow], storage_type: str) -> Optional[StorageFault]:
    """The core's check (rust/src/format.rs check_storable) of `values`, `_row_values(rows)`."""
    shapes = [(r.module_id, r.layer, r.a.shape[0], r.a.shape[1], r.b.shape[0], r.dora_scale is not None) for r in rows]
    found = _core.first_unstorable(raw_weights(values), shapes, storage_type)
    if found is None:
        return None
    i, column, value = found
    r = rows[i]
    factor = "lora_A" if column < r.a.size else "lora_B" if column < r.a.size + r.b.size else "DoRA scale"
    return StorageFault(i, r.module_id, r.layer, factor, value, storage_type)


def _check_storage_type(storage_type: str) -> None:
    if storage_type not in WEIGHT_DTYPES:
        raise ValueError(f"storage type {storage_type!r} is not one of {WEIGHT_DTYPES}")


def storage_fault(rows: Sequence[AdapterRow], storage_type: str) -> Optional[StorageFault]:
    """The first value of `rows` that `from_rows` would refuse to store as `storage_type` (NaN / Inf,
    or beyond its range), or None. DoRA scales are not checked for > 0 (`validate` does)."""
    _check_storage_type(storage_type)
    return _first_fault(_row_values(rows), rows, storage_type)


def from_rows(rows: Sequence[AdapterRow], storage_type: str = "float16") -> Tuple[np.ndarray, np.ndarray]:
    """(weights [N, W], config [N, 3|4] int32) from rows; W is the longest row, the rest is zero
    padding; config has the is_dora column only if some row is DoRA. bfloat16 is stored as its
    uint16 bit pattern (what np.save/np.load round-trip without pickle). A value the storage type
    cannot hold (NaN / Inf, or out of its range) raises LoraFormatError naming its row and factor."""
    _check_storage_type(storage_type)
    values = _row_values(rows)
    fault = _first_fault(values, rows, storage_type)
    if fault is not None:
        raise LoraFormatError(str(fault), row=fault.row)
    has_dora = any(r.dora_scale is not None for r in rows)
    config = np.zeros((len(rows), 4 if has_dora else 3), dtype=np.int32)
    for i, r in enumerate(rows):
        config[i, :3] = (r.module_id, r.layer, r.a.shape[0])
        if has_dora:
            config[i, 3] = int(r.dora_scale is not None)
    if storage_type == "float32":
        return values, config
    if storage_type == "float16":
        return values.astype(np.float16), config
    return _to_bf16_bits(values), config


def to_rows(weights, config, spec: ModelSpec) -> List[AdapterRow]:
    """Validates (weights, config) against `spec` and splits it into float32 AdapterRows."""
    layouts = validate(weights, config, spec)
    w = to_float32(np.asarray(weights).reshape(len(layouts), -1) if len(layouts) else np.asarray(weights))
    rows = []
    for i, r in enumerate(layouts):
        a = w[i, r.a_slice].reshape(r.rank, r.hi)
        b = w[i, r.b_slice].reshape(r.ho, r.rank)
        scale = w[i, r.scale_slice].copy() if r.is_dora else None
        rows.append(AdapterRow(r.module_id, r.layer, a.copy(), b.copy(), scale))
    return rows


# --- files: model.lora_weights.npy + model.lora_config.npy (TensorRT-LLM's names) ---------------

WEIGHTS_FILE = "model.lora_weights.npy"
CONFIG_FILE = "model.lora_config.npy"
#: Refuse files larger than this unless the caller raises it (an adapter is rarely above a few GiB).
DEFAULT_MAX_FILE_BYTES = 64 << 30


def read_json(path: str, error: Type[Exception] = LoraFormatError) -> Any:
    """The parsed JSON file at `path`; a file that is not JSON (or not UTF-8) raises `error` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise error(f"{path}: not a readable JSON file ({e})") from None


def save(out_dir: str, weights: np.ndarray, config: np.ndarray) -> None:
    """Writes model.lora_weights.npy and model.lora_config.npy into out_dir (created if needed)."""
    if weights_dtype_name(weights) == "bfloat16":
        weights = np.ascontiguousarray(weights).view(np.uint16)  # ml_dtypes' bfloat16 would save as opaque |V2
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, WEIGHTS_FILE), weights, allow_pickle=False)
    np.save(os.path.join(out_dir, CONFIG_FILE), np.asarray(config), allow_pickle=False)


@contextlib.contextmanager
def writing_to(path: str, what: str = ""):
    """An OSError while writing into `path` (a file in the way, no permission, a read-only or full
    disk) as a LoraFormatError naming the path; `what`: what is being written, for the message."""
    try:
        yield
    except OSError as e:
        raise LoraFormatError(f"{path}: cannot write {what + ' ' if what else ''}there ({e.strerror or e}"
                              f"{': ' + str(e.filename) if e.filename else ''})") from None


def _load_npy(path: str, max_bytes: int) -> np.ndarray:
    """np.load without pickle, after checking the header's shape against the file size and limit."""
    if not os.path.isfile(path):
        raise LoraFormatError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(f, max_header_size=1 << 16)
        except (ValueError, TypeError) as e:
            raise LoraFormatError(f"{path}: not a .npy file ({e})") from None
        if dtype.hasobject:
            raise LoraFormatError(f"{path}: holds Python objects; only numeric arrays are accepted")
        data_bytes = math.prod(shape) * dtype.itemsize  # Python ints: a crafted shape cannot wrap
        if data_bytes > max_bytes:
            raise LoraFormatError(f"{path}: {data_bytes} bytes is over the limit of {max_bytes} bytes")
        if f.tell() + data_bytes != size:
            raise LoraFormatError(f"{path}: header says {shape} {dtype} ({data_bytes} bytes) but the file holds {size - f.tell()}")
    return np.load(path, allow_pickle=False)


def load(out_dir: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Tuple[np.ndarray, np.ndarray]:
    """(weights, config) from a directory written by `save` or TensorRT-LLM's converter."""
    if not os.path.isdir(out_dir):
        raise LoraFormatError(f"{out_dir}: no such folder (it should hold {WEIGHTS_FILE} and {CONFIG_FILE})")
    if not os.path.isfile(os.path.join(out_dir, WEIGHTS_FILE)) and os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        raise LoraFormatError(f"{out_dir}: a PEFT adapter, not the TensorRT-LLM format ({WEIGHTS_FILE}, {CONFIG_FILE}); "
                              f"convert it first (`loramux convert -i {out_dir} -o OUT_DIR`, or loramux.convert.from_peft)")
    weights = _load_npy(os.path.join(out_dir, WEIGHTS_FILE), max_bytes)
    config = _load_npy(os.path.join(out_dir, CONFIG_FILE), max_bytes)
    return weights, config


__all__ = [
    "ModelSpec", "RowLayout", "AdapterRow", "validate", "adapter_input", "raw_weights", "raw_config", "row_width", "weights_dtype_name",
    "to_float32", "from_rows", "storage_fault", "StorageFault", "to_rows", "save", "load", "writing_to", "WEIGHT_DTYPES", "WEIGHTS_FILE", "CONFIG_FILE",
]
