"""The memory layouts Python shares with the Rust core and the CUDA kernels: the slot table's entry
and the dtype table, read from loramux._core so each is defined once (rust/src/cache/slot_table.rs,
rust/src/format.rs); cuda/lora_common.cuh is checked against the same core by tests/test_kernel_abi.py.
"""

from __future__ import annotations

from typing import Dict, Tuple

import loramux._core as _core
from loramux.modules import NUM_MODULES

#: names of the int64 words of one slot-table entry ``table[slot, layer, module_id]``, in order
ENTRY_FIELDS: Tuple[str, ...] = tuple(_core.SLOT_ENTRY_FIELDS)
ENTRY_WORDS = len(ENTRY_FIELDS)
#: index of each word in an entry
A_ADDR, B_ADDR, SCALE_ADDR, RANK = (ENTRY_FIELDS.index(f) for f in ("a_addr", "b_addr", "scale_addr", "rank"))

_DTYPE_TABLE = _core.dtype_table()
#: every dtype adapters arrive and are served in (torch's and numpy's names)
DTYPES: Tuple[str, ...] = tuple(name for name, _, _ in _DTYPE_TABLE)
#: bytes per element of each dtype
ITEMSIZE: Dict[str, int] = {name: size for name, size, _ in _DTYPE_TABLE}
#: the dtypes the CUDA kernels take (the others are served by the torch reference)
KERNEL_DTYPES: Tuple[str, ...] = tuple(name for name, _, kernels in _DTYPE_TABLE if kernels)


def table_shape(max_slots: int, num_layers: int) -> Tuple[int, int, int, int]:
    """Shape of the int64 slot table: ``[max_slots, num_layers, NUM_MODULES, ENTRY_WORDS]``."""
    return (max_slots, num_layers, NUM_MODULES, ENTRY_WORDS)


__all__ = ["ENTRY_FIELDS", "ENTRY_WORDS", "A_ADDR", "B_ADDR", "SCALE_ADDR", "RANK", "DTYPES", "ITEMSIZE", "KERNEL_DTYPES", "table_shape"]
