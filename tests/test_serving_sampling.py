"""Sampling, stop conditions and logprobs of the in-flight Executor, each checked against a
recomputation: PEFT's logits for the same prefix, filtered as HF's TopK / TopP warpers describe,
drawn with a generator seeded like the request's."""

from __future__ import annotations

import math

import pytest
import torch

import loramux as lm
from loramux.errors import LoraRequestError
from serving_helpers import alone, attach, llama, peft_logits, prompt_ids, talkative_prompt, tokenizer  # noqa: F401


def _recomputed_sample(peft_model, ids, adapter, new_tokens, temperature, top_k, top_p, seed):
    """The sampled answer recomputed from scratch: at each step PEFT's logits for the whole prefix,
    temperature, keep the top_k most likely, keep the most likely tokens until their mass reaches
    top_p, one multinomial draw from the request's seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(new_tokens):
        scores = peft_logits(peft_model, ids + out, adapter) / temperature
        if top_k:
            kth = scores.sort(descending=True).values[top_k - 1]
            scores[scores < kth] = -math.inf
        order = scores.argsort(descending=True)
        probs_sorted = torch.softmax(scores[order], dim=-1)
        keep = torch.zeros_like(probs_sorted, dtype=torch.bool)
        mass = 0.0
        for j, p in enumerate(probs_sorted.tolist()):  # the most likely tokens until the mass reaches top_p
            keep[j] = True
            mass += p
            if mass >= top_p:
                break
        masked = scores.clone()
        masked[order[~keep]] = -math.inf
        token = int(torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=gen))
        if token == 2:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 5, 1.0), (1.3, 0, 0.9), (0.7, 8, 0.8)])
def test_seeded_sampling_matches_a_recomputation_and_repeats(llama, tokenizer, temperature, top_k, top_p):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = prompt_ids(3, 6)
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        request = dict(max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p, seed=1234)
        ex.submit(lm.Request(ids, lora=lm.LoraConfig(1, *formats[1]), **request))
        (first,) = ex.run()
        # again, now sharing its steps with other requests (greedy and sampled with other seeds)
        ex.submit(lm.Request(prompt_ids(4, 9), max_new_tokens=8, temperature=1.0, seed=9))
        ex.submit(lm.Request(ids, lora=lm.LoraConfig(1), **request))
        ex.submit(lm.Request(prompt_ids(5, 4), max_new_tokens=8, lora=lm.LoraConfig(1)))
        _, second, _ = ex.run()
        want = _recomputed_sample(peft_model, ids, names[1], 6, temperature, top_k, top_p, 1234)
        assert first.token_ids == want
        assert second.token_ids == want


def test_different_seeds_give_different_answers(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=8)
        ids = talkative_prompt(peft_model, None, 8, first_seed=60)
        for seed in range(6):
            ex.submit(lm.Request(ids, max_new_tokens=8, temperature=2.0, seed=seed))
        answers = {tuple(r.token_ids) for r in ex.run()}
        assert len(answers) > 1


def test_a_temperature_too_small_for_float32_is_greedy_and_fails_no_request_beside_it(llama, tokenizer):
    """logits / 1e-300 overflow float32 (the divisor rounds to 0): the probabilities were NaN and the
    multinomial draw failed the step of every request sharing it. Such a request is greedy instead."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, None, 6, first_seed=64)
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.submit(lm.Request(ids, max_new_tokens=6, temperature=0.9, seed=3))
        for temperature in (1e-300, 1e-40, 1e-6):
            ex.submit(lm.Request(ids, max_new_tokens=6, temperature=temperature, seed=1))
        results = ex.run()
        assert all(r.error is None for r in results), [r.error for r in results]
        assert all(r.token_ids == alone(peft_model, ids, 6, None) for r in results[1:])


def test_logprobs_are_the_models_log_softmax_at_the_chosen_tokens(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, names[0], 5, first_seed=70)
        ex = lm.Executor(engine, tokenizer)
        h = ex.submit(lm.Request(ids, max_new_tokens=5, logprobs=True, lora=lm.LoraConfig(0, *formats[0])))
        (r,) = ex.run()
        assert r.token_ids == alone(peft_model, ids, 5, names[0])
        want = [torch.log_softmax(peft_logits(peft_model, ids + r.token_ids[:k], names[0]), -1)[t].item()
                for k, t in enumerate(r.token_ids)]
        assert r.logprobs == pytest.approx(want, abs=1e-4)
        assert [lp for d in h for lp in d.logprobs] == r.logprobs


def test_top_logprobs_are_the_models_likeliest_tokens_at_each_step(llama, tokenizer):
    """top_logprobs=k: at each step the k likeliest tokens under PEFT's logits with their
    log-softmax, likeliest first, beside a request in the same batch that asks for none; the
    chosen (greedy) token is the first of them."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, names[0], 4, first_seed=72)
        ex = lm.Executor(engine, tokenizer)
        h = ex.submit(lm.Request(ids, max_new_tokens=4, logprobs=True, top_logprobs=3, lora=lm.LoraConfig(0, *formats[0])))
        ex.submit(lm.Request(ids, max_new_tokens=4, logprobs=True))
        r, plain = ex.run()
        assert plain.top_logprobs is None and len(plain.logprobs) == 4
        assert len(r.top_logprobs) == len(r.token_ids) == 4
        for k, (token, top) in enumerate(zip(r.token_ids, r.top_logprobs)):
            want = torch.log_softmax(peft_logits(peft_model, ids + r.token_ids[:k], names[0]).float(), -1)
            values, order = torch.topk(want, 3)
            assert [t for t, _ in top] == order.tolist() and top[0][0] == token
            assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [top for d in h for top in d.top_logprobs] == r.top_logprobs


def test_top_logprobs_need_logprobs_and_a_count_in_range():
    with pytest.raises(LoraRequestError, match="needs logprobs=True"):
        lm.Request("x", top_logprobs=2)
    with pytest.raises(LoraRequestError, match=r"\[0, 20\]"):
        lm.Request("x", logprobs=True, top_logprobs=21)
    with pytest.raises(TypeError, match="top_logprobs must be an int"):
        lm.Request("x", logprobs=True, top_logprobs=2.0)


def test_stop_strings_cut_the_text_and_are_never_streamed(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, None, 8, first_seed=80)
        full = alone(peft_model, ids, 8, None)
        words = tokenizer.decode(full).split()
        stop = f"{words[3]} {words[4][:1]}"  # spans two tokens: held back until it shows up
        cut = tokenizer.decode(full).index(stop)
        ex = lm.Executor(engine, tokenizer)
        h = ex.submit(lm.Request(ids, max_new_tokens=8, stop=["zzz", stop]))
        (r,) = ex.run()
        assert r.finish_reason == "stop" and r.text == tokenizer.decode(full)[:cut]
        assert r.token_ids == full[: len(r.token_ids)] and len(r.token_ids) < 8
        assert "".join(d.text for d in h) == r.text


def test_stop_token_ids_end_the_answer_without_the_token(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, names[2], 8, first_seed=90)
        full = alone(peft_model, ids, 8, names[2])
        ex = lm.Executor(engine, tokenizer)
        ex.submit(lm.Request(ids, max_new_tokens=8, stop_token_ids=[full[3]], lora=lm.LoraConfig(2, *formats[2])))
        (r,) = ex.run()
        assert r.finish_reason == "stop" and r.token_ids == full[: full.index(full[3])]
