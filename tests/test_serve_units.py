"""The server's parts that need no model: adapter paths kept inside the adapter root, the bearer-key
check, request validation in the OpenAI error shape, error statuses, and the Prometheus text format."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("starlette")

from loramux.errors import LoraCacheFullError, LoraConvertError, LoraFormatError, LoraNotCachedError  # noqa: E402
from loramux.serving.server.adapter_paths import resolve_inside_root  # noqa: E402
from loramux.serving.server.api_errors import ApiError, from_exception  # noqa: E402
from loramux.serving.server.auth import BearerAuth  # noqa: E402
from loramux.serving.server.errors import AdapterNotFoundError, AdapterPathError, QueueFullError, UnknownModelError  # noqa: E402
from loramux.serving.server.metrics_text import Counter, Histogram, render  # noqa: E402
from loramux.serving.server.openai_schema import ChatCompletionRequest, CompletionRequest, parse  # noqa: E402


# --- adapter paths -------------------------------------------------------------------------------
@pytest.fixture
def root(tmp_path):
    r = tmp_path / "adapters"
    (r / "good").mkdir(parents=True)
    (r / "good" / "adapter_config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.safetensors").write_text("x")
    return r


def test_a_path_inside_the_root_resolves(root):
    assert resolve_inside_root(str(root), "good") == os.path.realpath(root / "good")
    assert resolve_inside_root(str(root), str(root / "good")) == os.path.realpath(root / "good")


@pytest.mark.parametrize("path", ["../outside", "good/../../outside", "/etc", "", "good\x00"])
def test_a_path_leaving_the_root_is_refused(root, path):
    with pytest.raises(AdapterPathError):
        resolve_inside_root(str(root), path)


def test_a_symlinked_folder_leading_out_of_the_root_is_refused(root, tmp_path):
    os.symlink(tmp_path / "outside", root / "escape")
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        resolve_inside_root(str(root), "escape")


def test_a_symlinked_file_inside_an_adapter_folder_leading_out_is_refused(root, tmp_path):
    os.symlink(tmp_path / "outside" / "secret.safetensors", root / "good" / "adapter_model.safetensors")
    with pytest.raises(AdapterPathError, match="links to"):
        resolve_inside_root(str(root), "good")


def test_a_missing_folder_inside_the_root_is_not_found_and_outside_still_refused(root):
    with pytest.raises(AdapterNotFoundError, match="no adapter folder"):
        resolve_inside_root(str(root), "nothere")
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        resolve_inside_root(str(root), "../nothere")  # no hint whether a folder outside exists


def test_without_a_root_runtime_loading_is_off(root):
    with pytest.raises(AdapterPathError, match="--adapter-root"):
        resolve_inside_root(None, str(root / "good"))


# --- bearer key ----------------------------------------------------------------------------------
def test_bearer_key_check():
    auth = BearerAuth(None, "s3cret")
    assert auth.allows(b"Bearer s3cret") and auth.allows(b"bearer s3cret")
    for header in (None, b"", b"Bearer s3cre", b"Bearer s3cret2", b"Basic s3cret", b"s3cret"):
        assert not auth.allows(header), header
    assert BearerAuth(None, None).allows(None)


# --- request validation --------------------------------------------------------------------------
def _parse_error(body, model=CompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body if isinstance(body, bytes) else json.dumps(body).encode(), model)
    assert info.value.status == 400
    return info.value


def test_valid_requests_parse():
    r = parse(b'{"model": "m", "prompt": ["a", "b"], "n": 2, "temperature": 0, "stop": "x"}', CompletionRequest)
    assert r.prompts == ["a", "b"] and r.stops == ["x"] and r.max_tokens == 16
    assert parse(b'{"model": "m", "prompt": [1, 2, 3]}', CompletionRequest).prompts == [[1, 2, 3]]
    c = parse(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], '
              b'"max_completion_tokens": 5}', ChatCompletionRequest)
    assert c.messages[0].as_dict() == {"role": "user", "content": "hi"} and c.max_new_tokens == 5


def test_null_takes_the_default_of_an_optional_field():
    """The OpenAI API's optional parameters are nullable: a client that sets one to None sends null."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "seed", "stop", "logprobs", "echo",
                           "presence_penalty", "frequency_penalty", "logit_bias", "user"])
    r = parse(json.dumps({"model": "m", "prompt": "x", **nulls, "stream_options": {"include_usage": None}}).encode(),
              CompletionRequest)
    assert (r.temperature, r.top_p, r.n, r.stream, r.logprobs, r.include_usage) == (1.0, 1.0, 1, False, None, False)
    assert r.max_tokens == 16
    # completions' max_tokens: null keeps its meaning (what the context leaves)
    assert parse(b'{"model": "m", "prompt": "x", "max_tokens": null}', CompletionRequest).max_tokens is None
    c = parse(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x", "name": None}],
                          "logprobs": None, "top_logprobs": None, "max_completion_tokens": None, "n": None,
                          "temperature": None}).encode(), ChatCompletionRequest)
    assert (c.logprobs, c.top_logprobs, c.n, c.temperature, c.max_new_tokens) == (False, None, 1, 1.0, None)
    # a required field stays required
    assert _parse_error({"model": None, "prompt": "x"}).param == "model"
    assert _parse_error({"model": "m", "prompt": None}).param == "prompt"


@pytest.mark.parametrize("body,field", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
])
def test_bad_completion_requests_name_the_field(body, field):
    err = _parse_error(body)
    assert err.body()["error"]["type"] == "invalid_request_error"
    if field is not None:
        assert err.param == field and field in err.message


def test_json_nested_past_the_parser_and_lone_surrogates_are_400s():
    deep = _parse_error(b'{"model": "m", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    assert deep.code == "invalid_json" and "nested too deeply" in deep.message
    lone = _parse_error(b'{"model": "m", "prompt": "\\ud800"}')
    assert lone.param == "prompt" and "not valid Unicode" in lone.message
    chat = _parse_error(b'{"model": "m", "messages": [{"role": "user", "content": "a\\udfffb"}]}', ChatCompletionRequest)
    assert chat.param == "messages" and "messages.0.content" in chat.message


def test_bad_chat_requests_are_refused():
    assert _parse_error({"model": "m", "messages": []}, ChatCompletionRequest).param == "messages"
    _parse_error({"model": "m", "messages": [{"content": "x"}]}, ChatCompletionRequest)
    top = _parse_error({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
                       ChatCompletionRequest)
    assert "top_logprobs needs logprobs: true" in top.message
    # a check across fields names the field it refused and its value, not the whole body
    assert top.param == "top_logprobs" and top.message.endswith("(got 3)") and "messages" not in top.message
    tools = _parse_error({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
                         ChatCompletionRequest)
    assert tools.param == "tools"
    many = _parse_error({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                         "top_logprobs": 21}, ChatCompletionRequest)
    assert many.param == "top_logprobs"


def test_completion_logprobs_count_the_alternatives_up_to_20():
    assert _parse_error({"model": "m", "prompt": "x", "logprobs": 21}).param == "logprobs"
    for n in (0, 5, 20):
        assert parse(json.dumps({"model": "m", "prompt": "x", "logprobs": n}).encode(), CompletionRequest).logprobs == n


# --- error statuses ------------------------------------------------------------------------------
@pytest.mark.parametrize("error,status", [
    (UnknownModelError("no such model"), 404),
    (AdapterPathError("outside"), 403),
    (AdapterNotFoundError("no folder"), 404),
    (QueueFullError("full"), 429),
    (LoraFormatError("bad adapter"), 400),
    (LoraConvertError("cannot convert"), 400),
    (LoraCacheFullError("too big"), 503),
    (LoraNotCachedError("evicted"), 503),
    (RuntimeError("bug"), 500),
])
def test_each_error_class_gets_its_status_and_openai_shape(error, status):
    api = from_exception(error)
    body = api.body()["error"]
    assert api.status == status and set(body) == {"message", "type", "param", "code"}
    assert str(error) in body["message"]


# --- Prometheus text -----------------------------------------------------------------------------
def test_prometheus_text_format():
    assert render([Counter("n_total", "none yet").lines()]).endswith("n_total 0\n")
    c = Counter("x_total", "things", labelled=True)
    c.inc(endpoint='/v1/"a"', status="200")
    c.inc(2, endpoint='/v1/"a"', status="200")
    h = Histogram("t_seconds", "time", [0.1, 1.0])
    for v in (0.05, 0.5, 5.0, None, float("nan")):
        h.observe(v)
    text = render([c.lines(), h.lines()])
    assert 'x_total{endpoint="/v1/\\"a\\"",status="200"} 3' in text
    assert "# TYPE t_seconds histogram" in text
    assert 't_seconds_bucket{le="0.1"} 1' in text and 't_seconds_bucket{le="1.0"} 2' in text
    assert 't_seconds_bucket{le="+Inf"} 3' in text and "t_seconds_count 3" in text and "t_seconds_sum 5.55" in text
    assert text.endswith("\n")


# --- the command line ----------------------------------------------------------------------------
def test_serve_refuses_what_is_not_a_model_and_parses_sizes(tmp_path, capsys):
    from loramux import cli

    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path), "--task-id", "x=3"]) == 2
    capsys.readouterr()
    # refused before the model loads: an empty key (`--api-key "$KEY"` with KEY unset), a missing root
    assert cli.main(["serve", "smollm2", "--api-key", ""]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    assert cli.main(["serve", "smollm2", "--adapter-root", str(tmp_path / "nowhere")]) == 2
    assert "--adapter-root" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "smollm2", "--host-cache-bytes", "512M", "--adapter", "a=/p"])
    assert args.host_cache_bytes == 512 << 20 and args.adapter == [("a", "/p")] and args.host == "127.0.0.1"


# --- the event loop keeps serving while a prompt is tokenized ----------------------------------
def test_a_prompt_is_tokenized_off_the_event_loop():
    """Tokenizing a prompt near --max-body-bytes takes a good part of a second; on the event loop it
    stalled every other stream. The tokenizer here returns only once the loop has run meanwhile."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from loramux.serving.server.completions import answer
    from loramux.serving.server.state import ServerConfig, ServerState

    loop_ran = threading.Event()

    class SlowTokenizer:
        chat_template = None

        def __call__(self, text):
            if not loop_ran.wait(10):
                raise AssertionError("the event loop stood still while the prompt was tokenized")
            return {"input_ids": [1, 2, 3]}

    class Submitted(Exception):
        pass

    def submit(request):
        raise Submitted(request.prompt)

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64, vocab_size=10),
                            get_input_embeddings=lambda: SimpleNamespace(num_embeddings=10))
    state = ServerState(SimpleNamespace(submit=submit), SimpleNamespace(model=model), SlowTokenizer(), None,
                        ServerConfig("base"))
    body = parse(b'{"model": "base", "prompt": "a long prompt", "max_tokens": 4}', CompletionRequest)

    async def main():
        task = asyncio.ensure_future(answer(state, None, body))
        await asyncio.sleep(0.05)
        loop_ran.set()
        with pytest.raises(Submitted) as submitted:
            await task
        return submitted.value.args[0]

    assert asyncio.run(main()) == [1, 2, 3]  # the executor gets the ids, not the text to tokenize again
    assert state.pending == 0
