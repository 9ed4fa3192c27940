"""A bounded load test of `loramux serve`: 64 concurrent streaming clients, 2 requests each, over 4
adapters and the base model; 8 clients go away mid-stream. Every other request gets all its tokens,
the server stays healthy, and its memory returns to the idle level."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from serve_process import ServerProcess, streaming_executor_missing  # noqa: E402
from tiny_chat_model import save_adapter, save_tiny_chat_model  # noqa: E402

pytestmark = pytest.mark.skipif(streaming_executor_missing(), reason="the server runs on the in-flight Executor's "
                                "streaming handles (loramux.serving.RequestHandle), absent from this tree")

CLIENTS = 64
REQUESTS_EACH = 2
DISCONNECTING = 8
MAX_TOKENS = 16
LONG_TOKENS = 100  # the requests whose clients go away: still running when they do
BASE = "tiny-chat"
ADAPTERS = ["b1", "b2", "b3", "b4"]
PROMPTS = ["tell me a story about the sea", "what is the capital of france?", "write a haiku about the moon",
           "give me three tips for focus", "name a big red bird"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-load")
    model = save_tiny_chat_model(str(tmp / BASE))
    args = [model, "--max-batch-size", "64", "--max-pending", "256"]
    for i, name in enumerate(ADAPTERS):
        args += ["--adapter", f"{name}={save_adapter(model, str(tmp / name), seed=40 + i, r=4 * (i + 1))}"]
    proc = ServerProcess(args)
    yield proc
    proc.stop()


async def _client(http, i: int, disconnect: bool, requests: int) -> list:
    """Runs this client's streamed requests one after the other (read as raw server-sent events: the
    openai client's per-chunk parsing would dominate a 2-core machine); returns (finish_reason,
    usage, content chunks, saw [DONE]) of each finished one."""
    model = ([BASE] + ADAPTERS)[i % (len(ADAPTERS) + 1)]
    done = []
    for k in range(requests):
        leave = disconnect and k == 0
        body = {"model": model, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "temperature": 0.8, "seed": i,
                "max_tokens": LONG_TOKENS if leave else MAX_TOKENS, "stream": True,
                "stream_options": {"include_usage": True}}
        chunks, finish, usage, end = 0, None, None, False
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    end = True
                    break
                chunk = json.loads(line[len("data: "):])
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    chunks += 1 if c["text"] else 0
                    finish = c["finish_reason"] or finish
                if leave and chunks == 2:
                    break  # leaving the block closes the connection: the client is gone mid-stream
        if not leave:
            done.append((finish, usage, chunks, end))
    return done


async def _round(url: str, disconnecting: int, requests: int = REQUESTS_EACH) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=CLIENTS)) as http:
        return await asyncio.gather(*[_client(http, i, i < disconnecting, requests) for i in range(CLIENTS)])


def _settled(server, timeout_s: float = 60.0) -> dict:
    """The server's metrics once no request is pending, queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        busy = [m.get(k, 0) for k in ("loramux_server_pending_requests", "loramux_executor_queue_depth",
                                      "loramux_executor_running")]
        if not any(busy) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_64_streaming_clients_over_4_adapters_and_the_base_model_with_8_disconnects(server):
    process = psutil.Process(server.pid)
    asyncio.run(_round(server.url, 0, requests=1))  # warm-up: the allocator's high-water mark of this load
    _settled(server)
    idle_rss = process.memory_info().rss
    cancelled_before = server.metrics().get("loramux_requests_cancelled_total", 0)

    results = asyncio.run(_round(server.url, DISCONNECTING))
    finished = [r for client in results for r in client]
    assert len(finished) == CLIENTS * REQUESTS_EACH - DISCONNECTING
    for finish, usage, chunks, end in finished:
        assert finish == "length" and usage["completion_tokens"] == MAX_TOKENS and end, (finish, usage, end)
        assert 1 <= chunks <= MAX_TOKENS

    m = _settled(server)
    assert m["loramux_server_pending_requests"] == 0
    assert m["loramux_executor_queue_depth"] == 0 and m.get("loramux_executor_running", 0) == 0
    if "loramux_executor_kv_bytes_in_use" in m:
        assert m["loramux_executor_kv_bytes_in_use"] == 0  # the cancelled requests' KV memory is back
    assert m["loramux_requests_cancelled_total"] - cancelled_before >= 1
    assert server.metrics()  # still answering
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
        r = client.completions.create(model="b3", prompt=PROMPTS[0], max_tokens=MAX_TOKENS)
        assert r.usage.completion_tokens == MAX_TOKENS
    rss = process.memory_info().rss
    assert rss <= idle_rss + max(64 << 20, idle_rss // 10), (rss, idle_rss)
