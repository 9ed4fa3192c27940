"""Idle OpenMP worker pools of other threads, released so the Executor's loop thread runs at the
speed of a main thread on the CPU.

torch's CPU ops run their parallel regions on OpenMP (libgomp in the Linux wheels), which keeps a
pool of workers per thread that ever ran one. The model is loaded (and often warmed up) on the main
thread, so its pool outlives that work; once the loop thread has a pool too, more workers exist than
CPUs and libgomp stops letting them spin between regions: every parallel op then sleeps and wakes
its workers. Measured on a 2-core VM: a [64, 576] add 3 us on the main thread, 11-57 us on a
second thread; a 60-row SmolLM2 decode step 230 ms vs 360 ms. Pausing the main thread's pool
(OpenMP 5's omp_pause_resource_all, which frees the calling thread's pool; a later parallel region
there builds a new one) brings the loop thread back to 230 ms.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable, Optional

import torch

__all__ = ["release_this_threads_workers"]

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft


@functools.lru_cache(maxsize=None)
def _pause_function() -> Optional[Callable[[int], int]]:
    """omp_pause_resource_all of the libgomp torch runs on, or None where torch brings none."""
    # the copy torch links against (loading it by path finds the already-loaded library)
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path) or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        function = ctypes.CDLL(path).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


def release_this_threads_workers() -> bool:
    """Frees the calling thread's idle OpenMP workers (not while it is inside a parallel region).
    Returns whether it could: False where torch does not run on libgomp (nothing to do there)."""
    pause = _pause_function()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0
