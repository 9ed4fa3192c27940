"""The Executor's KV cache: one row per running request in per-layer key/value buffers
[rows, kv_heads, capacity, head_dim], under a byte budget, and the views an HF decoder's
attention layers write into and read from during one forward (prompt chunks of several requests
packed into one sequence, or a decode step of one token per row).

Each request keeps its own row with its positions 0..n-1 (no padding inside a row), so position ids
stay natural; a decode step attends over the first L positions of rows 0..b-1 with a mask that
hides every position past a row's own length. Running requests always occupy rows 0..n-1 (a row
freed in the middle takes the last row's contents), so a step's keys are a view, never a gather.
On CUDA the buffers are allocated once at full size (captured CUDA graphs keep their addresses);
on the CPU they grow within the budget as requests need them (every row at once where the budget
allows, the length doubling; laid out anew for just the rows in use when a longer request needs
it), from memory that costs nothing until a position is written.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch


def kv_layout(config):
    """(layers, kv heads, head dim) of an HF decoder config."""
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers, heads, head_dim


class RowKVCache:
    """Key/value rows for up to `max_rows` requests of up to `max_seq_len` tokens each, within
    `budget_bytes` (rows x capacity x bytes per token)."""

    def __init__(self, config, dtype: torch.dtype, device: torch.device, max_rows: int, budget_bytes: int,
                 max_seq_len: int, grow: bool):
        self.layers, self.heads, self.head_dim = kv_layout(config)
        self.dtype, self.device = dtype, device
        self.bytes_per_token = 2 * self.layers * self.heads * self.head_dim * torch.tensor([], dtype=dtype).element_size()
        self.max_rows = max_rows
        self.budget_bytes = int(budget_bytes)
        # the longest row the budget allows with every row in use (CUDA) or with one row (CPU)
        per_row = self.budget_bytes // self.bytes_per_token // (1 if grow else max_rows)
        self.max_seq_len = min(max_seq_len, per_row)
        if self.max_seq_len < 2:
            raise ValueError(f"kv_cache_bytes={budget_bytes} holds {per_row} tokens per row "
                             f"({self.bytes_per_token} bytes per token, {max_rows if not grow else 1} row(s)): too small")
        self.grow = grow
        self.rows_alloc, self.capacity = (0, 0) if grow else (max_rows, self.max_seq_len)
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        self._allocate(self.rows_alloc, self.capacity)

    # --- memory --------------------------------------------------------------------------------------
    @property
    def bytes_allocated(self) -> int:
        return self.rows_alloc * self.capacity * self.bytes_per_token

    def never_fits(self, length: int) -> Optional[str]:
        """Why a request of `length` tokens (prompt + max_new_tokens) could never be held, or None."""
        if length > self.max_seq_len:
            split = "" if self.grow else f", split over {self.max_rows} rows"
            return (f"need {length} KV positions, more than the {self.max_seq_len} one request can hold "
                    f"(kv_cache_bytes={self.budget_bytes}{split}, {self.bytes_per_token} bytes per token)")
        return None

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` rows of `length` positions fit now: `rows` is every row in use (rows
        0..rows-1) and `length` the longest any of them needs. On the CPU that is a question of the
        budget alone (reserve() re-lays the buffers, for fewer rows if need be); on CUDA of the
        buffers allocated at full size."""
        if rows > self.max_rows or length > self.max_seq_len:
            return False
        if rows <= self.rows_alloc and length <= self.capacity:
            return True
        if not self.grow:
            return False
        return rows * length * self.bytes_per_token <= self.budget_bytes

    def reserve(self, rows: int, length: int) -> None:
        """Lays the buffers out (CPU) to hold `rows` rows of `length` positions, keeping rows 0..rows-1
        (the rows in use, none longer than `length`); the caller checked fits()."""
        if rows <= self.rows_alloc and length <= self.capacity:
            return
        per_token = self.bytes_per_token
        want_rows, want_len = max(rows, self.rows_alloc), max(length, self.capacity)
        if want_rows * want_len * per_token > self.budget_bytes:
            # laid out for more rows (or longer ones) than are in use now: only these rows, this long
            want_rows, want_len = rows, length
        # A reservation costs only the pages later written (_zeroed), while each regrowth copies every
        # row: reserve generously within the budget (every row where it allows, twice the length).
        grown_rows = self.max_rows if self.max_rows * want_len * per_token <= self.budget_bytes else want_rows
        grown_len = min(self.max_seq_len, max(want_len, 2 * self.capacity), self.budget_bytes // (grown_rows * per_token))
        old_k, old_v = self.keys, self.values
        keep_rows, keep_len = min(self.rows_alloc, grown_rows), min(self.capacity, grown_len)
        self._allocate(grown_rows, grown_len)
        for new, old in zip(self.keys + self.values, old_k + old_v):
            new[:keep_rows, :, :keep_len] = old[:keep_rows, :, :keep_len]

    def _allocate(self, rows: int, capacity: int) -> None:
        # zeros, not empty: a masked position still enters attention as (weight 0) x value, and
        # uninitialized memory may hold NaN
        shape = (rows, self.heads, capacity, self.head_dim)
        self.keys = [self._zeroed(shape) for _ in range(self.layers)]
        self.values = [self._zeroed(shape) for _ in range(self.layers)]
        self.rows_alloc, self.capacity = rows, capacity

    def _zeroed(self, shape: Tuple[int, ...]) -> torch.Tensor:
        if self.device.type != "cpu" or 0 in shape:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        # calloc (numpy's zeros) takes large blocks fresh from the OS, already zero: no page is
        # touched until written, where torch.zeros writes every byte of a reservation up front
        # (8 s of a 60 s CPU serving run, measured with py-spy)
        nbytes = math.prod(shape) * self.dtype.itemsize
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(self.dtype).view(shape)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of row `src` into row `dst` (compaction)."""
        for buf in self.keys + self.values:
            buf[dst, :, :length] = buf[src, :, :length]

    def clear_row(self, row: int, length: int) -> None:
        """Zeros the first `length` positions of `row`. A later request in this row reads the positions
        past its own length under the mask, and a masked NaN or infinity still turns its attention
        NaN (the score q.k is NaN before the mask is added): a failed request's row may hold them."""
        length = min(length, self.capacity)
        for buf in self.keys + self.values:
            buf[row, :, :length].zero_()

    # --- the views one forward uses --------------------------------------------------------------------
    def prefill_view(self, chunks: Sequence[Tuple[int, int, int]]) -> "PrefillView":
        """The view of one forward over prompt chunks [(row, start, length)]."""
        return PrefillView(self, chunks)

    def decode_view(self, positions: torch.Tensor, span: int) -> "DecodeView":
        return DecodeView(self, positions, span)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's lowest value elsewhere (eager and SDPA attention
    both add it to the scores; a finite value keeps a row with nothing allowed free of NaN)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low)


class PrefillView:
    """Prompt chunks of several requests packed into one forward: chunk c writes positions
    start_c..start_c+len_c-1 of its row. The chunks' tokens lie end to end in one sequence
    [1, T] (no padding, so no token the linears compute is wasted); attention reads each chunk's
    row prefix 0..start_c+len_c-1, the prefixes end to end [1, heads, S, head_dim], under a mask
    that lets a token see only its own chunk's prefix, causally. The index tensors are built once
    per forward, not once per layer."""

    def __init__(self, kv: RowKVCache, chunks: Sequence[Tuple[int, int, int]]):
        self.kv = kv
        self.chunks = [(int(r), int(s), int(n)) for r, s, n in chunks]
        device = kv.device
        rows = torch.tensor([r for r, _, _ in self.chunks], dtype=torch.long)
        starts = torch.tensor([s for _, s, _ in self.chunks], dtype=torch.long)
        lengths = torch.tensor([n for _, _, n in self.chunks], dtype=torch.long)
        ends = starts + lengths
        chunk_of_token = torch.repeat_interleave(torch.arange(len(self.chunks)), lengths)
        first_token = torch.cumsum(lengths, 0) - lengths
        token_pos = starts[chunk_of_token] + torch.arange(int(lengths.sum())) - first_token[chunk_of_token]
        chunk_of_key = torch.repeat_interleave(torch.arange(len(self.chunks)), ends)
        first_key = torch.cumsum(ends, 0) - ends
        key_pos = torch.arange(int(ends.sum())) - first_key[chunk_of_key]
        self.tokens = int(lengths.sum())
        # (query start, query end, key start, key end) of each chunk in the packed sequences
        self.blocks = list(zip(first_token.tolist(), (first_token + lengths).tolist(), first_key.tolist(),
                               (first_key + ends).tolist()))
        # the index vectors go to the device in one copy; the [T, S] mask is built there
        packed = torch.cat([first_token + lengths - 1, rows[chunk_of_token], token_pos, chunk_of_token,
                            rows[chunk_of_key], key_pos, chunk_of_key]).to(device, non_blocking=True)
        n, t, keys = len(self.chunks), self.tokens, int(ends.sum())
        self.last, self.token_row, self.token_pos, chunk_of_token, self.key_row, self.key_pos, chunk_of_key = \
            packed.split([n, t, t, t, keys, keys, keys])
        allowed = (chunk_of_token[:, None] == chunk_of_key[None, :]) & (self.key_pos[None, :] <= self.token_pos[:, None])
        self._mask = additive_mask(allowed, kv.dtype)[None, None]
        # one chunk: its row prefix is a slice of the buffers (a view, no gather)
        self._single = self.chunks[0] if len(self.chunks) == 1 else None

    def mask(self) -> torch.Tensor:
        return self._mask

    def positions(self) -> torch.Tensor:
        return self.token_pos[None]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        if self._single is not None:
            row, start, length = self._single
            end = start + length
            k[row, :, start:end] = key_states[0]
            v[row, :, start:end] = value_states[0]
            return k[row:row + 1, :, :end], v[row:row + 1, :, :end]
        # [1, heads, T, dim] -> [T, heads, dim], written at (row, :, position) of each token
        k[self.token_row, :, self.token_pos] = key_states[0].transpose(0, 1)
        v[self.token_row, :, self.token_pos] = value_states[0].transpose(0, 1)
        return (k[self.key_row, :, self.key_pos].transpose(0, 1)[None],
                v[self.key_row, :, self.key_pos].transpose(0, 1)[None])


class DecodeView:
    """One new token for each of rows 0..b-1, written at its row's position; attention reads the
    rows' first `span` positions (a row sees its own positions up to the new token's)."""

    def __init__(self, kv: RowKVCache, positions: torch.Tensor, span: int):
        self.kv, self.pos, self.span = kv, positions, span
        self.rows = torch.arange(positions.shape[0], device=positions.device)

    def mask(self) -> torch.Tensor:
        k = torch.arange(self.span, device=self.pos.device)[None, :]
        return additive_mask(k <= self.pos[:, None], self.kv.dtype)[:, None, None, :]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b = self.pos.shape[0]
        k, v = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        k[self.rows, :, self.pos] = key_states[:, :, 0]
        v[self.rows, :, self.pos] = value_states[:, :, 0]
        return k[:b, :, :self.span], v[:b, :, :self.span]


def model_positions(model) -> int:
    """The longest sequence the model takes (its position table, or its sliding window: the mask
    here is plain causal)."""
    config = model.config
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 20
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        longest = min(longest, window)
    return int(longest)


__all__ = ["DecodeView", "PrefillView", "RowKVCache", "additive_mask", "kv_layout", "model_positions"]
