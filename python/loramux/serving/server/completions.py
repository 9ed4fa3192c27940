"""POST /v1/completions and /v1/chat/completions: the OpenAI request turned into a Generation, and
its events turned into the OpenAI answer, whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, List, Optional, Union

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from loramux.serving.server import openai_responses as shapes
from loramux.serving.server.api_errors import ApiError, from_exception
from loramux.serving.server.generation import Choice, Generation, prompt_count
from loramux.serving.server.openai_schema import ChatCompletionRequest, CompletionRequest
from loramux.serving.server.sse import DONE, EventStream, event, until_disconnect
from loramux.serving.server.state import ServerState


def build(state: ServerState, body: Union[CompletionRequest, ChatCompletionRequest]) -> Generation:
    """The call's choices (prompt i, sample j at index i*n+j; seed+j for sample j), checked against
    the model: an unknown model 404, a prompt the tokenizer refuses or too long 400. Each prompt is
    tokenized here once and goes to the executor as token ids (its step loop would tokenize it again).
    Blocking (a long prompt takes a while to tokenize): call it from a worker thread."""
    chat = isinstance(body, ChatCompletionRequest)
    adapter_name = None if body.model == state.config.base_name else body.model
    if adapter_name is not None:
        state.registry.get(adapter_name)  # 404 before any tokenizing
    prompts: List[Any] = [[m.as_dict() for m in body.messages]] if chat else body.prompts
    max_tokens = body.max_new_tokens if chat else body.max_tokens
    choices = []
    for prompt in prompts:
        ids = state.prompt_ids(prompt)
        wanted = state.check_length(len(ids), max_tokens)
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j
            choices.append(Choice(len(choices), ids, len(ids), wanted, seed))
    logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
    return Generation(state, body, choices, adapter_name, logprobs, top)


def _error_of(choices: List[Choice]) -> Optional[ApiError]:
    failed = next((c for c in choices if c.error is not None), None)
    return from_exception(failed.error) if failed is not None else None


def _token_texts(state: ServerState, token_ids: List[int]) -> List[str]:
    return [state.tokenizer.decode([t]) for t in token_ids]


def _top_texts(state: ServerState, tops: Optional[list]) -> Optional[list]:
    """Each token's alternatives as (text, logprob) pairs, likeliest first; None where none were asked."""
    return [[(state.tokenizer.decode([t]), lp) for t, lp in top] for top in tops] if tops else None


async def answer(state: ServerState, http: HttpRequest, body: Union[CompletionRequest, ChatCompletionRequest]):
    """The whole answer (200), or a streamed one; an error before the first token gets its own status."""
    # off the event loop: tokenizing a prompt near --max-body-bytes stalled every other stream meanwhile
    gen = await asyncio.to_thread(build, state, body)
    gen.start()
    streaming = False
    try:
        if body.stream:
            response = await _stream(state, http, body, gen)
            streaming = isinstance(response, EventStream)  # from here the stream closes the generation
            return response
        choices = await until_disconnect(http, gen.wait())
        if choices is None:  # the client went away: nobody to answer
            return JSONResponse({}, status_code=499)
        error = _error_of(choices)
        if error is not None:
            raise error
        return JSONResponse(_whole(state, body, choices))
    finally:
        if not streaming:
            gen.close()


def _whole(state: ServerState, body, choices: List[Choice]) -> dict:
    chat = isinstance(body, ChatCompletionRequest)
    out, completion_tokens = [], 0
    for c in choices:
        text = getattr(c.result, "text", None)
        text = "".join(c.text) if text is None else text
        completion_tokens += len(c.token_ids)
        lp = None
        if gen_logprobs(body):
            tokens = _token_texts(state, c.token_ids)
            tops = _top_texts(state, c.top_logprobs)
            lp = shapes.chat_logprobs(tokens, c.logprobs, tops) if chat else \
                shapes.completion_logprobs(tokens, c.logprobs, tops=tops)
        make = shapes.chat_choice if chat else shapes.completion_choice
        out.append(make(c.index, text, c.finish_reason, lp))
    make = shapes.chat_completion if chat else shapes.completion
    return make(shapes.new_id("chatcmpl" if chat else "cmpl"), shapes.now(), body.model, out,
                shapes.usage(prompt_count(choices), completion_tokens))


def gen_logprobs(body) -> bool:
    return bool(body.logprobs) if isinstance(body, ChatCompletionRequest) else body.logprobs is not None


async def _stream(state: ServerState, http: HttpRequest, body, gen: Generation):
    """Waits for the first event (so an error before any token is answered with its status), then
    streams; the stream's generator owns the Generation from there and closes it however it ends."""
    events = gen.events()
    first = await until_disconnect(http, events.__anext__())
    if first is None:
        return JSONResponse({}, status_code=499)
    choice, delta = first
    if delta is None and choice.error is not None and not choice.token_ids:
        raise from_exception(choice.error)
    return EventStream(_sse(state, body, gen, first, events), on_close=gen.close)


async def _sse(state: ServerState, body, gen: Generation, first, events) -> AsyncIterator[bytes]:
    chat = isinstance(body, ChatCompletionRequest)
    id_, created, model = shapes.new_id("chatcmpl" if chat else "cmpl"), shapes.now(), body.model
    chunk = shapes.chat_chunk if chat else shapes.completion_chunk
    want_logprobs = gen_logprobs(body)
    # completions' text_offset counts from the start of each choice's answer, not of each chunk
    token_chars = {c.index: 0 for c in gen.choices}
    try:
        if chat:  # OpenAI opens each choice with the assistant's role
            yield event(chunk(id_, created, model, [shapes.chat_delta(c.index, {"role": "assistant", "content": ""})
                                                    for c in gen.choices]))
        pending = [first]
        while True:
            for choice, delta in pending:
                if delta is not None:
                    lp = None
                    if want_logprobs and delta.logprobs:
                        tokens = _token_texts(state, list(delta.token_ids))
                        tops = _top_texts(state, delta.top_logprobs)
                        lp = shapes.chat_logprobs(tokens, delta.logprobs, tops) if chat else \
                            shapes.completion_logprobs(tokens, delta.logprobs, token_chars[choice.index], tops)
                        token_chars[choice.index] += sum(map(len, tokens))
                    part = shapes.chat_delta(choice.index, {"content": delta.text}, None, lp) if chat else \
                        shapes.completion_choice(choice.index, delta.text, None, lp)
                    yield event(chunk(id_, created, model, [part]))
                elif choice.error is not None:
                    yield event(from_exception(choice.error).body())
                else:
                    part = shapes.chat_delta(choice.index, {}, choice.finish_reason) if chat else \
                        shapes.completion_choice(choice.index, "", choice.finish_reason)
                    yield event(chunk(id_, created, model, [part]))
            try:
                pending = [await events.__anext__()]
            except StopAsyncIteration:
                break
        if body.include_usage:
            total = sum(len(c.token_ids) for c in gen.choices)
            yield event(chunk(id_, created, model, [], shapes.usage(prompt_count(gen.choices), total)))
        yield DONE
    finally:
        gen.close()


__all__ = ["answer", "build"]
