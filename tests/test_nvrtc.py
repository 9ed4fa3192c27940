"""NVRTC compiles every kernel family for Ampere and Hopper, on a machine without a GPU: the
libnvrtc of the torch wheel (or a CUDA toolkit) is all it takes. Compile errors fail here, in CI,
not on the GPU machine."""

import pathlib

import pytest

from loramux import _core, cli
from loramux.ops import kernels
from loramux.errors import LoraCudaError

pytestmark = pytest.mark.skipif(kernels.nvrtc_library() is None, reason="no libnvrtc installed")


FAMILIES = {"lora_segments", "lora_shrink", "lora_expand", "lora_fused", "lora_prefill", "lora_merge"}


@pytest.fixture(scope="module")
def sm80_cubin_sizes():
    return dict(_core.nvrtc_compile_all(80))


def test_every_kernel_compiles(sm80_cubin_sizes):
    compiled = sm80_cubin_sizes
    assert set(compiled) == FAMILIES
    assert all(size > 1000 for size in compiled.values()), compiled


def test_compile_kernels_fills_the_cache_a_launch_reads(tmp_path, monkeypatch, capsys):
    """`loramux compile-kernels --arch 90` compiles every kernel (sm_90) into LORAMUX_KERNEL_CACHE,
    one file a family named by arch and NVRTC version; compiling again reads them back unchanged."""
    monkeypatch.setenv("LORAMUX_KERNEL_CACHE", str(tmp_path))
    assert cli.main(["compile-kernels", "--arch", "90"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and all(f"sm_90 {f}:" in out for f in FAMILIES)
    major, minor = _core.nvrtc_version()
    files = {p.name.split("-sm90-")[0]: p for p in tmp_path.iterdir()}
    assert set(files) == FAMILIES and all(f"-sm90-nvrtc{major}.{minor}-" in p.name for p in files.values())
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files.values()}
    assert dict(_core.nvrtc_compile_all(90, cache=True)) == {f: p.stat().st_size for f, p in files.items()}
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files.values()} == stamps


BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not (BENCH / "ptxas_report.py").is_file(), reason="not run from a source checkout")
@pytest.mark.parametrize("family", ["lora_segments", "lora_shrink"])
def test_the_report_compiles_what_the_loader_compiles(family, sm80_cubin_sizes, monkeypatch):
    """benchmarks/ptxas_report.py (and fused_trace.py) assemble a family's source from the loader's
    list of shared parts; the cubin comes out the loader's. Two families (one with a shared part)
    keep the check quick: the assembly is the same code for all."""
    monkeypatch.syspath_prepend(str(BENCH))
    import ptxas_report

    assert set(ptxas_report.SHARED) == FAMILIES
    assert all((ptxas_report.ROOT / part).is_file() for parts in ptxas_report.SHARED.values() for part in parts)
    rc, log, cubin = ptxas_report.nvrtc_compile(ptxas_report.family_source(family), family,
                                                ["--gpu-architecture=sm_80", "-std=c++17", "--fmad=true"])
    assert rc == 0, log
    assert len(cubin) == sm80_cubin_sizes[family]


def test_nvrtc_version_is_reported():
    major, minor = _core.nvrtc_version()
    assert major >= 12 and minor >= 0


def test_an_unknown_arch_is_a_typed_error():
    with pytest.raises(LoraCudaError):
        _core.nvrtc_compile_all(12)


def test_plan_splits_decode_over_the_sms(monkeypatch):
    for k in ("LORAMUX_DECODE_DEVICE_SPLIT", "LORAMUX_SHRINK_TARGET_BLOCKS"):  # the built-in plan, whatever the caller set
        monkeypatch.delenv(k, raising=False)
    ksplit, kchunk, reduce_first, _target = _core.plan_shrink(1, 4096, 1, 8)
    assert ksplit * kchunk >= 4096 and ksplit >= 4 and not reduce_first
    # decode: the split sized on the device from the step's item count, unless asked on the host
    assert _core.plan_shrink(32, 4096, 1, 64)[3] > 0 and _core.plan_shrink(32, 4096, 1, 64, device_split=False)[3] == 0
    # an empty input width plans (one chunk) instead of dividing by zero
    assert _core.plan_shrink(32, 0, 1, 8)[:2] == (1, 256) and _core.plan_fused(32, 0, 4096, 1, 8, 16)[:2] == (1, 256)
    ksplit, kchunk, reduce_first, target = _core.plan_shrink(2048, 4096, 3, 8)
    assert target == 0  # prefill plans its split on the host
    assert 1 <= ksplit <= 16 and kchunk % 64 == 0 and ksplit * kchunk >= 4096
    # reduced into u first wherever the shrink does not sum them itself: lora_apply asks only when
    # the shrink returned no u (register-staged, c1 / c4, or the pipelined shrink's fallback)
    assert reduce_first == (ksplit > 1)
    ksplit, kchunk, reduce_first, _target = _core.plan_shrink(2048, 4096, 3, 8, None, "c4")
    assert reduce_first == (ksplit > 1)
    assert not _core.plan_shrink(200, 4096, 3, 8)[2]  # small items: the expand sums the partials


def test_which_decode_batches_take_the_fused_kernel(monkeypatch):
    """The fused decode kernel's plan: decode batches above 16 tokens of rank <= 64 unless the
    launch table or LORAMUX_DECODE_FUSED says otherwise; its expand groups cover every column."""
    for k in ("LORAMUX_DECODE_FUSED", "LORAMUX_FUSED_EXPAND_BLOCKS", "LORAMUX_SHRINK_TARGET_BLOCKS", "LORAMUX_FUSED_STAGE_A",
              "LORAMUX_DECODE_DEVICE_SPLIT"):
        monkeypatch.delenv(k, raising=False)
    plan = _core.plan_fused(32, 4096, 14336, 2, 33, 16)
    ksplit, kchunk, col_steps, col_groups, staged_a, blocks_per_sm, split_target, expand_target = plan
    assert ksplit * kchunk >= 4096 and kchunk % 256 == 0 and col_groups * col_steps * 256 >= 14336
    assert split_target == 264 and expand_target == 396  # sized on the device from the step's item count
    monkeypatch.setenv("LORAMUX_DECODE_DEVICE_SPLIT", "0")
    assert _core.plan_fused(32, 4096, 14336, 2, 33, 16)[6:] == (0, 0)
    monkeypatch.delenv("LORAMUX_DECODE_DEVICE_SPLIT")
    # the shrink's A in registers unless the table (or LORAMUX_FUSED_STAGE_A) stages it
    assert not staged_a and blocks_per_sm is None and _core.plan_fused(32, 4096, 14336, 2, 33, 16, None, "fuseds")[4]
    assert _core.plan_fused(32, 4096, 14336, 2, 33, 16, None, "fused3")[4:6] == (False, 3)
    assert _core.plan_fused(32, 4096, 14336, 2, 33, 16, None, "fuseds4")[4:6] == (True, 4)
    assert _core.plan_fused(65, 4096, 4096, 1, 8, 16) is None  # prefill path
    assert _core.plan_fused(32, 4096, 4096, 1, 8, 128) is None  # past the fused kernel's ranks
    assert _core.plan_fused(32, 4096, 4096, 1, 8, 16, None, "o1") is None  # the table chose two kernels
    assert _core.plan_fused(8, 4096, 4096, 1, 8, 16) is None  # few tokens: two kernels unless the table says
    assert _core.plan_fused(8, 4096, 4096, 1, 8, 16, None, "fused") is not None
    # counted adapters averaging 4+ tokens take the pipelined kernels over small items instead
    for k in ("LORAMUX_PIPE_SMALL_DECODE", "LORAMUX_DECODE_TILES", "LORAMUX_DECODE_TILE_TOKENS"):
        monkeypatch.delenv(k, raising=False)
    assert _core.plan_fused(64, 4096, 4096, 1, 64, 16, adapters=16) is None and _core.small_items(64, 16)
    assert _core.plan_shrink(64, 4096, 1, 64, max_rank=16, adapters=16)[3] == 0  # the split planned on the host
    assert _core.plan_fused(64, 4096, 4096, 1, 64, 16, adapters=17) is not None
    assert _core.plan_fused(64, 4096, 4096, 1, 64, 16) is not None  # no count (a captured graph)
    assert _core.plan_fused(64, 4096, 4096, 1, 64, 128, adapters=16) is None  # past both kernels' ranks
    monkeypatch.setenv("LORAMUX_PIPE_SMALL_DECODE", "0")
    assert _core.plan_fused(64, 4096, 4096, 1, 64, 16, adapters=16) is not None
    monkeypatch.delenv("LORAMUX_PIPE_SMALL_DECODE")
    monkeypatch.setenv("LORAMUX_DECODE_FUSED", "0")
    assert _core.plan_fused(32, 4096, 14336, 2, 33, 16) is None
    monkeypatch.setenv("LORAMUX_DECODE_FUSED", "1")
    assert _core.plan_fused(8, 4096, 4096, 1, 8, 16, None, "o1") is not None
