"""SMs kept free of the base GEMM while its LoRA branch runs beside it. cuBLAS sizes a decode GEMM's
grid to fill every SM, so the side stream's LoRA blocks wait for GEMM blocks to retire (s23's step
timeline: 210 us of a 305 us overhead ran with nothing beside it). torch's experimental SM carveout
sets cuBLASLt's SM count target, which leaves that many SMs to the branch from the start; the
memory-bound decode GEMM on the rest loses little. torch applies it to cuBLASLt matmuls only, so the
backend is switched too, for the base GEMM's call alone (a captured graph keeps the kernels chosen
at capture). On by default (DEFAULT_SMS, from DEFAULT_MIN_TOKENS tokens up) where torch has the
carveout; LORAMUX_BESIDE_SM_CARVEOUT names another count for every batch, or 0 for none. The
settings are torch's process-wide ones, held only for the base GEMM's call: a matmul another
thread issues meanwhile runs under them too (same results, other kernels)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

from loramux.errors import LoraError

ENV = "LORAMUX_BESIDE_SM_CARVEOUT"
# s24, H100, benchmarks/decode_step.py: 8, 16 and 32 SMs each took the beside overhead at batch 32
# from 302-314 us to 269-272 us; 16 leaves an H100's or H200's 132 SMs 116 for the GEMM
DEFAULT_SMS = 16
# ...at batch 8 a carveout cost 9-21 us of a 1710 us step, at 16 nothing either way, from 24 up it
# saved up to 3 % of the step: unset, batches under this many tokens run their GEMM on every SM
DEFAULT_MIN_TOKENS = 17


def carveout_available() -> bool:
    """Whether this torch has the experimental SM carveout (it may drop it in any release)."""
    return hasattr(torch._C, "_set_sm_carveout_experimental")


def carveout_sms(tokens: int) -> Optional[int]:
    """The SM count kept from a base GEMM of `tokens` rows with a LoRA branch beside it:
    LORAMUX_BESIDE_SM_CARVEOUT's at any batch, else DEFAULT_SMS from DEFAULT_MIN_TOKENS tokens up where
    this torch has the carveout; None for none."""
    value = os.environ.get(ENV, "").strip()
    if value == "":
        return DEFAULT_SMS if carveout_available() and tokens >= DEFAULT_MIN_TOKENS else None
    if value == "0":
        return None
    if not value.isdigit():
        raise LoraError(f"{ENV}={value!r}: expected a count of SMs (0: none; unset: {DEFAULT_SMS})")
    return int(value)


@contextlib.contextmanager
def gemm_sm_carveout(sms: int) -> Iterator[None]:
    """Matmuls issued inside target all but `sms` SMs (cuBLASLt); both settings restored after."""
    if not carveout_available():
        raise LoraError(f"{ENV} needs a torch with torch._C._set_sm_carveout_experimental")
    sms_before = torch._C._get_sm_carveout_experimental()
    library_before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(sms_before)
        torch.backends.cuda.preferred_blas_library(library_before)


def carved(base: Callable[[], torch.Tensor], tokens: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """`base` (a GEMM of `tokens` rows) run under the carveout carveout_sms() names, or `base` itself
    when none. A count that leaves `device` no SM for the GEMM is refused."""
    sms = carveout_sms(tokens)
    if sms is None:
        return base
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    if sms >= sm_count:
        raise LoraError(f"{ENV}={sms}: {torch.cuda.get_device_name(device)} has {sm_count} SMs; "
                        "the base GEMM needs at least one")

    def run() -> torch.Tensor:
        with gemm_sm_carveout(sms):
            return base()

    return run
