"""Decode step of a Llama-8B-shaped model (4 layers, random weights, bf16) at batch 32 with 32
distinct adapters of rank 16 on all 7 projections, through loramux.attach's layers and the CUDA
kernels: base step, LoRA step, LoRA overhead vs its bytes floor, and PEFT on the same batch.
The adapters are random (weights, config) pairs put into a real LoraCache (benchmarks/_common.py
resident_adapters), so the kernels read the serving path's pool and slot table.
The LoRA step runs attach's fused siblings (q|k|v and gate|up: 4 lora_apply per layer); the same
step with one apply per projection (fuse_siblings off: 7 per layer) is timed beside it, and so is
the step with each projection's LoRA branch on a side stream beside its base GEMM
(Engine.lora_beside_base; forked and joined inside the captured graph, the branch merged into the
base output by cuda/lora_merge.cu), and both ways as a static batch (the serving graphs' form).
overhead_default_us is the form the engine takes by default at this batch.
Also checks the LoRA logits against PEFT's and replays the captured graph with new adapter
mappings (more and fewer distinct adapters, rows without one) against eager results.

    python benchmarks/decode_step.py --out decode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
from _common import capture, copy_bandwidth, env_set, llama_spec, median_seconds, random_adapter, resident_adapters

import loramux as lm
from loramux import ops
from loramux.convert.hf_modules import target_for
from loramux.models.attach import attach_layers
from loramux.ops.gemm_carveout import carveout_sms

DEV, DT = "cuda", torch.bfloat16
BATCH, ADAPTERS, RANK, LAYERS = 32, 32, 16, 4
# the 7 projections of a Llama layer: attn_q, k, v, dense, mlp_h_to_4h (gate_proj), mlp_4h_to_h, mlp_gate (up_proj)
MODULE_IDS = [1, 2, 3, 4, 5, 6, 7]


def build_model(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=LAYERS, vocab_size=128256, max_position_embeddings=4096)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(DEV):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(DT)
        try:
            model = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
    return model


def fresh_metas(engine):
    """Drops the step's per-token metadata so the capture builds it (slot_of_token, token segments)
    inside the graph, from the static slot tensor a replay reads."""
    engine.step._metas = {}
    engine._drop_sibling_outputs()


def graphed_step_us(engine, step):
    """Microseconds of one replay of step() captured with its metadata built inside the graph."""
    g, _ = capture(step, lambda: fresh_metas(engine))
    return median_seconds(g.replay) * 1e6


def ops_only(ad):
    """The step's LoRA work alone in a graph: 7 applies per layer (as attach's layers issue them)
    vs 4 (q,k,v in one 3-slice launch, gate,up in one 2-slice launch)."""
    from loramux.ops import BatchMeta, kernels

    slots = ad.slot_of_token(list(range(BATCH)))
    table = ad.cache.table
    meta = BatchMeta(table=table, pool=ad.cache.pool, dtype=DT, slot_of_token=slots, max_rank=RANK,
                     segments=kernels.segments(slots, table.shape[0]))  # once per step, as StepBatch
    x_h = torch.randn(BATCH, 4096, device=DEV, dtype=DT)
    x_f = torch.randn(BATCH, 14336, device=DEV, dtype=DT)
    y = {w: torch.zeros(BATCH, w, device=DEV, dtype=DT) for w in (1024, 4096, 14336, 6144, 28672)}
    per_proj = [(x_h, 1, 4096), (x_h, 2, 1024), (x_h, 3, 1024), (x_h, 4, 4096), (x_h, 7, 14336), (x_h, 5, 14336),
                (x_f, 6, 4096)]
    fused = [(x_h, [1, 2, 3], [4096, 1024, 1024]), (x_h, [4], [4096]), (x_h, [5, 7], [14336, 14336]), (x_f, [6], [4096])]

    def run_per_proj():
        for layer in range(LAYERS):
            for x, mid, ho in per_proj:
                kernels.lora_apply(x, y[ho], meta, layer, [mid], [ho])

    def run_fused():
        for layer in range(LAYERS):
            for x, mids, sizes in fused:
                kernels.lora_apply(x, y[sum(sizes)], meta, layer, mids, sizes)

    out = {}
    for name, fn in (("ops_only_7_per_layer_us", run_per_proj), ("ops_only_4_fused_per_layer_us", run_fused)):
        g, _ = capture(lambda: (fn(), None)[1])
        out[name] = median_seconds(g.replay) * 1e6
    return out


def applies_per_step(step):
    """How many lora_apply calls (and of how many slices) one eager step issues."""
    calls = []
    real = ops.lora_apply

    def counting(x, y, meta, layer, module_ids, out_sizes):
        calls.append(len(module_ids))
        real(x, y, meta, layer, module_ids, out_sizes)

    ops.lora_apply = counting
    try:
        step()
    finally:
        ops.lora_apply = real
    return dict(applies=len(calls), slices=sum(calls))


def beside_step(engine, step, slots0, ad, logits):
    """The same LoRA step with each projection's LoRA branch beside its base GEMM: graphed time and
    its logits against the in-order path's."""
    out = {}
    engine.lora_beside_base = True
    try:
        engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
        beside = step().float()
        out["beside_vs_in_order_rel"] = float((logits - beside).norm() / logits.norm())
        engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
        out["lora_beside_us"] = graphed_step_us(engine, step)
    except Exception as e:  # noqa: BLE001
        out["lora_beside_error"] = repr(e)[:300]
    # as the serving graphs run it: a static batch (any adapter mix, DoRA rows included)
    static = torch.tensor(slots0, dtype=torch.int32, device=DEV)
    out.update(graphed_both_ways(engine, step, lambda: engine.set_static_batch(static, ad.cache.table, ad.cache.pool),
                                 "lora_static_us", "lora_static_beside_us"))
    engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
    return out


def graphed_both_ways(engine, step, set_batch, in_order_key, beside_key):
    """{key: graphed step us}, the LoRA branch in order and beside the base GEMM, set_batch() before
    each capture; a failure kept as the key's _error."""
    out = {}
    for beside, key in ((False, in_order_key), (True, beside_key)):
        engine.lora_beside_base = beside
        try:
            set_batch()
            out[key] = graphed_step_us(engine, step)
        except Exception as e:  # noqa: BLE001
            out[key.replace("_us", "_error")] = repr(e)[:300]
    engine.lora_beside_base = False
    return out


def unfused_step(engine, step, slots0, ad, fused_logits):
    """The same LoRA step with one lora_apply per projection (attach(..., fuse_siblings=False)):
    graphed time, applies per step, and its logits against the fused path's."""
    out = {"applies_per_step": applies_per_step(step)}
    engine.fuse_siblings = False
    engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
    out["applies_per_step_unfused"] = applies_per_step(step)
    unfused = step().float()
    out["fused_vs_unfused_rel"] = float((fused_logits - unfused).norm() / unfused.norm())
    try:
        engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
        out["lora_unfused_us"] = graphed_step_us(engine, step)
    except Exception as e:  # noqa: BLE001
        out["lora_unfused_capture_error"] = repr(e)[:300]
    engine.fuse_siblings = True
    engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
    return out


def beside_by_batch(engine, model, ad, batches):
    """{batch: {base_us, in_order_us, beside_us}}: graphed decode steps at other batch sizes (rows
    cycling over the adapters), the LoRA branch in order and beside the base GEMM: the measurement
    behind the engine's auto bound (models/engine.py BESIDE_MAX_TOKENS)."""
    out = {}
    for batch in batches:
        ids = torch.randint(0, 128256, (batch, 1), device=DEV)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=DEV)
        step = lambda: model(input_ids=ids, position_ids=pos, use_cache=False).logits  # noqa: E731
        slots = [ad.slots[i % len(ad.slots)] for i in range(batch)]
        engine.clear_batch()
        g, _ = capture(step)
        row = {"base_us": median_seconds(g.replay) * 1e6}
        del g
        row.update(graphed_both_ways(engine, step, lambda: engine.set_batch(slots, ad.cache.table, ad.cache.pool),
                                     "in_order_us", "beside_us"))
        out[batch] = row
        print(f"batch {batch}:", {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return out


def variant_overheads(engine, step, slots0, ad, base_us, names):
    """{variant: [LoRA overhead us]}: the in-order step captured under each launch variant's
    environment (benchmarks/decode_ab.py VARIANTS), the default first and last (its spread)."""
    from decode_ab import VARIANTS

    rows = {}
    for name in ["default", *names, "default"]:
        with env_set({} if name == "default" else VARIANTS[name]):
            engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
            g, _ = capture(step, lambda: fresh_metas(engine))
            rows.setdefault(name, []).append(median_seconds(g.replay) * 1e6 - base_us)
            del g
    print("overhead by variant (us):", {k: [round(u, 1) for u in v] for k, v in rows.items()}, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode.json")
    ap.add_argument("--commit", default="", help="the source commit, recorded for readme_table.py")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes also timed in order and beside the "
                    "base GEMM (beside_by_batch), e.g. 8,64,128")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison (its step takes ~250 ms)")
    ap.add_argument("--variants", default="", help="comma-separated launch variants of benchmarks/decode_ab.py "
                    "(e.g. plain,m4): the in-order LoRA step captured again under each, the default before and after")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    res = dict(gpu=torch.cuda.get_device_name(), batch=BATCH, adapters=ADAPTERS, rank=RANK, layers=LAYERS,
               commit=args.commit or None, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    # the switches that change the beside form, as this run had them
    res["switches"] = {k: os.environ[k] for k in ("LORAMUX_BESIDE_SM_CARVEOUT", "LORAMUX_SIDE_STREAM_PRIORITY",
                                                  "LORAMUX_LORA_BESIDE_BASE") if k in os.environ}
    res["beside_sm_carveout"] = carveout_sms(BATCH)  # SMs kept from a base GEMM with a branch beside it
    bw = copy_bandwidth()
    res["copy_bw_gbs"] = bw / 1e9
    model, attn = None, None
    ids = torch.randint(0, 128256, (BATCH, 1), device=DEV)
    pos = torch.zeros(BATCH, 1, dtype=torch.long, device=DEV)
    for attn in ("sdpa", "eager"):
        model = build_model(attn)
        try:
            g_base, out_base = capture(lambda: model(input_ids=ids, position_ids=pos, use_cache=False).logits)
            break
        except Exception as e:  # noqa: BLE001 - record why and try the other attention
            res[f"capture_error_{attn}"] = repr(e)[:300]
            g_base = None
    res["attention"] = attn
    t_base = median_seconds(g_base.replay) if g_base is not None else median_seconds(lambda: model(input_ids=ids, position_ids=pos, use_cache=False))
    res["base_graphed"] = g_base is not None

    spec = llama_spec(LAYERS, RANK)
    engine = attach_layers(model, spec, None, DT, torch.device(DEV))
    default_beside = engine.beside_for(BATCH)  # the engine's default at this batch (LORAMUX_LORA_BESIDE_BASE)
    engine.lora_beside_base = False  # the step below in order; beside_step times the branch beside
    mids = MODULE_IDS
    adapters = [random_adapter(spec, mids, range(LAYERS), RANK, seed=1 + a, std=0.03) for a in range(ADAPTERS)]
    ad = resident_adapters(spec, adapters, dtype=DT, device=DEV)
    lora_bytes = ad.value_bytes
    res["lora_bytes"] = lora_bytes
    res["lora_floor_us"] = lora_bytes / bw * 1e6

    slots0 = list(ad.slots)  # row i uses adapter i
    engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
    step = lambda: model(input_ids=ids, position_ids=pos, use_cache=False).logits  # noqa: E731
    with torch.no_grad():
        eager = step().float()
    # the torch reference on the same GPU tensors (kernels switched off) checks the kernel path
    saved = ops.apply._kernels
    ops.apply._kernels = None
    try:
        engine.set_batch(slots0, ad.cache.table, ad.cache.pool)
        with torch.no_grad():
            ref = step().float()
    finally:
        ops.apply._kernels = saved
    base_logits = out_base.float() if g_base is not None else None
    res["kernel_vs_torch_ref_rel"] = float((eager - ref).norm() / (ref - base_logits).norm()) if base_logits is not None else None

    engine.set_batch(slots0, ad.cache.table, ad.cache.pool)  # fresh metas: built inside the capture
    try:
        g_lora, out_lora = capture(step, lambda: fresh_metas(engine))
        t_lora = median_seconds(g_lora.replay)
        res["lora_graphed"] = True
    except Exception as e:  # noqa: BLE001
        res["lora_capture_error"] = repr(e)[:300]
        g_lora, t_lora = None, median_seconds(step)
        res["lora_graphed"] = False
    res.update(base_us=t_base * 1e6, lora_us=t_lora * 1e6, overhead_us=(t_lora - t_base) * 1e6)
    res["overhead_over_floor"] = (t_lora - t_base) / (lora_bytes / bw)

    res.update(ops_only(ad))

    if g_lora is not None:  # replay with new mappings written into the engine's static slot tensor
        static_slots = engine.step.slot_of_row
        errs = []
        rng = torch.Generator().manual_seed(7)
        for distinct in (ADAPTERS, 4, 1, 17):
            slots = [ad.slots[a] for a in torch.randint(0, distinct, (BATCH,), generator=rng).tolist()]
            slots[3] = -1
            static_slots.copy_(torch.tensor(slots, dtype=torch.int32))
            g_lora.replay()
            torch.cuda.synchronize()
            got = out_lora.float().clone()
            engine.set_batch(slots, ad.cache.table, ad.cache.pool)
            want = step().float()
            errs.append(float((got - want).norm() / (want - base_logits).norm()) if base_logits is not None
                        else float((got - want).norm() / want.norm()))
        res["graph_replay_rel_err"] = errs

    # after the replay check: it writes the slot tensor g_lora captured, which set_batch replaces
    if args.variants and g_lora is not None:
        res["overhead_variants_us"] = variant_overheads(engine, step, slots0, ad, t_base * 1e6, args.variants.split(","))
    res.update(unfused_step(engine, step, slots0, ad, eager))
    res.update(beside_step(engine, step, slots0, ad, eager))
    if "lora_beside_us" in res:
        res["overhead_beside_us"] = res["lora_beside_us"] - t_base * 1e6
        res["overhead_beside_over_floor"] = res["overhead_beside_us"] / res["lora_floor_us"]
    res["default_beside"] = default_beside
    key = "overhead_beside_us" if default_beside else "overhead_us"
    if key in res:
        res["overhead_default_us"] = res[key]
        res["overhead_default_over_floor"] = res[key] / res["lora_floor_us"]
    for key in ("lora_static_us", "lora_static_beside_us"):
        if key in res:
            res[key.replace("lora_", "overhead_")] = res[key] - t_base * 1e6
    if "lora_unfused_us" in res:
        res["overhead_unfused_us"] = res["lora_unfused_us"] - t_base * 1e6
        res["overhead_unfused_over_floor"] = res["overhead_unfused_us"] / res["lora_floor_us"]

    if args.batches:
        res["beside_by_batch"] = beside_by_batch(engine, model, ad, [int(b) for b in args.batches.split(",")])

    # PEFT on the same batch and the same adapters (scaling 1: lora_alpha = r)
    if not args.no_peft:
        try:
            import peft

            engine.detach()
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)
            pm = peft.get_peft_model(model, cfg, adapter_name="a0").eval()
            for slot in range(1, ADAPTERS):
                pm.add_adapter(f"a{slot}", cfg)
            # each adapter's A and B per (layer, module), as its rows of the TensorRT-LLM format hold them
            ab = {}
            for a, (weights, config) in enumerate(adapters):
                w = weights.float().numpy()
                for i, row in enumerate(lm.format.validate(w, config, spec)):
                    mid, layer = int(config[i][0]), int(config[i][1])
                    ab[(a, layer, mid)] = (torch.from_numpy(w[i, row.a_slice].reshape(row.rank, row.hi).copy()),
                                           torch.from_numpy(w[i, row.b_slice].reshape(row.ho, row.rank).copy()))
            with torch.no_grad():
                for name, mod in pm.named_modules():
                    if not hasattr(mod, "lora_A") or not isinstance(getattr(mod, "lora_A"), torch.nn.ModuleDict):
                        continue
                    # each PEFT layer takes the rows the converter maps its HF path to (gate_proj: mlp_h_to_4h)
                    target = target_for("llama", name)
                    layer, mid = target.layer, target.module_ids[0]
                    for a in range(ADAPTERS):
                        mod.lora_A[f"a{a}"].weight.copy_(ab[(a, layer, mid)][0].to(DT))
                        mod.lora_B[f"a{a}"].weight.copy_(ab[(a, layer, mid)][1].to(DT))
            pm.eval()
            names = [f"a{a}" for a in range(ADAPTERS)]
            peft_step = lambda: pm(input_ids=ids, position_ids=pos, use_cache=False, adapter_names=names).logits  # noqa: E731
            peft_logits = peft_step().float()
            res["kernel_vs_peft_rel"] = float((eager - peft_logits).norm() / peft_logits.norm())
            if base_logits is not None:
                res["kernel_vs_peft_rel_of_lora_term"] = float((eager - peft_logits).norm() / (peft_logits - base_logits).norm())
            res["peft_us"] = median_seconds(peft_step, reps=5) * 1e6
            res["speedup_vs_peft"] = res["peft_us"] / res["lora_us"]
        except Exception as e:  # noqa: BLE001
            res["peft_error"] = repr(e)[:300]
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
