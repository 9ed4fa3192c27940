"""Shared by the serving tests: a tiny Llama with three PEFT adapters (the oracle) and its converted
copies, a word-level tokenizer over its vocabulary, and PEFT's greedy answer for one request alone."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import loramux as lm
from peft_models import VOCAB
from peft_models import build as _build
from peft_models import peft_rows as _peft_rows

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build("llama", torch.float32, tmp_path_factory.mktemp("adapters"))


def attach(ours, **kw):
    kw.setdefault("max_rank", 16)
    kw.setdefault("device_cache_bytes", 4 << 20)
    # the tiny model's adapters take kilobytes; the default host tier is 1 GiB (plus its reserve),
    # pre-faulted by every attach
    kw.setdefault("host_cache_bytes", 64 << 20)
    return lm.attach(ours, **kw)


def prompt_ids(seed: int, length: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=gen).tolist()


_ALONE = {}


def alone(peft_model, ids, max_new_tokens, adapter):
    """PEFT's greedy tokens for this prompt alone (HF generate, batch of one), cut at the end token."""
    key = (tuple(ids), max_new_tokens, adapter, str(peft_model.device))
    if key not in _ALONE:
        x = torch.tensor([ids], device=peft_model.device)
        out = _peft_rows(peft_model, [adapter], lambda m: m.generate(input_ids=x, max_new_tokens=max_new_tokens,
                                                                      do_sample=False, pad_token_id=0))
        tokens = out[0, len(ids):].tolist()
        _ALONE[key] = tokens[: tokens.index(EOS)] if EOS in tokens else tokens
    return _ALONE[key]


@torch.no_grad()
def peft_logits(peft_model, ids, adapter):
    """PEFT's next-token logits (float32) after `ids`, recomputed from scratch (no KV cache)."""
    x = torch.tensor([ids], device=peft_model.device)
    out = _peft_rows(peft_model, [adapter], lambda m: m(input_ids=x).logits[:, -1].float())
    return out[0]


def talkative_prompt(peft_model, adapter, new_tokens: int, first_seed: int = 0, length: int = 7):
    """A prompt whose greedy answer (PEFT, alone) runs all `new_tokens` without an end token."""
    for seed in range(first_seed, first_seed + 200):
        ids = prompt_ids(seed, length)
        if len(alone(peft_model, ids, new_tokens, adapter)) == new_tokens:
            return ids
    raise AssertionError("no prompt of the tiny model answers that long")
