"""Serving requests through an attached model: Request / LoraConfig / Result and the Executor that
applies the TensorRT-LLM task_id rules."""

from loramux.serving.executor import Executor
from loramux.serving.request import LoraConfig, Prompt, Request, Result

__all__ = ["Executor", "LoraConfig", "Prompt", "Request", "Result"]
