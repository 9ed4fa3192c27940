"""PEFT adapters made on the spot on tiny random HF models -> `loramux convert` -> back to PEFT:
PeftModel.from_pretrained loads the result and gives the original adapter's logits."""

import json
import os

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from tiny_hf import MODEL_TYPE, TINY_CONFIGS, fresh_model, logits, make_adapter, tiny_model  # noqa: E402

from loramux import cli, convert, format, spec  # noqa: E402
from loramux.errors import LoraConvertError, LoraDoraError  # noqa: E402
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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
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
        (dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "embed"),
        (dict(target_modules=["q_proj"], bias="lora_only"), "bias"),
    ],
)
def test_what_the_format_cannot_hold_is_named(kwargs, match, tmp_path):
    make_adapter("llama", tmp_path / "peft", **kwargs)
    with pytest.raises(LoraConvertError, match=match):
        convert.from_peft(str(tmp_path / "peft"))


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


def test_transformers4_per_expert_mixtral_adapters(tmp_path):
    tensors = _legacy_mixtral_adapter(str(tmp_path / "same"), distinct=False)
    weights, config = convert.from_peft(str(tmp_path / "same"), "float32")
    assert config.tolist() == [[MODULE_IDS["moe_h_to_4h"], 1, 2], [MODULE_IDS["moe_4h_to_h"], 1, 2], [MODULE_IDS["moe_gate"], 1, 2]]
    a = tensors["base_model.model.model.layers.1.block_sparse_moe.experts.0.w1.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.block_sparse_moe.experts.0.w1.lora_B.weight"]
    np.testing.assert_array_equal(weights[2, : a.size], a.reshape(-1))
    np.testing.assert_allclose(weights[2, a.size : a.size + b.size], (b * 2).reshape(-1))  # alpha/r = 2 folded
    _legacy_mixtral_adapter(str(tmp_path / "distinct"), distinct=True)
    with pytest.raises(LoraConvertError, match="moe_h_to_4h"):
        convert.from_peft(str(tmp_path / "distinct"))


def test_format_rows_without_an_hf_place_are_refused_by_to_peft(tmp_path):
    model_spec = spec.spec_from_hf_config(tiny_model("gpt2").config)
    weights, config = format.from_rows([format.AdapterRow(MODULE_IDS["attn_q"], 0, np.ones((2, 32), np.float32),
                                                          np.ones((32, 2), np.float32))], "float32")
    with pytest.raises(LoraConvertError, match="attn_q"):
        convert.to_peft(weights, config, model_spec, str(tmp_path / "x"), "gpt2")
