"""The request bodies of the OpenAI API this server accepts (completions, chat completions) and of
the adapter endpoints, as strict pydantic models: a wrong type or an out-of-range sampling
parameter is refused with the field named, never coerced."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Literal, Optional, Type, TypeVar, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loramux.serving.request import MAX_TOP_LOGPROBS
from loramux.serving.server.api_errors import ApiError

#: OpenAI allows up to 4 stop sequences; a few more cost nothing here
MAX_STOP = 16
MAX_N = 16


class FieldError(ValueError):
    """A check across a request's fields (in a model validator) that names the field it refused."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    # unknown fields (user, metadata, ...) are ignored as the OpenAI API ignores what it does not use
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """The OpenAI API's optional fields are nullable (`"temperature": null`, what a client sends
        for a parameter set to None): null takes the field's default, except where the field holds
        None itself (completions' `max_tokens: null`: what the context leaves). A required field
        stays required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields

        def null_is_default(name: str) -> bool:
            field = fields.get(name)
            return field is not None and not field.is_required() and type(None) not in get_args(field.annotation)

        return {k: v for k, v in data.items() if v is not None or not null_is_default(k)}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: off
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Optional[int] = Field(None, ge=0, lt=1 << 63)
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None

    @model_validator(mode="after")
    def _supported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise FieldError(name, f"{name} is not supported by this server (only 0)")
        if self.logit_bias:
            raise FieldError("logit_bias", "logit_bias is not supported by this server")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise FieldError("stop", f"stop must be up to {MAX_STOP} non-empty strings")
        if any(t < 0 for t in self.stop_token_ids or []):
            raise FieldError("stop_token_ids", "stop_token_ids must be non-negative token ids")
        return self

    @property
    def stops(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the chosen tokens' + this many likeliest
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _prompt(self):
        if self.echo:
            raise FieldError("echo", "echo is not supported by this server")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise FieldError("prompt", "prompt must not be empty")
        return self

    @property
    def prompts(self) -> List[Union[str, List[int]]]:
        """Each prompt of the request: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str = Field(min_length=1)
    content: Optional[Union[str, List[TextPart]]] = None
    name: Optional[str] = None

    def as_dict(self) -> Dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _chat(self):
        if self.tools:
            raise FieldError("tools", "tools are not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise FieldError("response_format", "response_format other than text is not supported by this server")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(_Strict):
    lora_name: str
    lora_path: str
    task_id: Optional[int] = Field(None, ge=0)


class UnloadAdapterRequest(_Strict):
    lora_name: str
    lora_int_id: Optional[int] = None  # vLLM's field; the name decides here


Model = TypeVar("Model", bound=BaseModel)


def _lone_surrogate(data) -> Optional[list]:
    """The path to a string (or key) holding a UTF-16 surrogate, else None; iterative, so
    no nesting depth json.loads accepts can overflow it."""
    stack = [([], data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or ["body"]
        elif isinstance(value, dict):
            stack.extend((path + [k], k) for k in value)
            stack.extend((path + [k], v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + [i], v) for i, v in enumerate(value))
    return None


def parse(body: bytes, model: Type[Model]) -> Model:
    """The validated request; ApiError 400 naming the field (or the JSON syntax error) otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON body: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    where = _lone_surrogate(data)
    if where is not None:  # JSON's "\ud800" escapes decode to text no tokenizer can encode
        raise ApiError(400, f"{'.'.join(map(str, where))}: not valid Unicode text (a lone surrogate escape)",
                       code="invalid_request", param=str(where[0]))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        value, param = first.get("input"), str(first["loc"][0]) if first["loc"] else None
        refused = (first.get("ctx") or {}).get("error")
        if not first["loc"] and isinstance(refused, FieldError):  # a check across fields: the one it names
            value, param = data.get(refused.param), refused.param
        got = "" if first["type"] == "missing" else f" (got {json.dumps(value, default=str)[:80]})"
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where + ': ' if where else ''}{message}{got}", code="invalid_request",
                       param=param) from None


__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "FieldError", "LoadAdapterRequest", "UnloadAdapterRequest",
           "StreamOptions", "parse", "MAX_N", "MAX_STOP"]
