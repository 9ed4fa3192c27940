"""Attaching loramux to HF models: target maps per architecture, LoRA-aware layers, the Engine."""

from loramux.models.attach import attach, attach_layers, detach
from loramux.models.engine import Engine
from loramux.models.targets import join_encoder_decoder, match_targets, spec_from_config

__all__ = ["attach", "attach_layers", "detach", "Engine", "join_encoder_decoder", "match_targets", "spec_from_config"]
