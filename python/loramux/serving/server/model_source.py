"""The base model `loramux serve MODEL` names: a Hugging Face model folder, a GGUF file (de-quantized
by transformers), or `smollm2`, the demo model packaged as a GGUF file (no download)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from loramux.serving.server.errors import ModelSourceError

SMOLLM2 = "smollm2"


@dataclass
class BaseModel:
    model: Any
    tokenizer: Any
    name: str  # what `model` names in a request for no adapter
    folder: Optional[str]  # a saved HF folder (DoRA adapters normalize against it), or None


def load_base_model(source: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if source == SMOLLM2:
        from loramux.demo.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(device, dtype)
        return BaseModel(model, tokenizer, SMOLLM2, None)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ModelSourceError(f"{source}: no config.json; MODEL must be a saved Hugging Face model folder, "
                                   f"a .gguf file or `{SMOLLM2}`")
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        return BaseModel(model.to(device).eval(), tokenizer, os.path.basename(os.path.normpath(source)), source)
    if os.path.isfile(source) and source.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(source))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        return BaseModel(model.to(device).eval(), tokenizer, name[: -len(".gguf")], None)
    raise ModelSourceError(f"{source}: not a model folder (with config.json), a .gguf file or `{SMOLLM2}`")


__all__ = ["BaseModel", "load_base_model", "SMOLLM2"]
