"""`--api-key`: every path but /health needs `Authorization: Bearer <key>`, compared in constant time
(hmac.compare_digest), so the answer's timing does not tell how much of a guess was right."""

from __future__ import annotations

import hmac
from typing import Any, Callable, Optional

from loramux.serving.server.api_errors import ApiError

#: paths a load balancer probes without credentials
OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    """ASGI middleware: refuses HTTP requests without the key with 401 in the OpenAI error shape."""

    def __init__(self, app, api_key: Optional[str], on_refused: Optional[Callable[[dict, ApiError], Any]] = None):
        """`on_refused(scope, error)`: the 401 answer to send (the server counts it there); by default
        the error's own response."""
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._on_refused = on_refused or (lambda scope, error: error.response())

    def allows(self, authorization: Optional[bytes]) -> bool:
        if self._key is None:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        # compared even when the scheme is wrong: every refusal costs the same time
        return hmac.compare_digest(token.strip(), self._key) & (scheme.lower() == b"bearer")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._key is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self.allows(header):
            return await self.app(scope, receive, send)
        error = ApiError(401, "Incorrect API key provided: send `Authorization: Bearer <key>` with the server's "
                         "--api-key", code="invalid_api_key")
        await self._on_refused(scope, error)(scope, receive, send)


__all__ = ["BearerAuth", "OPEN_PATHS"]
