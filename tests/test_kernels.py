"""The CUDA LoRA kernels against a float64 per-token oracle: multi-slice, mixed and odd ranks,
odd widths, DoRA, no-adapter rows untouched, decode and prefill paths, fp16 and bf16, CUDA graph
replay with new slot mappings, and the loramux.ops dispatch."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_fixtures import build_adapters, captured, oracle_apply, oracle_u, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from loramux.ops import kernels
    from loramux.errors import LoraCudaError

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
DEV = "cuda"


def _case(seed, dtype, T, widths, ranks, num_slots=8, layer=1, num_layers=3, dora_every=0, none_frac=0.2,
          max_rank=128, contiguous=False):
    """widths: [(module_id, Hi, Ho)] sharing Hi; ranks: per slot (0 = slot has no adapter)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    specs = {}
    for slot, rank in enumerate(ranks):
        for i, (mid, hi, ho) in enumerate(widths):
            if rank and not (slot + i) % 5 == 4:  # some adapters lack some modules (rank 0 entry)
                specs[(slot, layer, mid)] = (rank, hi, ho, bool(dora_every) and (slot % dora_every == 0))
            specs.setdefault((slot, 0, mid), (max(rank, 1), hi, ho, False))  # another layer: must be ignored
    ad = build_adapters(specs, num_slots=num_slots, num_layers=num_layers, max_rank=max_rank, dtype=dtype,
                        device=DEV, gen=gen)
    used = [s for s, r in enumerate(ranks) if r] or [-1]
    if contiguous:
        slots = sorted(rng.choice(used) for _ in range(T))
    else:
        slots = [(-1 if rng.random() < none_frac else rng.choice(used)) for _ in range(T)]
    hi = widths[0][1]
    x = torch.randn(T, hi, generator=gen).to(dtype).to(DEV)
    y0 = (0.1 * torch.randn(T, sum(w[2] for w in widths), generator=gen)).to(dtype).to(DEV)
    sot = torch.tensor(slots, dtype=torch.int32, device=DEV)
    return ad, slots, x, y0, sot


def _check_apply(ad, slots, x, y0, sot, layer, widths):
    mids, sizes = [w[0] for w in widths], [w[2] for w in widths]
    y = y0.clone()
    kernels.lora_apply(x, y, ad.meta(sot), layer, mids, sizes)
    torch.cuda.synchronize()
    want = oracle_apply(ad, x, y0, slots, layer, mids, sizes)
    assert torch.isfinite(y).all()
    untouched = [t for t, s in enumerate(slots) if s < 0]
    if untouched:
        assert torch.equal(y[untouched], y0[untouched]), "no-adapter rows changed"
    if not torch.equal(want, y0.double().cpu()):
        assert rel_err(y, want, y0) < TOL[x.dtype]
    return y


QKV = [(1, 576, 576), (2, 576, 192), (3, 576, 192)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 64, 65, 300])
def test_apply_qkv_mixed_ranks(dtype, T):
    ad, slots, x, y0, sot = _case(T, dtype, T, QKV, ranks=[8, 16, 1, 0, 64, 7, 128, 33])
    _check_apply(ad, slots, x, y0, sot, 1, QKV)


@pytest.mark.parametrize("T", [3, 200])
def test_dora_scales_in_the_epilogue(T):
    widths = [(7, 1536, 576), (5, 1536, 576)]
    ad, slots, x, y0, sot = _case(11 + T, torch.bfloat16, T, widths, ranks=[16, 8, 4, 32], dora_every=2)
    _check_apply(ad, slots, x, y0, sot, 1, widths)


@pytest.mark.parametrize("T", [2, 130, 300])
def test_odd_widths_take_the_scalar_path(T):
    widths = [(4, 100, 37), (6, 100, 5)]  # Hi, Ho not multiples of 8
    ad, slots, x, y0, sot = _case(5 + T, torch.float16, T, widths, ranks=[3, 5, 12])
    _check_apply(ad, slots, x, y0, sot, 1, widths)


def test_llama_mlp_widths():
    widths = [(6, 14336, 4096)]
    ad, slots, x, y0, sot = _case(3, torch.bfloat16, 16, widths, ranks=[16, 64])
    _check_apply(ad, slots, x, y0, sot, 1, widths)


@pytest.mark.parametrize("T", [4096, 8192])
def test_long_prefill(T):
    widths = [(18, 512, 1024)]
    ad, slots, x, y0, sot = _case(T, torch.bfloat16, T, widths, ranks=[16, 64, 8], contiguous=True)
    _check_apply(ad, slots, x, y0, sot, 1, widths)


@pytest.mark.parametrize("T", [5, 100])
def test_shrink_and_expand_standalone(T):
    ad, slots, x, y0, sot = _case(40 + T, torch.bfloat16, T, QKV, ranks=[8, 0, 24, 128])
    mids, sizes = [1, 2, 3], [576, 192, 192]
    meta = ad.meta(sot)
    u = kernels.lora_shrink(x, meta, 1, mids)
    want_u = oracle_u(ad, x, slots, 1, mids)
    assert u.shape == (3, T, 128) and u.dtype == torch.float32
    assert float((u.double().cpu() - want_u).norm() / want_u.norm()) < 1e-4
    assert torch.equal(u.cpu()[want_u == 0], torch.zeros_like(u.cpu()[want_u == 0]))  # zero past rank
    y = y0.clone()
    kernels.lora_expand(u, y, meta, 1, mids, sizes)
    want = oracle_apply(ad, x, y0, slots, 1, mids, sizes)
    assert rel_err(y, want, y0) < TOL[torch.bfloat16]


def test_ops_dispatch_uses_the_kernels_on_cuda():
    from loramux import ops

    ad, slots, x, y0, sot = _case(77, torch.float16, 33, QKV, ranks=[8, 16])
    mids, sizes = [1, 2, 3], [576, 192, 192]
    y_ops, y_k = y0.clone(), y0.clone()
    ops.lora_apply(x, y_ops, ad.meta(sot), 1, mids, sizes)
    kernels.lora_apply(x, y_k, ad.meta(sot), 1, mids, sizes)
    assert torch.equal(y_ops, y_k)


def test_bad_inputs_are_typed_errors_and_change_nothing():
    ad, slots, x, y0, sot = _case(9, torch.bfloat16, 4, QKV, ranks=[8])
    y = y0.clone()
    with pytest.raises(LoraCudaError, match="layer 3"):
        kernels.lora_apply(x, y, ad.meta(sot), 3, [1, 2, 3], [576, 192, 192])
    with pytest.raises(LoraCudaError, match="float16 or bfloat16|serve in one dtype"):
        kernels.lora_apply(x.float(), y.float(), ad.meta(sot), 1, [1, 2, 3], [576, 192, 192])
    with pytest.raises(LoraCudaError, match="wider than y"):
        kernels.lora_apply(x, y, ad.meta(sot), 1, [1, 2, 3], [576, 192, 193])
    with pytest.raises(Exception, match="module_id 19"):
        kernels.lora_apply(x, y[:, :576], ad.meta(sot), 1, [19], [576])
    torch.cuda.synchronize()
    assert torch.equal(y, y0)


def test_cuda_graph_replays_with_new_slot_mappings():
    """A captured decode step over static buffers, replayed with more and fewer distinct adapters."""
    dtype, T = torch.bfloat16, 32
    widths = [(1, 1024, 1024), (2, 1024, 256), (3, 1024, 256)]
    ad, _, x, y0, sot = _case(123, dtype, T, widths, ranks=[16, 8, 32, 4, 64, 16, 12, 20], num_slots=8)
    mids, sizes = [1, 2, 3], [1024, 256, 256]
    static_x, static_y, static_sot = x.clone(), y0.clone(), sot.clone()
    meta = ad.meta(static_sot)
    g = captured(lambda: kernels.lora_apply(static_x, static_y, meta, 1, mids, sizes))
    rng = random.Random(5)
    for distinct in (1, 3, 8, 2):
        slots = [rng.randrange(distinct) if rng.random() > 0.1 else -1 for _ in range(T)]
        xn = torch.randn(T, 1024, device=DEV).to(dtype)
        static_x.copy_(xn)
        static_y.copy_(y0)
        static_sot.copy_(torch.tensor(slots, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        want = oracle_apply(ad, xn, y0, slots, 1, mids, sizes)
        assert rel_err(static_y, want, y0) < TOL[dtype], distinct


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    T=st.sampled_from([1, 2, 16, 63, 64, 65, 129, 1000, 4096]),
    hi=st.sampled_from([8, 24, 576, 1000, 1536, 4096, 14336]),
    ho=st.sampled_from([8, 40, 192, 576, 1536, 14336]),
    ranks=st.lists(st.integers(0, 128), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**20),
    contiguous=st.booleans(),
)
def test_hypothesis_shapes(T, hi, ho, ranks, dtype, seed, contiguous):
    if T * (hi + ho) > 4096 * 4096:  # keep the float64 oracle quick
        T = max(1, 4096 * 4096 // (hi + ho))
    widths = [(5, hi, ho)]
    ad, slots, x, y0, sot = _case(seed, dtype, T, widths, ranks=ranks, num_slots=len(ranks) + 1,
                                  contiguous=contiguous)
    _check_apply(ad, slots, x, y0, sot, 1, widths)
