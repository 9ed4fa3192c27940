"""`loramux serve` under load: closed-loop streaming chat clients (1, 8, 32, 64 at once) over the base
model and its adapters, against a live server process. Per concurrency: requests/s, output tokens/s,
TTFT p50/p99 (request sent -> first content chunk) and TPOT p50/p99 (mean gap between content
chunks after the first, per request), measured by the clients over HTTP. JSON on stdout and --out.

  PYTHONPATH=python python3 benchmarks/serve_load.py --model smollm2 --device cpu
  PYTHONPATH=python python3 benchmarks/serve_load.py --model smollm2 --device cuda --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

PROMPTS = ["What is the capital of France?", "Give me three tips for staying focused.", "Write a haiku about the sea.",
           "What is 12 times 7?", "Name a famous physicist and one discovery.", "How do plants make food?",
           "Suggest a name for a pet turtle.", "What is a LoRA adapter, in one sentence?"]


def make_peft_adapters(model_name: str, out_dir: str):
    """The demo's three PEFT adapters (different ranks and targets) for SmolLM2; name -> folder."""
    from loramux.demo.main import make_adapters
    from loramux.demo.smollm2 import load_smollm2

    if model_name != "smollm2":
        raise SystemExit("--model other than smollm2: pass its adapters with --adapter NAME=PATH")
    model, _ = load_smollm2("cpu")
    _, dirs = make_adapters(model, out_dir)
    return {f"task{task_id}": path for task_id, path in dirs.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, adapters, port: int, log):
    cmd = [sys.executable, "-m", "loramux.cli", "serve", args.model, "--port", str(port), "--max-batch-size",
           str(args.max_batch_size), "--max-pending", "1024"]
    if args.device:
        cmd += ["--device", args.device]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loramux serve exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"loramux serve did not start; see {log.name}")


async def one_request(client, model: str, prompt: str, max_tokens: int, seed: int):
    sent = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.7,
        seed=seed, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if any(c.delta.content for c in chunk.choices):
            stamps.append(time.perf_counter())
    ttft = stamps[0] - sent if stamps else float("nan")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return ttft, tpot, tokens


async def level(url: str, models, concurrency: int, requests_each: int, max_tokens: int):
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:
        async def worker(i):
            out = []
            for k in range(requests_each):
                out.append(await one_request(client, models[(i + k) % len(models)], PROMPTS[(i + k) % len(PROMPTS)],
                                             max_tokens, seed=i * 1000 + k))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(i) for i in range(concurrency)]) for r in rs]
        elapsed = time.perf_counter() - start
    ttft = np.array([r[0] for r in results])
    tpot = np.array([r[1] for r in results])
    tokens = sum(r[2] for r in results)

    def pct(values, q):
        values = values[~np.isnan(values)]
        return round(float(np.percentile(values, q)) * 1e3, 2) if values.size else None

    return {"concurrency": concurrency, "requests": len(results), "seconds": round(elapsed, 3),
            "requests_per_s": round(len(results) / elapsed, 3), "output_tokens_per_s": round(tokens / elapsed, 2),
            "output_tokens": tokens, "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None)
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="loramux-serve-bench-") as tmp, \
            open(os.path.join(tmp, "server.log"), "w") as log:
        adapters = make_peft_adapters(args.model, os.path.join(tmp, "peft"))
        port = free_port()
        proc = start_server(args, adapters, port, log)
        try:
            url = f"http://127.0.0.1:{port}"
            models = [args.model] + list(adapters)
            asyncio.run(level(url, models, 2, 1, 4))  # warm-up: first requests compile and allocate
            rows = []
            for c in [int(x) for x in args.concurrency.split(",")]:
                rows.append(asyncio.run(level(url, models, c, args.requests_per_client, args.max_tokens)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = {"benchmark": "serve_load", "date": date, "machine": platform.node(), "cpu_count": os.cpu_count(),
              "model": args.model, "device": args.device or "auto",
              "models_served": ["base"] + list(adapters), "max_tokens": args.max_tokens,
              "requests_per_client": args.requests_per_client, "rows": rows}
    try:
        import torch

        if torch.cuda.is_available() and args.device != "cpu":
            report["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print("\n| clients | requests/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']} | {r['output_tokens_per_s']} | {r['ttft_ms_p50']} / "
              f"{r['ttft_ms_p99']} | {r['tpot_ms_p50']} / {r['tpot_ms_p99']} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
