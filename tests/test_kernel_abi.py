"""The kernels' argument structs agree between Rust and CUDA: NVRTC compiles cuda/lora_common.cuh
with a static_assert of every size, alignment and field offset the Rust compiler chose for the
`#[repr(C)]` structs of rust/src/cuda/launch.rs (and of every number the header repeats), so any
drift is a compile error here, on a machine without a GPU."""

from __future__ import annotations

import ctypes
import pathlib
from typing import List, Optional, Tuple

import pytest

from loramux import _core
from loramux.ops.nvrtc_library import nvrtc_library

CUDA_DIR = pathlib.Path(__file__).resolve().parent.parent / "cuda"
HEADER = "lora_common.cuh"

pytestmark = [
    pytest.mark.skipif(nvrtc_library() is None, reason="no libnvrtc installed"),
    pytest.mark.skipif(not (CUDA_DIR / HEADER).is_file(), reason="not run from a source checkout"),
]


def check_source(structs, constants) -> str:
    """A translation unit that includes the header and asserts the Rust layout of everything."""
    # NVRTC has no <cstddef> and no __builtin_offsetof; __INTADDR__ is how its EDG front end
    # defines offsetof (an address constant turned into an integer constant expression).
    lines = [f'#include "{HEADER}"', "#define ABI_OFFSETOF(T, f) ((unsigned long long)__INTADDR__(&(((T*)0)->f)))"]
    for name, size, align, fields in structs:
        lines.append(f'static_assert(sizeof({name}) == {size}, "sizeof({name}) is {size} in Rust");')
        lines.append(f'static_assert(alignof({name}) == {align}, "alignof({name}) is {align} in Rust");')
        for field, offset in fields:
            lines.append(
                f'static_assert(ABI_OFFSETOF({name}, {field}) == {offset}, "{name}.{field} is at offset {offset} in Rust");'
            )
    for macro, value in constants:
        lines.append(f'static_assert({macro} == {value}, "{macro} is {value} in Rust");')
    return "\n".join(lines) + "\n"


def nvrtc_compile(source: str, arch: int = 80) -> Tuple[bool, str]:
    """(compiled, log) of `source` with cuda/ on the include path; the libnvrtc loaded by loramux."""
    lib = ctypes.CDLL(nvrtc_library())
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"abi_check.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    try:
        opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-std=c++17", f"--include-path={CUDA_DIR}".encode()]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        return rc == 0, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_every_argument_struct_has_the_rust_layout_in_cuda():
    structs, constants = _core.kernel_struct_layouts(), _core.kernel_constants()
    assert {"LoraSlices", "LoraTable", "ShrinkArgs"} <= {name for name, *_ in structs}
    ok, log = nvrtc_compile(check_source(structs, constants))
    assert ok, f"cuda/{HEADER} and rust/src/cuda/launch.rs disagree:\n{log}"


def _drifted(structs, constants, which: str) -> Tuple[list, list, str]:
    """The Rust tables with one number off, and the assert message that must then fail."""
    structs = [(n, s, a, list(f)) for n, s, a, f in structs]
    constants = list(constants)
    name, size, align, fields = structs[-1]
    if which == "size":
        structs[-1] = (name, size + 8, align, fields)
        return structs, constants, f"sizeof({name})"
    if which == "offset":
        field, offset = fields[1]
        fields[1] = (field, offset + 4)
        return structs, constants, f"{name}.{field}"
    macro, value = constants[0]
    constants[0] = (macro, value + 1)
    return structs, constants, macro


@pytest.mark.parametrize("which", ["size", "offset", "constant"])
def test_a_layout_that_drifted_fails_to_compile(which):
    structs, constants, named = _drifted(_core.kernel_struct_layouts(), _core.kernel_constants(), which)
    ok, log = nvrtc_compile(check_source(structs, constants))
    assert not ok and named in log, log
