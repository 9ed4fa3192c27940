"""DoRA scales: the format stores, per output row o, the *normalized* scale
m_o / ||W0[o,:] + B[o,:] A||_2 (LoRA scaling already folded into B), which needs the base weights W0.

`normalize` / `denormalize` convert between PEFT's magnitude vector m and that scale; `BaseWeights`
reads W0 from an HF model (an nn.Module or a saved model directory) without instantiating it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from loramux.errors import LoraDoraError
from loramux.format import read_json

# Rows per block when forming W0 + B A, so a large module never needs a second full-size copy.
_ROW_BLOCK = 1024


def _row_norms(base_weight: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||W0[o,:] + B[o,:] A||_2 for every output row o, in float64."""
    ho, hi = base_weight.shape
    if a.shape[1] != hi or b.shape != (ho, a.shape[0]):
        raise LoraDoraError(f"DoRA shapes disagree: base weight {base_weight.shape}, A {a.shape}, B {b.shape}")
    a64 = a.astype(np.float64)
    norms = np.empty(ho, dtype=np.float64)
    for start in range(0, ho, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, ho)
        block = base_weight[start:stop].astype(np.float64) + b[start:stop].astype(np.float64) @ a64
        norms[start:stop] = np.linalg.norm(block, axis=1)
    return norms


def normalize(base_weight: np.ndarray, a: np.ndarray, b: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """The normalized DoRA scale m / ||W0 + B A|| per output row (float64). base_weight is [Ho, Hi]
    (nn.Linear layout), A [r, Hi], B [Ho, r] with the LoRA scaling folded in, magnitude [Ho]."""
    norms = _row_norms(base_weight, a, b)
    if magnitude.shape != norms.shape:
        raise LoraDoraError(f"DoRA magnitude has shape {magnitude.shape}, expected ({norms.shape[0]},)")
    if np.any(norms == 0):
        row = int(np.flatnonzero(norms == 0)[0])
        raise LoraDoraError(f"DoRA: row {row} of W0 + B A is all zeros; its scale is undefined")
    return magnitude.astype(np.float64) / norms


def denormalize(base_weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of normalize: PEFT's magnitude m = scale * ||W0 + B A|| per output row (float64)."""
    norms = _row_norms(base_weight, a, b)
    if scale.shape != norms.shape:
        raise LoraDoraError(f"DoRA scale has shape {scale.shape}, expected ({norms.shape[0]},)")
    return scale.astype(np.float64) * norms


class BaseWeights:
    """Reads base weights by HF module path from an nn.Module or a saved HF model directory
    (safetensors, sharded or not; pytorch_model.bin only through torch.load(weights_only=True))."""

    def __init__(self, base_model: Any):
        self._module = None
        self._files: Dict[str, str] = {}
        self.config: Optional[Dict[str, Any]] = None
        if isinstance(base_model, (str, os.PathLike)):
            self._open_dir(os.fspath(base_model))
        elif hasattr(base_model, "state_dict"):
            self._module = base_model
            cfg = getattr(base_model, "config", None)
            self.config = cfg.to_dict() if hasattr(cfg, "to_dict") else None
        else:
            raise LoraDoraError(f"base_model must be an HF model or a saved model directory, got {type(base_model).__name__}")

    def _open_dir(self, path: str) -> None:
        if not os.path.isdir(path):
            raise LoraDoraError(f"base model directory {path!r} does not exist")
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            self.config = read_json(cfg_path, LoraDoraError)
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            weight_map = read_json(index, LoraDoraError)["weight_map"]
            self._files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, "np") as f:
                self._files = {k: single for k in f.keys()}
        elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
            import torch

            self._module = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise LoraDoraError(f"{path!r} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")

    def _tensor(self, key: str):
        import torch

        if self._module is not None:
            sd = self._module if isinstance(self._module, dict) else None
            if sd is None:
                try:
                    return self._module.get_parameter(key).detach()
                except AttributeError:
                    return None
            return sd.get(key)
        if key not in self._files:
            return None
        from safetensors import safe_open

        with safe_open(self._files[key], "pt") as f:
            return f.get_tensor(key)

    def weight(self, hf_path: str, transposed: bool = False) -> np.ndarray:
        """The base weight of `hf_path` as float64 [out, in]; `transposed` for GPT-2 Conv1D ([in, out])."""
        key = hf_path + ".weight"
        t = self._tensor(key)
        if t is None:
            # Saved task models sometimes drop or add the first path component (model., transformer.).
            tail = key.split(".", 1)[1]
            keys = self._files.keys() if self._module is None else (
                self._module.keys() if isinstance(self._module, dict) else dict(self._module.named_parameters()).keys())
            found = [k for k in keys if k == tail or k.endswith("." + tail)]
            t = self._tensor(found[0]) if len(found) == 1 else None
        if t is None:
            raise LoraDoraError(f"DoRA: base weight {key} not found in the base model")
        w = t.detach().float().cpu().numpy().astype(np.float64)  # a GPU model's weights too
        return w.T if transposed else w


__all__ = ["normalize", "denormalize", "BaseWeights"]
