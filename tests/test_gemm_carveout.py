"""The base GEMM beside a LoRA branch run under torch's SM carveout (cuBLASLt): DEFAULT_SMS from
DEFAULT_MIN_TOKENS tokens up unless LORAMUX_BESIDE_SM_CARVEOUT names another count for every batch,
every setting restored after, whatever base() does."""

import pytest
import torch

from loramux.errors import LoraError
from loramux.ops import gemm_carveout
from loramux.ops.gemm_carveout import DEFAULT_MIN_TOKENS, DEFAULT_SMS, ENV, carved, carveout_available, carveout_sms, gemm_sm_carveout

needs_carveout = pytest.mark.skipif(not carveout_available(), reason="this torch has no SM carveout")


def test_the_count_is_read_from_the_variable(monkeypatch):
    default = DEFAULT_SMS if carveout_available() else None
    monkeypatch.delenv(ENV, raising=False)
    assert carveout_sms(DEFAULT_MIN_TOKENS) == default and carveout_sms(64) == default
    assert carveout_sms(DEFAULT_MIN_TOKENS - 1) is None and carveout_sms(1) is None
    for value, want in (("0", None), ("16", 16), (" 8 ", 8)):  # a count set holds at every batch
        monkeypatch.setenv(ENV, value)
        assert carveout_sms(1) == want and carveout_sms(64) == want
    monkeypatch.setenv(ENV, "")
    assert carveout_sms(64) == default
    monkeypatch.setenv(ENV, "-4")
    with pytest.raises(LoraError, match="LORAMUX_BESIDE_SM_CARVEOUT='-4'"):
        carveout_sms(64)


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

    cuda = torch.device("cuda")
    monkeypatch.setenv(ENV, "0")
    assert carved(base, 64, cuda) is base
    monkeypatch.delenv(ENV)
    assert carved(base, DEFAULT_MIN_TOKENS - 1, cuda) is base
    before = _settings()
    carved(base, DEFAULT_MIN_TOKENS, cuda)()
    monkeypatch.setenv(ENV, "24")
    carved(base, 1, cuda)()
    assert seen == [(DEFAULT_SMS, torch._C._BlasBackend.Cublaslt), (24, torch._C._BlasBackend.Cublaslt)]
    assert _settings() == before


@pytest.mark.gpu
@needs_carveout
def test_a_count_that_leaves_the_gemm_no_sm_is_refused(monkeypatch):
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    monkeypatch.setenv(ENV, str(sm_count))
    with pytest.raises(LoraError, match=f"has {sm_count} SMs"):
        carved(lambda: torch.zeros(1), 64, torch.device("cuda"))
    monkeypatch.setenv(ENV, str(sm_count - 1))
    assert carved(lambda: torch.zeros(1), 64, torch.device("cuda"))().shape == (1,)


def test_a_torch_without_the_carveout_runs_without_unless_asked(monkeypatch):
    monkeypatch.delattr(torch._C, "_set_sm_carveout_experimental", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    assert carveout_sms(64) is None
    base = lambda: torch.zeros(1)  # noqa: E731
    assert carved(base, 64, torch.device("cpu")) is base
    monkeypatch.setenv(ENV, "8")
    with pytest.raises(LoraError, match="needs a torch with"), gemm_carveout.gemm_sm_carveout(carveout_sms(64)):
        pass

