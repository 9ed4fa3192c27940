"""SMs kept free of the base GEMM while its LoRA branch runs beside it (an A/B switch, off unless
LORAMUX_BESIDE_SM_CARVEOUT names a count). cuBLAS sizes a decode GEMM's grid to fill every SM, so
the side stream's LoRA blocks wait for GEMM blocks to retire (s23's step timeline: 210 us of a
305 us overhead ran with nothing beside it). torch's experimental SM carveout sets cuBLASLt's SM
count target, which leaves that many SMs to the branch from the start; a memory-bound GEMM on the
rest may lose little. torch applies it to cuBLASLt matmuls only, so the backend is switched too,
for the base GEMM's call alone (a captured graph keeps the kernels chosen at capture)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

from loramux.errors import LoraError

ENV = "LORAMUX_BESIDE_SM_CARVEOUT"


def carveout_sms() -> Optional[int]:
    """The SM count LORAMUX_BESIDE_SM_CARVEOUT keeps from the base GEMM; None when unset or 0."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "0"):
        return None
    if not value.isdigit():
        raise LoraError(f"{ENV}={value!r}: expected a count of SMs (0 or unset: off)")
    return int(value)


@contextlib.contextmanager
def gemm_sm_carveout(sms: int) -> Iterator[None]:
    """Matmuls issued inside target all but `sms` SMs (cuBLASLt); both settings restored after."""
    if not hasattr(torch._C, "_set_sm_carveout_experimental"):
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


def carved(base: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`base` run under the carveout LORAMUX_BESIDE_SM_CARVEOUT names, or `base` itself when off."""
    sms = carveout_sms()
    if sms is None:
        return base

    def run() -> torch.Tensor:
        with gemm_sm_carveout(sms):
            return base()

    return run
