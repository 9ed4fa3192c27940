"""Shared by test_tp.py and test_dora.py: a tiny random Llama, random adapters in the TensorRT-LLM
format, and the merged-weights oracle (one adapter per row: W' = W + B A, DoRA: diag(s) (W + B A))."""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

#: module id -> Llama projection (the TensorRT-LLM module ids of a Llama decoder layer: mlp_h_to_4h is
#: the projection the activation reads, gate_proj; mlp_gate the multiplied one, up_proj)
_PROJ = {1: "q_proj", 2: "k_proj", 3: "v_proj", 4: "o_proj", 5: "gate_proj", 6: "down_proj", 7: "up_proj"}


def tiny_llama(seed: int = 0, *, layers: int = 4, bias: bool = True):
    """hidden 32, 8 heads x 4, 4 kv heads (GQA), ffn 64: splits by tp 1, 2 and 4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=4, attention_bias=bias,
                      mlp_bias=bias, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-initializes biases: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def module_dims(model, module_id: int) -> Tuple[int, int]:
    proj = _proj(model, 0, module_id)
    return proj.in_features, proj.out_features


def _proj(model, layer: int, module_id: int):
    block = model.model.layers[layer]
    name = _PROJ[module_id]
    return getattr(block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, name)


def random_adapter(model, rows: Sequence[Tuple[int, int, int]], *, dora: bool, seed: int, scale: float = 0.2):
    """(weights [N, W] float32, config [N, 4]) for rows (module_id, layer, rank); DoRA rows get
    positive scales near 1."""
    rng = np.random.default_rng(seed)
    out, cfg = [], []
    for mid, layer, rank in rows:
        hi, ho = module_dims(model, mid)
        a = rng.standard_normal((rank, hi)) * scale
        b = rng.standard_normal((ho, rank)) * scale
        parts = [a.ravel(), b.ravel()] + ([rng.uniform(0.7, 1.3, ho)] if dora else [])
        out.append(np.concatenate(parts))
        cfg.append([mid, layer, rank, int(dora)])
    width = max(len(r) for r in out) + 5  # trailing padding, as the format allows
    weights = np.zeros((len(out), width), np.float32)
    for i, r in enumerate(out):
        weights[i, : len(r)] = r
    return weights, np.asarray(cfg, np.int64)


def merged(model, weights: np.ndarray, config: np.ndarray):
    """A copy of `model` with the adapter merged into its weights (the oracle for one row)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for row, c in zip(weights, config):
            mid, layer, rank = int(c[0]), int(c[1]), int(c[2])
            dora = len(c) == 4 and bool(c[3])
            proj = _proj(m, layer, mid)
            hi, ho = proj.in_features, proj.out_features
            a = torch.from_numpy(row[: rank * hi].reshape(rank, hi).astype(np.float64))
            b = torch.from_numpy(row[rank * hi : rank * hi + ho * rank].reshape(ho, rank).astype(np.float64))
            w = proj.weight.double() + b @ a
            if dora:
                s = torch.from_numpy(row[rank * (hi + ho) : rank * (hi + ho) + ho].astype(np.float64))
                w = s[:, None] * w
            proj.weight.copy_(w.to(proj.weight.dtype))
    return m


def oracle_logits(model, input_ids: torch.Tensor, adapters: Dict[int, Tuple[np.ndarray, np.ndarray]],
                  task_ids: List[Optional[int]]) -> torch.Tensor:
    """Row b's logits from `model` with task_ids[b]'s adapter merged (None: the base model)."""
    rows = []
    with torch.no_grad():
        for b, t in enumerate(task_ids):
            m = model if t is None else merged(model, *adapters[t])
            rows.append(m(input_ids[b : b + 1]).logits[0])
    return torch.stack(rows)
