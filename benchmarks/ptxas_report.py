"""Prints ptxas' resource report (registers, shared memory, spills) of every kernel for one arch,
through the same libnvrtc the package uses: no GPU needed. Usage: python benchmarks/ptxas_report.py 90"""

import ctypes
import pathlib
import sys

from loramux.ops import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1] / "cuda"


def report(arch: int) -> None:
    lib = ctypes.CDLL(kernels.nvrtc_library())
    common = (ROOT / "lora_common.cuh").read_text()
    shared = "\n#line 1 \"lora_shrink_decode.cuh\"\n" + (ROOT / "lora_shrink_decode.cuh").read_text()
    # the shared parts each family gets prepended (rust/src/cuda/nvrtc.rs FAMILIES)
    parts = {"lora_segments": "", "lora_shrink": shared, "lora_expand": "", "lora_fused": shared, "lora_prefill": ""}
    for name, part in parts.items():
        src = (common + part + f'\n#line 1 "{name}.cu"\n' + (ROOT / f"{name}.cu").read_text()).encode()
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None) == 0
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        print(f"== {name} sm_{arch} rc={rc}\n{log.value.decode()}")


if __name__ == "__main__":
    report(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
