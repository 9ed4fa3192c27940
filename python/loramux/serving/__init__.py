"""Serving requests through an attached model: Request / LoraConfig / Result, the in-flight
Executor that applies the TensorRT-LLM task_id rules, its handles and the static baseline."""

from loramux.serving.executor import Executor
from loramux.serving.handle import RequestHandle
from loramux.serving.request import Delta, LoraConfig, Prompt, Request, Result
from loramux.serving.static_batch import StaticExecutor

__all__ = ["Delta", "Executor", "LoraConfig", "Prompt", "Request", "RequestHandle", "Result", "StaticExecutor"]
