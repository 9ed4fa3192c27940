"""benchmarks/step_timeline.py's sweep: kernels cut into replays at idle gaps, and per category the
kernel count, summed duration, union and time alone, on hand-made timelines (two streams)."""

import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.skipif(not (BENCH / "step_timeline.py").is_file(), reason="not run from a source checkout")


@pytest.fixture
def tl(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import step_timeline

    return step_timeline


def k(name, start, end, stream=7):
    return {"name": name, "start": float(start), "end": float(end), "stream": stream}


def test_categories(tl):
    assert [tl.category(n) for n in ("lora_fused_decode_bf16", "nvjet_tst_64x8_64x16", "sm90_xmma_gemm_bf16",
                                     "flash_fwd_kernel", "void at::native::vectorized_elementwise_kernel")] == \
        ["lora", "gemm", "gemm", "attention", "other"]


def test_overlap_union_and_alone(tl):
    # a GEMM 0..10 on the main stream, the LoRA branch 2..14 on a side stream, then a merge 14..16
    s = tl.summarize([k("nvjet_gemm", 0, 10), k("lora_fused_decode_bf16", 2, 14, 9), k("lora_beside_merge_bf16", 14, 16)])
    assert s["wall_us"] == 16 and s["busy_us"] == 16 and s["streams"] == 2
    lora, gemm = s["categories"]["lora"], s["categories"]["gemm"]
    assert (lora["count"], lora["sum_us"], lora["union_us"], lora["alone_us"]) == (2, 14, 14, 6)
    assert (gemm["count"], gemm["union_us"], gemm["alone_us"]) == (1, 10, 2)
    assert s["lora_by_name"] == {"lora_fused_decode_bf16": {"count": 1, "sum_us": 12, "alone_us": 4},
                                 "lora_beside_merge_bf16": {"count": 1, "sum_us": 2, "alone_us": 2}}


def test_lora_time_alone_is_shared_among_the_lora_kernels_running(tl):
    # two applies overlap alone 4..6 (1 us each), one runs alone 6..8; a GEMM beside 0..4
    s = tl.summarize([k("nvjet_gemm", 0, 4), k("lora_apply", 1, 6, 9), k("lora_apply", 4, 8, 11), k("lora_merge", 8, 9)])
    assert s["categories"]["lora"]["alone_us"] == 5
    assert s["lora_by_name"]["lora_apply"] == {"count": 2, "sum_us": 9, "alone_us": 4}
    assert s["lora_by_name"]["lora_merge"]["alone_us"] == 1


def test_idle_time_and_touching_kernels(tl):
    # back to back on one stream (a GEMM, then a LoRA kernel at the instant it ends), then 5 us idle
    s = tl.summarize([k("nvjet_gemm", 0, 3), k("lora_b", 3, 4), k("elementwise", 9, 10)])
    assert s["wall_us"] == 10 and s["busy_us"] == 5
    assert s["categories"]["lora"]["alone_us"] == 1 and s["categories"]["gemm"]["alone_us"] == 3
    assert s["categories"]["other"]["alone_us"] == 1


def test_replays_split_at_gaps_and_medians(tl):
    one = [k("gemm", 0, 10), k("lora_x", 10, 12)]
    replays = tl.split_replays(one + [dict(e, start=e["start"] + 1000, end=e["end"] + 1000) for e in one]
                               + [k("gemm", 2000, 2010)], gap_us=500)
    assert [len(r) for r in replays] == [2, 2, 1]
    m = tl.median_summary(replays[:2])
    assert m["replays"] == 2 and m["wall_us"] == 12 and m["categories"]["lora"]["alone_us"] == 2
    assert m["lora_by_name"] == {"lora_x": {"count": 1, "sum_us": 2, "alone_us": 2}}
    # a LoRA kernel in one replay of three counts zero in the others
    assert tl.median_summary(replays)["lora_by_name"]["lora_x"]["count"] == 1
