"""attach(model) swaps an HF model's LoRA target layers for per-row LoRA wrappers and gives back the
Engine that serves them from a two-level adapter cache; detach(engine) restores the model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from loramux.convert import hf_modules as hfspec
from loramux.models.engine import Engine
from loramux.models.siblings import group_siblings
from loramux.models.targets import match_targets, served_modules, spec_from_config
from loramux.models.wrappers import LoraExperts, LoraLinear, LoraRouter

_WRAPPERS = (LoraLinear, LoraRouter, LoraExperts)


def _out_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if type(layer).__name__ == "Conv1D":  # GPT-2's transposed linear
        return layer.nf
    raise TypeError(f"cannot put LoRA on a {type(layer).__name__}")


def _wrap(target, layer: nn.Module, spec, engine) -> nn.Module:
    def width(mid: int) -> int:
        return spec.module_dims(mid)[1]

    if target.kind == hfspec.ROUTER:
        (mid,), = target.slices
        return LoraRouter(layer, engine, target.layer, mid, width(mid))
    if target.kind == hfspec.EXPERTS:
        (gate_id, up_id), (down_id,) = target.slices
        return LoraExperts(layer, engine, target.layer, (gate_id, up_id), down_id)
    out = _out_features(layer)
    sizes = [tuple(width(mid) for mid in ids) for ids in target.slices]
    for ids, widths in zip(target.slices, sizes):
        if sum(widths) != out:
            raise ValueError(f"{target.name}: modules {ids} give {sum(widths)} output features, the layer has {out}")
    return LoraLinear(layer, engine, target.layer, target.slices, sizes, conv1d=not isinstance(layer, nn.Linear))


def _refuse_attached(model: nn.Module) -> None:
    if any(isinstance(m, _WRAPPERS) for m in model.modules()):
        raise ValueError("this model already has loramux layers attached; detach() first")


def attach_layers(model: nn.Module, spec, cache, dtype: torch.dtype, device: torch.device,
                  fuse_siblings: bool = True) -> Engine:
    """Wraps every target layer of `model` (loramux.convert.hf_modules table, via models/targets.py); the layers read `cache`'s slots.
    `fuse_siblings`: projections that read one input (q|k|v, gate|up) share one multi-slice LoRA launch."""
    _refuse_attached(model)
    engine = Engine(model, spec, cache, dtype, device, restore=[])
    restore, linears = [], []
    for target in match_targets(model):
        parent_name, _, attr = target.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, attr)
        wrapper = _wrap(target, original, spec, engine)
        setattr(parent, attr, wrapper)
        restore.append((parent, attr, original))
        if isinstance(wrapper, LoraLinear):
            linears.append((parent_name, wrapper))
    if not restore:
        raise ValueError(f"no LoRA target layers found in this {model.config.model_type} model")
    engine._restore = restore
    engine.sibling_groups = group_siblings(linears, engine)
    engine.fuse_siblings = fuse_siblings
    return engine


def attach(
    model: nn.Module,
    max_rank: int = 64,
    host_cache_bytes: int = 1 << 30,
    device_cache_fraction: Optional[float] = None,
    device_cache_bytes: Optional[int] = None,
    max_slots: int = 64,
    page_bytes: int = 64 << 10,
    fuse_siblings: bool = True,
) -> Engine:
    """Makes `model` serve per-row LoRA adapters; returns its Engine (engine.cache holds adapters).

    The cache keeps adapters in the model's dtype on the model's device: a GPU model gets a device
    tier of `device_cache_bytes` (or `device_cache_fraction` of free GPU memory); a CPU model a
    host-memory "device" tier. The device tier is carved into pages of `page_bytes`. The cache
    refuses adapters with rows no layer of the model applies (an mlp_router row on a Llama); a
    fused row whose parts are wrapped separately (attn_qkv on a Llama's q/k/v_proj) is kept as
    those parts.
    With `fuse_siblings` (default), projections HF calls on one input (q|k|v, gate|up) get their
    LoRA from one multi-slice launch; False keeps one launch per projection (same results).
    """
    from loramux.cache import LoraCache

    _refuse_attached(model)  # before the cache pins or pre-faults its memory
    param = next(model.parameters())
    spec = spec_from_config(model.config, max_rank=max_rank)
    device = param.device
    cache = LoraCache(
        spec,
        dtype=param.dtype,
        host_cache_bytes=host_cache_bytes,
        device=device if device.type == "cuda" else "cpu",
        device_cache_bytes=device_cache_bytes,
        device_cache_fraction=device_cache_fraction,
        max_slots=max_slots,
        page_bytes=page_bytes,
        served=served_modules(match_targets(model)),
    )
    return attach_layers(model, spec, cache, param.dtype, device, fuse_siblings=fuse_siblings)


def detach(engine: Engine) -> nn.Module:
    """Restores the original layers of the engine's model and returns the model."""
    return engine.detach()
