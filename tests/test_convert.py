"""PEFT adapters made on the spot on tiny random HF models -> `loramux convert` -> back to PEFT:
PeftModel.from_pretrained loads the result and gives the original adapter's logits."""

import json
import math
import os

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from tiny_hf import MODEL_TYPE, TINY_CONFIGS, fresh_model, logits, make_adapter, sample_inputs, tiny_model  # noqa: E402

from loramux import cli, convert, format  # noqa: E402
from loramux.convert import hf_modules as spec  # noqa: E402
from loramux.errors import LoraConvertError, LoraDoraError, LoraFormatError  # noqa: E402
from loramux.modules import MODULE_IDS, NUM_MODULES  # noqa: E402

ARCHS = sorted(TINY_CONFIGS)
PRODUCED_IDS = set()


def _base_dir(arch, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / f"base-{arch}"
    if not path.exists():
        tiny_model(arch).save_pretrained(str(path))
    return str(path)


def _round_trip(arch, peft_dir, out_dir, back_dir, storage="float32", base_dir=None):
    argv = ["convert", "-i", str(peft_dir), "-o", str(out_dir), "--storage-type", storage]
    if base_dir:
        argv += ["--base-model", base_dir]
    assert cli.main(argv) == 0
    weights, config = format.load(str(out_dir))
    hf_config = tiny_model(arch).config
    model_spec = spec.spec_from_hf_config(hf_config)
    format.validate(weights, config, model_spec)
    convert.to_peft(weights, config, model_spec, str(back_dir), hf_config, base_model=base_dir)
    back = peft.PeftModel.from_pretrained(fresh_model(arch), str(back_dir)).eval()
    return weights, config, back


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_round_trips_through_the_cli_with_identical_logits(arch, tmp_path, tmp_path_factory):
    original = make_adapter(arch, tmp_path / "peft")
    # an encoder-decoder needs its base model (decoder layers are numbered after the encoder's)
    base_dir = _base_dir(arch, tmp_path_factory) if arch == "bart" else None
    _, config, back = _round_trip(arch, tmp_path / "peft", tmp_path / "fmt", tmp_path / "back", base_dir=base_dir)
    PRODUCED_IDS.update(int(m) for m in config[:, 0])
    want, got, base = logits(original, arch), logits(back, arch), logits(tiny_model(arch), arch)
    assert (want - base).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_module_id_but_fused_cross_qkv_comes_from_a_tested_architecture():
    covered = set()
    for arch in ARCHS:
        covered.update(spec.module_ids_of(MODEL_TYPE.get(arch, arch)))
    assert covered | spec.IDS_WITHOUT_HF_ARCH == set(range(NUM_MODULES))
    assert spec.IDS_WITHOUT_HF_ARCH == {MODULE_IDS["cross_attn_qkv"]}
    if len(PRODUCED_IDS) > 10:  # the parametrized conversions above ran in this session
        assert PRODUCED_IDS | spec.IDS_WITHOUT_HF_ARCH == set(range(NUM_MODULES))


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_storage_round_trips_within_dtype(storage, tmp_path):
    original = make_adapter("llama", tmp_path / "peft")
    weights, _, back = _round_trip("llama", tmp_path / "peft", tmp_path / "fmt", tmp_path / "back", storage)
    assert format.weights_dtype_name(weights) == storage
    torch.testing.assert_close(logits(back, "llama"), logits(original, "llama"), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt2-xattn"])  # gpt2-xattn: DoRA on a fused k|v layer
def test_dora_needs_the_base_model_and_then_round_trips(arch, tmp_path, tmp_path_factory):
    original = make_adapter(arch, tmp_path / "peft", use_dora=True)
    with pytest.raises(LoraDoraError, match="base_model"):
        convert.from_peft(str(tmp_path / "peft"))
    base_dir = _base_dir(arch, tmp_path_factory)
    _, config, back = _round_trip(arch, tmp_path / "peft", tmp_path / "fmt", tmp_path / "back", base_dir=base_dir)
    assert config.shape[1] == 4 and (config[:, 3] == 1).all()
    torch.testing.assert_close(logits(back, arch), logits(original, arch), rtol=1e-5, atol=1e-5)


def test_rslora_rank_and_alpha_patterns_and_layers_to_transform(tmp_path):
    original = make_adapter("llama", tmp_path / "peft", r=4, lora_alpha=6, use_rslora=True, layers_to_transform=[0, 2],
                            rank_pattern={"q_proj": 2, "model.layers.2.mlp.down_proj": 8}, alpha_pattern={"v_proj": 3})
    _, config, back = _round_trip("llama", tmp_path / "peft", tmp_path / "fmt", tmp_path / "back")
    assert sorted(set(config[:, 1].tolist())) == [0, 2]
    ranks = {(int(m), int(layer)): int(r) for m, layer, r in config}
    assert ranks[(MODULE_IDS["attn_q"], 0)] == 2 and ranks[(MODULE_IDS["mlp_4h_to_h"], 2)] == 8
    assert ranks[(MODULE_IDS["mlp_4h_to_h"], 0)] == 4
    torch.testing.assert_close(logits(back, "llama"), logits(original, "llama"), rtol=1e-5, atol=1e-5)


def test_bin_adapter_converts_like_safetensors(tmp_path):
    model = make_adapter("qwen2", tmp_path / "st")
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert os.path.exists(tmp_path / "bin" / convert.BIN_FILE)
    w1, c1 = convert.from_peft(str(tmp_path / "st"), "float32")
    w2, c2 = convert.from_peft(str(tmp_path / "bin"), "float32")
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["q_proj", "lm_head"]), "lm_head.* a LoRA on an embedding or lm_head"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "embed.* a LoRA on an embedding or lm_head"),
        (dict(target_modules=["q_proj"], bias="lora_only"), "bias"),
        (dict(target_modules=["q_proj"], bias="all"), "bias"),
    ],
)
def test_what_the_format_cannot_hold_is_named(kwargs, match, tmp_path):
    make_adapter("llama", tmp_path / "peft", **kwargs)
    with pytest.raises(LoraConvertError, match=match):
        convert.from_peft(str(tmp_path / "peft"))


def test_output_size_is_checked_before_allocating(tmp_path):
    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj"])
    with pytest.raises(LoraFormatError, match="over the limit"):
        convert.from_peft(str(tmp_path / "peft"), max_bytes=100)


def test_distinct_expert_weights_are_refused(tmp_path):
    make_adapter("mixtral", tmp_path / "peft", target_modules=[], share_experts=False)
    with pytest.raises(LoraConvertError, match="experts 0 and 1 have different LoRA weights"):
        convert.from_peft(str(tmp_path / "peft"))


def test_bart_numbers_decoder_layers_after_the_encoders(tmp_path, tmp_path_factory):
    make_adapter("bart", tmp_path / "peft", target_modules=["q_proj", "v_proj"])
    with pytest.raises(LoraConvertError, match="base_model"):
        convert.from_peft(str(tmp_path / "peft"))
    _, config = convert.from_peft(str(tmp_path / "peft"), base_model=_base_dir("bart", tmp_path_factory))
    by_layer = {layer: sorted(int(m) for m, lay, _ in config if lay == layer) for layer in range(4)}
    q, v, xq, xv = (MODULE_IDS[m] for m in ("attn_q", "attn_v", "cross_attn_q", "cross_attn_v"))
    assert by_layer == {0: [q, v], 1: [q, v], 2: [q, v, xq, xv], 3: [q, v, xq, xv]}


def _legacy_mixtral_adapter(path, distinct):
    """A transformers-4 style Mixtral adapter (one Linear per expert: w1/w2/w3) written by hand."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    h, f, r, experts = 8, 12, 2, 3
    tensors = {}
    for name, (hi, ho) in {"w1": (h, f), "w3": (h, f), "w2": (f, h)}.items():
        a, b = rng.standard_normal((r, hi), dtype=np.float32), rng.standard_normal((ho, r), dtype=np.float32)
        for e in range(experts):
            key = f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.{name}"
            tensors[key + ".lora_A.weight"] = a + (e if distinct and name == "w3" else 0)
            tensors[key + ".lora_B.weight"] = b
    os.makedirs(path)
    save_file(tensors, os.path.join(path, convert.SAFETENSORS_FILE))
    with open(os.path.join(path, convert.ADAPTER_CONFIG), "w") as fh:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"],
                   "auto_mapping": {"base_model_class": "MixtralForCausalLM"}}, fh)
    return tensors


def test_factors_that_do_not_pair_up_are_named(tmp_path):
    from safetensors.numpy import save_file

    os.makedirs(tmp_path / "bad")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({key + ".lora_A.weight": np.ones((2, 8), np.float32), key + ".lora_B.weight": np.ones((8, 3), np.float32)},
              str(tmp_path / "bad" / convert.SAFETENSORS_FILE))
    with open(tmp_path / "bad" / convert.ADAPTER_CONFIG, "w") as fh:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}, fh)
    with pytest.raises(LoraConvertError, match="q_proj: lora_A"):
        convert.from_peft(str(tmp_path / "bad"))
    with open(tmp_path / "bad" / convert.ADAPTER_CONFIG, "w") as fh:
        json.dump({"peft_type": "IA3", "target_modules": ["q_proj"]}, fh)
    with pytest.raises(LoraConvertError, match="IA3"):
        convert.from_peft(str(tmp_path / "bad"))


def test_transformers4_per_expert_mixtral_adapters(tmp_path):
    tensors = _legacy_mixtral_adapter(str(tmp_path / "same"), distinct=False)
    weights, config = convert.from_peft(str(tmp_path / "same"), "float32")
    assert config.tolist() == [[MODULE_IDS["moe_h_to_4h"], 1, 2], [MODULE_IDS["moe_4h_to_h"], 1, 2], [MODULE_IDS["moe_gate"], 1, 2]]
    for row, name in ((0, "w1"), (1, "w2"), (2, "w3")):  # w1 (gate) is moe_h_to_4h, w3 (up) moe_gate
        a = tensors[f"base_model.model.model.layers.1.block_sparse_moe.experts.0.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.model.layers.1.block_sparse_moe.experts.0.{name}.lora_B.weight"]
        np.testing.assert_array_equal(weights[row, : a.size], a.reshape(-1))
        np.testing.assert_allclose(weights[row, a.size : a.size + b.size], (b * 2).reshape(-1))  # alpha/r = 2 folded
    _legacy_mixtral_adapter(str(tmp_path / "distinct"), distinct=True)
    with pytest.raises(LoraConvertError, match="moe_gate"):
        convert.from_peft(str(tmp_path / "distinct"))


@pytest.mark.parametrize(
    "arch, path, names",
    [
        ("llama", "model.layers.0.mlp.gate_proj", ("mlp_h_to_4h",)),
        ("llama", "model.layers.0.mlp.up_proj", ("mlp_gate",)),
        ("llama", "model.layers.0.mlp.down_proj", ("mlp_4h_to_h",)),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert.gate_proj", ("mlp_h_to_4h",)),
        ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj", ("mlp_gate",)),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1", ("moe_h_to_4h",)),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w3", ("moe_gate",)),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w2", ("moe_4h_to_h",)),
        ("qwen2_moe", "model.layers.0.mlp.experts.0.gate_proj", ("moe_h_to_4h",)),
        ("qwen2_moe", "model.layers.0.mlp.experts.0.up_proj", ("moe_gate",)),
        ("mixtral", "model.layers.0.mlp.experts.gate_up_proj", ("moe_h_to_4h", "moe_gate")),  # [gate; up]
    ],
)
def test_gated_mlps_map_to_module_ids_as_tensorrt_llm_converts_them(arch, path, names):
    """The module table names TensorRT-LLM's layers: mlp_h_to_4h is the projection the activation
    reads (HF gate_proj, Mixtral w1), mlp_gate the multiplied one (up_proj, w3); TensorRT-LLM's
    converter maps them so, and files exchanged with it must keep gate and up apart."""
    assert spec.target_for(arch, path).module_ids == tuple(MODULE_IDS[n] for n in names)


def test_a_gate_proj_adapter_converts_to_mlp_h_to_4h_rows(tmp_path):
    make_adapter("llama", tmp_path / "peft", target_modules=["gate_proj"])
    _, config = convert.from_peft(str(tmp_path / "peft"), "float32")
    assert set(config[:, 0].tolist()) == {MODULE_IDS["mlp_h_to_4h"]}
    _, rule = spec.hf_path_for("phi3", MODULE_IDS["mlp_h_to_4h"], 0)  # written into gate_up's gate half
    assert rule.inner == "mlp.gate_up_proj" and rule.module_ids == (MODULE_IDS["mlp_h_to_4h"], MODULE_IDS["mlp_gate"])


def test_format_rows_without_an_hf_place_are_refused_by_to_peft(tmp_path):
    model_spec = spec.spec_from_hf_config(tiny_model("gpt2").config)
    weights, config = format.from_rows([format.AdapterRow(MODULE_IDS["mlp_router"], 0, np.ones((2, 32), np.float32),
                                                          np.ones((1, 2), np.float32))], "float32")
    with pytest.raises(LoraConvertError, match="mlp_router"):
        convert.to_peft(weights, config, model_spec, str(tmp_path / "x"), "gpt2")


def _split_rows(arch, rng, dora=False):
    """Rows that a fused HF layer holds side by side: q/k/v beside qkv, gate/up beside gate_up."""
    model_spec = spec.spec_from_hf_config(tiny_model(arch).config)
    names = ["attn_q", "attn_v", "attn_qkv"] + (["mlp_gate", "mlp_h_to_4h", "mlp_gate_up"] if arch == "phi3" else [])
    rows = []
    for rank, name in enumerate(names, start=1):
        hi, ho = model_spec.module_dims(MODULE_IDS[name])
        scale = rng.uniform(0.5, 1.5, ho).astype(np.float32) if dora else None
        rows.append(format.AdapterRow(MODULE_IDS[name], 1, rng.standard_normal((rank, hi), dtype=np.float32) * 0.3,
                                      rng.standard_normal((ho, rank), dtype=np.float32) * 0.3, scale))
    return model_spec, rows


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_split_rows_are_written_into_the_fused_layer(arch, tmp_path):
    """Oracle: each row's B @ A merged into the base weight at its output offset."""
    model_spec, rows = _split_rows(arch, np.random.default_rng(5))
    weights, config = format.from_rows(rows, "float32")
    convert.to_peft(weights, config, model_spec, str(tmp_path / "peft"), tiny_model(arch).config)
    loaded = peft.PeftModel.from_pretrained(fresh_model(arch), str(tmp_path / "peft")).eval()
    merged = fresh_model(arch)
    for row in rows:
        path, rule = spec.hf_path_for(arch, row.module_id, row.layer)
        at = spec.output_offset(rule, row.module_id, model_spec)
        delta = torch.from_numpy(row.b @ row.a)
        weight = merged.get_parameter(path + ".weight")
        with torch.no_grad():
            if rule.kind == spec.CONV1D:
                weight[:, at : at + delta.shape[0]] += delta.T
            else:
                weight[at : at + delta.shape[0]] += delta
    torch.testing.assert_close(logits(loaded, arch), logits(merged, arch), rtol=1e-5, atol=1e-5)


def test_split_dora_rows_keep_scale_one_where_no_row_covers(tmp_path, tmp_path_factory):
    model_spec, rows = _split_rows("gpt2", np.random.default_rng(6), dora=True)
    rows = rows[:1]  # attn_q only: c_attn's k and v outputs are untouched
    weights, config = format.from_rows(rows, "float32")
    base_dir = _base_dir("gpt2", tmp_path_factory)
    convert.to_peft(weights, config, model_spec, str(tmp_path / "peft"), "gpt2", base_model=base_dir)
    w2, c2 = convert.from_peft(str(tmp_path / "peft"), "float32", base_model=base_dir)
    (back,) = format.to_rows(w2, c2, model_spec)
    q = model_spec.module_dims(MODULE_IDS["attn_q"])[1]
    assert back.module_id == MODULE_IDS["attn_qkv"]
    np.testing.assert_allclose(back.b[:q], rows[0].b, rtol=1e-6)
    np.testing.assert_array_equal(back.b[q:], 0)
    np.testing.assert_allclose(back.dora_scale[:q], rows[0].dora_scale, rtol=1e-5)
    np.testing.assert_allclose(back.dora_scale[q:], 1, rtol=1e-5)


# --- bad input: every odd adapter is refused with a typed error naming what is wrong -------------


def _edited_copy(src, dst, tensors=None, config=None, raw_config=None):
    """A copy of the PEFT folder `src` in `dst` with its state dict and adapter_config edited:
    `tensors(dict)` / `config(dict)` change them in place; `raw_config` replaces the JSON text."""
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(src, convert.SAFETENSORS_FILE))
    with open(os.path.join(src, convert.ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    if tensors:
        tensors(state)
    if config:
        config(cfg)
    os.makedirs(dst)
    save_file(state, os.path.join(dst, convert.SAFETENSORS_FILE))
    with open(os.path.join(dst, convert.ADAPTER_CONFIG), "w") as f:
        f.write(json.dumps(cfg) if raw_config is None else raw_config)
    return str(dst)


_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


@pytest.fixture(scope="module")
def llama_peft(tmp_path_factory):
    """A tiny Llama adapter on q, k, v and down_proj (r=4, hidden 32, mlp 48) in 3 layers."""
    path = tmp_path_factory.mktemp("llama-peft") / "peft"
    make_adapter("llama", str(path), target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    return str(path)


@pytest.mark.parametrize(
    "edit, named",
    [
        (_set(_Q0 + ".lora_A.weight", np.ones((4, 30), np.float32)), "q_proj: lora_A has shape [4, 30], expected [4, 32]"),
        (_set(_Q0 + ".lora_B.weight", np.ones((33, 4), np.float32)), "q_proj: lora_B has shape [33, 4], expected [32, 4]"),
        (_set("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", np.ones((8, 4), np.float32)),
         "layers.1.self_attn.v_proj: lora_B has shape [8, 4], expected [16, 4]"),  # k_proj's and v_proj's widths agree
        (_set("base_model.model.model.layers.2.mlp.down_proj.lora_A.weight", np.ones((4, 40), np.float32)),
         "down_proj: lora_A has shape [4, 40], expected [4, 48]"),
    ],
    ids=["A-width", "B-height", "v-vs-k", "mlp-width"],
)
@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model"])
def test_factors_of_the_wrong_width_are_named(llama_peft, tmp_path, tmp_path_factory, edit, named, with_model):
    """A factor whose width is not the model's would still fit a padded row and serve garbage: with
    the model its shape is checked against the model's; without, against the other layers' and the
    modules sharing the width (the odd one out is named)."""
    bad = _edited_copy(llama_peft, tmp_path / "bad", tensors=edit)
    base = _base_dir("llama", tmp_path_factory) if with_model else None
    with pytest.raises(LoraConvertError, match=named.replace("[", r"\[").replace("]", r"\]")):
        convert.from_peft(bad, base_model=base)


def test_the_shared_widths_table_agrees_with_the_formats_module_dims():
    """peft_reader._SHARED_WIDTHS names, for the checks without a model, which width each module
    reads and writes; the format's ModelSpec.module_dims (rust/src/format.rs) is the rule it
    mirrors: every module's widths, spelled out by the table, equal module_dims' on a model whose
    every width differs (the fused qkv outputs, a sum, are left to the per-module check; the fused
    cross-attention qkv needs an encoder as wide as the decoder)."""
    from loramux.convert import peft_reader

    def model(encoder):
        return format.ModelSpec(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=24, ffn_size=96,
                                expert_ffn_size=80, num_experts=6, encoder_hidden_size=encoder, max_rank=8)

    value = {"hidden size": 64, "attention width": 4 * 24, "key/value width": 2 * 24, "MLP width": 96,
             "expert MLP width": 80, "number of experts": 6, "encoder width": 40, **peft_reader._FIXED_WIDTHS}
    assert set(peft_reader._SHARED_WIDTHS) == set(MODULE_IDS)
    for name, sides in peft_reader._SHARED_WIDTHS.items():
        dims = model(64 if name == "cross_attn_qkv" else 40).module_dims(MODULE_IDS[name])
        for side, entry in enumerate(sides):
            if entry is not None:
                what, times = entry
                assert value[what] * times == dims[side], (name, side, entry, dims)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("lora_alpha", None, "lora_alpha=None"),
        ("lora_alpha", "16", "lora_alpha='16'"),
        ("r", 0, "r=0"),
        ("alpha_pattern", {"q_proj": "16"}, "alpha_pattern\\['q_proj'\\]='16'"),
        ("rank_pattern", {"q_proj": "4"}, "rank_pattern\\['q_proj'\\]='4'"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern\\['q_proj'\\]=0"),
        ("alpha_pattern", {"q_proj[": 2}, "alpha_pattern key 'q_proj\\['"),
        ("alpha_pattern", ["q_proj"], "alpha_pattern=\\['q_proj'\\]"),
        ("rank_pattern", "q_proj", "rank_pattern='q_proj'"),
        ("auto_mapping", "LlamaForCausalLM", "auto_mapping='LlamaForCausalLM'"),
        ("use_dora", "false", "use_dora='false'"),
        ("target_parameters", "mlp.gate.weight", "target_parameters='mlp.gate.weight'"),
    ],
)
def test_odd_adapter_config_values_are_named(llama_peft, tmp_path, field, value, named):
    bad = _edited_copy(llama_peft, tmp_path / "bad", config=_set(field, value))
    with pytest.raises(LoraConvertError, match=named):
        convert.from_peft(bad)


@pytest.mark.parametrize("text", ["[]", "null", "3", '"LORA"'])
def test_an_adapter_config_that_is_not_an_object_is_named(llama_peft, tmp_path, text):
    bad = _edited_copy(llama_peft, tmp_path / "bad", raw_config=text)
    with pytest.raises(LoraConvertError, match="adapter_config.json: holds .*expected a JSON object"):
        convert.from_peft(bad)


def test_rank_0_factors_are_named(llama_peft, tmp_path):
    def rank0(state):
        state[_Q0 + ".lora_A.weight"] = np.ones((0, 32), np.float32)
        state[_Q0 + ".lora_B.weight"] = np.ones((32, 0), np.float32)

    bad = _edited_copy(llama_peft, tmp_path / "bad", tensors=rank0)
    with pytest.raises(LoraConvertError, match="layers.0.self_attn.q_proj: its rank is 0"):
        convert.from_peft(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_non_finite_factors_are_named(llama_peft, tmp_path, value, factor):
    key = f"{_Q0}.{factor}.weight"

    def poison(state):
        state[key][1, 2] = value

    bad = _edited_copy(llama_peft, tmp_path / "bad", tensors=poison)
    with pytest.raises(LoraFormatError, match=f"{key}: holds a non-finite value \\({value}\\)"):
        convert.from_peft(bad, "float32")


def _put(factor, value):
    def edit(state):
        state[f"{_Q0}.{factor}.weight"][0, 0] = value
    return edit


@pytest.mark.parametrize(
    "edit, storage, named",
    [
        (_put("lora_A", 1e6), "float16", "lora_A holds 1e\\+06"),
        (_put("lora_A", -7e4), "float16", "lora_A holds -70000"),
        (_put("lora_B", 4e4), "float16", "lora_B .*holds 80000"),  # x lora_alpha/r = 2
        (_put("lora_A", 3.4e38), "bfloat16", "lora_A holds 3.4e\\+38"),
    ],
)
def test_values_too_large_for_the_storage_type_are_named(llama_peft, tmp_path, edit, storage, named):
    """float16 / bfloat16 would store them as inf (numpy only warns); a wider type holds them."""
    bad = _edited_copy(llama_peft, tmp_path / "bad", tensors=edit)
    with pytest.raises(LoraConvertError, match=f"q_proj: {named}, too large for storage type {storage}"):
        convert.from_peft(bad, storage)
    weights, _ = convert.from_peft(bad, "float32")
    assert np.isfinite(weights).all()


def test_a_scale_that_overflows_float32_is_named(llama_peft, tmp_path):
    huge = _edited_copy(llama_peft, tmp_path / "huge", config=_set("lora_alpha", 1e40))
    with pytest.raises(LoraConvertError, match=r"down_proj: lora_B .*holds -?(inf|nan), not finite \(storage type float32 "
                                               r".*lora_alpha too large"):
        convert.from_peft(huge, "float32")


def test_an_empty_adapter_is_refused(llama_peft, tmp_path):
    bad = _edited_copy(llama_peft, tmp_path / "bad", tensors=lambda state: state.clear())
    with pytest.raises(LoraConvertError, match="no LoRA factors found"):
        convert.from_peft(bad)


def test_dora_without_its_magnitudes_is_refused(llama_peft, tmp_path, tmp_path_factory):
    """Converted as plain LoRA it would silently serve another adapter than the one trained."""
    bad = _edited_copy(llama_peft, tmp_path / "bad", config=_set("use_dora", True))
    for base in (None, _base_dir("llama", tmp_path_factory)):
        with pytest.raises(LoraConvertError, match="use_dora is true but model.layers.0.mlp.down_proj .and 11 more "
                                                   "modules. has no lora_magnitude_vector"):
            convert.from_peft(bad, base_model=base)


# --- hypothesis: PEFT -> format -> PEFT over random architectures, shapes, ranks and modules ------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def hf_configs(draw):
    arch = draw(st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "phi3", "mixtral", "qwen2_moe", "bart"]))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([2, 4]))
    hidden, layers, ffn = heads * head_dim * draw(st.sampled_from([1, 2])), draw(st.integers(1, 3)), draw(st.sampled_from([6, 10]))
    if arch == "gpt2":
        return dict(model_type=arch, n_embd=hidden, n_head=heads, n_layer=layers, n_inner=ffn,
                    add_cross_attention=draw(st.booleans()))
    if arch == "bart":
        return dict(model_type=arch, d_model=hidden, encoder_layers=layers, decoder_layers=draw(st.integers(1, 2)),
                    encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn)
    cfg = dict(model_type=arch, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
               num_key_value_heads=draw(st.sampled_from([1, heads])), head_dim=head_dim, intermediate_size=ffn)
    if arch == "mixtral":
        cfg.update(num_local_experts=draw(st.integers(1, 3)))
    if arch == "qwen2_moe":
        cfg.update(num_experts=draw(st.integers(1, 3)), moe_intermediate_size=4, shared_expert_intermediate_size=ffn,
                   decoder_sparse_step=1, mlp_only_layers=[])
    return cfg


def _write_base(path, cfg):
    """A stand-in base model dir: its config.json (all from_peft reads without DoRA) and one tensor."""
    from safetensors.numpy import save_file

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({"unused": np.zeros(1, np.float32)}, os.path.join(path, "model.safetensors"))


def _write_peft_and_base(root, tensors, adapter_config, cfg):
    """A PEFT folder (root/peft: safetensors + adapter_config.json) and its base model's config (root/base)."""
    from safetensors.numpy import save_file

    os.makedirs(root / "peft")
    save_file(tensors, str(root / "peft" / convert.SAFETENSORS_FILE))
    with open(root / "peft" / convert.ADAPTER_CONFIG, "w") as f:
        json.dump(adapter_config, f)
    _write_base(str(root / "base"), cfg)


@st.composite
def peft_adapters(draw):
    """(hf config, adapter_config, state dict, records) of a random valid PEFT adapter; a record is
    (pattern key, state-dict module path, A, B, experts) per target."""
    cfg = draw(hf_configs())
    arch, model_spec = cfg["model_type"], spec.spec_from_hf_config(cfg)
    enc = spec.encoder_layers_of(cfg)
    mids = draw(st.lists(st.sampled_from(spec.module_ids_of(arch)), min_size=1, max_size=6, unique=True))
    layers = draw(st.lists(st.integers(0, model_spec.num_layers - 1), min_size=1, unique=True))
    targets = {}
    for mid in [1 if arch != "gpt2" else 0] + mids:
        for layer in layers:
            try:
                path, rule = spec.hf_path_for(arch, mid, layer, enc)
                model_spec.module_dims(rule.module_ids[0])
            except (LoraConvertError, ValueError):
                continue  # e.g. cross attention in an encoder layer, or GPT-2 without it
            targets[path] = rule
    r, rank_pattern, alpha_pattern, tensors, records = draw(st.integers(1, 4)), {}, {}, {}, []
    target_modules, target_parameters = [], []
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for path, rule in sorted(targets.items()):
        hi = model_spec.module_dims(rule.module_ids[0])[0]
        ho = sum(model_spec.module_dims(m)[1] for m in rule.module_ids)
        key = path + ".weight" if rule.kind == spec.ROUTER else path
        (target_parameters if rule.kind in (spec.ROUTER, spec.EXPERTS) else target_modules).append(key)
        rank = draw(st.integers(1, 6)) if draw(st.booleans()) else r
        if rank != r:
            rank_pattern[key] = rank
        if draw(st.booleans()):
            alpha_pattern[key] = draw(st.sampled_from([1, 3, 16]))
        experts = model_spec.num_experts if rule.kind == spec.EXPERTS else 1
        nested = path
        if rule.kind == spec.EXPERTS:  # PEFT nests the wrappers: gate_up_proj inside down_proj
            module, pname = path.rsplit(".", 1)
            both = f"{module}.down_proj" in targets and f"{module}.gate_up_proj" in targets
            nested = module + (".base_layer" if both and pname == "gate_up_proj" else "")
        a, b = rng.standard_normal((rank, hi), dtype=np.float32), rng.standard_normal((ho, rank), dtype=np.float32)
        tensors[f"base_model.model.{nested}.lora_A.weight"] = np.tile(a, (experts, 1))
        tensors[f"base_model.model.{nested}.lora_B.weight"] = np.repeat(b, experts, axis=1)
        records.append((key, nested, a, b, experts))
    adapter_config = dict(peft_type="LORA", r=r, lora_alpha=draw(st.sampled_from([1, 4, 8])), use_rslora=draw(st.booleans()),
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers_to_transform=sorted(layers),
                          target_modules=target_modules, target_parameters=target_parameters or None)
    return cfg, adapter_config, tensors, records


def _delta(a, b, adapter_config, key):
    """scaling * B @ A as PEFT computes it (its own pattern lookup)."""
    from peft.utils.other import get_pattern_key

    alpha = adapter_config["alpha_pattern"].get(get_pattern_key(adapter_config["alpha_pattern"].keys(), key),
                                                adapter_config["lora_alpha"])
    rank = a.shape[0]
    scaling = alpha / math.sqrt(rank) if adapter_config["use_rslora"] else alpha / rank
    return (b.astype(np.float64) * scaling) @ a.astype(np.float64)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(peft_adapters(), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_peft_to_format_to_peft_is_exact_within_dtype(tmp_path_factory, adapter, storage):
    from safetensors.torch import load_file

    cfg, adapter_config, tensors, records = adapter
    root = tmp_path_factory.mktemp("rt")
    _write_peft_and_base(root, tensors, adapter_config, cfg)
    weights, config = convert.from_peft(str(root / "peft"), storage, base_model=str(root / "base"))
    convert.to_peft(weights, config, spec.spec_from_hf_config(cfg), str(root / "back"), cfg)
    with open(root / "back" / convert.ADAPTER_CONFIG) as f:
        back_config = json.load(f)
    back = {k: v.float().numpy() for k, v in load_file(str(root / "back" / convert.SAFETENSORS_FILE)).items()}
    assert len(back) == len(tensors)
    assert sorted(back_config["target_modules"] + (back_config["target_parameters"] or [])) == sorted(r[0] for r in records)
    tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[storage]
    for key, nested, a, b, experts in records:
        ba, bb = back[f"base_model.model.{nested}.lora_A.weight"], back[f"base_model.model.{nested}.lora_B.weight"]
        rank = ba.shape[0] // experts
        want = _delta(a, b, adapter_config, key)
        for e in range(experts):  # every expert got the same adapter back
            ea, eb = ba.reshape(experts, rank, -1)[e], bb.reshape(bb.shape[0], rank, experts)[:, :, e]
            np.testing.assert_allclose(_delta(ea, eb, back_config, key), want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(peft_adapters(), st.data())
def test_a_factor_of_the_wrong_width_is_named_against_the_model(tmp_path_factory, adapter, data):
    """One factor of a random valid adapter made one column (A) or one row (B) too wide: with the
    model, from_peft names that module, the expected and the actual shape."""
    cfg, adapter_config, tensors, records = adapter
    key, nested, _, _, _ = data.draw(st.sampled_from(records))
    factor = data.draw(st.sampled_from(["lora_A", "lora_B"]))
    name = f"base_model.model.{nested}.{factor}.weight"
    good = tensors[name]
    pad = np.zeros((good.shape[0], 1) if factor == "lora_A" else (1, good.shape[1]), np.float32)
    tensors = dict(tensors, **{name: np.concatenate([good, pad], axis=1 if factor == "lora_A" else 0)})
    root = tmp_path_factory.mktemp("wide")
    _write_peft_and_base(root, tensors, adapter_config, cfg)
    with pytest.raises(LoraConvertError) as err:
        convert.from_peft(str(root / "peft"), "float32", base_model=str(root / "base"))
    message = str(err.value)
    module = key[: -len(".weight")] if key.endswith(".weight") else key
    assert module in message and factor in message, message
    assert f"shape {list(tensors[name].shape)}, expected {list(good.shape)}" in message, message


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_an_adapter_whose_initialization_rewrites_the_base_is_refused(tmp_path, init):
    # PEFT runs these initializations again when it loads the adapter, rewriting the base weights
    make_adapter("llama", str(tmp_path / "peft"), target_modules=["q_proj"])
    path = tmp_path / "peft" / convert.ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["init_lora_weights"] = init
    path.write_text(json.dumps(config))
    with pytest.raises(LoraConvertError, match=f"init_lora_weights='{init}'"):
        convert.from_peft(str(tmp_path / "peft"))


def test_a_pissa_adapter_serves_as_peft_loads_it_once_peft_saved_it_as_plain_lora(tmp_path):
    import loramux as lm

    model = peft.get_peft_model(fresh_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights="pissa")).eval()
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter saved as plain LoRA
    model.save_pretrained(str(tmp_path / "initial"))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training": B moves away from its SVD initialization
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "pissa"))
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.raises(LoraConvertError, match="path_initial_model_for_weight_conversion"):
        convert.from_peft(str(tmp_path / "pissa"))
    loaded = peft.PeftModel.from_pretrained(fresh_model("llama"), str(tmp_path / "pissa")).eval()
    plain = peft.PeftModel.from_pretrained(fresh_model("llama"), str(tmp_path / "plain")).eval()
    torch.testing.assert_close(logits(plain, "llama"), logits(loaded, "llama"), rtol=1e-4, atol=1e-4)
    weights, config = convert.from_peft(str(tmp_path / "plain"), "float32")
    ours = fresh_model("llama")
    with lm.attach(ours, max_rank=16, host_cache_bytes=4 << 20, device_cache_bytes=2 << 20) as engine:
        engine.cache.put(1, weights, config)
        rows = sample_inputs("llama")["input_ids"].shape[0]
        with engine.batch([1] * rows):
            got = logits(ours, "llama")
    torch.testing.assert_close(got, logits(loaded, "llama"), rtol=1e-4, atol=1e-4)


def test_dora_on_a_fused_layer_of_two_modules_serves_as_peft(tmp_path):
    """GPT-2's cross-attention c_attn holds k and v: each DoRA scale belongs to one output row, so
    the scales split with B's rows."""
    import loramux as lm

    original = make_adapter("gpt2-xattn", str(tmp_path / "peft"), use_dora=True)
    weights, config = convert.from_peft(str(tmp_path / "peft"), "float32", base_model=fresh_model("gpt2-xattn"))
    split = {MODULE_IDS["cross_attn_k"], MODULE_IDS["cross_attn_v"]}
    assert {int(m) for m, _, _, dora in config if dora == 1} >= split
    ours = fresh_model("gpt2-xattn")
    with lm.attach(ours, max_rank=16, host_cache_bytes=4 << 20, device_cache_bytes=2 << 20) as engine:
        engine.cache.put(1, weights, config)
        with engine.batch([1, None]):
            got = logits(ours, "gpt2-xattn")
    want, base = logits(original, "gpt2-xattn"), logits(tiny_model("gpt2-xattn"), "gpt2-xattn")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)
