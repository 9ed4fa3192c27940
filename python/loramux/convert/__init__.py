"""PEFT LoRA adapter folders <-> the TensorRT-LLM (weights, config) numpy format, and the per-
architecture map from Hugging Face module paths to the 19 module ids that both directions read."""

from loramux.convert.peft_reader import detect_arch, from_peft, read_adapter
from loramux.convert.peft_files import ADAPTER_CONFIG, BIN_FILE, KEY_PREFIX, SAFETENSORS_FILE
from loramux.convert.peft_writer import to_peft

__all__ = ["from_peft", "to_peft", "read_adapter", "detect_arch", "ADAPTER_CONFIG", "SAFETENSORS_FILE", "BIN_FILE",
           "KEY_PREFIX"]
