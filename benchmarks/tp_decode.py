"""Decode step of a Llama-8B-shaped model at tp = 1, 2, 4 over NCCL: the base step, the step with a
batch of distinct LoRA adapters (r=16 on all 7 projections by default), the LoRA overhead per tp and
the adapter bytes each rank caches. Prints one JSON line per tp, then a table.

    python benchmarks/tp_decode.py --tp 1 2 4            # one process per GPU, spawned here
    python benchmarks/tp_decode.py --tp 1 --layers 4     # quick check on one GPU

The decode step is one new token per row with no KV context: it reads every weight once, which is
what LoRA adds to; attention over a context costs the same with or without adapters. Random
weights (no hub access); the model is built on each rank and sharded in place.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import adapter_value_bytes, capture, copy_bandwidth, median_seconds

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False)


def _adapter(model, rank: int, seed: int):
    """A full adapter (all 7 projections, every layer) as (bfloat16 bits as uint16 [N, W], config)."""
    from loramux.parallel.llama import SERVED_MODULE_IDS
    from loramux.models.targets import spec_from_config

    cfg = model.config
    spec = spec_from_config(cfg, max_rank=rank)
    dims = {mid: spec.module_dims(mid) for mid in SERVED_MODULE_IDS}
    rows = [(mid, layer) for layer in range(cfg.num_hidden_layers) for mid in sorted(SERVED_MODULE_IDS)]
    width = max(rank * (hi + ho) for hi, ho in dims.values())
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weights = (torch.randn(len(rows), width, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.01)
    config = np.array([[mid, layer, rank] for mid, layer in rows], dtype=np.int64)
    return weights.cpu().view(torch.int16).numpy().view(np.uint16), config


def _time_ms(step, args) -> float:
    """Median ms of one step; every rank starts each timed step together (a barrier before it)."""
    return median_seconds(step, reps=args.iters, warmup=args.warmup, before=dist.barrier) * 1e3


def _step_ms(shard, ids, task_ids, args) -> dict:
    """Eager and CUDA-graphed step times (ms) of one batch; the graph holds the whole stage pass,
    the NCCL all-reduces included; acquiring the adapters stays outside it."""
    with shard.batch(task_ids):
        out = {"eager": _time_ms(lambda: shard.step(ids), args)}
        try:
            graph, _ = capture(lambda: shard.step(ids))
            out["graph"] = _time_ms(graph.replay, args)
        except Exception as e:  # noqa: BLE001 - report why, keep the eager figure
            out["graph_error"] = repr(e)[:300]
    return out


def _worker(rank: int, tp: int, port: int, out_path: str, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramux.parallel import rank_spec
    from loramux.parallel import TpLlama, init_parallel

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                            device_id=torch.device("cuda", rank))
    ctx = init_parallel(tp, 1)
    cfg = LlamaConfig(num_hidden_layers=args.layers, **LLAMA_8B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    adapters = [_adapter(model, args.rank, seed=i) for i in range(args.adapters)]
    # every adapter has the same rows: one adapter's slice size, from the rank's module dims
    slice_bytes = adapter_value_bytes(rank_spec(_full_spec(model, args.rank), tp), adapters[0][1], 2)
    budget = int(slice_bytes * args.adapters * 1.25) + (64 << 20)
    shard = TpLlama(model, ctx, max_rank=args.rank, host_cache_bytes=budget, device_cache_bytes=budget,
                    max_slots=max(64, args.adapters))
    torch.cuda.empty_cache()
    for task_id, (w, c) in enumerate(adapters):
        shard.load(task_id, w, c)
    del adapters
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 1), device="cuda")
    with_lora = [i % args.adapters for i in range(args.batch)]
    base = _step_ms(shard, ids, [None] * args.batch, args)
    lora = _step_ms(shard, ids, with_lora, args)
    gbs = copy_bandwidth() / 1e9  # device copy, read + write counted
    read_bytes = slice_bytes * len(set(with_lora))  # each adapter's slice is read once per step
    floor_ms = read_bytes / (gbs * 1e9) * 1e3
    if rank == 0:
        row = dict(tp=tp, layers=args.layers, batch=args.batch, adapters=len(set(with_lora)), rank=args.rank,
                   adapter_bytes_per_rank=slice_bytes, lora_bytes_read_per_rank=read_bytes,
                   copy_gbs=round(gbs, 1), lora_floor_ms=round(floor_ms, 3),
                   gpu=torch.cuda.get_device_name(), kernels=_kernels_in_use())
        for mode in ("eager", "graph"):
            if mode in base and mode in lora:
                over = lora[mode] - base[mode]
                row.update({f"base_{mode}_ms": round(base[mode], 3), f"lora_{mode}_ms": round(lora[mode], 3),
                            f"overhead_{mode}_ms": round(over, 3),
                            f"overhead_over_floor_{mode}": round(over / floor_ms, 2) if floor_ms else None})
        row.update({f"{k}_{name}": v for name, d in (("base", base), ("lora", lora)) for k, v in d.items() if k.endswith("error")})
        with open(out_path, "w") as f:
            json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def _full_spec(model, max_rank):
    import loramux

    c = model.config
    return loramux.ModelSpec(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                             num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, ffn_size=c.intermediate_size,
                             max_rank=max_rank)


def _kernels_in_use() -> bool:
    try:
        import loramux.ops.kernels as k

        return bool(k.available())
    except ModuleNotFoundError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tp_decode needs CUDA GPUs (NCCL)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            if tp > torch.cuda.device_count():
                row = dict(tp=tp, skipped=f"needs {tp} GPUs, {torch.cuda.device_count()} visible")
            else:
                out_path = os.path.join(tmp, f"tp{tp}.json")
                mp.start_processes(_worker, args=(tp, _free_port(), out_path, args), nprocs=tp, join=True,
                                   start_method="spawn")
                with open(out_path) as f:
                    row = json.load(f)
            print(json.dumps(row), flush=True)
            rows.append(row)
    _table(rows)
    return 0


def _table(rows) -> None:
    cols = ["tp", "base_eager_ms", "lora_eager_ms", "base_graph_ms", "lora_graph_ms", "overhead_graph_ms",
            "lora_floor_ms", "overhead_over_floor_graph", "adapter_bytes_per_rank"]
    print(" ".join(f"{c:>26}" for c in cols))
    for row in rows:
        if "skipped" in row:
            print(f"{row['tp']:>26} skipped: {row['skipped']}")
        else:
            print(" ".join(f"{row.get(c, '-')!s:>26}" for c in cols))
    ran = [row for row in rows if "gpu" in row]
    if ran:
        r = ran[0]
        print(f"GPU: {r['gpu']}; kernels: {r['kernels']}; layers {r['layers']}, batch {r['batch']}, "
              f"{r['adapters']} adapters r={r['rank']} on 7 projections")


if __name__ == "__main__":
    sys.exit(main())
