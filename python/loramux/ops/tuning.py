"""The measured launch table: which expand kernel (or the fused decode kernel) and how many shrink
blocks a lora_apply launches for its (GPU arch, Hi -> output slices, rank bucket, token bucket), as
benchmarks/tune.py measured them on the device (launch_table.json, shipped in the package).
Geometries it holds no entry for, and other archs, keep the built-in rules of rust/src/cuda/plan.rs.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

__all__ = ["Choice", "TOKEN_BUCKETS", "RANK_BUCKETS", "FEW_ADAPTERS", "token_bucket", "rank_bucket", "adapter_bucket",
           "choice", "load_table", "TABLE_PATH"]

TABLE_PATH = pathlib.Path(__file__).with_name("launch_table.json")
#: a bucket holds the token counts above the previous bound up to its own; past the last: the last.
#: The bounds follow the kernels' paths: <= 64 may take the flat decode expand, <= 256 the
#: small-item kernels, above that the tensor-core tiles (rust/src/cuda/plan.rs); where a batch's
#: adapter count moves a 65..512-token batch to the other layout (small_items), it keeps its token
#: bucket's entry (what the same-run A/B of that rule measured).
TOKEN_BUCKETS = (1, 16, 64, 256, 512, 2048)
RANK_BUCKETS = (16, 32, 64, 128)
#: where the batch's adapter count is known (BatchMeta.adapters), an entry may hold for "one"
#: adapter, "few" (2 to FEW_ADAPTERS) or "many" only: measured on the H200 (docs/kernel-notes.md,
#: s15), the pipelined expand's 4-tile spans took 0.84-0.87x the time at 2048 tokens over 1-32
#: adapters and 1.10-1.13x over 128, so one entry for every count had to keep the slower choice for
#: few; and (s16) at 256 tokens 4-tile spans over 32 adapters' small items took 0.89x the time where
#: one adapter's 64-token tiles took 1.10x
FEW_ADAPTERS = 32
#: LORAMUX_TUNING=off ignores the table (the built-in rules decide): for A/B runs;
#: LORAMUX_TUNING_TABLE=path reads another table file instead of the shipped one (A/B of two sweeps)
_OFF = ("off", "0", "none")


class Choice(NamedTuple):
    shrink_target_blocks: Optional[int]
    expand_kernel: Optional[str]  # fused | fused3 | fuseds | fuseds4 | flat | o1 | o1w | o4 | c1 | c4 | p | p2 | p4 | p6 | p8 | p16 (rust/src/cuda/plan/tuning.rs ExpandKind)
    #: decode buckets: whether the split was sized from the step's item count on the device when
    #: the entry was timed (rust/src/cuda/plan/shrink.rs decode_split_from_device); None: the built-in rule
    decode_device_split: Optional[bool] = None


_DEFAULT = Choice(None, None, None)


def token_bucket(tokens: int) -> int:
    return next((b for b in TOKEN_BUCKETS if tokens <= b), TOKEN_BUCKETS[-1])


def rank_bucket(max_rank: int) -> int:
    return next((b for b in RANK_BUCKETS if max_rank <= b), RANK_BUCKETS[-1])


def adapter_bucket(adapters: Optional[int]) -> Optional[str]:
    """"one", "few" or "many" for a counted batch, None where the count is not known (a captured graph)."""
    if adapters is None:
        return None
    return "one" if adapters <= 1 else "few" if adapters <= FEW_ADAPTERS else "many"


Key = Tuple[int, int, Tuple[int, ...], int, int, Optional[str]]  # arch, hi, out sizes, rank, token, adapter buckets


def _key(arch: int, hi: int, out_sizes: Sequence[int], rank_b: int, token_b: int, adapter_b: Optional[str] = None) -> Key:
    return (int(arch), int(hi), tuple(int(o) for o in out_sizes), int(rank_b), int(token_b), adapter_b)


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> Dict[Key, Choice]:
    """{key: Choice} of a table file; an absent file is an empty table (built-in rules everywhere)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return {}
    table = {}
    for e in doc.get("entries", []):
        key = _key(e["arch"], e["hi"], e["out_sizes"], e["rank_bucket"], e["token_bucket"], e.get("adapter_bucket"))
        split = e.get("decode_device_split")
        table[key] = Choice(e.get("shrink_target_blocks"), e.get("expand_kernel"), None if split is None else bool(split))
    return table


def choice(arch: int, hi: int, out_sizes: Sequence[int], max_rank: int, tokens: int, adapters: Optional[int] = None) -> Choice:
    """The table's launch choice for this lora_apply: the entry for its adapter bucket where the count
    is known and the table has one, else the entry for any count; Choice(None, None, None) where it
    has none."""
    if os.environ.get("LORAMUX_TUNING", "").lower() in _OFF:
        return _DEFAULT
    table = load_table(os.environ.get("LORAMUX_TUNING_TABLE") or str(TABLE_PATH))
    key = _key(arch, hi, out_sizes, rank_bucket(max_rank), token_bucket(tokens))
    bucket = adapter_bucket(adapters)
    if bucket is not None:
        found = table.get(key[:-1] + (bucket,))
        if found is not None:
            return found
    return table.get(key, _DEFAULT)
