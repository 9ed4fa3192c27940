"""Attention of a packed prefill chunk by chunk. A packed forward's queries are several prompts'
chunks end to end and its keys their row prefixes end to end, under a block-diagonal causal mask:
one masked attention over all of it computes every query against every key, so its cost grows with
the square of the pack (16 prompts of 150 tokens: 16x the work of attending each chunk to its own
prefix). Here each chunk attends to its own prefix under its block of that mask, through the same
SDPA call HF's "sdpa" implementation makes, so a chunk's result is what one masked call gives it.
Used on the CPU, where attention is paid in core time (the GPU serving path keeps the one call)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional, Sequence, Tuple

import torch

_NAME = "loramux_packed_sdpa"
# (query start, query end, key start, key end) of each chunk of the packed forward now running
_blocks: contextvars.ContextVar[Optional[Sequence[Tuple[int, int, int, int]]]] = contextvars.ContextVar(
    "loramux_packed_blocks", default=None)
_registered = False


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = _blocks.get()
    if (blocks is None or attention_mask is None or query.shape[0] != 1 or query.shape[2] != blocks[-1][1]
            or key.shape[2] != blocks[-1][3]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = [sdpa_attention_forward(module, query[:, :, t0:t1], key[:, :, s0:s1], value[:, :, s0:s1],
                                   attention_mask[..., t0:t1, s0:s1], **kwargs)[0]
            for t0, t1, s0, s1 in blocks]
    return torch.cat(outs, dim=1), None  # [1, T, heads, head_dim], as sdpa_attention_forward's


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(_NAME, _attention)
        _registered = True


@contextlib.contextmanager
def packed_attention(model, blocks: Sequence[Tuple[int, int, int, int]]):
    """Within this context the model's SDPA attention runs per chunk `blocks` (query and key
    ranges). Models on another attention implementation are left as they are."""
    config = model.config
    if len(blocks) < 2 or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    token = _blocks.set(list(blocks))
    config._attn_implementation = _NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _blocks.reset(token)


__all__ = ["packed_attention"]
