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
    for name in ("convert", "to-peft", "info"):
        assert name in text
    with pytest.raises(SystemExit):
        cli.main(["convert"])  # -i / -o are required
