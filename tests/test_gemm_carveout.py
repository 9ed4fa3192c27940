"""LORAMUX_BESIDE_SM_CARVEOUT: the base GEMM beside a LoRA branch run under torch's SM carveout
(cuBLASLt), every setting restored after, whatever base() does."""

import pytest
import torch

from loramux.errors import LoraError
from loramux.ops import gemm_carveout
from loramux.ops.gemm_carveout import ENV, carved, carveout_sms, gemm_sm_carveout

needs_carveout = pytest.mark.skipif(not hasattr(torch._C, "_set_sm_carveout_experimental"),
                                    reason="this torch has no SM carveout")


def test_the_count_is_read_from_the_variable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert carveout_sms() is None
    for value, want in (("0", None), ("16", 16), (" 8 ", 8)):
        monkeypatch.setenv(ENV, value)
        assert carveout_sms() == want
    monkeypatch.setenv(ENV, "-4")
    with pytest.raises(LoraError, match="LORAMUX_BESIDE_SM_CARVEOUT='-4'"):
        carveout_sms()


def _settings():
    return torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()


@needs_carveout
def test_the_carveout_holds_inside_and_is_undone_after_a_raise():
    before = _settings()
    with gemm_sm_carveout(16):
        assert _settings() == (16, torch._C._BlasBackend.Cublaslt)
    assert _settings() == before
    with pytest.raises(RuntimeError, match="base failed"), gemm_sm_carveout(8):
        raise RuntimeError("base failed")
    assert _settings() == before


@needs_carveout
def test_carved_runs_base_under_the_carveout_only_when_asked(monkeypatch):
    seen = []

    def base():
        seen.append(_settings())
        return torch.zeros(1)

    monkeypatch.delenv(ENV, raising=False)
    assert carved(base) is base
    monkeypatch.setenv(ENV, "24")
    before = _settings()
    carved(base)()
    assert seen == [(24, torch._C._BlasBackend.Cublaslt)] and _settings() == before


def test_a_torch_without_the_carveout_is_named(monkeypatch):
    monkeypatch.delattr(torch._C, "_set_sm_carveout_experimental", raising=False)
    with pytest.raises(LoraError, match="needs a torch with"), gemm_carveout.gemm_sm_carveout(8):
        pass

