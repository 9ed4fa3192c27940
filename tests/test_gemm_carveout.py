"""The base GEMM beside a LoRA branch run under torch's SM carveout (cuBLASLt): DEFAULT_SMS unless
LORAMUX_BESIDE_SM_CARVEOUT names another count, every setting restored after, whatever base() does."""

import pytest
import torch

from loramux.errors import LoraError
from loramux.ops import gemm_carveout
from loramux.ops.gemm_carveout import DEFAULT_SMS, ENV, carved, carveout_available, carveout_sms, gemm_sm_carveout

needs_carveout = pytest.mark.skipif(not carveout_available(), reason="this torch has no SM carveout")


def test_the_count_is_read_from_the_variable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert carveout_sms() == (DEFAULT_SMS if carveout_available() else None)
    for value, want in (("0", None), ("16", 16), (" 8 ", 8), ("", DEFAULT_SMS if carveout_available() else None)):
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


@pytest.mark.gpu
@needs_carveout
def test_carved_runs_base_under_the_carveout_only_when_asked(monkeypatch):
    seen = []

    def base():
        seen.append(_settings())
        return torch.zeros(1)

    monkeypatch.setenv(ENV, "0")
    assert carved(base, torch.device("cuda")) is base
    monkeypatch.setenv(ENV, "24")
    before = _settings()
    carved(base, torch.device("cuda"))()
    assert seen == [(24, torch._C._BlasBackend.Cublaslt)] and _settings() == before


@pytest.mark.gpu
@needs_carveout
def test_a_count_that_leaves_the_gemm_no_sm_is_refused(monkeypatch):
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    monkeypatch.setenv(ENV, str(sm_count))
    with pytest.raises(LoraError, match=f"has {sm_count} SMs"):
        carved(lambda: torch.zeros(1), torch.device("cuda"))
    monkeypatch.setenv(ENV, str(sm_count - 1))
    assert carved(lambda: torch.zeros(1), torch.device("cuda"))().shape == (1,)


def test_a_torch_without_the_carveout_runs_without_unless_asked(monkeypatch):
    monkeypatch.delattr(torch._C, "_set_sm_carveout_experimental", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    assert carveout_sms() is None
    base = lambda: torch.zeros(1)  # noqa: E731
    assert carved(base, torch.device("cpu")) is base
    monkeypatch.setenv(ENV, "8")
    with pytest.raises(LoraError, match="needs a torch with"), gemm_carveout.gemm_sm_carveout(carveout_sms()):
        pass

