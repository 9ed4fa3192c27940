"""The in-flight Executor on a tiny Llama, PEFT (one request at a time, HF generate) as the oracle: a
mixed workload submitted while others run gives every request the greedy tokens it gets alone;
chunked prefill, waiting for KV rows and adapter slots change nothing; failures stay local."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import loramux as lm
from loramux.errors import LoraFormatError, LoraRequestError, LoraStepError
from serving_helpers import alone, attach, llama, prompt_ids, talkative_prompt, tokenizer  # noqa: F401 (fixtures)


def _mixed_plan(n, seed=0):
    """(prompt ids, max_new_tokens, adapter index or None): prompts 3..40 tokens, 1..12 new tokens,
    three adapters and no-adapter rows."""
    gen = torch.Generator().manual_seed(seed)
    plan = []
    for i in range(n):
        length = int(torch.randint(3, 41, (1,), generator=gen))
        new = int(torch.randint(1, 13, (1,), generator=gen))
        adapter = [None, 0, 1, 2][i % 4]
        plan.append((prompt_ids(100 + i, length), new, adapter))
    return plan


def _lora(adapter, formats, seen):
    if adapter is None:
        return None
    if adapter in seen:
        return lm.LoraConfig(adapter)
    seen.add(adapter)
    return lm.LoraConfig(adapter, *formats[adapter])


def test_mixed_workload_submitted_while_running_matches_peft_alone(llama, tokenizer):
    """16 requests, 4 running at most, prompts chunked by a 16-token step budget; half submitted
    from another thread while the first half runs. Each answer equals PEFT's for it alone."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    plan = _mixed_plan(16)
    try:
        seen, handles = set(), [None] * len(plan)
        with lm.Executor(engine, tokenizer, max_batch_size=4, max_tokens_per_step=16) as ex:
            for i in range(8):
                ids, new, adapter = plan[i]
                handles[i] = ex.submit(lm.Request(ids, max_new_tokens=new, lora=_lora(adapter, formats, seen)))
            next(iter(handles[0]))  # the loop is producing tokens when the rest arrive

            def late():
                for i in range(8, 16):
                    ids, new, adapter = plan[i]
                    handles[i] = ex.submit(lm.Request(ids, max_new_tokens=new, lora=_lora(adapter, formats, seen)))

            t = threading.Thread(target=late)
            t.start()
            t.join()
            results = [h.result(timeout=600) for h in handles]
            metrics = ex.metrics()
        assert metrics["prefill_chunks"] > len(plan)  # some prompts took several chunks
        assert metrics["requests_finished"] == len(plan) and metrics["running"] == 0
        for r, (ids, new, adapter) in zip(results, plan):
            assert r.ok, r.error
            assert r.token_ids == alone(peft_model, ids, new, None if adapter is None else names[adapter]), r
            assert r.prompt_tokens == len(ids)
            assert r.finish_reason == ("length" if len(r.token_ids) == new else "stop")
            assert r.ttft_s is not None and r.ttft_s >= 0
    finally:
        engine.detach()


def test_run_without_a_thread_and_streams_match_results(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=3)
        plan = _mixed_plan(5, seed=1)
        seen = set()
        handles = [ex.submit(lm.Request(ids, max_new_tokens=new, lora=_lora(a, formats, seen))) for ids, new, a in plan]
        results = ex.run()
        assert [r.request_id for r in results] == [h.request_id for h in handles]
        for h, r, (ids, new, a) in zip(handles, results, plan):
            deltas = list(h)
            assert [t for d in deltas for t in d.token_ids] == r.token_ids
            assert "".join(d.text for d in deltas) == r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True)
            assert r.token_ids == alone(peft_model, ids, new, None if a is None else names[a])


def test_async_iteration_does_not_block_the_event_loop(llama, tokenizer):
    import asyncio

    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = prompt_ids(7, 9)

        async def main(ex):
            ticks = 0
            stop = asyncio.Event()

            async def ticker():
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            tick_task = asyncio.create_task(ticker())
            h = ex.submit(lm.Request(ids, max_new_tokens=6, lora=lm.LoraConfig(1, *formats[1])))
            got = [d async for d in h]
            stop.set()
            await tick_task
            return got, h.result(), ticks

        with lm.Executor(engine, tokenizer) as ex:
            deltas, result, ticks = asyncio.run(main(ex))
        assert [t for d in deltas for t in d.token_ids] == result.token_ids == alone(peft_model, ids, 6, names[1])
        assert ticks > len(deltas)  # the loop kept running other tasks while it waited for tokens


def test_cancel_frees_the_kv_row_and_the_adapter_hold(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, names[0], 40, first_seed=11)
        full = alone(peft_model, ids, 40, names[0])
        with lm.Executor(engine, tokenizer, max_batch_size=2) as ex:
            h = ex.submit(lm.Request(ids, max_new_tokens=40, lora=lm.LoraConfig(0, *formats[0])))
            it = iter(h)
            next(it)
            assert engine.cache.pinned_ids() == [0]
            h.cancel()
            r = h.result(timeout=60)
            metrics = ex.metrics()
            pinned = engine.cache.pinned_ids()
        assert r.finish_reason == "cancelled" and r.error is None
        assert 1 <= len(r.token_ids) < len(full) and r.token_ids == full[: len(r.token_ids)]
        assert pinned == [] and metrics["running"] == 0 and metrics["kv_bytes_in_use"] == 0
        assert metrics["requests_cancelled"] == 1


def test_a_request_that_could_never_fit_fails_alone_and_others_wait_for_rows(llama, tokenizer):
    """A KV budget of 64 positions (rows x longest row): a request needing 70 fails alone with a typed
    error; four requests needing 20 each run three at a time (the fourth waits) and match PEFT."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    with pytest.raises(ValueError, match="too small"):
        lm.Executor(engine, tokenizer, max_batch_size=4, kv_cache_bytes=1, max_seq_len=32)
    per_token = 2 * ours.config.num_hidden_layers * ours.config.num_key_value_heads * \
        (ours.config.hidden_size // ours.config.num_attention_heads) * 4
    try:
        batches = []
        hook = ours.model.layers[0].register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        ex = lm.Executor(engine, tokenizer, max_batch_size=4, kv_cache_bytes=2 * 32 * per_token, max_seq_len=128)
        assert ex.kv.max_seq_len == 64  # the budget, not the model, limits a row (CPU rows grow to it)
        big = ex.submit(lm.Request(prompt_ids(1, 60), max_new_tokens=10))
        small = [ex.submit(lm.Request(prompt_ids(2 + i, 12), max_new_tokens=8)) for i in range(4)]
        results = ex.run()
        assert isinstance(results[0].error, LoraRequestError) and "never fit" in str(results[0].error)
        assert results[0].finish_reason == "error"
        for i, r in enumerate(results[1:]):
            assert r.ok and r.token_ids == alone(peft_model, prompt_ids(2 + i, 12), 8, None)
        assert ex.kv.bytes_allocated <= 2 * 32 * per_token
        assert max(batches) == 3  # decode steps of three rows: the fourth request waited for memory
        assert big.done() and all(h.done() for h in small)
    finally:
        hook.remove()
        engine.detach()


def _per_token(config):
    return 2 * config.num_hidden_layers * config.num_key_value_heads * \
        (config.hidden_size // config.num_attention_heads) * 4


def test_a_grown_kv_cache_admits_a_lone_request_a_fresh_one_would(llama, tokenizer):
    """A KV budget of 64 positions and 4 rows: a first short request lays the buffers out for every
    row (4 x 5 positions); a request needing 50 still runs alone afterwards, as on a fresh Executor
    (the buffers re-laid for the rows in use), one submitted beside it waits for its row; one
    needing 70 fails alone naming max_new_tokens and the sizes."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4, kv_cache_bytes=64 * _per_token(ours.config),
                         max_seq_len=128)
        ex.submit(lm.Request(prompt_ids(60, 3), max_new_tokens=2))
        (first,) = ex.run()
        assert first.ok and ex.kv.rows_alloc == 4 and ex.kv.capacity < 50
        long_ids = talkative_prompt(peft_model, names[0], 40, first_seed=61, length=10)
        ex.submit(lm.Request(long_ids, max_new_tokens=40, lora=lm.LoraConfig(0, *formats[0])))
        ex.submit(lm.Request(prompt_ids(62, 6), max_new_tokens=4))
        ex.submit(lm.Request(prompt_ids(63, 10), max_new_tokens=60))
        long, beside, never = ex.run()
        assert long.ok, long.error
        assert long.token_ids == alone(peft_model, long_ids, 40, names[0])
        assert beside.ok and beside.token_ids == alone(peft_model, prompt_ids(62, 6), 4, None)
        assert isinstance(never.error, LoraRequestError) and "never fit" in str(never.error)
        for part in ("max_new_tokens=60", "10 tokens", "70 KV positions", "the 64 one request can hold"):
            assert part in str(never.error), never.error
        assert ex.kv.bytes_allocated <= 64 * _per_token(ours.config)
        assert engine.cache.pinned_ids() == [] and ex.metrics()["running"] == 0


def test_lora_config_refuses_a_task_id_the_cache_cannot_hold(llama):
    """The cache's ids are u64: LoraConfig refuses 2**64 and more where the request is built."""
    ours, peft_model, names, formats = llama
    with pytest.raises(LoraRequestError, match=r"task_id must be an int in \[0, 2\*\*64\)"):
        lm.LoraConfig(2 ** 64, *formats[0])
    assert lm.LoraConfig(2 ** 64 - 1).task_id == 2 ** 64 - 1


def test_a_task_id_the_cache_refuses_fails_that_request_alone(llama, tokenizer):
    """Whatever admitting a request raises (here the cache refusing an id changed after LoraConfig
    checked it) fails that request alone, typed (the cause chained), as does a broadcast weights
    view too large to copy: the request running meanwhile goes on as PEFT says, the cache keeps
    what it had, and the executor still serves."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, names[1], 40, first_seed=70)
        with lm.Executor(engine, tokenizer, max_batch_size=4) as ex:
            good = ex.submit(lm.Request(ids, max_new_tokens=40, lora=lm.LoraConfig(1, *formats[1])))
            next(iter(good))  # running when the bad ones arrive
            sneaked = lm.LoraConfig(3, *formats[0])
            sneaked.task_id = 2 ** 64
            bad = ex.submit(lm.Request(prompt_ids(71, 5), max_new_tokens=3, lora=sneaked))
            rows = formats[0][1].shape[0]  # 2**47 bytes a row behind 2 bytes: more than any memory to copy
            huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), (rows, 2 ** 46), (0, 0))
            broadcast = lm.LoraConfig(4, huge, formats[0][1])
            strided = ex.submit(lm.Request(prompt_ids(72, 5), max_new_tokens=3, lora=broadcast))
            bad_r, strided_r = bad.result(timeout=120), strided.result(timeout=120)
            good_r = good.result(timeout=120)
            again = ex.submit(lm.Request(prompt_ids(73, 5), max_new_tokens=3, lora=lm.LoraConfig(1)))
            after = again.result(timeout=120)
        assert isinstance(bad_r.error, LoraRequestError) and bad_r.finish_reason == "error"
        assert isinstance(bad_r.error.__cause__, ValueError) and "2**64" in str(bad_r.error)
        assert isinstance(strided_r.error, LoraFormatError) and "not contiguous" in str(strided_r.error)
        assert good_r.ok, good_r.error
        assert good_r.token_ids == alone(peft_model, ids, 40, names[1])
        assert after.ok and after.token_ids == alone(peft_model, prompt_ids(73, 5), 3, names[1])
        assert engine.cache.task_ids() == [1] and engine.cache.pinned_ids() == []


def test_a_failure_starting_admitted_requests_fails_them_alone(llama, tokenizer):
    """The KV reservation for newly admitted requests raising (no memory for their rows) fails
    those requests with LoraStepError; the request already running goes on."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ids = talkative_prompt(peft_model, names[2], 12, first_seed=80)
        running = ex.submit(lm.Request(ids, max_new_tokens=12, lora=lm.LoraConfig(2, *formats[2])))
        ex._step_once()  # admitted, prefilled, decoding
        reserve = ex.kv.reserve

        def no_memory(rows, length):
            raise MemoryError("no memory for the new rows (injected)")

        ex.kv.reserve = no_memory
        late = ex.submit(lm.Request(prompt_ids(81, 5), max_new_tokens=3, lora=lm.LoraConfig(2)))
        ex._step_once()
        ex.kv.reserve = reserve
        assert late.done()  # failed at once, not lost between the queue and the running rows
        for _ in range(20):
            if running.done():
                break
            ex._step_once()
        first, second = running.result(timeout=0), late.result(timeout=0)
        assert first.ok and first.token_ids == alone(peft_model, ids, 12, names[2])
        assert isinstance(second.error, LoraStepError) and "injected" in str(second.error)
        assert engine.cache.pinned_ids() == [] and ex.metrics()["running"] == 0


def test_prompt_longer_than_the_model_fails_alone(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_seq_len=24)
        ex.submit(lm.Request(prompt_ids(3, 20), max_new_tokens=5))
        ex.submit(lm.Request(prompt_ids(4, 10), max_new_tokens=5))
        too_long, fine = ex.run()
        assert isinstance(too_long.error, LoraRequestError) and "exceed max_seq_len=24" in str(too_long.error)
        assert fine.ok and fine.token_ids == alone(peft_model, prompt_ids(4, 10), 5, None)


def test_prompt_token_ids_outside_the_vocabulary_are_refused_at_submit(llama, tokenizer):
    """Nothing is queued: the handle of a request the model could not embed would otherwise only
    fail when admitted. A text prompt the tokenizer turns into no ids fails alone when admitted."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer)
        vocab = ours.get_input_embeddings().num_embeddings
        for ids in ([5, vocab], [-1, 5], np.array([5, vocab + 7])):
            with pytest.raises(LoraRequestError, match=rf"\[0, {vocab}\)"):
                ex.submit(lm.Request(ids, max_new_tokens=2))
        ex.submit(lm.Request("   ", max_new_tokens=2))
        ex.submit(lm.Request(prompt_ids(4, 10), max_new_tokens=5))
        empty, fine = ex.run()
        assert isinstance(empty.error, LoraRequestError) and "not empty" in str(empty.error)
        assert fine.ok and fine.token_ids == alone(peft_model, prompt_ids(4, 10), 5, None)
        assert ex.metrics()["requests_submitted"] == 2


class _Faulty:
    """A forward pre-hook on the first decoder layer that raises `error` on its `at`-th call."""

    def __init__(self, model, at, error):
        self.calls, self.at, self.error = 0, at, error
        self.handle = model.model.layers[0].register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise self.error


def test_an_exception_in_a_step_fails_only_that_steps_requests(llama, tokenizer):
    """Step 1 prefills A and B (one packed forward: layer call 1) and decodes both (call 2, which
    fails): A and B fail with LoraStepError (the cause chained); C, admitted after, runs as PEFT
    says; so does D later."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    fault = _Faulty(ours, 2, RuntimeError("CUDA error: an illegal memory access (injected)"))
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=2)
        ids = [prompt_ids(20 + i, 5 + i) for i in range(4)]
        ex.submit(lm.Request(ids[0], max_new_tokens=4, lora=lm.LoraConfig(0, *formats[0])))
        ex.submit(lm.Request(ids[1], max_new_tokens=4))
        ex.submit(lm.Request(ids[2], max_new_tokens=4, lora=lm.LoraConfig(0)))
        a, b, c = ex.run()
        for r in (a, b):
            assert isinstance(r.error, LoraStepError) and r.finish_reason == "error"
            assert isinstance(r.error.__cause__, RuntimeError) and "injected" in str(r.error)
        assert c.ok and c.token_ids == alone(peft_model, ids[2], 4, names[0])
        assert engine.cache.pinned_ids() == []  # the failed requests' adapter hold is released
        ex.submit(lm.Request(ids[3], max_new_tokens=4, lora=lm.LoraConfig(0)))
        (d,) = ex.run()
        assert d.ok and d.token_ids == alone(peft_model, ids[3], 4, names[0])
        assert ex.metrics()["step_errors"] == 1
    finally:
        fault.handle.remove()
        engine.detach()


def test_an_exception_in_a_prefill_fails_the_requests_of_that_forward_alone(llama, tokenizer):
    """A 12-token step budget: the first forward packs the prompts of A and B (6 tokens each) and
    fails; A and B fail, C (prefilled by the next step's forward) runs as PEFT says."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    fault = _Faulty(ours, 1, torch.OutOfMemoryError("out of memory (injected)"))
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4, max_tokens_per_step=12)
        ids = [prompt_ids(30 + i, 6) for i in range(3)]
        for i in range(3):
            ex.submit(lm.Request(ids[i], max_new_tokens=3, lora=lm.LoraConfig(1, *formats[1]) if i == 2 else None))
        first, second, third = ex.run()
        for r in (first, second):
            assert isinstance(r.error, LoraStepError) and "out of memory" in str(r.error) and r.token_ids == []
        assert third.ok and third.token_ids == alone(peft_model, ids[2], 3, names[1])
        assert engine.cache.pinned_ids() == []
    finally:
        fault.handle.remove()
        engine.detach()


def test_ctrl_c_in_run_stops_and_returns_what_finished(llama, tokenizer):
    """A one-token request finishes at its prefill (both prompts in layer call 1); the interrupt
    comes at the first decode (call 2)."""
    ours, peft_model, names, formats = llama
    engine = attach(ours)
    fault = _Faulty(ours, 2, KeyboardInterrupt())
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ids = [prompt_ids(40, 5), talkative_prompt(peft_model, names[2], 30, first_seed=41)]
        ex.submit(lm.Request(ids[0], max_new_tokens=1))
        ex.submit(lm.Request(ids[1], max_new_tokens=30, lora=lm.LoraConfig(2, *formats[2])))
        done, stopped = ex.run()
        assert done.ok and done.finish_reason == "length" and done.token_ids == alone(peft_model, ids[0], 1, None)
        assert stopped.finish_reason == "cancelled" and stopped.token_ids == alone(peft_model, ids[1], 1, names[2])
        assert engine.cache.pinned_ids() == [] and ex.metrics()["running"] == 0
        ex.submit(lm.Request(ids[1], max_new_tokens=3, lora=lm.LoraConfig(2)))  # the executor still serves
        (again,) = ex.run()
        assert again.ok and again.token_ids == alone(peft_model, ids[1], 3, names[2])
    finally:
        fault.handle.remove()
        engine.detach()


@pytest.mark.parametrize("during", ["adapter put", "start of admitted requests"])
def test_ctrl_c_during_admission_cancels_the_requests_it_had_taken(llama, tokenizer, monkeypatch, during):
    """Requests taken off the queue but not yet running when the interrupt comes (a large adapter's
    put takes a while) are cancelled too: run() returns, and no adapter stays pinned."""
    import loramux.serving.executor as executor_module

    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.submit(lm.Request(prompt_ids(1, 5), max_new_tokens=3, lora=lm.LoraConfig(0, *formats[0])))
        ex.submit(lm.Request(prompt_ids(2, 5), max_new_tokens=3, temperature=1.0, lora=lm.LoraConfig(1, *formats[1])))
        if during == "adapter put":
            put = ex._gate.resolve
            monkeypatch.setattr(ex._gate, "resolve", lambda seq: put(seq) if seq.task_id == 0 else _interrupt())
        else:
            monkeypatch.setattr(executor_module, "new_generator", lambda request, device: _interrupt())
        returned = []
        runner = threading.Thread(target=lambda: returned.append(ex.run()), daemon=True)
        runner.start()
        runner.join(60)
        assert returned, "run() never returned"
        assert [r.finish_reason for r in returned[0]] == ["cancelled", "cancelled"]
        assert engine.cache.pinned_ids() == [] and ex.metrics()["running"] == 0
        monkeypatch.undo()
        ex.submit(lm.Request(prompt_ids(1, 5), max_new_tokens=3, lora=lm.LoraConfig(0)))  # the executor still serves
        (again,) = ex.run()
        assert again.ok and again.token_ids == alone(peft_model, prompt_ids(1, 5), 3, names[0])


def _interrupt():
    raise KeyboardInterrupt


def test_metrics_report_queue_running_kv_and_cache(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=2)
        for i in range(5):
            ex.submit(lm.Request(prompt_ids(50 + i, 6), max_new_tokens=3, lora=lm.LoraConfig(1, *formats[1])))
        before = ex.metrics()
        assert before["queue_depth"] == 5 and before["running"] == 0 and before["kv_bytes_in_use"] == 0
        results = ex.run()
        after = ex.metrics()
        tokens = sum(len(r.token_ids) for r in results)
        assert after["generated_tokens"] == tokens == ex.generated_tokens
        assert after["requests_submitted"] == after["requests_finished"] == 5
        assert after["prompt_tokens"] == sum(r.prompt_tokens for r in results) == 5 * 6
        assert after["cache_misses"] == after["cache_loads"] == 1 and after["cache_hits"] >= 5
        assert after["queue_depth"] == 0 and after["kv_bytes_allocated"] > 0
        for key in ("tokens_per_s", "kv_bytes_budget", "cache_evictions", "steps", "cuda_graphs_captured"):
            assert key in after


def test_leaving_the_with_block_on_an_exception_cancels_what_runs(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ids = talkative_prompt(peft_model, names[1], 40, first_seed=120)
        release = threading.Event()
        # the loop's second forward (its first decode) waits until the caller is about to fail
        calls = []

        def hold_second_forward(module, args):
            calls.append(1)
            if len(calls) == 2:
                release.wait(60)

        hook = ours.model.layers[0].register_forward_pre_hook(hold_second_forward)
        try:
            with pytest.raises(RuntimeError, match="caller failed"):
                with lm.Executor(engine, tokenizer) as ex:
                    h = ex.submit(lm.Request(ids, max_new_tokens=40, lora=lm.LoraConfig(1, *formats[1])))
                    next(iter(h))
                    release.set()
                    raise RuntimeError("caller failed")
        finally:
            hook.remove()
        r = h.result(timeout=60)
        assert r.finish_reason == "cancelled" and 1 <= len(r.token_ids) < 40
        assert r.token_ids == alone(peft_model, ids, 40, names[1])[: len(r.token_ids)]
        assert engine.cache.pinned_ids() == [] and ex.metrics()["running"] == 0


def test_alive_reports_a_step_loop_that_died(llama, tokenizer):
    """alive() is what `loramux serve`'s /health answers: True without a loop (run() steps in the
    caller's thread) and while the loop runs; False once something escaped a step and ended it."""
    ours, peft_model, names, formats = llama
    with attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=2)
        assert ex.alive()
        ex.start()
        assert ex.alive()

        def escape():  # not an Exception: per-step handling does not catch it, the loop ends
            raise SystemExit("the step loop ends")

        ex._step_once = escape
        h = ex.submit(lm.Request(prompt_ids(1, 5), max_new_tokens=2))
        ex._thread.join(timeout=60)
        assert not ex.alive()
        assert h.result(timeout=10).finish_reason == "cancelled"  # its requests are not left hanging
        with pytest.raises(RuntimeError, match="step loop has ended"):  # nothing would ever serve it
            ex.submit(lm.Request(prompt_ids(1, 5), max_new_tokens=2))
        ex.close()
        del ex._step_once
        ex.submit(lm.Request(prompt_ids(1, 5), max_new_tokens=2))  # closed: run() steps in this thread
        dead, r = ex.run()  # (run() returns every handle not returned yet: the one the dead loop cancelled too)
        assert dead.finish_reason == "cancelled"
        assert r.ok and r.token_ids == alone(peft_model, prompt_ids(1, 5), 2, None)
