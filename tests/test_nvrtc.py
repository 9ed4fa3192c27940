"""NVRTC compiles every kernel family for Ampere and Hopper, on a machine without a GPU: the
libnvrtc of the torch wheel (or a CUDA toolkit) is all it takes. Compile errors fail here, in CI,
not on the GPU machine."""

import pytest

from loramux import _core
from loramux.ops import kernels
from loramux.errors import LoraCudaError

pytestmark = pytest.mark.skipif(kernels.nvrtc_library() is None, reason="no libnvrtc installed")


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles(arch):
    compiled = dict(_core.nvrtc_compile_all(arch))
    assert set(compiled) == {"lora_segments", "lora_shrink", "lora_expand", "lora_fused"}
    assert all(size > 1000 for size in compiled.values()), compiled


def test_nvrtc_version_is_reported():
    major, minor = _core.nvrtc_version()
    assert major >= 12 and minor >= 0


def test_an_unknown_arch_is_a_typed_error():
    with pytest.raises(LoraCudaError):
        _core.nvrtc_compile_all(12)


def test_plan_splits_decode_over_the_sms():
    ksplit, kchunk, reduce_first = _core.plan_shrink(1, 4096, 1, 8)
    assert ksplit * kchunk >= 4096 and ksplit >= 4 and not reduce_first
    ksplit, kchunk, reduce_first = _core.plan_shrink(2048, 4096, 3, 8)
    assert 1 <= ksplit <= 16 and kchunk % 64 == 0 and ksplit * kchunk >= 4096
    assert reduce_first == (ksplit > 1)
