"""Attaching loramux to HF models: target maps per architecture, LoRA-aware layers, the Engine."""

from loramux.models.attach import attach, attach_layers, detach
from loramux.models.engine import Engine
from loramux.models.targets import match_targets, spec_from_config

__all__ = ["attach", "attach_layers", "detach", "Engine", "match_targets", "spec_from_config"]
