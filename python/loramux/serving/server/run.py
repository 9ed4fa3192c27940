"""`loramux serve`: the base model attached, its Executor, the adapters given on the command line,
and the app on uvicorn (bound to localhost unless told otherwise)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    adapters: List[Tuple[str, str, Optional[int]]] = field(default_factory=list)  # (name, path, task_id)
    adapter_root: Optional[str] = None
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    device: Optional[str] = None
    max_batch_size: int = 64
    max_rank: int = 64
    host_cache_bytes: int = 1 << 30
    device_cache_bytes: Optional[int] = None
    max_slots: int = 64
    kv_cache_bytes: Optional[int] = None  # the executor's KV-cache budget (default: its own)
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    max_pending: int = 256
    unload_timeout_s: float = 30.0
    capture_graphs: bool = True  # CUDA: every decode-step graph captured before the first request
    log_level: str = "warning"


def build(options: ServeOptions):
    """(ASGI app, executor): everything but the socket, so tests and embedders can serve it their way."""
    from loramux.models import attach
    from loramux.serving import Executor
    from loramux.serving.server.adapters_registry import AdapterRegistry
    from loramux.serving.server.app import build_app
    from loramux.serving.server.errors import AdapterNotFoundError
    from loramux.serving.server.model_source import load_base_model
    from loramux.serving.server.state import ServerConfig, ServerState

    if options.adapter_root is not None and not os.path.isdir(options.adapter_root):  # before the model loads
        raise AdapterNotFoundError(f"--adapter-root {options.adapter_root}: no such folder")
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(options.model, device)
    name = options.served_model_name or base.name
    engine = attach(base.model, max_rank=options.max_rank, host_cache_bytes=options.host_cache_bytes,
                       device_cache_bytes=options.device_cache_bytes, max_slots=options.max_slots)
    kv = {} if options.kv_cache_bytes is None else {"kv_cache_bytes": options.kv_cache_bytes}
    executor = Executor(engine, base.tokenizer, max_batch_size=options.max_batch_size, **kv)
    if options.capture_graphs:  # so no request waits for a capture (0 on the CPU)
        started = time.perf_counter()
        captured = executor.capture_graphs()
        if captured:
            print(f"loramux serve: {captured} decode-step CUDA graphs captured in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
    registry = AdapterRegistry(engine.cache, name, options.adapter_root, base.folder)
    for adapter_name, path, task_id in options.adapters:  # the operator's own paths: trusted
        registry.load(adapter_name, path, task_id, trusted=True)
    config = ServerConfig(name, options.adapter_root, options.api_key, options.max_body_bytes,
                          options.max_tokens_limit, options.max_pending, options.unload_timeout_s)
    state = ServerState(executor, engine, base.tokenizer, registry, config)
    return build_app(state, executor_context=executor), executor


def serve(options: ServeOptions) -> int:
    import uvicorn

    app, _ = build(options)
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                                           lifespan="on", timeout_graceful_shutdown=5))
    print(f"loramux serve: {options.model} on http://{options.host}:{options.port}/v1", flush=True)
    server.run()
    return 0 if server.started else 1

