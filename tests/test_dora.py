"""DoRA parity with PEFT (use_dora=True): logits per row of a mixed batch of DoRA and plain adapters,
on a Llama with biases on every projection, through loramux.attach and the tp=1 parallel forward;
and the errors for DoRA that cannot be served."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from dora_adapters import ADAPTERS, ROWS, dora_input_ids, dora_peft_rows

import loramux as lm
from loramux.models import spec_from_config


def test_converted_dora_rows_carry_is_dora_and_positive_scales(dora_setup):
    _, _, converted, _ = dora_setup
    for name, (weights, config) in converted.items():
        if not ADAPTERS[name].get("use_dora"):
            assert config.shape[1] == 3 or not config[:, 3].any()  # plain LoRA: no DoRA rows
            continue
        assert config.shape[1] == 4 and config[:, 3].all()
        spec = spec_from_config(dora_setup[0].config, max_rank=8)
        for row, layout in zip(weights, lm.format.validate(weights, config, spec)):
            scales = row[layout.scale_slice]
            assert scales.shape == (layout.ho,) and (scales > 0).all()


def test_mixed_dora_and_plain_batch_matches_peft_through_attach(dora_setup):
    base, peft_model, converted, _ = dora_setup
    ids = dora_input_ids()
    want = dora_peft_rows(peft_model, ids)
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


def test_tp1_parallel_forward_matches_peft_with_dora(dora_setup):
    from loramux.parallel import ParallelContext, TpLlama

    base, peft_model, converted, _ = dora_setup
    ids = dora_input_ids()
    want = dora_peft_rows(peft_model, ids)
    shard = TpLlama(copy.deepcopy(base), ParallelContext(), max_rank=8, host_cache_bytes=16 << 20, device="cpu",
                    device_cache_bytes=8 << 20)
    task = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    for name, (w, c) in converted.items():
        shard.load(task[name], w, c)
    got = shard.forward(ids, [None if n is None else task[n] for n in ROWS])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dora_without_base_weights_is_a_dora_error(dora_setup):
    from loramux import convert

    _, _, converted, out = dora_setup
    with pytest.raises(lm.LoraDoraError, match="base"):
        convert.from_peft(str(out / "dora4"), storage_type="float32")
    w, c = converted["dora4"]
    spec = spec_from_config(dora_setup[0].config, max_rank=8)
    with pytest.raises(lm.LoraDoraError, match="base weights") as err:
        lm.format.validate(w, c, spec, dora_allowed=False)
    assert err.value.row == 0
    lm.format.validate(w, c[:, :3], spec, dora_allowed=False)  # the same rows without is_dora are plain LoRA


def test_dora_scales_that_normalization_cannot_produce_are_rejected(dora_setup):
    w, c = dora_setup[2]["dora4"]
    spec = spec_from_config(dora_setup[0].config, max_rank=8)
    layout = lm.format.validate(w, c, spec)[1]
    bad = w.copy()
    bad[1, layout.scale_slice.start + 2] = -bad[1, layout.scale_slice.start + 2]
    with pytest.raises(lm.LoraDoraError, match="normalize") as err:
        lm.format.validate(bad, c, spec)
    assert err.value.row == 1
    bad[1, layout.scale_slice] = 0.0  # an unfilled scale vector
    with pytest.raises(lm.LoraDoraError):
        lm.format.validate(bad, c, spec)


def test_dora_normalize_cli_writes_normalized_scales(dora_setup, tmp_path):
    from loramux import cli
    from loramux import format as fmt

    base, _, converted, out = dora_setup
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
