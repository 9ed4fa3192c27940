"""The response bodies of the OpenAI API: completions and chat completions, whole or as stream
chunks, with `usage` and the chosen tokens' logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


#: a token's likeliest alternatives: (text, logprob) pairs, likeliest first
Alternatives = Sequence[Tuple[str, float]]


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float], offset: int = 0,
                        tops: Optional[Sequence[Alternatives]] = None) -> Dict[str, Any]:
    """The completions API's logprobs object for the chosen tokens; `top_logprobs` maps each
    alternative's text to its logprob (null when none were asked; texts that decode alike keep the
    likelier, as in a JSON object)."""
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top = None
    if tops is not None:
        top = []
        for alts in tops:
            by_text: Dict[str, float] = {}
            for t, x in alts:
                by_text.setdefault(t, float(x))
            top.append(by_text)
    return {"tokens": list(tokens), "token_logprobs": [float(x) for x in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float],
                  tops: Optional[Sequence[Alternatives]] = None) -> Dict[str, Any]:
    alternatives = tops if tops is not None else [()] * len(tokens)
    return {"content": [{"token": t, "logprob": float(x), "bytes": list(t.encode()),
                         "top_logprobs": [{"token": a, "logprob": float(y), "bytes": list(a.encode())} for a, y in alts]}
                        for t, x, alts in zip(tokens, logprobs, alternatives)]}


def completion(id: str, created: int, model: str, choices: List[Dict[str, Any]], usage_: Dict[str, int]) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def completion_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(id: str, created: int, model: str, choices: List[Dict[str, Any]], usage_: Dict[str, int]) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_}


def chat_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def completion_chunk(id: str, created: int, model: str, choices: List[dict], usage_: Optional[dict] = None) -> dict:
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(id: str, created: int, model: str, choices: List[dict], usage_: Optional[dict] = None) -> dict:
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_delta(index: int, delta: Dict[str, Any], finish_reason: Optional[str] = None,
               logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(name: str, created: int, root: str, parent: Optional[str]) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "loramux", "root": root, "parent": parent}


__all__ = ["new_id", "now", "usage", "completion_logprobs", "chat_logprobs", "completion", "completion_choice",
           "chat_completion", "chat_choice", "completion_chunk", "chat_chunk", "chat_delta", "model_card"]
