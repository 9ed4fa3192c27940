"""One request's numbers going bad stays that request's problem: an adapter whose (finite, in-format)
weights overflow the model's dtype makes its own rows' logits NaN or infinite; that request fails
alone with LoraNonFiniteError, and every other request of its steps gets the tokens it gets without
it, whether greedy or sampled, with logprobs or not, packed into one prefill with it or later
taking over its KV row, or in an encoder-decoder's static batch."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import loramux as lm
import loramux.serving.model_step as model_step
from loramux.errors import LoraNonFiniteError, LoraRequestError, LoraStepError
from loramux.serving.sampling import choose
from peft_models import build
from serving_helpers import alone, attach, llama, prompt_ids, tokenizer  # noqa: F401 (fixtures)

OVERFLOWING_TASK = 7


def _overflowing(formats):
    """Adapter 1 (every projection of every layer) with its weights scaled by 1e10: finite float32,
    accepted by the format, and enough to overflow the activations."""
    weights, config = formats[1]
    return lm.LoraConfig(OVERFLOWING_TASK, (weights.astype(np.float64) * 1e10).astype(weights.dtype), config)


def _neighbours():
    """Requests to serve beside the overflowing one: greedy, greedy with top_logprobs, sampled."""
    return [dict(prompt=prompt_ids(1, 6), max_new_tokens=5),
            dict(prompt=prompt_ids(3, 9), max_new_tokens=5, logprobs=True, top_logprobs=3),
            dict(prompt=prompt_ids(4, 5), max_new_tokens=5, temperature=1.0, seed=11, logprobs=True)]


def _serve(engine, tokenizer, requests):
    ex = lm.Executor(engine, tokenizer, max_batch_size=4)
    for kw in requests:
        ex.submit(lm.Request(**kw))
    return ex.run()


@pytest.mark.parametrize("options", [{}, dict(logprobs=True, top_logprobs=2), dict(temperature=1.0, seed=5),
                                     dict(temperature=0.7, top_p=0.9, seed=5, logprobs=True)],
                         ids=["greedy", "greedy-top_logprobs", "sampled", "sampled-logprobs"])
def test_an_adapter_that_overflows_fails_its_request_alone(llama, tokenizer, options):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        want = _serve(engine, tokenizer, _neighbours())
        bad = dict(prompt=prompt_ids(2, 7), max_new_tokens=5, lora=_overflowing(formats), **options)
        got = _serve(engine, tokenizer, _neighbours()[:1] + [bad] + _neighbours()[1:])
    failed = got.pop(1)
    assert failed.finish_reason == "error" and isinstance(failed.error, LoraNonFiniteError)
    assert isinstance(failed.error, LoraRequestError) and failed.error.task_id == OVERFLOWING_TASK
    assert f"task_id {OVERFLOWING_TASK}" in str(failed.error) and "not finite" in str(failed.error)
    for g, w in zip(got, want):
        assert g.ok, g.error
        assert (g.token_ids, g.logprobs, g.top_logprobs) == (w.token_ids, w.logprobs, w.top_logprobs)
    assert got[0].token_ids == alone(peft_model, prompt_ids(1, 6), 5, None)


def test_an_overflowing_chunk_in_one_masked_pack_fails_alone(llama, tokenizer, monkeypatch):
    """The GPU packs the prompt chunks under one masked attention (the CPU attends chunk by chunk):
    there the overflowing chunk's NaN keys reach the chunks beside it. They are prefilled again
    alone, and answer as without it."""
    monkeypatch.setattr(model_step, "packed_attention", lambda model, blocks: contextlib.nullcontext())
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.submit(lm.Request(prompt_ids(1, 6), max_new_tokens=5))
        ex.submit(lm.Request(prompt_ids(2, 6), max_new_tokens=5, lora=_overflowing(formats)))
        ex.submit(lm.Request(prompt_ids(3, 6), max_new_tokens=5, lora=lm.LoraConfig(0, *formats[0])))
        first, failed, third = ex.run()
    assert isinstance(failed.error, LoraNonFiniteError)
    assert first.ok and first.token_ids == alone(peft_model, prompt_ids(1, 6), 5, None)
    assert third.ok and third.token_ids == alone(peft_model, prompt_ids(3, 6), 5, names[0])


def test_an_overflowing_prompt_chunk_fails_before_its_last_chunk(llama, tokenizer):
    """A prompt prefilled in chunks fails at its first non-finite chunk; the request beside it goes on."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4, max_tokens_per_step=8)
        ex.submit(lm.Request(prompt_ids(2, 30), max_new_tokens=3, lora=_overflowing(formats)))
        ex.submit(lm.Request(prompt_ids(5, 12), max_new_tokens=6))
        failed, other = ex.run()
        assert ex.metrics()["prefill_forwards"] < 5  # the 30 tokens would take 4 forwards alone
    assert isinstance(failed.error, LoraNonFiniteError) and failed.token_ids == []
    assert other.ok and other.token_ids == alone(peft_model, prompt_ids(5, 12), 6, None)


def test_the_next_request_in_a_failed_requests_kv_row_answers_as_alone(llama, tokenizer):
    """Positions past a row's length enter its attention masked, but a NaN left there by the request
    that held the row before still turns it NaN: a failed request's row is zeroed as it leaves."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.submit(lm.Request(prompt_ids(2, 12), max_new_tokens=5, lora=_overflowing(formats)))
        (failed,) = ex.run()
        # a short prompt in the failed request's row, attending as far as the long one beside it
        ex.submit(lm.Request(prompt_ids(1, 4), max_new_tokens=5))
        ex.submit(lm.Request(prompt_ids(3, 20), max_new_tokens=5))
        short, long = ex.run()
    assert isinstance(failed.error, LoraNonFiniteError)
    assert short.ok and short.token_ids == alone(peft_model, prompt_ids(1, 4), 5, None)
    assert long.ok and long.token_ids == alone(peft_model, prompt_ids(3, 20), 5, None)


def test_choose_gives_a_fault_for_rows_not_finite_and_the_same_picks_for_the_others():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    requests = [lm.Request([5], logprobs=True, top_logprobs=3), lm.Request([5], temperature=1.0, seed=1),
                lm.Request([5], temperature=1.0, seed=2, logprobs=True), lm.Request([5], logprobs=True)]

    def generators():
        return [None] + [torch.Generator().manual_seed(r.seed) for r in requests[1:3]] + [None]

    clean = choose(logits, requests, generators())
    poisoned = logits.clone()
    poisoned[1, 7] = math.nan
    poisoned[3, 0] = math.inf
    got = choose(poisoned, requests, generators())
    assert got.faults == [None, "logits", None, "logits"]
    for i in (0, 2):
        assert (got.tokens[i], got.logprobs[i], got.tops[i]) == (clean.tokens[i], clean.logprobs[i], clean.tops[i])
    # finite logits too large for a temperature: the probabilities overflow, that row alone fails
    huge = logits.clone()
    huge[2] *= 1e35
    cold = [requests[0], requests[1], lm.Request([5], temperature=1e-4, seed=2)]
    got = choose(huge[:3], cold, [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert got.faults == [None, None, "probabilities"]
    assert got.tokens[:2] == clean.tokens[:2]


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return build("bart", torch.float32, tmp_path_factory.mktemp("bart-adapters"))


class _TokenizerFailingOn:
    """The tokenizer, except that decoding ids that hold `token` raises (a tokenizer bug one answer
    runs into)."""

    def __init__(self, tokenizer, token):
        self._tokenizer, self._token = tokenizer, token

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, ids, **kwargs):
        if self._token in list(ids):
            raise ValueError(f"cannot decode {self._token}")
        return self._tokenizer.decode(ids, **kwargs)


def test_encoder_decoder_batches_fail_an_overflowing_row_or_an_undecodable_answer_alone(bart, tokenizer):
    """Encoder-decoder models run in static generate batches: a row whose logits went NaN got the
    argmax of NaN as its answer, and a tokenizer failing on one answer ended the whole batch (and
    the step loop)."""
    ours, peft_model, names, formats = bart
    prompts = [prompt_ids(1, 6), prompt_ids(2, 6), prompt_ids(4, 6)]
    with attach(ours) as engine:
        plain = lm.LoraConfig(0, *formats[0])  # the random model answers most prompts alike; an adapter does not
        neighbours = [dict(prompt=prompts[0], max_new_tokens=4), dict(prompt=prompts[2], max_new_tokens=4, lora=plain)]
        want = _serve(engine, tokenizer, neighbours)
        assert want[0].token_ids != want[1].token_ids
        bad = dict(prompt=prompts[1], max_new_tokens=4, lora=_overflowing(formats))
        got = _serve(engine, tokenizer, [neighbours[0], bad, neighbours[1]])
        assert isinstance(got[1].error, LoraNonFiniteError) and got[1].token_ids == []
        assert [(r.token_ids, r.text) for r in (got[0], got[2])] == [(w.token_ids, w.text) for w in want]
        # a token only the first answer holds
        token = next(t for t in want[0].token_ids if t not in want[1].token_ids)
        got = _serve(engine, _TokenizerFailingOn(tokenizer, token), neighbours)
    assert isinstance(got[0].error, LoraStepError) and "cannot decode" in str(got[0].error)
    assert got[1].ok and (got[1].token_ids, got[1].text) == (want[1].token_ids, want[1].text)
