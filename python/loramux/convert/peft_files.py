"""The names inside a PEFT adapter folder, as PEFT writes and reads them."""

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
#: What PEFT puts before a module path in a saved adapter's state-dict keys.
KEY_PREFIX = "base_model.model."
# PEFT nests the ParamWrappers of one experts module in parameter registration order, the first
# innermost: its keys carry one ".base_layer" per wrapper outside it.
EXPERT_PARAM_ORDER = ("gate_up_proj", "down_proj")

__all__ = ["ADAPTER_CONFIG", "SAFETENSORS_FILE", "BIN_FILE", "KEY_PREFIX", "EXPERT_PARAM_ORDER"]
