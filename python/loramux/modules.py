"""The 19 LoRA module ids of the TensorRT-LLM contract (defined in rust/src/modules.rs)."""

from __future__ import annotations

from typing import Dict, List

import loramux._core as _core

_TABLE = _core.module_table()

#: module name -> module id, e.g. ``MODULE_IDS["attn_q"] == 1``
MODULE_IDS: Dict[str, int] = {name: mid for mid, name, _ in _TABLE}
#: module id -> module name
MODULE_NAMES: Dict[int, str] = {mid: name for mid, name, _ in _TABLE}
#: module ids whose base layer is row-parallel (A is split by tensor parallelism)
ROW_PARALLEL: frozenset = frozenset(mid for mid, _, kind in _TABLE if kind == "row")
#: module ids whose base layer is column-parallel (B is split by tensor parallelism)
COLUMN_PARALLEL: frozenset = frozenset(mid for mid, _, kind in _TABLE if kind == "column")
NUM_MODULES = len(_TABLE)


def module_id(name: str) -> int:
    """Module id of a TensorRT-LLM module name; LoraFormatError for an unknown name."""
    return _core.module_id(name)


def module_names() -> List[str]:
    return [MODULE_NAMES[i] for i in range(NUM_MODULES)]
