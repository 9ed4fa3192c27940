"""Server-sent events (the `data: <json>` lines OpenAI streams, ending with `data: [DONE]`), and the
response that sends them while watching the connection: a client that goes away closes the event
generator at once, so its `finally` cancels the request and frees its memory."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, Awaitable, Callable, Optional

import anyio
from starlette.requests import Request

DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStream:
    """ASGI response streaming `events` (bytes, already framed by `event`) as text/event-stream.
    `on_close` runs however the stream ends, even if the generator never started."""

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Optional[Callable[[], None]] = None):
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    async for chunk in self.events:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()  # done: stop listening

                async def listen() -> None:
                    await wait_for_disconnect(receive)
                    group.cancel_scope.cancel()  # gone: stop streaming (cancels the generator's await)

                group.start_soon(stream)
                group.start_soon(listen)
        finally:
            try:
                await self.events.aclose()  # runs the generator's own cleanup if it started
            finally:
                if self.on_close is not None:
                    self.on_close()


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work` (a non-streaming answer) while watching the connection; a client that goes away
    cancels it (the work's own cleanup cancels its requests). Returns the work's result, or None."""
    result: list = []
    failed: list = []
    async with anyio.create_task_group() as group:
        async def run() -> None:
            try:
                result.append(await work)
            except Exception as err:  # raised below as itself, not inside an exception group
                failed.append(err)
            group.cancel_scope.cancel()

        async def listen() -> None:
            await wait_for_disconnect(request.receive)
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(listen)
    if failed:
        raise failed[0]
    return result[0] if result else None


__all__ = ["DONE", "event", "EventStream", "until_disconnect", "wait_for_disconnect"]
