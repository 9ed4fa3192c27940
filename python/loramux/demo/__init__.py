"""The demo: a real small model (SmolLM2-135M-Instruct, shipped in a PyPI package) serving a mixed
batch of LoRA adapters, checked against PEFT. `load_smollm2()` gives the model to try loramux on,
`make_example_adapter(dir)` a real PEFT adapter on it, converted."""

from loramux.demo.example import make_example_adapter
from loramux.demo.smollm2 import load_smollm2, smollm2_config


def main(*args, **kwargs) -> int:
    from loramux.demo.main import main as run

    return run(*args, **kwargs)


__all__ = ["load_smollm2", "smollm2_config", "make_example_adapter", "main"]
