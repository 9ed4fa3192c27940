"""The Executor's row KV cache on the CPU: reservations grow within the budget, keep what was
written, and read zero wherever nothing was written (attention multiplies masked positions by 0,
so stale memory there must be finite)."""

import numpy as np
import torch
from transformers import LlamaConfig

from loramux.serving.kv_cache import RowKVCache

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100)


def _cache(max_rows=8, budget_tokens=4096, max_seq_len=512):
    per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads, head dim 16, float32
    return RowKVCache(CONFIG, torch.float32, torch.device("cpu"), max_rows, budget_tokens * per_token, max_seq_len, grow=True)


def test_growth_keeps_written_positions_and_reads_zero_elsewhere():
    kv = _cache()
    kv.reserve(2, 10)
    for buf in kv.keys + kv.values:
        buf[:2, :, :10] = 7.0
    # blocks freed just before hold NaN: a reservation must not hand their memory out as it is
    stale = [np.full(n, np.nan, dtype=np.float32) for n in (64 << 20, 1 << 18, 1 << 18, 1 << 19, 1 << 19)]
    del stale
    kv.reserve(5, 300)
    assert kv.rows_alloc >= 5 and kv.capacity >= 300
    for buf in kv.keys + kv.values:
        assert torch.all(buf[:2, :, :10] == 7.0)
        rest = buf.clone()
        rest[:2, :, :10] = 0.0
        assert torch.count_nonzero(rest) == 0


def test_reservations_stay_within_the_budget_and_take_every_row_when_they_can():
    kv = _cache(max_rows=8, budget_tokens=4096)
    kv.reserve(1, 100)
    assert kv.rows_alloc == 8  # every row fits the budget at this length: no regrowth per admission
    assert kv.bytes_allocated <= kv.budget_bytes
    kv.reserve(8, 500)
    assert kv.rows_alloc == 8 and kv.capacity >= 500 and kv.bytes_allocated <= kv.budget_bytes
    tight = _cache(max_rows=8, budget_tokens=1000)
    tight.reserve(2, 400)  # 8 rows of 400 would pass the budget
    assert 2 <= tight.rows_alloc < 8 and tight.capacity >= 400 and tight.bytes_allocated <= tight.budget_bytes


def test_a_lone_long_request_fits_once_every_row_was_laid_out_short():
    """The rule is the rows in use x the longest of them within the budget, whatever the buffers
    were laid out for: after a short reservation took every row, one row as long as the budget
    allows still fits, re-laid with the rows in use kept; more rows of it wait."""
    kv = _cache(max_rows=8, budget_tokens=1000)
    kv.reserve(2, 10)
    assert kv.rows_alloc == 8 and kv.capacity < 500
    for buf in kv.keys + kv.values:
        buf[0, :, :10] = 7.0
    assert kv.fits(1, 500) and kv.fits(2, 500)  # 8 rows of 500 would not: the rows in use decide
    assert not kv.fits(3, 500) and not kv.fits(1, 513)  # the budget; max_seq_len
    kv.reserve(1, 500)
    assert kv.capacity >= 500 and 1 <= kv.rows_alloc < 8 and kv.bytes_allocated <= kv.budget_bytes
    for buf in kv.keys + kv.values:
        assert torch.all(buf[0, :, :10] == 7.0) and torch.count_nonzero(buf[0, :, 10:]) == 0
    kv.reserve(8, 100)  # back to every row, shorter
    assert kv.rows_alloc == 8 and kv.capacity >= 100 and kv.bytes_allocated <= kv.budget_bytes
    for buf in kv.keys + kv.values:
        assert torch.all(buf[0, :, :10] == 7.0)


def test_full_size_buffers_never_move():
    """grow=False (the CUDA layout, where captured graphs keep the buffers' addresses): every row
    at full length from the start; fits() is that allocation, and reserve() never reallocates."""
    per_token = 2 * 2 * 2 * 16 * 4
    kv = RowKVCache(CONFIG, torch.float32, torch.device("cpu"), 4, 400 * per_token, 512, grow=False)
    assert (kv.rows_alloc, kv.capacity, kv.max_seq_len) == (4, 100, 100)
    keys = [k.data_ptr() for k in kv.keys]
    assert kv.fits(4, 100) and kv.fits(1, 100) and not kv.fits(1, 101)
    kv.reserve(1, 100)
    kv.reserve(4, 50)
    assert [k.data_ptr() for k in kv.keys] == keys and kv.bytes_allocated == 400 * per_token
    assert "split over 4 rows" in kv.never_fits(101)
