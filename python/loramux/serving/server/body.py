"""Reading a request body with a size limit: a Content-Length over it is refused before reading,
and a chunked body is cut off as soon as it passes it."""

from __future__ import annotations

from starlette.requests import Request

from loramux.serving.server.api_errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length must be a number of bytes, got {declared!r}", code="invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes "
                           "(--max-body-bytes)", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes (--max-body-bytes)",
                           code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["read_body"]
