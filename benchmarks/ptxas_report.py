"""Prints ptxas' resource report (registers, shared memory, spills) of every kernel for one arch,
through the same libnvrtc the package uses: no GPU needed. Usage: python benchmarks/ptxas_report.py 90
`family_source` and `nvrtc_compile` are what benchmarks/fused_trace.py compiles with too."""

import ctypes
import pathlib
import sys

from loramux import _core
from loramux.ops import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1] / "cuda"
# the shared parts each family gets prepended after lora_common.cuh, as the loader lists them
SHARED = dict(_core.kernel_families())


def family_source(name: str, body: str = None) -> str:
    """The source the loader compiles for kernel family `name` (`body`: its .cu text instead of the file's)."""
    parts = [(ROOT / "lora_common.cuh").read_text()]
    parts += [f'\n#line 1 "{h}"\n' + (ROOT / h).read_text() for h in SHARED[name]]
    parts.append(f'\n#line 1 "{name}.cu"\n' + (body if body is not None else (ROOT / f"{name}.cu").read_text()))
    return "".join(parts)


def nvrtc_compile(source: str, name: str, opts: list) -> tuple:
    """(NVRTC's return code, its log, the cubin or None) of `source` compiled with `opts` (str)."""
    lib = ctypes.CDLL(kernels.nvrtc_library())
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None) == 0
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = None
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, out)
        cubin = out.raw
    return rc, log.value.decode(), cubin


def report(arch: int) -> None:
    for name in SHARED:
        rc, log, _ = nvrtc_compile(family_source(name), name, [f"--gpu-architecture=sm_{arch}", "-std=c++17", "--ptxas-options=-v"])
        print(f"== {name} sm_{arch} rc={rc}\n{log}")


if __name__ == "__main__":
    report(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
