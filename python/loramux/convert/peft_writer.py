"""Writes a (weights, config) adapter as a PEFT LoRA directory (adapter_config.json +
adapter_model.safetensors) that PeftModel.from_pretrained loads: the inverse of convert.from_peft.

The scale is already folded into B, so every module gets lora_alpha = r (scale 1). Rows that share
one HF weight (the gate and up halves of a fused experts gate_up_proj) become one block-diagonal
LoRA of rank r_gate + r_up, which is exact; so do attn_q/k/v rows on a fused qkv layer (GPT-2,
Phi-3) and mlp_h_to_4h/mlp_gate (gate/up) rows on Phi-3's gate_up_proj.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import loramux.format as fmt
from loramux.convert import hf_modules as hfspec
from loramux.dora import BaseWeights, denormalize
from loramux.errors import LoraConvertError, LoraDoraError
from loramux.convert.peft_files import ADAPTER_CONFIG, BIN_FILE, EXPERT_PARAM_ORDER, KEY_PREFIX, SAFETENSORS_FILE
from loramux.format import AdapterRow, ModelSpec

_TASK_TYPE = {hfspec.BART: "SEQ_2_SEQ_LM"}


def _fuse(rows: List[Tuple[hfspec.TargetRule, AdapterRow]], spec: ModelSpec, out_features: int):
    """(A, B, DoRA scale or None) of one HF layer from the rows it holds: A stacks the rows' A, B
    places each row's B at its output offset in its own rank columns (block-diagonal: exact). With
    DoRA, outputs no row covers keep scale 1 (their weight rows are untouched)."""
    if len(rows) == 1 and len(rows[0][0].module_ids) == 1:
        row = rows[0][1]
        return row.a, row.b, row.dora_scale
    a = np.concatenate([row.a for _, row in rows], axis=0)
    b = np.zeros((out_features, a.shape[0]), dtype=np.float32)
    dora = any(row.dora_scale is not None for _, row in rows)
    scale = np.ones(out_features, dtype=np.float32) if dora else None
    col = 0
    for rule, row in rows:
        at, (ho, rank) = hfspec.output_offset(rule, row.module_id, spec), row.b.shape
        b[at : at + ho, col : col + rank] = row.b
        if dora:
            scale[at : at + ho] = row.dora_scale
        col += rank
    return a, b, scale


def _nested_key(path: str, kind: str, present_params: List[str]) -> str:
    """The module path PEFT's state dict uses for `path`, with ".base_layer" for nested wrappers."""
    if kind != hfspec.EXPERTS:
        return path
    module, pname = path.rsplit(".", 1)
    order = [p for p in EXPERT_PARAM_ORDER if p in present_params]
    return module + ".base_layer" * (len(order) - 1 - order.index(pname))


def _save_tensors(tensors: Dict[str, np.ndarray], dtype: str, out_path: str) -> None:
    import torch
    from safetensors.torch import save_file

    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(tdtype) for k, v in tensors.items()},
              out_path, metadata={"format": "pt"})


def to_peft(weights, config, spec: ModelSpec, out_dir: str, arch: Any, base_model: Any = None, *,
            base_model_name_or_path: Optional[str] = None) -> None:
    """Writes (weights, config), validated against `spec`, as a PEFT adapter into out_dir. `arch` is
    the HF model_type ('llama', 'gpt2', 'mixtral', ...) or the HF config itself (needed for an
    encoder-decoder, to tell its stacks apart, unless base_model gives it). DoRA rows need base_model
    (an HF model or a saved model dir) to turn the normalized scales back into PEFT magnitudes."""
    rows = fmt.to_rows(weights, config, spec)
    base = BaseWeights(base_model) if base_model is not None else None
    hf_config = arch if not isinstance(arch, str) else (base.config if base is not None else None)
    arch = arch if isinstance(arch, str) else hfspec.config_value(arch, "model_type")
    encoder_layers = hfspec.encoder_layers_of(hf_config)
    family = hfspec.family_of(arch)
    dora = {r.dora_scale is not None for r in rows}
    if len(dora) > 1:
        raise LoraConvertError("PEFT's use_dora is per adapter: the rows mix DoRA and plain LoRA")
    use_dora = dora == {True}
    if use_dora and base is None:
        raise LoraDoraError("DoRA rows need the base model's weights to recover PEFT magnitudes: pass base_model= "
                            "(an HF model or a saved model dir)")

    by_path: Dict[str, List[Tuple[hfspec.TargetRule, AdapterRow]]] = defaultdict(list)
    for row in rows:
        path, rule = hfspec.hf_path_for(arch, row.module_id, row.layer, encoder_layers)
        by_path[path].append((rule, row))
    expert_params: Dict[str, List[str]] = defaultdict(list)
    for path, held in by_path.items():
        if held[0][0].kind == hfspec.EXPERTS:
            module, pname = path.rsplit(".", 1)
            expert_params[module].append(pname)

    tensors: Dict[str, np.ndarray] = {}
    ranks: Dict[str, int] = {}
    target_modules, target_parameters = [], []
    for path, held in sorted(by_path.items()):
        rule = held[0][0]
        out_features = sum(spec.module_dims(m)[1] for m in rule.module_ids)
        a, b, scale = _fuse(held, spec, out_features)
        pattern_key = path
        if rule.kind == hfspec.EXPERTS:
            if scale is not None:
                raise LoraConvertError(f"{path}: PEFT has no DoRA for expert parameters")
            # PEFT's expert LoRA: A [r*E, in] = experts' A stacked; B [out, r*E] with column k*E + e = B_e[:, k].
            experts = spec.num_experts
            a, b = np.tile(a, (experts, 1)), np.repeat(b, experts, axis=1)
            target_parameters.append(path)
        elif rule.kind == hfspec.ROUTER:
            pattern_key = path + ".weight"
            target_parameters.append(pattern_key)
        else:
            target_modules.append(path)
        ranks[pattern_key] = a.shape[0] // (spec.num_experts if rule.kind == hfspec.EXPERTS else 1)
        key = KEY_PREFIX + _nested_key(path, rule.kind, expert_params.get(path.rsplit(".", 1)[0], []))
        tensors[key + ".lora_A.weight"] = a
        tensors[key + ".lora_B.weight"] = b
        if scale is not None:
            w0 = base.weight(path, transposed=rule.kind == hfspec.CONV1D)
            tensors[key + ".lora_magnitude_vector"] = denormalize(w0, a, b, scale).astype(np.float32)

    r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
    odd = {k: v for k, v in ranks.items() if v != r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPE.get(family, "CAUSAL_LM"),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # the scale is folded into B: alpha = r makes it 1
        "rank_pattern": odd,
        "alpha_pattern": dict(odd),
        "use_rslora": False,
        "use_dora": use_dora,
        "target_modules": target_modules,
        "target_parameters": target_parameters or None,
        "fan_in_fan_out": family == hfspec.GPT2,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "layers_to_transform": None,
        "inference_mode": True,
    }
    # An existing folder is written into (its adapter files replaced), as PEFT's save_pretrained does.
    with fmt.writing_to(out_dir, "the PEFT adapter"):
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config, f, indent=2)
        _save_tensors(tensors, fmt.weights_dtype_name(np.asarray(weights)), os.path.join(out_dir, SAFETENSORS_FILE))


__all__ = ["to_peft"]
