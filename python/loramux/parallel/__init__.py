"""Tensor and pipeline parallel LoRA: each rank's slice of a full adapter, and a tp x pp Llama-family
forward over torch.distributed with a per-rank adapter cache."""

from loramux.parallel.slicing import RankAdapter, rank_spec, slice_adapter, stage_layers

_TORCH_NAMES = ("ParallelContext", "init_parallel", "ParallelLoraLinear", "TpLlama")


def __getattr__(name):  # the forward needs torch.distributed; the slicing is numpy only
    if name in _TORCH_NAMES:
        from loramux.parallel import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'loramux.parallel' has no attribute {name!r}")


__all__ = ["RankAdapter", "rank_spec", "slice_adapter", "stage_layers", *_TORCH_NAMES]
