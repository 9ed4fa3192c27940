"""The Executor's task_id rules over the two-level cache, on a tiny Llama with PEFT as the oracle:
first request carries the adapter, later ones the id; unknown ids and bad adapters fail alone;
requests wait (not fail) when the device or host tier cannot hold their adapters beside the running
ones; results come back in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loramux as lm
from loramux.errors import LoraCacheFullError, LoraFormatError, LoraNotCachedError, LoraRequestError
from loramux.format import AdapterRow, from_rows
from peft_models import DEVICES, VOCAB
from peft_models import build as _build
from peft_models import peft_rows as _peft_rows
from serving_helpers import attach as _attach
from serving_helpers import llama, tokenizer  # noqa: F401 (fixtures)

NEW_TOKENS = 4


def _prompt(seed, length=None):
    """Random words t3..; lengths vary (4..8 words) so batches need padding."""
    gen = torch.Generator().manual_seed(seed)
    length = length or 4 + seed % 5
    return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (length,), generator=gen).tolist())


def _peft_tokens(peft_model, tokenizer, prompt, adapter):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(peft_model.device)
    out = _peft_rows(peft_model, [adapter], lambda m: m.generate(input_ids=ids, max_new_tokens=NEW_TOKENS,
                                                                  do_sample=False, pad_token_id=0))
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


@pytest.fixture(scope="module", params=DEVICES)
def llama_on(request, tmp_path_factory, llama):
    if request.param == "cpu":
        return llama
    return _build("llama", torch.float32, tmp_path_factory.mktemp("adapters-gpu"), request.param)


def test_task_id_rules_mixed_batch_and_order(llama_on, tokenizer):
    ours, peft_model, names, formats = llama_on
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=3)
        plan = [(7, formats[0]), (None, None), (9, formats[1]), (7, None), (11, formats[2]), (9, None), (7, None)]
        adapter_of = {7: names[0], 9: names[1], 11: names[2], None: None}
        prompts = [_prompt(i) for i in range(len(plan))]
        for prompt, (task, fmt) in zip(prompts, plan):
            lora = None if task is None else lm.LoraConfig(task, *(fmt if fmt is not None else (None, None)))
            ex.submit(lm.Request(prompt, max_new_tokens=NEW_TOKENS, lora=lora))
        results = ex.run()
        assert [r.request_id for r in results] == list(range(len(plan)))
        for r, prompt, (task, _) in zip(results, prompts, plan):
            assert r.ok, r.error
            assert r.task_id == task
            assert r.token_ids == _peft_tokens(peft_model, tokenizer, prompt, adapter_of[task])
        # a later run: the id alone is enough
        ex.submit(lm.Request(prompts[0], max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(11)))
        (again,) = ex.run()
        assert again.ok and again.token_ids == _peft_tokens(peft_model, tokenizer, prompts[0], names[2])


def test_unknown_id_and_bad_adapter_fail_alone(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        bad_w, bad_c = formats[0][0].copy(), formats[0][1].copy()
        bad_c[0, 0] = 42  # not a module id
        ex.submit(lm.Request(_prompt(1), max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(5)))  # never given
        ex.submit(lm.Request(_prompt(2), max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(3, *formats[1])))
        ex.submit(lm.Request(_prompt(3), max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(4, bad_w, bad_c)))
        ex.submit(lm.Request(_prompt(4), max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(4)))
        unknown, good, bad, after_bad = ex.run()
        assert isinstance(unknown.error, LoraNotCachedError) and "5" in str(unknown.error)
        assert good.ok and good.token_ids == _peft_tokens(peft_model, tokenizer, _prompt(2), names[1])
        assert isinstance(bad.error, LoraFormatError) and "module_id 42" in str(bad.error)
        assert isinstance(after_bad.error, LoraNotCachedError)  # the bad adapter was never cached
        assert 4 not in engine.cache and 3 in engine.cache


def test_requests_wait_when_device_tier_holds_fewer_adapters(llama, tokenizer):
    """Two slots for three adapters: the third adapter's request waits until a running request
    releases its slot (TensorRT-LLM defers, it does not fail), then runs."""
    ours, peft_model, names, formats = llama
    engine = _attach(ours, max_slots=2)  # two adapters at once at most
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=8)
        tasks = [1, 2, 3, None, 1, 3]
        for i, t in enumerate(tasks):
            lora = None if t is None else lm.LoraConfig(t, *formats[t - 1])
            ex.submit(lm.Request(_prompt(10 + i), max_new_tokens=NEW_TOKENS, lora=lora))
        results = ex.run()
        assert ex.metrics()["cache_evictions"] >= 1  # a slot was handed from one adapter to another
        for i, (r, t) in enumerate(zip(results, tasks)):
            assert r.ok, r.error
            assert r.token_ids == _peft_tokens(peft_model, tokenizer, _prompt(10 + i), None if t is None else names[t - 1])
    finally:
        engine.detach()


def test_adapter_larger_than_device_tier_fails_alone(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with _attach(ours, device_cache_bytes=64 << 10, page_bytes=4 << 10) as engine:
        spec = engine.spec
        gen = np.random.default_rng(0)
        rows = [AdapterRow(mid, layer, gen.standard_normal((16, spec.module_dims(mid)[0])).astype(np.float32),
                           gen.standard_normal((spec.module_dims(mid)[1], 16)).astype(np.float32))
                for layer in range(spec.num_layers) for mid in (1, 2, 3, 4, 5, 6, 7)]
        big = from_rows(rows, "float32")  # 2 layers x 32 KiB (+ page rounding): more than the device tier
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.submit(lm.Request(_prompt(20), max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(1, *big)))
        ex.submit(lm.Request(_prompt(21), max_new_tokens=NEW_TOKENS))
        ex.submit(lm.Request(_prompt(22), max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(2, *formats[0])))
        too_big, plain, small = ex.run()
        assert isinstance(too_big.error, LoraCacheFullError), too_big.error
        assert plain.ok and plain.token_ids == _peft_tokens(peft_model, tokenizer, _prompt(21), None)
        assert small.ok and small.token_ids == _peft_tokens(peft_model, tokenizer, _prompt(22), names[0])


def test_config_errors_are_typed():
    with pytest.raises(LoraFormatError, match="weights and config"):
        lm.LoraConfig(1, weights=np.zeros((1, 4), np.float32))
    with pytest.raises(LoraRequestError, match="task_id"):
        lm.LoraConfig(-3)
    with pytest.raises(TypeError, match="task_id"):
        lm.LoraConfig("7")
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.Request("t3", max_new_tokens=0)


def test_encoder_decoder_requests_match_peft(tokenizer, tmp_path):
    ours, peft_model, names, formats = _build("bart", torch.float32, tmp_path)
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        plan = [(0, formats[0]), (None, None), (1, formats[1]), (0, None)]
        for i, (task, fmt) in enumerate(plan):
            lora = None if task is None else lm.LoraConfig(task, *(fmt if fmt is not None else (None, None)))
            ex.submit(lm.Request(_prompt(30 + i), max_new_tokens=NEW_TOKENS, lora=lora))
        results = ex.run()
        assert len({tuple(r.token_ids) for r in results}) > 1, "adapters must change the generated tokens"
        for i, (r, (task, _)) in enumerate(zip(results, plan)):
            ids = tokenizer(_prompt(30 + i), return_tensors="pt")["input_ids"]
            out = _peft_rows(peft_model, [None if task is None else names[task]],
                             lambda m: m.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0))
            want = out[0, 1:].tolist()  # after the decoder start token
            want = want[: want.index(2)] if 2 in want else want
            assert r.ok and r.token_ids == want, (r, want)


def test_next_batch_adapters_load_while_the_current_batch_runs(llama, tokenizer):
    ours, peft_model, names, formats = llama
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=1)
        for t in range(3):
            ex.submit(lm.Request(_prompt(40 + t), max_new_tokens=2, lora=lm.LoraConfig(t, *formats[t])))
        assert all(r.ok for r in ex.run())
        stats = engine.cache.stats()
        # each adapter is loaded once (a miss, by the prefetch when its request is scheduled) and
        # admitted once the load has landed, so every acquire is a hit: none waits on a copy
        assert (stats["misses"], stats["hits"]) == (3, 3), stats


def test_token_id_prompts_and_chat_messages(llama, tokenizer):
    ours, peft_model, names, formats = llama
    engine = _attach(ours)
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        texts = [_prompt(50), _prompt(51)]
        for text in texts:
            ex.submit(lm.Request(text, max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(0, *formats[0])))
        as_text = ex.run()
        for text in texts:
            ex.submit(lm.Request(tokenizer(text)["input_ids"], max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(0)))
        as_ids = ex.run()
        assert [r.token_ids for r in as_ids] == [r.token_ids for r in as_text]
        ex.submit(lm.Request(texts[0], max_new_tokens=NEW_TOKENS))
        ex.submit(lm.Request(tokenizer(texts[1])["input_ids"], max_new_tokens=NEW_TOKENS))
        mixed = ex.run()  # text and token ids share a batch
        assert [r.token_ids for r in mixed] == [_peft_tokens(peft_model, tokenizer, t, None) for t in texts]
        for bad in ([], [{"role": "user"}]):
            with pytest.raises(LoraRequestError, match="prompt"):
                lm.Request(bad)
        with pytest.raises(TypeError, match="prompt"):
            lm.Request([1.5, 2])
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
        ex.submit(lm.Request([{"role": "user", "content": texts[0]}], max_new_tokens=NEW_TOKENS, lora=lm.LoraConfig(0)))
        (chat,) = ex.run()
        assert chat.ok and chat.token_ids == as_text[0].token_ids
    finally:
        tokenizer.chat_template = None
        engine.detach()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.sampled_from([None, 0, 1, 2, 7]), st.booleans(), st.integers(0, 3)),
                     min_size=1, max_size=9),
       batch=st.integers(1, 4))
def test_any_request_sequence_follows_the_task_id_rules(llama, tokenizer, plan, batch):
    """Model of the TensorRT-LLM rules: requests are scheduled in submission order; one carrying an
    adapter caches it; one naming an id no earlier request carried fails alone."""
    ours, peft_model, names, formats = llama
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=batch)
        cached, expect_ok = set(), []
        for t, carries, _ in plan:
            if t is not None and t != 7 and carries:
                cached.add(t)
            expect_ok.append(t is None or t in cached)
        for task, carries, p in plan:
            lora = None
            if task is not None:  # id 7 never comes with weights
                lora = lm.LoraConfig(task, *formats[task]) if carries and task != 7 else lm.LoraConfig(task)
            ex.submit(lm.Request(_prompt(60 + p), max_new_tokens=2, lora=lora))
        results = ex.run()
        assert [r.ok for r in results] == expect_ok
        for r, (task, _, p) in zip(results, plan):
            if r.ok:
                assert r.token_ids == _tokens_of(peft_model, tokenizer, p, None if task is None else names[task])
            else:
                assert isinstance(r.error, LoraNotCachedError) and r.error.task_id == task


_TOKENS = {}


def _tokens_of(peft_model, tokenizer, p, adapter):
    key = (p, adapter)
    if key not in _TOKENS:
        ids = tokenizer(_prompt(60 + p), return_tensors="pt")["input_ids"]
        out = _peft_rows(peft_model, [adapter], lambda m: m.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                                                                     pad_token_id=0))
        tokens = out[0, ids.shape[1]:].tolist()
        _TOKENS[key] = tokens[: tokens.index(2)] if 2 in tokens else tokens
    return _TOKENS[key]


def _host_bytes_of_one_adapter(ours, formats):
    probe = _attach(ours)
    probe.cache.put(0, *formats[1])
    one = probe.cache.stats()["host_bytes"]
    probe.detach()
    return one


def _three_adapters_served_in_turn(engine, tokenizer, peft_model, names, formats, max_batch_size):
    """Three requests, each carrying its own copy of one adapter under ids 0, 1, 2: all answer as
    PEFT does; the engine is detached after."""
    try:
        ex = lm.Executor(engine, tokenizer, max_batch_size=max_batch_size)
        for t in (0, 1, 2):
            ex.submit(lm.Request(_prompt(70 + t), max_new_tokens=2, lora=lm.LoraConfig(t, *formats[1])))
        results = ex.run()
        assert all(r.ok for r in results), [r.error for r in results]
        assert all(r.token_ids == _tokens_of(peft_model, tokenizer, 10 + t, names[1]) for t, r in enumerate(results))
    finally:
        engine.detach()


def test_next_batch_never_evicts_the_running_batch(llama, tokenizer):
    """A host tier that holds one adapter: each batch's adapter is cached and served in turn (the
    next batch's adapter is loaded only after the running one is pinned, or at its own turn)."""
    ours, peft_model, names, formats = llama
    one = _host_bytes_of_one_adapter(ours, formats)
    engine = _attach(ours, host_cache_bytes=one)
    _three_adapters_served_in_turn(engine, tokenizer, peft_model, names, formats, max_batch_size=1)


def test_split_batch_keeps_its_second_half_cached_while_admitting_the_next(llama, tokenizer):
    """A batch split by the device tier (one slot) with a host tier of two adapters: the next batch's
    adapter is admitted only while the last part runs, so it never evicts the part still waiting."""
    ours, peft_model, names, formats = llama
    one = _host_bytes_of_one_adapter(ours, formats)
    engine = _attach(ours, host_cache_bytes=2 * one, max_slots=1)
    _three_adapters_served_in_turn(engine, tokenizer, peft_model, names, formats, max_batch_size=2)


def test_host_tier_of_one_adapter_serves_carried_adapters_in_turn_and_an_evicted_id_fails_typed(llama, tokenizer):
    """A host tier of one adapter and two requests carrying two: the second put waits until the
    first request (which pins the first adapter) has finished, then evicts it. A request naming
    only the id of an adapter a later put evicted cannot be reloaded: LoraCacheFullError naming the
    host tier (not "not cached")."""
    ours, peft_model, names, formats = llama
    one = _host_bytes_of_one_adapter(ours, formats)
    with _attach(ours, host_cache_bytes=one) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=2)
        for t in (0, 1):
            ex.submit(lm.Request(_prompt(70 + t), max_new_tokens=2, lora=lm.LoraConfig(t, *formats[1])))
        results = ex.run()
        assert all(r.ok for r in results), [r.error for r in results]
        assert [r.token_ids for r in results] == [_tokens_of(peft_model, tokenizer, 10 + t, names[1]) for t in (0, 1)]
        assert engine.cache.task_ids() == [1]  # the one put last
        ex.submit(lm.Request(_prompt(71), max_new_tokens=2, lora=lm.LoraConfig(2, *formats[1])))  # evicts 1
        ex.submit(lm.Request(_prompt(70), max_new_tokens=2, lora=lm.LoraConfig(1)))
        kept, evicted = ex.run()
        assert isinstance(evicted.error, LoraCacheFullError) and "host tier" in str(evicted.error), evicted.error
        assert evicted.error.task_id == 1 and evicted.finish_reason == "error"
        assert kept.ok and kept.token_ids == _tokens_of(peft_model, tokenizer, 11, names[1])


def test_an_id_only_request_for_an_adapter_the_user_removed_says_it_was_removed(llama, tokenizer):
    """The executor put the adapter; the user removed it (cache.remove): a request naming only its
    id fails with LoraNotCachedError saying it was removed, not that later adapters evicted it."""
    ours, peft_model, names, formats = llama
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer)
        ex.submit(lm.Request(_prompt(70), max_new_tokens=2, lora=lm.LoraConfig(1, *formats[1])))
        (first,) = ex.run()
        assert first.ok, first.error
        engine.cache.remove(1)
        ex.submit(lm.Request(_prompt(70), max_new_tokens=2, lora=lm.LoraConfig(1)))
        (gone,) = ex.run()
        assert isinstance(gone.error, LoraNotCachedError) and gone.error.task_id == 1, gone.error
        assert "removed" in str(gone.error) and "evicted" not in str(gone.error)
        ex.submit(lm.Request(_prompt(70), max_new_tokens=2, lora=lm.LoraConfig(1, *formats[1])))  # sent again
        (again,) = ex.run()
        assert again.ok and again.token_ids == first.token_ids


def test_a_bad_prompt_fails_its_request_alone_and_caches_nothing(llama, tokenizer):
    """Token ids outside the vocabulary are refused at submit, and chat messages for a tokenizer
    without a chat template fail their own request, with LoraRequestError; neither adapter is
    cached; the others run."""
    ours, peft_model, names, formats = llama
    with _attach(ours) as engine:
        ex = lm.Executor(engine, tokenizer, max_batch_size=4)
        ex.submit(lm.Request(_prompt(80), max_new_tokens=2))
        with pytest.raises(LoraRequestError, match=str(VOCAB)):
            ex.submit(lm.Request([3, VOCAB], max_new_tokens=2, lora=lm.LoraConfig(1, *formats[0])))
        ex.submit(lm.Request([{"role": "user", "content": "t3"}], max_new_tokens=2, lora=lm.LoraConfig(2, *formats[1])))
        ex.submit(lm.Request(_prompt(81), max_new_tokens=2, lora=lm.LoraConfig(0, *formats[2])))
        plain, no_template, good = ex.run()
        assert isinstance(no_template.error, LoraRequestError) and "prompt" in str(no_template.error)
        assert 1 not in engine.cache and 2 not in engine.cache
        assert plain.ok and plain.token_ids == _tokens_of(peft_model, tokenizer, 20, None)
        assert good.ok and good.token_ids == _tokens_of(peft_model, tokenizer, 21, names[2])


def test_request_fields_are_typed():
    """Bad arguments are TypeError / ValueError (LoraRequestError is a ValueError), never the
    adapter-format error."""
    with pytest.raises(TypeError, match="lora"):
        lm.Request("t3", lora=5)
    with pytest.raises(TypeError, match="max_new_tokens"):
        lm.Request("t3", max_new_tokens="8")
    for bad in (np.zeros((2, 2), np.int64), 7, [True, False]):
        with pytest.raises(TypeError, match="prompt"):
            lm.Request(bad)
    with pytest.raises(LoraRequestError, match="prompt"):
        lm.Request(torch.tensor([], dtype=torch.long))
    assert lm.Request(np.array([3, 4])).prompt == [3, 4] == lm.Request(torch.tensor([3, 4])).prompt
    for bad, error in ((0, ValueError), (2.5, TypeError), ("8", TypeError)):
        with pytest.raises(error, match="max_batch_size"):
            lm.Executor(None, None, max_batch_size=bad)
    for kwargs, error in ((dict(temperature=-1.0), ValueError), (dict(temperature="hot"), TypeError),
                          (dict(top_p=0.0), ValueError), (dict(top_p=1.5), ValueError), (dict(top_k=-1), ValueError),
                          (dict(top_k=2.0), TypeError), (dict(seed=-1), ValueError), (dict(seed=1.5), TypeError),
                          (dict(stop=[""]), ValueError), (dict(stop=[3]), TypeError),
                          (dict(stop_token_ids=["a"]), TypeError), (dict(logprobs=1), TypeError)):
        with pytest.raises(error) as caught:
            lm.Request("t3", **kwargs)
        assert not isinstance(caught.value, LoraFormatError)
        assert next(iter(kwargs)) in str(caught.value)


def test_loraconfig_from_peft_keeps_float32_and_takes_a_base_model(tmp_path):
    """The numpy-free shortcut: lossless by default (the cache packs into the serving dtype anyway),
    and DoRA adapters (which need the base weights) convert through it too."""
    from tiny_hf import make_adapter, tiny_model

    make_adapter("llama", str(tmp_path / "plain"), target_modules=["q_proj", "v_proj"])
    plain = lm.LoraConfig.from_peft(3, str(tmp_path / "plain"))
    assert plain.weights.dtype == np.float32
    assert np.array_equal(plain.weights, lm.convert.from_peft(str(tmp_path / "plain"), storage_type="float32")[0])
    assert lm.LoraConfig.from_peft(3, str(tmp_path / "plain"), storage_type="float16").weights.dtype == np.float16
    make_adapter("llama", str(tmp_path / "dora"), target_modules=["q_proj"], use_dora=True)
    dora = lm.LoraConfig.from_peft(4, str(tmp_path / "dora"), base_model=tiny_model("llama"))
    assert dora.config.shape[1] == 4 and dora.config[:, 3].all()


def test_generation_stops_at_the_models_own_eos(llama, tokenizer):
    """A model whose generation_config names another end token than the tokenizer's: the answer ends
    before it (generate stops there and pads the row), as it does at the tokenizer's."""
    ours, peft_model, names, formats = llama
    engine = _attach(ours)
    saved = ours.generation_config.eos_token_id
    try:
        ex = lm.Executor(engine, tokenizer)
        ex.submit(lm.Request(_prompt(90), max_new_tokens=4))
        (free,) = ex.run()
        assert len(free.token_ids) == 4 and 2 not in free.token_ids
        ours.generation_config.eos_token_id = [free.token_ids[1]]
        ex.submit(lm.Request(_prompt(90), max_new_tokens=4))
        ex.submit(lm.Request(_prompt(91), max_new_tokens=4))  # another row: the stopped one gets padded
        stopped, _ = ex.run()
        cut = free.token_ids.index(free.token_ids[1])
        assert stopped.token_ids == free.token_ids[:cut], (stopped.token_ids, free.token_ids)
    finally:
        ours.generation_config.eos_token_id = saved
        engine.detach()
