"""Packed prefill: the prompt chunks of several requests (different adapters, lengths and start
positions) run in one forward of the in-flight Executor, against PEFT run on each prompt alone
(its logits recomputed from scratch, and HF generate's greedy tokens)."""

from __future__ import annotations

import torch

import loramux as lm
from serving_helpers import alone, attach, peft_logits, prompt_ids, llama, tokenizer  # noqa: F401 (fixtures)


class _Forwards:
    """Counts the forwards reaching the first decoder layer and the tokens of each."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.model.layers[0].register_forward_pre_hook(
            lambda m, args: self.shapes.append(tuple(args[0].shape[:2])))


def test_packed_prefill_of_chunks_with_different_adapters_matches_peft_logits(llama, tokenizer):
    """Forward 1 packs: row 0 a whole prompt (adapter 0), row 1 the first 7 of 20 tokens (no
    adapter), row 2 a whole prompt (adapter 2), row 3 the first 10 of 15 (adapter 1). Forward 2
    packs the rest of rows 1 and 3 with a whole prompt on row 4 (adapter 1). Every completed
    prompt's logits equal PEFT's for that prompt alone; the chunks of forward 1 that did not end a
    prompt still come back (their logits are those of their prefix)."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    forwards = _Forwards(ours)
    try:
        for task, (w, c) in enumerate(formats):
            engine.cache.put(task, w, c)
        hold = engine.cache.acquire([0, 1, 2])
        slot = dict(zip((0, 1, 2), hold.slots))
        ex = lm.Executor(engine, tokenizer, max_batch_size=8)
        step = ex._step
        ex.kv.reserve(5, 32)
        prompts = [prompt_ids(400 + r, n) for r, n in enumerate((9, 20, 4, 15, 12))]
        adapter = [0, None, 2, 1, 1]
        s = [-1 if a is None else slot[a] for a in adapter]
        first = step.prefill([(0, 0, prompts[0], s[0]), (1, 0, prompts[1][:7], s[1]), (2, 0, prompts[2], s[2]),
                              (3, 0, prompts[3][:10], s[3])])
        second = step.prefill([(1, 7, prompts[1][7:], s[1]), (3, 10, prompts[3][10:], s[3]), (4, 0, prompts[4], s[4])])
        assert forwards.shapes == [(1, 9 + 7 + 4 + 10), (1, 13 + 5 + 12)]  # two packed forwards, no padding
        assert first.shape[0] == 4 and second.shape[0] == 3

        def want(row, upto=None):
            name = None if adapter[row] is None else names[adapter[row]]
            return peft_logits(peft_model, prompts[row][:upto], name)

        expected = [(first[0], want(0)), (first[1], want(1, 7)), (first[2], want(2)), (first[3], want(3, 10)),
                    (second[0], want(1)), (second[1], want(3)), (second[2], want(4))]
        for got, ref in expected:
            torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=1e-4)
        # the rows differ by adapter: a packed forward did not give every token one adapter
        no_adapter = peft_logits(peft_model, prompts[0], None)
        assert (first[0].float() - no_adapter).abs().max() > 1e-3
        engine.cache.release(hold)
    finally:
        forwards.handle.remove()
        engine.detach()


def test_executor_packs_chunked_prompts_of_mixed_adapters_and_answers_as_peft_alone(llama, tokenizer):
    """Six requests of 5..33 prompt tokens over three adapters and none, submitted at once under a
    24-token step budget: the prompts prefill in chunks packed several per forward (fewer forwards
    than chunks, some forward with more tokens than any one chunk of its step), and every greedy
    answer equals PEFT's for that request alone."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    plan = [(prompt_ids(500 + i, n), new, a) for i, (n, new, a) in
            enumerate([(5, 6, 0), (33, 4, None), (11, 8, 2), (27, 5, 1), (8, 7, 0), (19, 3, 1)])]
    forwards = _Forwards(ours)
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=8, max_tokens_per_step=24)
        seen = set()
        for ids, new, a in plan:
            lora = None if a is None else (lm.LoraConfig(a) if a in seen else lm.LoraConfig(a, *formats[a]))
            seen.add(a)
            ex.submit(lm.Request(ids, max_new_tokens=new, lora=lora))
        results = ex.run()
        metrics = ex.metrics()
        for r, (ids, new, a) in zip(results, plan):
            assert r.ok, r.error
            assert r.token_ids == alone(peft_model, ids, new, None if a is None else names[a])
        assert metrics["prefill_chunks"] > len(plan)  # some prompts took several chunks
        assert metrics["prefill_forwards"] < metrics["prefill_chunks"]
        packed = [t for b, t in forwards.shapes if b == 1 and t > 1]
        assert len(packed) == metrics["prefill_forwards"] and max(packed) == 24  # a full budget of several chunks
    finally:
        forwards.handle.remove()
        engine.detach()


def test_cpu_packed_prefill_attends_chunk_by_chunk(llama, tokenizer, monkeypatch):
    """On the CPU each chunk of a packed forward attends to its own row prefix (one SDPA call per
    chunk and layer, the queries and keys of that chunk only), not the whole pack under one mask;
    its logits equal PEFT's for each prompt alone, the second chunk of a prompt included."""
    import transformers.integrations.sdpa_attention as sdpa

    ours, peft_model, names, formats = llama
    engine = attach(ours)
    calls = []
    real = sdpa.sdpa_attention_forward

    def spy(module, query, key, value, mask, **kwargs):
        calls.append((query.shape[2], key.shape[2]))
        return real(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    try:
        engine.cache.put(0, *formats[0])
        hold = engine.cache.acquire([0])
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.kv.reserve(3, 32)
        prompts = [prompt_ids(700 + r, n) for r, n in enumerate((9, 14, 6))]
        step = ex._step
        step.prefill([(1, 0, prompts[1][:5], -1)])
        got = step.prefill([(0, 0, prompts[0], hold.slots[0]), (1, 5, prompts[1][5:], -1), (2, 0, prompts[2], -1)])
        layers = ours.config.num_hidden_layers
        # (the one-chunk forward before it takes HF's registered SDPA, which the spy does not see)
        assert calls == [(9, 9), (9, 14), (6, 6)] * layers
        for row, logits in enumerate(got):
            ref = peft_logits(peft_model, prompts[row], names[0] if row == 0 else None)
            torch.testing.assert_close(logits.float(), ref, atol=1e-4, rtol=1e-4)
        assert ours.config._attn_implementation == "sdpa"
        engine.cache.release(hold)
    finally:
        engine.detach()
