"""The (weights, config) format: every valid random adapter validates and reads back exactly; every
bad-input class raises its typed error naming the row; .npy files are read without pickle."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from loramux import format
from loramux.errors import LoraDoraError, LoraFormatError
from loramux.format import AdapterRow, ModelSpec
from loramux.modules import MODULE_IDS, NUM_MODULES

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def specs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    experts = draw(st.sampled_from([0, 3]))
    return ModelSpec(num_layers=draw(st.integers(1, 4)), hidden_size=draw(st.sampled_from([4, 8, 12])), num_heads=heads,
                     num_kv_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])), head_dim=head_dim,
                     ffn_size=draw(st.sampled_from([0, 10, 16])), expert_ffn_size=6 if experts else 0, num_experts=experts,
                     encoder_hidden_size=draw(st.sampled_from([0, 8, 12])), max_rank=draw(st.sampled_from([4, 8])))


def _dims(spec, mid):
    try:
        return spec.module_dims(mid)
    except LoraFormatError:
        return None


#: the largest float32 magnitude each storage type holds finite: float16 rounds 65519 to 65504 and
#: 65520 to inf; bfloat16 rounds the float32 halfway past its largest value to inf
STORABLE_PEAK = {"float16": 65519.0, "bfloat16": float(np.array([0x7F7F7FFF], np.uint32).view(np.float32)[0]),
                 "float32": float(np.finfo(np.float32).max)}


@st.composite
def adapters(draw, storage=None):
    """(spec, rows, storage type): a random valid adapter over a random model, its values anywhere
    in the storage type's range."""
    spec = draw(specs())
    present = [m for m in range(NUM_MODULES) if _dims(spec, m)]
    slots = [(m, layer) for m in present for layer in range(spec.num_layers)]
    chosen = draw(st.lists(st.sampled_from(slots), min_size=1, max_size=8, unique=True))
    dora = draw(st.booleans())
    storage = storage or draw(st.sampled_from(format.WEIGHT_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    peak = STORABLE_PEAK[storage]
    spread = draw(st.sampled_from([1.0, 1e4, peak / 8]))

    def values(shape):
        """Normal values `spread` wide, within what `storage` holds, sometimes with its extremes."""
        v = np.clip(rng.standard_normal(shape) * spread, -peak, peak).astype(np.float32)
        if v.size and draw(st.booleans()):
            v.reshape(-1)[rng.integers(v.size)] = peak * rng.choice([-1, 1])
        return v

    rows = []
    for mid, layer in chosen:
        hi, ho = spec.module_dims(mid)
        rank = draw(st.integers(1, spec.max_rank))
        scale = rng.uniform(0.5, 2, ho).astype(np.float32) if dora and draw(st.booleans()) else None
        rows.append(AdapterRow(mid, layer, values((rank, hi)), values((ho, rank)), scale))
    return spec, rows, storage


def _as_stored(values, storage):
    """What `values` become after a round trip through `storage`."""
    if storage == "float16":
        return values.astype(np.float16).astype(np.float32)
    if storage == "bfloat16":
        return format.to_float32(format.from_rows([AdapterRow(1, 0, values.reshape(1, -1), np.zeros((1, 1), np.float32))],
                                                  "bfloat16")[0])[0, : values.size].reshape(values.shape)
    return values


@SETTINGS
@given(adapters())
def test_every_valid_random_adapter_validates_and_reads_back(adapter):
    spec, rows, storage = adapter
    weights, config = format.from_rows(rows, storage)
    assert format.weights_dtype_name(weights) == storage
    layouts = format.validate(weights, config, spec)
    assert [(r.module_id, r.layer, r.rank, r.is_dora) for r in layouts] == \
        [(r.module_id, r.layer, r.a.shape[0], r.dora_scale is not None) for r in rows]
    assert weights.shape[1] == format.row_width(layouts)
    for got, want in zip(format.to_rows(weights, config, spec), rows):
        np.testing.assert_array_equal(got.a, _as_stored(want.a, storage))
        np.testing.assert_array_equal(got.b, _as_stored(want.b, storage))
        if want.dora_scale is not None:
            np.testing.assert_array_equal(got.dora_scale, _as_stored(want.dora_scale, storage))
    # TensorRT-LLM's leading batch dimension and int64 config are the same adapter
    assert format.validate(weights[None], config.astype(np.int64)[None], spec) == layouts


BAD_CLASSES = ["unknown_module", "layer_out_of_range", "negative_layer", "rank_zero", "rank_too_big", "duplicate",
               "row_too_short", "nan", "inf", "bad_is_dora", "module_not_in_model", "dora_without_base"]


def _corrupt(kind, spec, weights, config, row):
    """Makes row `row` bad in one way; returns (weights, config, validate kwargs, error class)."""
    w, c = weights.copy(), config.copy()
    kwargs, error = {}, LoraFormatError
    if kind == "unknown_module":
        c[row, 0] = NUM_MODULES
    elif kind == "layer_out_of_range":
        c[row, 1] = spec.num_layers
    elif kind == "negative_layer":
        c[row, 1] = -1
    elif kind == "rank_zero":
        c[row, 2] = 0
    elif kind == "rank_too_big":
        c[row, 2] = spec.max_rank + 1
    elif kind == "duplicate":
        c[row, :2] = c[0, :2]
    elif kind == "row_too_short":
        c[row, 2] = spec.max_rank
        hi, ho = spec.module_dims(int(c[row, 0]))
        w = w[:, : min(w.shape[1], spec.max_rank * (hi + ho) - 1)]
        c[:row, 2] = 1  # earlier rows still fit the narrower array
    elif kind in ("nan", "inf"):
        if w.dtype == np.uint16:  # bfloat16 bits
            w[row, 0] = 0x7FC0 if kind == "nan" else 0x7F80
        else:
            w[row, 0] = np.nan if kind == "nan" else np.inf
    elif kind == "bad_is_dora":
        c = np.concatenate([c, np.zeros((len(c), 1), c.dtype)], axis=1) if c.shape[1] == 3 else c
        c[row, 3] = 2
    elif kind == "module_not_in_model":
        c[row, 0] = MODULE_IDS["moe_router"]  # the spec below has no experts
    elif kind == "dora_without_base":
        c = np.concatenate([c, np.zeros((len(c), 1), c.dtype)], axis=1) if c.shape[1] == 3 else c
        c[:, 3] = 0
        c[row, 3] = 1
        w = np.concatenate([w, np.ones((len(w), 64), w.dtype)], axis=1)
        kwargs, error = {"dora_allowed": False}, LoraDoraError
    return w, c, kwargs, error


@SETTINGS
@given(st.sampled_from(BAD_CLASSES), st.integers(1, 5), st.data())
def test_each_bad_input_class_raises_its_typed_error_naming_the_row(kind, n_rows, data):
    assume(kind != "duplicate" or n_rows > 1)
    spec = ModelSpec(num_layers=n_rows + 1, hidden_size=8, num_heads=2, ffn_size=12, max_rank=4)
    rows = []
    for layer in range(n_rows):
        mid = data.draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 18]))
        hi, ho = spec.module_dims(mid)
        rows.append(AdapterRow(mid, layer, np.full((1, hi), 0.5, np.float32), np.full((ho, 1), 0.5, np.float32)))
    weights, config = format.from_rows(rows, data.draw(st.sampled_from(format.WEIGHT_DTYPES)))
    row = data.draw(st.integers(1 if kind == "duplicate" else 0, n_rows - 1))
    w, c, kwargs, error = _corrupt(kind, spec, weights, config, row)
    with pytest.raises(error) as info:
        format.validate(w, c, spec, **kwargs)
    assert info.value.row == row, f"{kind}: {info.value}"
    assert f"row {row}" in str(info.value)


@pytest.mark.parametrize(
    "weights, config, match",
    [
        (np.zeros((2, 8), np.float64), np.array([[1, 0, 1]] * 2), "dtype"),
        (np.zeros((2, 8), np.int32), np.array([[1, 0, 1]] * 2), "dtype"),
        (np.zeros((2, 8), np.float32), np.array([[1.0, 0, 1]] * 2), "config has dtype"),
        (np.zeros(16, np.float32), np.array([[1, 0, 1]] * 2), r"\[N, W\]"),
        (np.zeros((2, 2, 8), np.float32), np.array([[1, 0, 1]] * 2), r"\[N, W\]"),
        (np.zeros((2, 8), np.float32), np.array([1, 0, 1]), r"\[N, 3\]"),
        (np.zeros((2, 8), np.float32), np.array([[1, 0]] * 2), r"\[N, 3\]"),
        (np.zeros((3, 8), np.float32), np.array([[1, 0, 1]] * 2), "one weights row per config row"),
        (np.zeros((1, 8), np.float32), np.array([[1, 2**64 - 1, 1]], np.uint64), "18446744073709551615"),  # not wrapped to -1
    ],
)
def test_shape_and_dtype_errors(weights, config, match):
    spec = ModelSpec(num_layers=2, hidden_size=4, num_heads=2, max_rank=4)
    with pytest.raises(LoraFormatError, match=match):
        format.validate(weights, config, spec)


SPEC_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_size", "expert_ffn_size",
               "num_experts", "encoder_hidden_size", "max_rank")


@pytest.mark.parametrize("value", [-1, 2.5, True, "8", 2**64, None])
@pytest.mark.parametrize("field", SPEC_FIELDS)
def test_a_model_spec_size_that_is_not_a_count_is_a_typed_error_naming_the_field(field, value):
    sizes = dict(num_layers=2, hidden_size=8, num_heads=2)
    if value is None and field in ("num_kv_heads", "head_dim"):
        assert ModelSpec(**sizes, **{field: None}) == ModelSpec(**sizes)  # None: derived from the heads
        return
    with pytest.raises(LoraFormatError, match=f"ModelSpec {field} must be an integer in") as raised:
        ModelSpec(**{**sizes, field: value})
    assert isinstance(raised.value, ValueError) and not isinstance(raised.value, OverflowError)
    spec = ModelSpec(**sizes)
    with pytest.raises(LoraFormatError, match=f"ModelSpec {field} must be an integer in"):
        setattr(spec, field, value)
    assert spec == ModelSpec(**sizes)  # a refused assignment changes nothing


def test_model_spec_takes_numpy_integers_and_names_its_fields():
    spec = ModelSpec(num_layers=np.int64(3), hidden_size=np.uint16(8), num_heads=2)
    assert (spec.num_layers, spec.hidden_size, spec.num_kv_heads, spec.head_dim) == (3, 8, 2, 4)
    spec.max_rank = np.int32(16)
    assert repr(spec).startswith("ModelSpec(num_layers=3, hidden_size=8,") and "max_rank=16)" in repr(spec)
    assert [f for f in SPEC_FIELDS if hasattr(spec, f)] == list(SPEC_FIELDS)
    with pytest.raises(AttributeError, match="no field"):
        spec.num_layer = 3


def test_the_trtllm_documentation_example_layout():
    """The contract's example, rows built as it draws them: <D x 4 in weights>, <4 x D out weights>,
    <padding> (here NaN: padding is never read)."""
    spec = ModelSpec(num_layers=4, hidden_size=4, num_heads=2, num_kv_heads=2, head_dim=2, max_rank=8)
    config = np.array([[1, 0, 2], [2, 0, 4], [1, 1, 2], [2, 1, 4], [1, 2, 2], [1, 3, 8]])
    rng = np.random.default_rng(0)
    ins = [rng.standard_normal((d, 4)).astype(np.float32) for d in config[:, 2]]
    outs = [rng.standard_normal((4, d)).astype(np.float32) for d in config[:, 2]]
    weights = np.full((6, 8 * 4 + 4 * 8), np.nan, np.float32)
    for i, (a, b) in enumerate(zip(ins, outs)):
        weights[i, : a.size + b.size] = np.concatenate([a.ravel(), b.ravel()])
    layouts = format.validate(weights, config, spec)
    assert [r.needed for r in layouts] == [16, 32, 16, 32, 16, 64]
    for got, a, b, (mid, layer, _) in zip(format.to_rows(weights, config, spec), ins, outs, config):
        assert (got.module_id, got.layer, got.dora_scale) == (mid, layer, None)
        np.testing.assert_array_equal(got.a, a)
        np.testing.assert_array_equal(got.b, b)


def test_cross_attn_qkv_is_held_at_the_format_level():
    """No supported HF architecture fuses cross-attention q|k|v; the format still holds the id."""
    qkv = MODULE_IDS["cross_attn_qkv"]
    spec = ModelSpec(num_layers=2, hidden_size=8, num_heads=4, num_kv_heads=2, encoder_hidden_size=8, max_rank=4)
    assert spec.module_dims(qkv) == (8, 8 + 2 * 4)
    rows = [AdapterRow(qkv, 1, np.full((3, 8), 0.25, np.float32), np.full((16, 3), -0.5, np.float32))]
    weights, config = format.from_rows(rows, "float32")
    (got,) = format.to_rows(weights, config, spec)
    np.testing.assert_array_equal(got.b, rows[0].b)
    other_width = ModelSpec(num_layers=2, hidden_size=8, num_heads=4, encoder_hidden_size=6, max_rank=4)
    with pytest.raises(LoraFormatError, match="cross_attn_qkv"):
        format.validate(weights, config, other_width)


def test_bfloat16_as_ml_dtypes_or_uint16_is_the_same_adapter():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    spec = ModelSpec(num_layers=1, hidden_size=4, num_heads=2, max_rank=2)
    values = np.linspace(-1, 1, 2 * 4 + 4 * 2, dtype=np.float32)[None]
    bits = format.from_rows([AdapterRow(1, 0, values[:, :8].reshape(2, 4), values[:, 8:].reshape(4, 2))], "bfloat16")[0]
    as_ml = values.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(as_ml.view(np.uint16), bits)
    assert format.validate(as_ml, np.array([[1, 0, 2]]), spec) == format.validate(bits, np.array([[1, 0, 2]]), spec)


def test_files_round_trip_and_untrusted_files_are_refused(tmp_path):
    weights, config = format.from_rows([AdapterRow(1, 0, np.ones((2, 4), np.float32), np.ones((4, 2), np.float32))], "bfloat16")
    format.save(str(tmp_path / "ok"), weights, config)
    w, c = format.load(str(tmp_path / "ok"))
    np.testing.assert_array_equal(w, weights)
    np.testing.assert_array_equal(c, config)
    with pytest.raises(LoraFormatError, match="over the limit"):
        format.load(str(tmp_path / "ok"), max_bytes=8)

    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / format.CONFIG_FILE, config)
    np.save(bad / format.WEIGHTS_FILE, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LoraFormatError, match="objects"):
        format.load(str(bad))
    np.save(bad / format.WEIGHTS_FILE, np.zeros((4, 64), np.float16))
    data = (bad / format.WEIGHTS_FILE).read_bytes()
    (bad / format.WEIGHTS_FILE).write_bytes(data[:-10])  # header promises more than the file holds
    with pytest.raises(LoraFormatError, match="header says"):
        format.load(str(bad))
    (bad / format.WEIGHTS_FILE).write_bytes(b"not a numpy file at all")
    with pytest.raises(LoraFormatError, match="not a .npy"):
        format.load(str(bad))
    with pytest.raises(LoraFormatError, match="missing: no such folder"):
        format.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraFormatError, match="no such file"):
        format.load(str(tmp_path / "empty"))


def test_a_header_whose_shape_overflows_int64_is_refused(tmp_path):
    # (2**62 + 4) * 4 elements wraps to 16 in int64: the 64 bytes written must not pass for it.
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**62 + 4, 4)}
    with open(tmp_path / format.WEIGHTS_FILE, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(16, np.float32).tobytes())
    np.save(tmp_path / format.CONFIG_FILE, np.zeros((1, 3), np.int64))
    with pytest.raises(LoraFormatError, match="over the limit"):
        format.load(str(tmp_path))


def test_from_rows_refuses_rows_that_are_not_an_adapter():
    a, b = np.ones((2, 4), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(LoraFormatError, match="row 0.*DoRA scales"):
        format.from_rows([AdapterRow(1, 0, a, b, np.ones(3, np.float32))])
    with pytest.raises(LoraFormatError, match="row 1"):
        format.from_rows([AdapterRow(1, 0, a, b), AdapterRow(2, 0, np.float32(1.0), b)])
    with pytest.raises(LoraFormatError, match=f"row 1: module_id {NUM_MODULES} is not one of") as err:
        format.from_rows([AdapterRow(1, 0, a, b), AdapterRow(NUM_MODULES, 0, a, b)])
    assert err.value.row == 1
    with pytest.raises(LoraFormatError, match="row 0: layer -1 is negative"):
        format.from_rows([AdapterRow(1, -1, a, b)])
    with pytest.raises(ValueError, match="storage type 'int8'") as err:  # an argument, not adapter data
        format.from_rows([AdapterRow(1, 0, a, b)], "int8")
    assert not isinstance(err.value, LoraFormatError)


def test_ml_dtypes_bfloat16_is_saved_as_its_uint16_bits(tmp_path):
    import ml_dtypes

    weights = (np.arange(24, dtype=np.float32).reshape(1, 24) / 8).astype(ml_dtypes.bfloat16)
    config = np.array([[1, 0, 2]])
    format.save(str(tmp_path), weights, config)  # np.save alone would write an opaque |V2 array
    w, _ = format.load(str(tmp_path))
    assert w.dtype == np.uint16 and format.weights_dtype_name(w) == "bfloat16"
    np.testing.assert_array_equal(w, weights.view(np.uint16))


def test_a_broadcast_view_too_large_to_copy_is_a_format_error_naming_its_shape():
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), (60, 2**40), (0, 0))  # 132 TB behind 2 bytes
    spec = ModelSpec(num_layers=2, hidden_size=4, num_heads=2, max_rank=4)
    with pytest.raises(LoraFormatError, match=r"weights \[60, 1099511627776\] float16 are not contiguous"):
        format.validate(huge, np.array([[1, 0, 1]] * 60), spec)


def _rows_with(value, factor):
    """attn_q layer 0, then attn_v layer 2 with DoRA scales, `value` last in row 1's `factor`."""
    a, b, scale = np.full((2, 8), 0.5, np.float32), np.full((4, 2), -0.25, np.float32), np.ones(4, np.float32)
    {"lora_A": a, "lora_B": b, "DoRA scale": scale}[factor].reshape(-1)[-1] = value
    q = AdapterRow(MODULE_IDS["attn_q"], 0, np.ones((1, 8), np.float32), np.ones((8, 1), np.float32))
    return [q, AdapterRow(MODULE_IDS["attn_v"], 2, a, b, scale)]


@pytest.mark.parametrize("factor", ["lora_A", "lora_B", "DoRA scale"])
@pytest.mark.parametrize(
    "value, storage",
    [(np.nan, "float16"), (np.inf, "bfloat16"), (-np.inf, "float32"), (np.nan, "float32"), (65520.0, "float16"),
     (-7e4, "float16"), (3.4e38, "bfloat16"), (-STORABLE_PEAK["float32"], "bfloat16")],
)
def test_from_rows_refuses_values_the_storage_type_cannot_hold_naming_the_row(value, storage, factor):
    """numpy would store them as inf (or NaN) with a warning at most: an adapter no model serves."""
    rows = _rows_with(value, factor)
    with pytest.raises(LoraFormatError) as err:
        format.from_rows(rows, storage)
    assert err.value.row == 1
    message = str(err.value)
    assert message.startswith(f"row 1 (attn_v layer 2): {factor} holds {value:g}"), message
    if np.isfinite(value):
        largest, wider = {"float16": ("65504", "bfloat16 or float32"), "bfloat16": ("3.38953e+38", "float32")}[storage]
        assert message.endswith(f", too large for storage type {storage} (largest {largest}); use {wider}"), message
    else:
        assert f"not finite (storage type {storage} needs finite values)" in message
    fault = format.storage_fault(rows, storage)
    assert fault[:4] == (1, MODULE_IDS["attn_v"], 2, factor) and fault.storage_type == storage
    assert fault.finite == bool(np.isfinite(value)) and str(fault) == message


@pytest.mark.parametrize("value", [65520.0, -7e4, 3.4e38, STORABLE_PEAK["float32"], -STORABLE_PEAK["float32"], 1e-45])
def test_float32_storage_holds_every_finite_value(value):
    weights, _ = format.from_rows(_rows_with(value, "lora_B"), "float32")
    assert weights[1, 2 * 8 + 4 * 2 - 1] == np.float32(value)
    assert format.storage_fault(_rows_with(value, "lora_B"), "float32") is None


def test_the_largest_value_each_half_type_holds_is_stored_finite():
    for storage, peak, stored in (("float16", 65519.0, 65504.0), ("bfloat16", STORABLE_PEAK["bfloat16"], 3.3895313892515355e38)):
        weights, _ = format.from_rows(_rows_with(-peak, "lora_A"), storage)
        assert format.to_float32(weights)[1, 2 * 8 - 1] == -stored
    weights, _ = format.from_rows(_rows_with(7e4, "lora_A"), "bfloat16")  # beyond float16, within bfloat16
    assert format.to_float32(weights)[1, 2 * 8 - 1] == 70144.0


def test_dora_scales_are_stored_unnormalized():
    """Callers build rows whose scales validate refuses until normalized; storing them is no fault."""
    for scale in (0.0, -2.0):
        weights, config = format.from_rows(_rows_with(scale, "DoRA scale"), "float16")
        assert weights[1, -1] == scale and config[1, 3] == 1
