"""The in-flight Executor on a CUDA device: the mixed workload against PEFT alone (float32, adapters
loaded on the copy stream when scheduled; base steps replayed from CUDA graphs), and the decode-step
graphs (float16, the CUDA LoRA kernels) against the same step run eagerly, replayed with changing
adapter mixes and batch sizes inside one bucket."""

from __future__ import annotations

import pytest
import torch

import loramux as lm
from serving_helpers import alone, attach, prompt_ids, tokenizer  # noqa: F401 (fixtures)
from peft_models import build as _build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def llama_cuda(tmp_path_factory):
    return _build("llama", torch.float32, tmp_path_factory.mktemp("adapters-gpu"), "cuda")


@pytest.fixture(scope="module")
def llama_cuda_fp16(tmp_path_factory):
    return _build("llama", torch.float16, tmp_path_factory.mktemp("adapters-gpu16"), "cuda")


def test_mixed_workload_on_cuda_matches_peft_alone(llama_cuda, tokenizer):
    ours, peft_model, names, formats = llama_cuda
    engine = attach(ours)
    gen = torch.Generator().manual_seed(5)
    plan = []
    for i in range(16):
        length, new = int(torch.randint(3, 41, (1,), generator=gen)), int(torch.randint(1, 13, (1,), generator=gen))
        plan.append((prompt_ids(200 + i, length), new, [None, 0, 1, 2][i % 4]))
    try:
        seen, handles = set(), []
        with lm.Executor(engine, tokenizer, max_batch_size=4, max_tokens_per_step=16, cuda_graphs=True) as ex:
            for ids, new, a in plan:
                lora = None
                if a is not None:
                    lora = lm.LoraConfig(a) if a in seen else lm.LoraConfig(a, *formats[a])
                    seen.add(a)
                handles.append(ex.submit(lm.Request(ids, max_new_tokens=new, lora=lora)))
            results = [h.result(timeout=300) for h in handles]
            metrics = ex.metrics()
        for r, (ids, new, a) in zip(results, plan):
            assert r.ok, r.error
            assert r.token_ids == alone(peft_model, ids, new, None if a is None else names[a])
        assert "adapter graphs" in (metrics["cuda_graphs_error"] or "")  # float32 adapters run eagerly
        assert "base graphs" not in (metrics["cuda_graphs_error"] or "")
        assert engine.cache.pinned_ids() == []
    finally:
        engine.detach()


def test_decode_graphs_replay_any_adapter_mix_like_the_eager_step(llama_cuda_fp16, tokenizer):
    ours, peft_model, names, formats = llama_cuda_fp16
    with attach(ours) as engine:
        for task, (w, c) in enumerate(formats):
            engine.cache.put(task, w, c)
        hold = engine.cache.acquire([0, 1, 2])
        s0, s1, s2 = hold.slots
        ex = lm.Executor(engine, tokenizer, max_batch_size=8, cuda_graphs=True)
        step, graphs = ex._step, ex._step.graphs
        assert graphs is not None and not graphs.failed, graphs.error
        prompts = [prompt_ids(300 + r, 5 + 3 * r) for r in range(5)]
        row_slot = [s0, -1, s1, s2, s0]
        step.prefill([(row, 0, ids, row_slot[row]) for row, ids in enumerate(prompts)])  # one packed forward
        positions = [len(p) for p in prompts]
        tokens = [p[-1] for p in prompts]
        for rows, slots in ((5, row_slot), (5, [-1] * 5), (5, [s2] * 5), (3, [s1, s0, -1]), (5, [s1, s2, s0, -1, s1])):
            got = graphs.run(tokens[:rows], positions[:rows], slots, max(positions[:rows]) + 1)
            saved, step.graphs = step.graphs, None
            try:
                want = step.decode(tokens[:rows], positions[:rows], slots)
            finally:
                step.graphs = saved
            assert got is not None
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
            base = None
            if any(s >= 0 for s in slots):  # the adapters change the logits: the graph did apply them
                step.graphs = None
                try:
                    base = step.decode(tokens[:rows], positions[:rows], [-1] * rows)
                finally:
                    step.graphs = saved
                assert (got.float() - base.float()).abs().max() > 1e-2
        assert graphs.captured >= 3 and graphs.replays == 5  # (8 rows: adapters, base), (4 rows: adapters)
        engine.cache.release(hold)


def test_graphs_captured_ahead_serve_steps_without_a_capture(llama_cuda_fp16, tokenizer):
    """capture_graphs before serving captures every batch bucket (adapters and not) for rows up to
    64 positions; decode steps of any size and adapter mix then replay them, none captured late,
    with the eager step's logits; once serving, capture_graphs refuses (its warm-up writes KV rows)."""
    ours, peft_model, names, formats = llama_cuda_fp16
    with attach(ours) as engine:
        for task, (w, c) in enumerate(formats):
            engine.cache.put(task, w, c)
        hold = engine.cache.acquire([0, 1, 2])
        s0, s1, s2 = hold.slots
        ex = lm.Executor(engine, tokenizer, max_batch_size=8, cuda_graphs=True)
        step, graphs = ex._step, ex._step.graphs
        made = ex.capture_graphs(64)
        assert not graphs.failed, graphs.error
        assert made == graphs.captured == 2 * len(graphs.batch_buckets)  # one span bucket (64), both kinds
        prompts = [prompt_ids(600 + r, 4 + 5 * r) for r in range(6)]
        row_slot = [s2, s0, -1, s1, s0, s2]
        step.prefill([(row, 0, ids, row_slot[row]) for row, ids in enumerate(prompts)])
        positions = [len(p) for p in prompts]
        tokens = [p[-1] for p in prompts]
        for rows, slots in ((6, row_slot), (1, [s1]), (3, [-1, -1, -1]), (5, [s0, s1, s2, -1, s0])):
            got = graphs.run(tokens[:rows], positions[:rows], slots, max(positions[:rows]) + 1)
            saved, step.graphs = step.graphs, None
            try:
                want = step.decode(tokens[:rows], positions[:rows], slots)
            finally:
                step.graphs = saved
            assert got is not None
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        assert graphs.captured == made and graphs.replays == 4
        engine.cache.release(hold)
        with ex:
            with pytest.raises(RuntimeError, match="before serving"):
                ex.capture_graphs(64)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_an_overflowing_adapter_fails_alone_on_cuda(llama_cuda, llama_cuda_fp16, tokenizer, precision):
    """On CUDA the prompt chunks of a step share one masked attention (a NaN key reaches every chunk
    of the pack) and decode steps replay graphs: the overflowing request still fails alone with
    LoraNonFiniteError, and the others (greedy, with top_logprobs, sampled) answer as without it."""
    import numpy as np

    ours, peft_model, names, formats = llama_cuda if precision == "float32" else llama_cuda_fp16
    weights, config = formats[1]
    scale = 1e10 if precision == "float32" else 1e4  # finite in the storage type, overflowing the activations
    bad = lm.LoraConfig(7, (weights.astype(np.float64) * scale).astype(weights.dtype), config)
    neighbours = [dict(prompt=prompt_ids(1, 6), max_new_tokens=6),
                  dict(prompt=prompt_ids(3, 9), max_new_tokens=6, logprobs=True, top_logprobs=3,
                       lora=lm.LoraConfig(0, *formats[0])),
                  dict(prompt=prompt_ids(4, 5), max_new_tokens=6, temperature=1.0, seed=11)]
    with attach(ours) as engine:
        def serve(requests):
            ex = lm.Executor(engine, tokenizer, max_batch_size=4, cuda_graphs=True)
            for kw in requests:
                ex.submit(lm.Request(**kw))
            return ex.run()

        want = serve(neighbours)
        got = serve(neighbours[:1] + [dict(prompt=prompt_ids(2, 7), max_new_tokens=6, lora=bad)] + neighbours[1:])
        again = serve(neighbours)  # the failed request's KV row and adapter left nothing behind
        pinned = engine.cache.pinned_ids()
    failed = got.pop(1)
    assert isinstance(failed.error, lm.LoraNonFiniteError) and failed.error.task_id == 7
    for g, w, a in zip(got, want, again):
        assert g.ok and a.ok, (g.error, a.error)
        assert g.token_ids == w.token_ids == a.token_ids
    assert pinned == []
