"""Two DoRA adapters and a plain one on a Llama with biases on every projection (PEFT
use_dora=True), converted with their scales normalized; shared by the DoRA and sibling tests
through the `dora_setup` fixture of conftest.py."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from tp_oracle import tiny_llama

from loramux import convert

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> PEFT LoraConfig kwargs: two DoRA adapters (different ranks, rsLoRA on one), one plain
ADAPTERS = {
    "dora4": dict(r=4, lora_alpha=8, target_modules=PROJ, use_dora=True),
    "plain8": dict(r=8, lora_alpha=4, target_modules=PROJ),
    "dora2": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_dora=True,
                  use_rslora=True),
}
ROWS = ["dora4", "plain8", None, "dora2", "dora4"]


def build_dora_setup(out):
    """A base model, a PEFT model holding the three adapters (random B and magnitudes, so DoRA is far
    from the identity), and each adapter converted to the TensorRT-LLM format with DoRA normalized."""
    base = tiny_llama(1, layers=2, bias=True)
    torch.manual_seed(2)
    names = list(ADAPTERS)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(lora_dropout=0.0, **ADAPTERS[name]))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in pname:
                p.mul_(torch.empty_like(p).uniform_(0.6, 1.4))
    peft_model.eval()
    peft_model.save_pretrained(out)
    converted = {}
    for name in names:
        converted[name] = convert.from_peft(str(out / name), storage_type="float32", base_model=base)
    return base, peft_model, converted, out


def dora_peft_rows(peft_model, input_ids):
    outs = {}
    with torch.no_grad():
        for name in set(ROWS):
            if name is None:
                with peft_model.disable_adapter():
                    outs[name] = peft_model(input_ids).logits
            else:
                peft_model.set_adapter(name)
                outs[name] = peft_model(input_ids).logits
    return torch.stack([outs[name][i] for i, name in enumerate(ROWS)])


def dora_input_ids():
    return torch.randint(0, 64, (len(ROWS), 7), generator=torch.Generator().manual_seed(3))
