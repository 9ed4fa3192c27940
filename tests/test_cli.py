"""The `loramux` command line: convert and info, run as a user runs them."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("peft")

from tiny_hf import make_adapter  # noqa: E402

from loramux import cli, convert, format  # noqa: E402
from loramux.modules import MODULE_IDS  # noqa: E402


def _run(*argv):
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(format.__file__))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "loramux.cli", *argv], capture_output=True, text=True, env=env, timeout=300)


def test_convert_then_info_as_a_subprocess(tmp_path):
    make_adapter("llama", tmp_path / "peft", r=4, rank_pattern={"v_proj": 2}, layers_to_transform=[1, 2])
    done = _run("convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "out"), "--storage-type", "bfloat16")
    assert done.returncode == 0, done.stderr
    weights, config = format.load(str(tmp_path / "out"))
    assert weights.dtype == np.uint16 and config.shape == (14, 3)
    info = _run("info", str(tmp_path / "out"))
    assert info.returncode == 0, info.stderr
    assert "14 module-layers" in info.stdout and "bfloat16" in info.stdout and f"({weights.nbytes} bytes)" in info.stdout
    lines = {line.split()[0]: line.split() for line in info.stdout.splitlines()[2:] if line.split()[0] in MODULE_IDS}
    assert lines["attn_v"][1:4] == [str(MODULE_IDS["attn_v"]), "1-2", "2"]
    assert lines["mlp_gate"][1:4] == [str(MODULE_IDS["mlp_gate"]), "1-2", "4"]


def test_convert_and_back_with_to_peft(tmp_path):
    import peft
    from tiny_hf import fresh_model, logits, tiny_model

    original = make_adapter("phi3", tmp_path / "peft")
    tiny_model("phi3").save_pretrained(str(tmp_path / "base"))
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "fmt"), "--storage-type", "float32"]) == 0
    assert cli.main(["to-peft", "-i", str(tmp_path / "fmt"), "-o", str(tmp_path / "back"),
                     "--base-model", str(tmp_path / "base")]) == 0
    back = peft.PeftModel.from_pretrained(fresh_model("phi3"), str(tmp_path / "back")).eval()
    np.testing.assert_allclose(logits(back, "phi3").numpy(), logits(original, "phi3").numpy(), rtol=1e-5, atol=1e-5)
    assert cli.main(["to-peft", "-i", str(tmp_path / "fmt"), "-o", str(tmp_path / "x"), "--base-model", str(tmp_path)]) == 2


def test_errors_exit_2_with_the_typed_error(tmp_path):
    make_adapter("llama", tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    assert cli.main(["convert", "-i", str(tmp_path / "dora"), "-o", str(tmp_path / "out")]) == 2
    done = _run("convert", "-i", str(tmp_path / "dora"), "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "LoraDoraError" in done.stderr and "--base-model" in done.stderr
    assert not os.path.exists(tmp_path / "out")  # a failed conversion writes nothing
    assert cli.main(["info", str(tmp_path / "nowhere")]) == 2


def test_a_missing_folder_is_named_as_missing(tmp_path, capsys):
    for argv in (["convert", "-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")],
                 ["info", str(tmp_path / "nowhere")],
                 ["dora-normalize", "-i", str(tmp_path / "nowhere"), "-b", str(tmp_path), "-o", str(tmp_path / "out")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{tmp_path / 'nowhere'}: no such folder" in err, err
    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj"])
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "trt")]) == 0
    assert cli.main(["to-peft", "-i", str(tmp_path / "trt"), "-o", str(tmp_path / "back"),
                     "--base-model", str(tmp_path / "no-model")]) == 2
    assert "no-model: no such folder" in capsys.readouterr().err


def test_version():
    from loramux import __version__

    done = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"loramux {__version__}", (done.stdout, done.stderr)


def _bad_pairs(weights, config):
    """(what, weights, config) for each kind of invalid adapter info must refuse."""
    unknown = config.copy()
    unknown[0, 0] = 19
    negative = config.copy()
    negative[1, 1] = -1
    duplicate = config.copy()
    duplicate[1] = duplicate[0]
    nan = format.to_float32(weights)
    nan[0, 0] = np.nan
    rank0 = config.copy()
    rank0[0, 2] = 0
    return [("module_id 19", weights, unknown), ("layer_idx -1", weights, negative), ("already given", weights, duplicate),
            ("not finite", nan, config), ("adapter_size", weights, rank0)]


def test_info_validates_what_it_lists(tmp_path, capsys):
    """info exits 2 with the format's typed error for an adapter it cannot serve (as to-peft does),
    without a model for ids, layers, ranks, duplicates and values, with --base-model also widths."""
    make_adapter("llama", tmp_path / "peft", r=4)
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "good"), "--storage-type", "float32"]) == 0
    assert cli.main(["info", str(tmp_path / "good")]) == 0
    assert "valid" in capsys.readouterr().out
    weights, config = format.load(str(tmp_path / "good"))
    for what, w, c in _bad_pairs(weights, config):
        format.save(str(tmp_path / "bad"), w, c)
        assert cli.main(["info", str(tmp_path / "bad")]) == 2, what
        err = capsys.readouterr().err
        assert "LoraFormatError" in err and what in err, (what, err)
    from tiny_hf import tiny_model

    tiny_model("llama").save_pretrained(str(tmp_path / "base"))
    assert cli.main(["info", str(tmp_path / "good"), "--base-model", str(tmp_path / "base")]) == 0
    assert "valid for" in capsys.readouterr().out
    narrow = weights[:, : weights.shape[1] // 2].copy()  # every row too short for its shapes
    format.save(str(tmp_path / "narrow"), narrow, config)
    assert cli.main(["info", str(tmp_path / "narrow")]) == 0  # widths need the model
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "narrow"), "--base-model", str(tmp_path / "base")]) == 2
    assert "needs" in capsys.readouterr().err


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_example_adapter_is_a_real_peft_adapter_and_its_conversion(tmp_path, dora):
    """make_example_adapter (what `loramux example-adapter` runs on SmolLM2) on a tiny Llama: the
    PEFT folder loads back into PEFT, the converted pair validates against the model and carries
    normalized DoRA scales when asked, and the model is left as it was."""
    import peft
    import torch
    from tiny_hf import fresh_model

    from loramux.demo import make_example_adapter
    from loramux.models import spec_from_config

    model = fresh_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = make_example_adapter(str(tmp_path / "ex"), rank=4, targets=["q_proj", "down_proj"], dora=dora,
                                 storage_type="float32", model=model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    weights, config = format.load(paths["trt"])
    layouts = format.validate(weights, config, spec_from_config(model.config, max_rank=8))
    assert {r.module_id for r in layouts} == {MODULE_IDS["attn_q"], MODULE_IDS["mlp_4h_to_h"]}
    assert all(r.rank == 4 and r.is_dora == dora for r in layouts)
    assert np.abs(weights).max() > 0
    loaded = peft.PeftModel.from_pretrained(fresh_model("llama"), paths["peft"])
    assert loaded.peft_config["default"].use_dora == dora


def test_info_without_a_model_takes_dora_rows_and_names_bad_flags(tmp_path, capsys):
    """Without --base-model the DoRA scales cannot be found (they follow A and B, whose widths come
    from the model): a normalized DoRA adapter is listed as valid, a flag other than 0 / 1 is not,
    and the scales are checked once the model is given."""
    from tiny_hf import fresh_model

    from loramux.demo import make_example_adapter

    model = fresh_model("llama")
    paths = make_example_adapter(str(tmp_path / "ex"), rank=4, targets=["q_proj"], dora=True, storage_type="float32", model=model)
    assert cli.main(["info", paths["trt"]]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "DoRA scales" in out
    weights, config = format.load(paths["trt"])
    flag = config.copy()
    flag[1, 3] = 2
    format.save(str(tmp_path / "flag"), weights, flag)
    assert cli.main(["info", str(tmp_path / "flag")]) == 2
    err = capsys.readouterr().err
    assert "LoraFormatError" in err and "row 1" in err and "is_dora" in err, err
    model.save_pretrained(str(tmp_path / "base"))
    assert cli.main(["info", paths["trt"], "--base-model", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    unnormalized = format.to_float32(weights)
    unnormalized[:, -1] = -1.0  # the last DoRA scale of every row (the rows are exactly as wide as they need)
    format.save(str(tmp_path / "neg"), unnormalized, config)
    assert cli.main(["info", str(tmp_path / "neg"), "--base-model", str(tmp_path / "base")]) == 2
    assert "LoraDoraError" in capsys.readouterr().err


def test_info_on_a_peft_folder_says_to_convert_it(tmp_path, capsys):
    make_adapter("llama", tmp_path / "peft", r=4)
    assert cli.main(["info", str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err
    assert "a PEFT adapter" in err and "loramux convert" in err, err


def test_unreadable_json_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{not json")
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "out")]) == 2
    assert "LoraConvertError" in capsys.readouterr().err
    make_adapter("llama", tmp_path / "good", target_modules=["q_proj"])
    assert cli.main(["convert", "-i", str(tmp_path / "good"), "-o", str(tmp_path / "trt")]) == 0
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{not json")
    for argv in (["to-peft", "-i", str(tmp_path / "trt"), "-o", str(tmp_path / "back"), "--base-model", str(tmp_path / "base")],
                 ["convert", "-i", str(tmp_path / "good"), "-o", str(tmp_path / "o2"), "--base-model", str(tmp_path / "base")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "config.json" in err and "Lora" in err, err


def test_progress_bar_on_large_adapters(tmp_path, monkeypatch, capsys):
    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj"])
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "small")]) == 0
    assert "converting" not in capsys.readouterr().err
    monkeypatch.setattr(convert.peft_reader, "PROGRESS_BYTES", 0)  # every adapter counts as large
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "large")]) == 0
    assert "converting" in capsys.readouterr().err


def test_help_lists_the_subcommands():
    text = cli.build_parser().format_help()
    for name in ("convert", "to-peft", "info", "dora-normalize", "demo", "example-adapter"):
        assert name in text
    with pytest.raises(SystemExit):
        cli.main(["convert"])  # -i / -o are required


def test_demo_progress_is_plain_lines_off_a_terminal(capsys):
    """Written to a pipe or a log, the demo's progress is a few whole lines, not a bar's carriage
    returns; on a terminal it is a tqdm bar."""
    from loramux.demo.main import LineProgress, progress

    with progress(8, "serving", "step") as bar:  # pytest's captured stdout is not a terminal
        assert isinstance(bar, LineProgress)
        for _ in range(8):
            bar.update(1)
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines() == ["serving: 1/8 steps", "serving: 2/8 steps", "serving: 4/8 steps", "serving: 6/8 steps",
                                "serving: 8/8 steps, done"]


def _bad_factor_adapter(tmp_path):
    """A PEFT adapter whose layer-0 q_proj lora_A is 2 columns short of the model's input width."""
    from safetensors.numpy import load_file, save_file

    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj", "v_proj"])
    path = str(tmp_path / "peft" / convert.SAFETENSORS_FILE)
    state = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = state[key][:, :-2].copy()
    save_file(state, path)
    return str(tmp_path / "peft")


def test_bad_adapters_exit_2_without_a_traceback(tmp_path):
    bad = _bad_factor_adapter(tmp_path)
    done = _run("convert", "-i", bad, "-o", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "LoraConvertError" in done.stderr, done.stderr
    assert "q_proj: lora_A has shape [4, 30], expected [4, 32]" in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "out")


def test_output_paths_that_cannot_be_written_exit_2_naming_them(tmp_path, capsys):
    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj"])
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "trt")]) == 0
    from tiny_hf import tiny_model

    tiny_model("llama").save_pretrained(str(tmp_path / "base"))
    (tmp_path / "afile").write_text("not a folder")
    capsys.readouterr()
    for out, said in ((tmp_path / "afile", "exists and is not a folder"), (tmp_path / "afile" / "sub", "is a file"),
                      ("/proc/loramux-no-such-folder", "cannot write")):  # /proc refuses new entries, even to root
        for argv in (["convert", "-i", str(tmp_path / "peft"), "-o", str(out)],
                     ["to-peft", "-i", str(tmp_path / "trt"), "-o", str(out), "--base-model", str(tmp_path / "base")],
                     ["example-adapter", str(out)]):
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "LoraFormatError" in err and f"{out}" in err and said in err, (argv, err)
    assert (tmp_path / "afile").read_text() == "not a folder"
    done = _run("convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "afile" / "sub"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


def test_the_input_folder_is_not_an_output(tmp_path, capsys):
    """Writing into the input folder would overwrite (to-peft) or mix into (convert) the input; any
    other existing folder is overwritten, as PEFT's save_pretrained and TensorRT-LLM's converter do."""
    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj"])
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "trt")]) == 0
    from tiny_hf import tiny_model

    tiny_model("llama").save_pretrained(str(tmp_path / "base"))
    os.symlink(tmp_path / "trt", tmp_path / "link")
    before = {p: (tmp_path / "trt" / p).read_bytes() for p in os.listdir(tmp_path / "trt")}
    capsys.readouterr()
    for argv in (["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "peft") + "/"],
                 ["to-peft", "-i", str(tmp_path / "trt"), "-o", str(tmp_path / "trt"), "--base-model", str(tmp_path / "base")],
                 ["to-peft", "-i", str(tmp_path / "trt"), "-o", str(tmp_path / "link"), "--base-model", str(tmp_path / "base")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "LoraFormatError" in err and "is the input folder" in err, (argv, err)
    assert sorted(os.listdir(tmp_path / "peft")) == sorted(["adapter_config.json", "adapter_model.safetensors", "README.md"])
    assert {p: (tmp_path / "trt" / p).read_bytes() for p in os.listdir(tmp_path / "trt")} == before
    # another existing folder is overwritten
    assert cli.main(["to-peft", "-i", str(tmp_path / "trt"), "-o", str(tmp_path / "peft"), "--base-model", str(tmp_path / "base")]) == 0
    assert cli.main(["convert", "-i", str(tmp_path / "peft"), "-o", str(tmp_path / "trt")]) == 0


@pytest.mark.parametrize("argv, named", [(["--rank", "0"], "--rank"), (["--rank", "-3"], "--rank"),
                                         (["--targets", "foo_proj"], "--targets: foo_proj"),
                                         (["--targets", "q_proj,lm_head"], "--targets: lm_head"), (["--targets", ","], "--targets")])
def test_example_adapter_options_are_checked(tmp_path, capsys, argv, named):
    """Refused as argparse refuses any bad option: exit 2 naming it, before the model is loaded."""
    with pytest.raises(SystemExit) as done:
        cli.main(["example-adapter", str(tmp_path / "ex"), *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "ex")


def test_make_example_adapter_names_targets_the_model_lacks(tmp_path):
    from tiny_hf import fresh_model

    from loramux.demo import make_example_adapter
    from loramux.errors import LoraConvertError

    with pytest.raises(LoraConvertError, match="targets \\['foo_proj'\\]"):
        make_example_adapter(str(tmp_path / "ex"), rank=4, targets=["foo_proj"], model=fresh_model("llama"))
    from loramux.errors import LoraFormatError

    with pytest.raises(LoraFormatError, match="/proc/loramux-no-such-folder/peft: cannot write"):
        make_example_adapter("/proc/loramux-no-such-folder", rank=4, model=fresh_model("llama"))


def test_dora_normalize_checks_its_output_folder_as_convert_does(tmp_path, capsys):
    from tiny_hf import tiny_model

    make_adapter("llama", tmp_path / "peft", target_modules=["q_proj"], use_dora=True)
    tiny_model("llama").save_pretrained(str(tmp_path / "base"))
    (tmp_path / "afile").write_text("not a folder")
    before = sorted(os.listdir(tmp_path / "peft"))
    capsys.readouterr()
    for out, said in ((tmp_path / "afile", "exists and is not a folder"), (tmp_path / "afile" / "sub", "is a file"),
                      (tmp_path / "peft", "is the input folder"), ("/proc/loramux-no-such-folder", "cannot write")):
        argv = ["dora-normalize", "-i", str(tmp_path / "peft"), "-b", str(tmp_path / "base"), "-o", str(out)]
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "LoraFormatError" in err and f"{out}" in err and said in err, (argv, err)
    assert (tmp_path / "afile").read_text() == "not a folder"
    assert sorted(os.listdir(tmp_path / "peft")) == before
