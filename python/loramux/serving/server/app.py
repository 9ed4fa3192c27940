"""The ASGI application: the OpenAI routes (/v1/completions, /v1/chat/completions, /v1/models and
/v1/models/{model}), the adapter routes (/v1/load_lora_adapter, /v1/unload_lora_adapter), /health
and /metrics, with the bearer-key check around them and every error answered in the OpenAI error shape."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loramux.serving.server import openai_responses as shapes
from loramux.serving.server.api_errors import ApiError, from_exception
from loramux.serving.server.auth import BearerAuth
from loramux.serving.server.body import read_body
from loramux.serving.server.completions import answer
from loramux.serving.server.openai_schema import (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                                  UnloadAdapterRequest, parse)
from loramux.serving.server.state import ServerState

Handler = Callable[[ServerState, Request], Awaitable[Any]]


def _route(state: ServerState, path: str, handler: Handler, methods) -> Route:
    """A route whose errors become OpenAI error answers and whose answers are counted by status."""
    async def endpoint(request: Request) -> Response:
        try:
            response = await handler(state, request)
        except Exception as err:  # an ApiError, a loramux error, or a bug: answered, never a dropped connection
            response = from_exception(err).response()
        state.metrics.requests.inc(endpoint=path, status=str(getattr(response, "status_code", 200)))
        return response

    return Route(path, endpoint, methods=methods)


async def completions(state: ServerState, request: Request):
    return await answer(state, request, parse(await read_body(request, state.config.max_body_bytes), CompletionRequest))


async def chat_completions(state: ServerState, request: Request):
    body = parse(await read_body(request, state.config.max_body_bytes), ChatCompletionRequest)
    return await answer(state, request, body)


async def models(state: ServerState, request: Request):
    base = state.config.base_name
    data = [shapes.model_card(base, state.started, base, None)]
    data += [shapes.model_card(a.name, a.created, a.path, base) for a in state.registry.names()]
    return JSONResponse({"object": "list", "data": data})


async def model(state: ServerState, request: Request):
    """One model card (the openai client's models.retrieve); an unknown name 404. Adapter names may
    hold '/', so the route takes the rest of the path."""
    name, base = request.path_params["model"], state.config.base_name
    if name == base:
        return JSONResponse(shapes.model_card(base, state.started, base, None))
    adapter = state.registry.get(name)
    return JSONResponse(shapes.model_card(adapter.name, adapter.created, adapter.path, base))


async def load_lora_adapter(state: ServerState, request: Request):
    body = parse(await read_body(request, state.config.max_body_bytes), LoadAdapterRequest)
    # reading and converting an adapter takes a while: off the event loop
    adapter = await asyncio.to_thread(state.registry.load, body.lora_name, body.lora_path, body.task_id)
    return JSONResponse({"object": "lora_adapter", "id": adapter.name, "task_id": adapter.task_id,
                         "root": adapter.path, "status": "loaded"})


async def unload_lora_adapter(state: ServerState, request: Request):
    body = parse(await read_body(request, state.config.max_body_bytes), UnloadAdapterRequest)
    adapter = await state.registry.unload(body.lora_name, state.config.unload_timeout_s)
    return JSONResponse({"object": "lora_adapter", "id": adapter.name, "task_id": adapter.task_id,
                         "status": "unloaded"})


async def health(state: ServerState, request: Request):
    ok = state.executor.alive()
    return JSONResponse({"status": "ok" if ok else "executor stopped"}, status_code=200 if ok else 503)


async def metrics(state: ServerState, request: Request):
    levels = {"loramux_server_pending_requests": state.pending,
              "loramux_server_adapters_loaded": len(state.registry.names())}
    text = state.metrics.text(state.executor.metrics(), state.engine.cache.stats(), levels)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def build_app(state: ServerState, executor_context: Any = None) -> Any:
    """The ASGI app serving `state`. `executor_context` (the Executor, a context manager running its
    step loop) is entered at start-up and left at shutdown."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if executor_context is None:
            yield
            return
        with executor_context:
            yield

    routes = [
        _route(state, "/v1/completions", completions, ["POST"]),
        _route(state, "/v1/chat/completions", chat_completions, ["POST"]),
        _route(state, "/v1/models", models, ["GET"]),
        _route(state, "/v1/models/{model:path}", model, ["GET"]),
        _route(state, "/v1/load_lora_adapter", load_lora_adapter, ["POST"]),
        _route(state, "/v1/unload_lora_adapter", unload_lora_adapter, ["POST"]),
        _route(state, "/health", health, ["GET"]),
        _route(state, "/metrics", metrics, ["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        404: lambda request, exc: ApiError(404, f"no route {request.method} {request.url.path}",
                                           code="not_found").response(),
        405: lambda request, exc: ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed").response(),
    })
    return BearerAuth(app, state.config.api_key)


__all__ = ["build_app"]
