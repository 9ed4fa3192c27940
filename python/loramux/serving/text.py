"""Text in and out of the model: a prompt's token ids (chat messages through the tokenizer's
template), and incremental detokenization for streaming, which holds text back while it ends in an
incomplete character or could still become one of the request's stop strings."""

from __future__ import annotations

from typing import List, Optional, Sequence

from loramux.errors import LoraRequestError


def prompt_token_ids(tokenizer, model, prompt) -> List[int]:
    """The prompt's token ids; a prompt the tokenizer refuses, or ids outside the model's
    vocabulary, raise LoraRequestError."""
    try:
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            prompt = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, str):
            prompt = tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt]
    except Exception as err:  # e.g. chat messages for a tokenizer without a chat template
        raise LoraRequestError(f"the tokenizer refused this prompt: {type(err).__name__}: {err}") from None
    check_token_ids(ids, model_vocab(model))
    return ids


def model_vocab(model) -> int:
    """How many token ids the model's input embedding takes."""
    return getattr(model.get_input_embeddings(), "num_embeddings", None) or model.config.vocab_size


def check_token_ids(ids: Sequence[int], vocab: int) -> None:
    """Raises LoraRequestError unless `ids` is a non-empty prompt of ids in [0, vocab)."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if not ids or bad:
        raise LoraRequestError(f"prompt token ids must be in [0, {vocab}) and not empty; got {bad[:4] or 'none'}")


def _decoder(tokenizer):
    """tokenizer.decode(ids, skip_special_tokens=True), through the Rust backend of a fast tokenizer
    when that is exactly what decode would do (no cleanup pass, decode not overridden): the Python
    wrapper costs more than decoding a few tokens, and the step loop decodes every row each step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    mro = type(tokenizer).__mro__

    def owner(name):
        return next((i for i, k in enumerate(mro) if name in vars(k)), None)

    fast = (backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False
            and owner("_decode") is not None and owner("_decode") == owner("backend_tokenizer")
            and (owner("decode") or 0) >= owner("_decode"))
    if fast:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalText:
    """Decodes a growing list of token ids; `add` returns the text that is now safe to stream.

    Each token decodes a short window, not the whole answer (as vLLM's incremental detokenizer
    does): the text of ids[prefix:] minus that of ids[prefix:read] is what the new ids add, where
    ids[prefix:read] are the last ids already turned into text, kept as context (a decoder may
    treat a sequence's first token differently). Ids whose text ends in an incomplete character
    wait for the ids that complete it."""

    def __init__(self, tokenizer, stop: Optional[Sequence[str]] = None):
        self._decode = _decoder(tokenizer)
        self.stop = list(stop or [])
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string's prefix may be pending
        self.ids: List[int] = []
        self.text = ""  # the whole answer's text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of self.text already streamed
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def _advance(self, final: bool) -> None:
        """Appends to self.text what ids[read:] add (held back while it ends in an incomplete
        character, unless the answer is over)."""
        if self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> str:
        """Adds a token; returns the newly streamable text. Sets `stopped` when a stop string shows up
        (the text is cut before it)."""
        self.ids.append(token_id)
        self._advance(final=False)
        if self.stop:
            start = max(0, self.sent - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._hold
        if safe <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : safe], safe
        return piece

    def flush(self) -> str:
        """The rest of the text (the answer is over)."""
        if not self.stopped:
            self._advance(final=True)
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece


def end_token_ids(tokenizer, model) -> set:
    """The tokens an answer ends at: the tokenizer's end token and the model's generation_config
    eos_token_id (an int or a list), where generate stops a row."""
    stops = set()
    generation_config = getattr(model, "generation_config", None)
    for eos in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if eos is not None:
            stops.update([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
    return stops


def pad_token_id(tokenizer) -> int:
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if cand is not None:
            return int(cand)
    return 0


__all__ = ["IncrementalText", "check_token_ids", "end_token_ids", "model_vocab", "pad_token_id", "prompt_token_ids"]
