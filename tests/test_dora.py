"""DoRA parity with PEFT (use_dora=True): logits per row of a mixed batch of DoRA and plain adapters,
on a Llama with biases on every projection, through loramux.attach and the tp=1 parallel forward;
and the errors for DoRA that cannot be served."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import loramux as lm
from loramux.models import spec_from_config
from tp_oracle import tiny_llama

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> PEFT LoraConfig kwargs: two DoRA adapters (different ranks, rsLoRA on one), one plain
ADAPTERS = {
    "dora4": dict(r=4, lora_alpha=8, target_modules=PROJ, use_dora=True),
    "plain8": dict(r=8, lora_alpha=4, target_modules=PROJ),
    "dora2": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_dora=True,
                  use_rslora=True),
}
ROWS = ["dora4", "plain8", None, "dora2", "dora4"]


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    """A base model, a PEFT model holding the three adapters (random B and magnitudes, so DoRA is far
    from the identity), and each adapter converted to the TensorRT-LLM format with DoRA normalized."""
    from loramux import convert

    base = tiny_llama(1, layers=2, bias=True)
    torch.manual_seed(2)
    names = list(ADAPTERS)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(lora_dropout=0.0, **ADAPTERS[name]))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in pname:
                p.mul_(torch.empty_like(p).uniform_(0.6, 1.4))
    peft_model.eval()
    out = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(out)
    converted = {}
    for name in names:
        converted[name] = convert.from_peft(str(out / name), storage_type="float32", base_model=base)
    return base, peft_model, converted, out


def _peft_rows(peft_model, input_ids):
    outs = {}
    with torch.no_grad():
        for name in set(ROWS):
            if name is None:
                with peft_model.disable_adapter():
                    outs[name] = peft_model(input_ids).logits
            else:
                peft_model.set_adapter(name)
                outs[name] = peft_model(input_ids).logits
    return torch.stack([outs[name][i] for i, name in enumerate(ROWS)])


def _input_ids():
    return torch.randint(0, 64, (len(ROWS), 7), generator=torch.Generator().manual_seed(3))


def test_converted_dora_rows_carry_is_dora_and_positive_scales(peft_setup):
    _, _, converted, _ = peft_setup
    for name, (weights, config) in converted.items():
        if not ADAPTERS[name].get("use_dora"):
            assert config.shape[1] == 3 or not config[:, 3].any()  # plain LoRA: no DoRA rows
            continue
        assert config.shape[1] == 4 and config[:, 3].all()
        spec = spec_from_config(peft_setup[0].config, max_rank=8)
        for row, layout in zip(weights, lm.format.validate(weights, config, spec)):
            scales = row[layout.scale_slice]
            assert scales.shape == (layout.ho,) and (scales > 0).all()


def test_mixed_dora_and_plain_batch_matches_peft_through_attach(peft_setup):
    base, peft_model, converted, _ = peft_setup
    ids = _input_ids()
    want = _peft_rows(peft_model, ids)
    model = copy.deepcopy(base)
    engine = lm.attach(model, max_rank=8, host_cache_bytes=16 << 20, device_cache_bytes=8 << 20)
    task = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    for name, (w, c) in converted.items():
        engine.cache.put(task[name], w, c)
    with torch.no_grad(), engine.batch([None if n is None else task[n] for n in ROWS]):
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(ids).logits
    assert not torch.allclose(got[0], plain[0], atol=1e-3)  # the DoRA row really differs from the base


def test_tp1_parallel_forward_matches_peft_with_dora(peft_setup):
    from loramux.parallel import ParallelContext, TpLlama

    base, peft_model, converted, _ = peft_setup
    ids = _input_ids()
    want = _peft_rows(peft_model, ids)
    shard = TpLlama(copy.deepcopy(base), ParallelContext(), max_rank=8, host_cache_bytes=16 << 20, device="cpu",
                    device_cache_bytes=8 << 20)
    task = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    for name, (w, c) in converted.items():
        shard.load(task[name], w, c)
    got = shard.forward(ids, [None if n is None else task[n] for n in ROWS])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dora_without_base_weights_is_a_dora_error(peft_setup):
    from loramux import convert

    _, _, converted, out = peft_setup
    with pytest.raises(lm.LoraDoraError, match="base"):
        convert.from_peft(str(out / "dora4"), storage_type="float32")
    w, c = converted["dora4"]
    spec = spec_from_config(peft_setup[0].config, max_rank=8)
    with pytest.raises(lm.LoraDoraError, match="base weights") as err:
        lm.format.validate(w, c, spec, dora_allowed=False)
    assert err.value.row == 0
    lm.format.validate(w, c[:, :3], spec, dora_allowed=False)  # the same rows without is_dora are plain LoRA


def test_dora_scales_that_normalization_cannot_produce_are_rejected(peft_setup):
    w, c = peft_setup[2]["dora4"]
    spec = spec_from_config(peft_setup[0].config, max_rank=8)
    layout = lm.format.validate(w, c, spec)[1]
    bad = w.copy()
    bad[1, layout.scale_slice.start + 2] = -bad[1, layout.scale_slice.start + 2]
    with pytest.raises(lm.LoraDoraError, match="normalize") as err:
        lm.format.validate(bad, c, spec)
    assert err.value.row == 1
    bad[1, layout.scale_slice] = 0.0  # an unfilled scale vector
    with pytest.raises(lm.LoraDoraError):
        lm.format.validate(bad, c, spec)


def test_dora_normalize_cli_writes_normalized_scales(peft_setup, tmp_path):
    from loramux import cli
    from loramux import format as fmt

    base, _, converted, out = peft_setup
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    assert cli.main(["dora-normalize", "-i", str(out / "dora4"), "--base-model", str(base_dir), "-o",
                     str(tmp_path / "norm"), "--storage-type", "float32"]) == 0
    w, c = fmt.load(str(tmp_path / "norm"))
    np.testing.assert_array_equal(c, converted["dora4"][1])
    np.testing.assert_allclose(w, converted["dora4"][0], rtol=1e-6, atol=1e-7)
    assert cli.main(["dora-normalize", "-i", str(out / "dora4"), "-o", str(tmp_path / "x")]) != 0  # no base
    assert cli.main(["dora-normalize", "-i", str(out / "plain8"), "-b", str(base_dir), "-o", str(tmp_path / "y")]) != 0
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
