"""Errors as the OpenAI API shapes them, {"error": {"message", "type", "param", "code"}}, and the
HTTP status each loramux error class gets (a bad request 400, an unknown model 404, a full queue 429)."""

from __future__ import annotations

from typing import Optional

from starlette.responses import JSONResponse

from loramux.errors import (LoraCacheFullError, LoraConvertError, LoraError, LoraFormatError, LoraNotCachedError,
                            LoraTaskConflictError)
from loramux.serving.server.errors import (AdapterBusyError, AdapterConflictError, AdapterNotFoundError, AdapterPathError,
                                           QueueFullError, RequestError, UnknownModelError)


class ApiError(Exception):
    """An answer other than 200: its status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# most specific first: the first class an error is an instance of decides
_STATUS = [
    (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (AdapterNotFoundError, 404, "invalid_request_error", "adapter_not_found"),
    (AdapterPathError, 403, "permission_error", "adapter_path_refused"),
    (AdapterConflictError, 409, "invalid_request_error", "adapter_conflict"),
    (AdapterBusyError, 409, "invalid_request_error", "adapter_busy"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (RequestError, 400, "invalid_request_error", "invalid_request"),
    (LoraTaskConflictError, 409, "invalid_request_error", "adapter_conflict"),
    (LoraCacheFullError, 503, "server_error", "adapter_cache_full"),
    (LoraNotCachedError, 503, "server_error", "adapter_not_cached"),
    (LoraConvertError, 400, "invalid_request_error", "invalid_adapter"),
    (LoraFormatError, 400, "invalid_request_error", "invalid_request"),
    (ValueError, 400, "invalid_request_error", "invalid_request"),
    (TypeError, 400, "invalid_request_error", "invalid_request"),
]


def from_exception(err: BaseException) -> ApiError:
    """The API error for an exception raised while serving a request; anything unforeseen is a 500
    that names its class (the message of a loramux error says what was wrong)."""
    if isinstance(err, ApiError):
        return err
    message = str(err) or type(err).__name__
    for cls, status, kind, code in _STATUS:
        if isinstance(err, cls):
            return ApiError(status, message, kind, code)
    if isinstance(err, LoraError):
        return ApiError(500, f"{type(err).__name__}: {message}", "server_error", "internal_error")
    return ApiError(500, f"internal error: {type(err).__name__}: {message}", "server_error", "internal_error")


__all__ = ["ApiError", "from_exception"]
