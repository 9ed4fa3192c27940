"""`loramux serve` as a client sees it: a live server process on 127.0.0.1 (a tiny random Llama chat
model folder, PEFT and TensorRT-LLM adapters) driven by the official `openai` client; every text is
compared with the Executor's for the same request and seed."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from serve_process import ServerProcess, cache_remove_missing, streaming_executor_missing  # noqa: E402
from tiny_chat_model import CONTEXT, save_adapter, save_tiny_chat_model  # noqa: E402

pytestmark = pytest.mark.skipif(streaming_executor_missing(), reason="the server runs on the in-flight Executor's "
                                "streaming handles (loramux.serving.RequestHandle), absent from this tree")
needs_cache_remove = pytest.mark.skipif(cache_remove_missing(), reason="unloading an adapter needs LoraCache.remove, "
                                        "absent from this tree")

KEY = "test-key-123"
MAX_TOKENS_LIMIT = 100
MAX_PENDING = 80
BASE = "tiny-chat"
PROMPT = "tell me a story about the sea and the moon"
MESSAGES = [{"role": "system", "content": "you are a cat"},
            {"role": "user", "content": "what is the capital of france?"}]


class _WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from loramux import convert, format

    tmp = tmp_path_factory.mktemp("serve")
    model = save_tiny_chat_model(str(tmp / BASE))
    root = tmp / "adapters"
    for i, name in enumerate(["a1", "a2", "a3"]):
        save_adapter(model, str(root / name), seed=10 + i, r=4 + 4 * i)
    weights, config = convert.from_peft(save_adapter(model, str(tmp / "peft-t4"), seed=20), storage_type="float32")
    format.save(str(root / "t4"), weights, config)  # a TensorRT-LLM numpy pair
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    (root / "wrong-model").mkdir()  # a valid pair for a model with more layers
    cfg = config.copy()
    cfg[0, 1] = 7
    format.save(str(root / "wrong-model"), weights, cfg)
    (root / "pickled").mkdir()  # a PEFT .bin whose unpickling would run code: must be refused unread
    (root / "pickled" / "adapter_config.json").write_text((root / "a1" / "adapter_config.json").read_text())
    (root / "pickled" / "adapter_model.bin").write_bytes(pickle.dumps(_WritesMarker(str(tmp / "pwned"))))
    save_adapter(model, str(tmp / "outside"), seed=30)
    os.symlink(tmp / "outside", root / "escape")
    return {"model": model, "root": root, "tmp": tmp}


@pytest.fixture(scope="module")
def server(files):
    root = files["root"]
    proc = ServerProcess([files["model"], "--adapter", f"a1={root / 'a1'}", "--adapter", f"a2={root / 'a2'}",
                          "--task-id", "a2=42", "--adapter-root", str(root), "--max-tokens-limit",
                          str(MAX_TOKENS_LIMIT), "--max-pending", str(MAX_PENDING), "--max-body-bytes", "65536"],
                         api_key=KEY)
    proc.root = root
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(files):
    """The Executor on the same model folder, one request at a time, as the server ran them."""
    import loramux as lm
    from loramux.serving.server.adapters_registry import read_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    engine = lm.attach(model, host_cache_bytes=64 << 20)
    ex = lm.Executor(engine, tokenizer, max_batch_size=8)
    adapters = {name: (100 + i, *read_adapter(str(files["root"] / name)))
                for i, name in enumerate(["a1", "a2", "a3", "t4"])}

    def run(model_name, prompt, max_tokens, temperature=1.0, top_p=1.0, seed=None, stop=()):
        lora = None
        if model_name != BASE:
            task_id, weights, config = adapters[model_name]
            lora = lm.LoraConfig(task_id, weights, config)
        request = lm.Request(prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=0,
                             seed=seed, stop=list(stop), stop_token_ids=[], logprobs=False, lora=lora)
        result = ex.submit(request).result(timeout=120)
        assert result.error is None, result.error
        return result

    with ex:
        yield run


def _complete(client, model, stream, **kw):
    """(text, finish_reason, usage) of a completion, streamed or not."""
    if not stream:
        r = client.completions.create(model=model, prompt=PROMPT, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    text, finish, usage = [], None, None
    for chunk in client.completions.create(model=model, prompt=PROMPT, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.text)
            finish = c.finish_reason or finish
    return "".join(text), finish, usage


def _chat(client, model, stream, **kw):
    if not stream:
        r = client.chat.completions.create(model=model, messages=MESSAGES, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage, roles = [], None, None, []
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    return "".join(text), finish, usage


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=1234)])
def test_completions_and_chat_equal_the_executor_for_two_adapters_and_the_base_model(client, reference, sampling):
    texts = {}
    for model in (BASE, "a1", "a2"):
        want_text = reference(model, PROMPT, 12, **sampling)
        want_chat = reference(model, MESSAGES, 10, **sampling)
        for stream in (False, True):
            text, finish, usage = _complete(client, model, stream, max_tokens=12, **sampling)
            assert (text, finish) == (want_text.text, "length"), (model, stream)
            assert (usage.prompt_tokens, usage.completion_tokens) == (want_text.prompt_tokens, 12)
            text, finish, usage = _chat(client, model, stream, max_tokens=10, **sampling)
            assert (text, finish) == (want_chat.text, "length"), (model, stream)
            assert (usage.completion_tokens, usage.total_tokens) == (10, want_chat.prompt_tokens + 10)
        texts[model] = want_text.text
    assert len(set(texts.values())) == 3  # each adapter changes the answer


def test_stop_strings_and_several_prompts_and_choices(client, reference):
    full = reference(BASE, PROMPT, 12, temperature=0).text
    word = full.split()[3]
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=12, temperature=0, stop=[word])
    assert r.choices[0].text == full[: full.index(word)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="a1", prompt=[PROMPT, "hello world"], n=2, max_tokens=5, temperature=0.8,
                                  seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, (prompt, seed) in zip(r.choices, [(PROMPT, 5), (PROMPT, 6), ("hello world", 5), ("hello world", 6)]):
        assert c.text == reference("a1", prompt, 5, temperature=0.8, seed=seed).text
    assert r.usage.completion_tokens == 20


def test_logprobs_of_the_chosen_tokens(client):
    r = client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=6, logprobs=True, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(t.logprob <= 0 for t in content)
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=6, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == 6


def test_top_logprobs_list_the_likeliest_tokens_first(client):
    r = client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3,
                                       temperature=0)
    for t in r.choices[0].logprobs.content:
        alts = t.top_logprobs
        assert len(alts) == 3 and alts[0].token == t.token and alts[0].logprob == pytest.approx(t.logprob)
        assert [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
    streamed = [t for chunk in client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=4, logprobs=True,
                                                              top_logprobs=3, temperature=0, stream=True)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in streamed] == \
        [(t.token, [a.token for a in t.top_logprobs]) for t in r.choices[0].logprobs.content]
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 4
    for token, chosen, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(alts) <= 2 and alts[token] == pytest.approx(chosen) and max(alts.values()) == alts[token]


def test_a_temperature_too_small_to_divide_by_is_greedy_and_leaves_the_batch_alone(client, reference):
    """temperature 1e-300 passes validation (>= 0); dividing the logits by it gave NaN probabilities
    that failed every request sharing the step with a 500. It answers greedily, the others as usual."""
    stream = client.completions.create(model="a1", prompt=PROMPT, max_tokens=40, temperature=0.8, seed=3,
                                       stream=True)
    first = next(iter(stream))
    tiny = client.completions.create(model="a1", prompt=PROMPT, max_tokens=6, temperature=1e-300)
    assert tiny.choices[0].text == reference("a1", PROMPT, 6, temperature=0).text
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
    assert text == reference("a1", PROMPT, 40, temperature=0.8, seed=3).text


def test_parameters_set_to_none_take_their_defaults(client, reference):
    """The openai client sends a parameter set to None as null, which the OpenAI API takes as unset."""
    r = client.completions.create(model="a1", prompt=PROMPT, max_tokens=5, temperature=0, top_p=None, n=None,
                                  stream=None, seed=None, stop=None, logprobs=None, presence_penalty=None)
    assert r.choices[0].text == reference("a1", PROMPT, 5, temperature=0).text
    r = client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=5, temperature=None, top_p=None,
                                       n=None, logprobs=None, top_logprobs=None, stream_options=None)
    assert len(r.choices) == 1 and r.choices[0].logprobs is None and r.usage.completion_tokens == 5


def test_streamed_completion_logprobs_offsets_count_from_the_start_of_the_answer(client):
    """Each chunk's text_offset went back to 0; a streamed answer's offsets are the whole answer's."""
    kw = dict(model="a1", prompt=PROMPT, max_tokens=6, logprobs=1, temperature=0, n=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    streamed = {0: ([], []), 1: ([], [])}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs:
                streamed[c.index][0].extend(c.logprobs.tokens)
                streamed[c.index][1].extend(c.logprobs.text_offset)
    assert whole.text_offset[-1] > 0
    assert streamed[0] == streamed[1] == (whole.tokens, whole.text_offset)


def test_models_retrieve_gives_one_card_and_404_for_an_unknown_name(server, client):
    base, adapter = client.models.retrieve(BASE), client.models.retrieve("a1")
    assert (base.id, adapter.id, adapter.parent) == (BASE, "a1", BASE)
    listed = {m.id: m for m in client.models.list().data}
    assert adapter == listed["a1"] and base == listed[BASE]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.models.retrieve("nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.retrieve("a1")


def _post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers={**headers, "content-type": "application/json"},
                      timeout=120)


def _models(client):
    return {m.id for m in client.models.list().data}


@needs_cache_remove
def test_adapters_load_and_unload_at_run_time(server, client, reference):
    assert _models(client) == {BASE, "a1", "a2"}
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": "a3"})
    assert r.status_code == 200, r.text
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "t4", "lora_path": str(server.root / "t4")})
    assert r.status_code == 200, r.text
    assert _models(client) == {BASE, "a1", "a2", "a3", "t4"}
    for name in ("a3", "t4"):  # a PEFT folder and a TensorRT-LLM numpy pair
        text, _, _ = _complete(client, name, False, max_tokens=8, temperature=0)
        assert text == reference(name, PROMPT, 8, temperature=0).text
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200
    assert _models(client) == {BASE, "a1", "a2", "t4"}
    with pytest.raises(openai.NotFoundError, match="a3"):
        client.completions.create(model="a3", prompt=PROMPT, max_tokens=4)
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 404
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": "a3"}).status_code == 200
    text, _, _ = _complete(client, "a3", False, max_tokens=8, temperature=0)
    assert text == reference("a3", PROMPT, 8, temperature=0).text
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200


@needs_cache_remove
def test_unloading_an_adapter_in_use_waits_for_its_requests(server, client):
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": "a3"}).status_code == 200
    stream = client.completions.create(model="busy", prompt=PROMPT, max_tokens=90, temperature=0, stream=True)
    chunks = [next(iter(stream))]
    done = {}
    thread = threading.Thread(
        target=lambda: done.update(r=_post(server, "/v1/unload_lora_adapter", {"lora_name": "busy"})))
    thread.start()
    # the listing drops an adapter once its unload begins (a fixed sleep raced a loaded machine)
    deadline = time.monotonic() + 30
    while "busy" in _models(client) and time.monotonic() < deadline:
        time.sleep(0.02)
    # unloading (or unloaded): new requests are refused, the one in flight runs to its end
    with pytest.raises(openai.NotFoundError, match="busy"):
        client.completions.create(model="busy", prompt=PROMPT, max_tokens=4)
    chunks += list(stream)
    thread.join(60)
    assert done["r"].status_code == 200, done["r"].text
    text_chunks = [c for c in chunks if c.choices]
    assert sum(1 for c in text_chunks if c.choices[0].finish_reason is None) == 90  # one chunk per token
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert "busy" not in _models(client)


def test_a_client_that_goes_away_cancels_its_request(server, client):
    before = server.metrics()["loramux_requests_cancelled_total"]
    with pytest.raises(httpx.TimeoutException):  # a non-streamed answer the client stops waiting for
        httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=0.02,
                   json={"model": "a2", "prompt": PROMPT, "max_tokens": MAX_TOKENS_LIMIT})
    deadline = time.monotonic() + 30
    m = server.metrics()
    # the cancelled counter moves before the pending gauge drops: wait for both
    while (m["loramux_requests_cancelled_total"] == before or m["loramux_server_pending_requests"] != 0) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
        m = server.metrics()
    assert m["loramux_requests_cancelled_total"] == before + 1 and m["loramux_server_pending_requests"] == 0
    _good(client)


def _good(client):
    r = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8)
    assert r.usage.completion_tokens == 8


def _error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code, error
    return error["message"]


def test_every_error_is_answered_in_the_openai_shape_and_a_good_request_still_works(server, client):
    good = {"model": "a1", "prompt": PROMPT, "max_tokens": 4}
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
    _good(client)
    _error(_post(server, "/v1/completions", b'{"model": "a1", "prompt": '), 400, "invalid_json")
    _good(client)
    assert "prompt" in _error(_post(server, "/v1/completions", {"model": "a1"}), 400)
    _good(client)
    assert "messages" in _error(_post(server, "/v1/chat/completions", {"model": "a1"}), 400)
    _good(client)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a1", prompt=PROMPT, max_tokens=4, temperature=3.5)
    _good(client)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=4, top_p=0)
    _good(client)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="a1", prompt=" ".join(["cat"] * CONTEXT), max_tokens=4)
    _good(client)
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.completions.create(model="a1", prompt=PROMPT, max_tokens=MAX_TOKENS_LIMIT + 1)
    _good(client)
    assert "token ids" in _error(_post(server, "/v1/completions", {**good, "prompt": [1, 10 ** 6]}), 400)
    _good(client)
    # a call over --max-pending on its own can never get in: 400, not 429 (which clients retry)
    refused = _error(_post(server, "/v1/completions", {**good, "prompt": [PROMPT] * (MAX_PENDING // 4 + 1), "n": 4}),
                     400, "invalid_request")
    assert "--max-pending" in refused
    _good(client)
    _error(_post(server, "/v1/completions", {**good, "prompt": "x" * 70000}), 413, "body_too_large")
    _good(client)
    # invalid adapters: the typed loramux error's message, and nothing loaded
    assert "broken" in _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "broken"}), 400)
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": "wrong-model"}), 400)
    refused = _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "pickled"}), 400)
    assert "weights_only" in refused
    assert not (server.root.parent / "pwned").exists()
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "a3"}), 409, "adapter_conflict")
    _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "missing"}), 404, "adapter_not_found")
    big = _error(_post(server, "/v1/load_lora_adapter", {"lora_name": "t", "lora_path": "a3", "task_id": 2**64}), 400)
    assert "2**64" in big
    assert {"b", "w", "p", "m", "t"}.isdisjoint(_models(client))
    _good(client)
    # paths out of the adapter root
    for path in ("../outside", "escape", str(server.root.parent / "outside"), "a3/../../outside"):
        refused = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        _error(refused, 403, "adapter_path_refused")
    _good(client)
    # keys
    for key in (None, "wrong", KEY + "x"):
        _error(_post(server, "/v1/completions", good, key=key), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    _good(client)
    _error(httpx.get(server.url + "/v1/nothing", headers=server.headers()), 404)
    _good(client)
    assert _models(client) >= {BASE, "a1", "a2"}


def test_a_full_server_answers_429_and_admits_again_once_its_requests_end(server, client):
    filling = client.completions.create(model=BASE, prompt=[PROMPT] * (MAX_PENDING // 4), n=4,
                                        max_tokens=MAX_TOKENS_LIMIT, stream=True)
    next(iter(filling))
    with pytest.raises(openai.RateLimitError, match="max-pending"):
        client.completions.create(model="a1", prompt=PROMPT, max_tokens=4)
    filling.close()  # gone: its requests are cancelled and let go of their places
    deadline = time.monotonic() + 30
    while server.metrics()["loramux_server_pending_requests"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    _good(client)


def test_health_is_open_and_metrics_report_requests_tokens_latency_queue_and_cache(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 401
    _good(client)
    m = server.metrics()
    assert m['loramux_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert m["loramux_generation_tokens_total"] >= 8 and m["loramux_prompt_tokens_total"] >= 1
    assert m["loramux_time_to_first_token_seconds_count"] >= 1
    assert m['loramux_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["loramux_time_to_first_token_seconds_count"]
    assert "loramux_time_per_output_token_seconds_count" in m
    assert m["loramux_server_pending_requests"] == 0
    for name in ("loramux_executor_queue_depth", "loramux_cache_hits_total", "loramux_cache_misses_total",
                 "loramux_cache_evictions_total", "loramux_cache_loads_total", "loramux_cache_host_bytes",
                 "loramux_cache_device_bytes_used"):
        assert name in m, name
    assert m["loramux_cache_host_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_decode_graphs_are_captured_at_start_up(files):
    """`loramux serve` on a GPU captures every decode-step graph before it answers (and says so);
    with --no-graph-capture it captures them as steps need them; both answer alike, streamed."""
    root = files["root"]
    answers, logs = [], []
    for extra in ([], ["--no-graph-capture"]):
        proc = ServerProcess([files["model"], "--device", "cuda", "--adapter", f"a1={root / 'a1'}", *extra], api_key=KEY)
        try:
            client = openai.OpenAI(base_url=proc.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            answers.append([_complete(client, m, stream, max_tokens=12, temperature=0.0)[:2]
                            for m in ("a1", BASE) for stream in (False, True)])
            logs.append(proc.output())
        finally:
            proc.stop()
    assert "decode-step CUDA graphs captured" in logs[0] and "captured" not in logs[1]
    assert answers[0] == answers[1]
    assert all(finish == "length" and text for text, finish in answers[0])
