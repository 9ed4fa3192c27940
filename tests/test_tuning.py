"""The shipped launch table (python/loramux/ops/launch_table.json, written by benchmarks/tune.py)
is well formed, names only kernels the planner knows, and is what a lora_apply of a listed
geometry passes to the launcher; other geometries, other archs and LORAMUX_TUNING=off keep the
built-in rules."""

from __future__ import annotations

import json
import os

import pytest

from loramux import _core
from loramux.ops import tuning

KINDS = {"fused", "fused3", "fuseds", "fuseds4", "flat", "o1", "o1w", "o4", "c1", "c4", "p", "p2", "p4", "p6", "p8", "p16"}


def test_buckets_follow_the_kernel_paths():
    assert [tuning.token_bucket(t) for t in (1, 2, 16, 17, 64, 65, 256, 257, 512, 513, 9000)] == \
        [1, 16, 16, 64, 64, 256, 256, 512, 512, 2048, 2048]
    assert [tuning.rank_bucket(r) for r in (1, 16, 17, 64, 100, 128)] == [16, 16, 32, 64, 128, 128]


def test_shipped_table_is_well_formed():
    doc = json.loads(tuning.TABLE_PATH.read_text())
    seen = set()
    for e in doc["entries"]:
        key = (e["arch"], e["hi"], tuple(e["out_sizes"]), e["rank_bucket"], e["token_bucket"], e.get("adapter_bucket"))
        assert key not in seen, f"two entries for {key}"
        seen.add(key)
        # an adapter bucket's entry was timed at that bucket's counts only
        assert e.get("adapter_bucket") in (None, "one", "few", "many")
        if e.get("adapter_bucket"):
            assert {tuning.adapter_bucket(n) for n in e["adapters"]} == {e["adapter_bucket"]}
        assert e["rank_bucket"] in tuning.RANK_BUCKETS and e["token_bucket"] in tuning.TOKEN_BUCKETS
        kind = e["expand_kernel"]
        assert kind in KINDS
        # each path's kernels only: flat to 64 tokens, small items to 256, tiles above
        assert (kind.startswith("fused") or kind == "flat") <= (e["token_bucket"] <= 64)
        assert kind.startswith("fused") <= (e["rank_bucket"] <= 64)
        assert (kind in ("o1", "o1w", "o4")) <= (e["token_bucket"] <= 256)
        assert (kind in ("c1", "c4")) <= (e["token_bucket"] > 256)
        assert e["shrink_target_blocks"] > 0
        # a decode entry names the split it was timed with; other buckets have none
        split = e.get("decode_device_split")
        assert split is None or (isinstance(split, bool) and 1 < e["token_bucket"] <= 64)
        # the planner takes the choice
        plan = _core.plan_shrink(e["token_bucket"], e["hi"], len(e["out_sizes"]), 32, e["shrink_target_blocks"], kind,
                                 decode_device_split=split)
        if split is not None and "LORAMUX_DECODE_DEVICE_SPLIT" not in os.environ:
            assert (plan[3] > 0) == split
    assert {m["arch"] for m in doc["measured"]} >= {e["arch"] for e in doc["entries"]}


def test_lookup_hits_listed_geometries_only(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": [dict(arch=90, hi=4096, out_sizes=[4096, 1024, 1024], rank_bucket=16,
                                                 token_bucket=64, expand_kernel="o1w", shrink_target_blocks=264),
                                            dict(arch=90, hi=4096, out_sizes=[4096], rank_bucket=16, token_bucket=16,
                                                 expand_kernel="fused", shrink_target_blocks=132, decode_device_split=True)]}))
    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    monkeypatch.delenv("LORAMUX_TUNING", raising=False)
    hit = tuning.choice(90, 4096, [4096, 1024, 1024], 16, 40)
    assert hit == tuning.Choice(264, "o1w") == tuning.Choice(264, "o1w", None)
    assert tuning.choice(90, 4096, [4096], 16, 9) == tuning.Choice(132, "fused", True)
    none = tuning.Choice(None, None, None)
    assert tuning.choice(80, 4096, [4096, 1024, 1024], 16, 40) == none  # another arch
    assert tuning.choice(90, 4096, [4096], 16, 40) == none  # another shape
    assert tuning.choice(90, 4096, [4096, 1024, 1024], 64, 40) == none  # another rank bucket
    assert tuning.choice(90, 4096, [4096, 1024, 1024], 16, 100) == none  # another token bucket
    monkeypatch.setenv("LORAMUX_TUNING", "off")
    assert tuning.choice(90, 4096, [4096, 1024, 1024], 16, 40) == none


def test_a_counted_batch_takes_its_adapter_bucket_entry(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    geo = dict(arch=90, hi=4096, out_sizes=[4096], rank_bucket=16, token_bucket=2048)
    path.write_text(json.dumps({"entries": [dict(geo, expand_kernel="p", shrink_target_blocks=264),
                                            dict(geo, expand_kernel="p4", shrink_target_blocks=264, adapter_bucket="few"),
                                            dict(geo, token_bucket=512, expand_kernel="p16", shrink_target_blocks=528,
                                                 adapter_bucket="many")]}))
    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    monkeypatch.delenv("LORAMUX_TUNING", raising=False)
    assert [tuning.adapter_bucket(n) for n in (None, 1, 2, 32, 33)] == [None, "one", "few", "few", "many"]
    assert tuning.choice(90, 4096, [4096], 16, 2048) == tuning.Choice(264, "p")  # count not known
    assert tuning.choice(90, 4096, [4096], 16, 2048, adapters=8) == tuning.Choice(264, "p4")
    assert tuning.choice(90, 4096, [4096], 16, 2048, adapters=1) == tuning.Choice(264, "p")  # one adapter: no "one" entry
    assert tuning.choice(90, 4096, [4096], 16, 2048, adapters=128) == tuning.Choice(264, "p")  # no "many" entry
    assert tuning.choice(90, 4096, [4096], 16, 512, adapters=128) == tuning.Choice(528, "p16")
    none = tuning.Choice(None, None, None)
    assert tuning.choice(90, 4096, [4096], 16, 512, adapters=8) == none
    assert tuning.choice(90, 4096, [4096], 16, 512) == none


def test_planner_takes_the_choices_and_rejects_unknown_kernels(monkeypatch):
    for v in ("LORAMUX_EXPAND_DECODE", "LORAMUX_SHRINK_TARGET_BLOCKS"):
        monkeypatch.delenv(v, raising=False)
    few = _core.plan_shrink(64, 4096, 1, 64, 132, None, device_split=False)
    many = _core.plan_shrink(64, 4096, 1, 64, 1056, None, device_split=False)
    assert few[0] < many[0]
    # sized on the device: the target travels to the kernels
    assert _core.plan_shrink(64, 4096, 1, 64, 132, None)[3] == 132
    assert _core.plan_shrink(8, 4096, 1, 8) == _core.plan_shrink(8, 4096, 1, 8, None, None)
    with pytest.raises(Exception, match="unknown expand kernel"):
        _core.plan_shrink(8, 4096, 1, 8, None, "o2")
    # a table entry's device split decides where the environment does not
    monkeypatch.delenv("LORAMUX_DECODE_DEVICE_SPLIT", raising=False)
    assert _core.plan_shrink(16, 4096, 1, 64, 132, None, decode_device_split=True)[3] == 132
    assert _core.plan_shrink(64, 4096, 1, 64, 132, None, decode_device_split=False)[3] == 0
    assert _core.plan_fused(16, 4096, 4096, 1, 64, 16, 132, "fused", decode_device_split=True)[6] == 132
    assert _core.plan_fused(64, 4096, 4096, 1, 64, 16, 132, "fused", decode_device_split=False)[6] == 0


def _tune_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "tune.py"
    if not path.is_file():
        pytest.skip("not run from a source checkout")
    spec = importlib.util.spec_from_file_location("tune_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_selection_keeps_coarse_splits_noise_and_wrong_results_out():
    tune = _tune_script()
    case = dict(hi=4096, out_sizes=[4096], rank=16, tokens=40, default_us=100.0, variants=[
        dict(expand_kernel="o1", shrink_target_blocks=132, us=50.0, rel_err=1e-3),  # coarser than built-in: out
        dict(expand_kernel="o1w", shrink_target_blocks=1056, us=60.0, rel_err=0.5),  # wrong result: out
        dict(expand_kernel="flat", shrink_target_blocks=132, us=80.0, rel_err=1e-3),  # flat's own target: in
        dict(expand_kernel="o1", shrink_target_blocks=528, us=90.0, rel_err=1e-3),
    ])
    e = tune.select(case, margin=0.03)
    assert (e["expand_kernel"], e["shrink_target_blocks"], e["token_bucket"], e["rank_bucket"]) == ("flat", 132, 64, 16)
    case["variants"] = [dict(expand_kernel="o1", shrink_target_blocks=528, us=98.0, rel_err=1e-3)]
    assert tune.select(case, margin=0.03) is None  # within the noise margin: the built-in rule stays
    # timed at one adapter and at many: a variant that wins at many but loses at one stays out
    case = dict(hi=4096, out_sizes=[4096], rank=64, tokens=16, adapters=[1, 16], default_us=[10.0, 40.0], variants=[
        dict(expand_kernel="o1w", shrink_target_blocks=1056, us=[12.0, 20.0], rel_err=1e-3),
        dict(expand_kernel="o1", shrink_target_blocks=1056, us=[9.0, 36.0], rel_err=1e-3),
    ])
    e = tune.select(case, margin=0.03)
    assert (e["expand_kernel"], e["us"], e["adapters"]) == ("o1", [9.0, 36.0], [1, 16])
    assert ("o1", 132, True) not in tune.variants(40, tune.TARGETS) and ("flat", 132, True) in tune.variants(40, tune.TARGETS)
    assert ("fused", 132, False) in tune.variants(40, tune.TARGETS)  # swept from 132, both adapter counts timed
    # decode counts: each choice with the split sized on the host and on the device; the entry names it
    assert {v[2] for v in tune.variants(16, tune.TARGETS)} == {False, True} and ("fused", 264) in tune.variants(1, tune.TARGETS)
    assert tune.forced_env("fused", 264, True)["LORAMUX_DECODE_DEVICE_SPLIT"] == "1"
    dcase = dict(hi=4096, out_sizes=[4096], rank=16, tokens=16, adapters=[1, 16], default_us=[10.0, 20.0], variants=[
        dict(expand_kernel="fused", shrink_target_blocks=132, decode_device_split=False, us=[9.5, 19.8], rel_err=1e-3),
        dict(expand_kernel="fused", shrink_target_blocks=132, decode_device_split=True, us=[9.0, 17.0], rel_err=1e-3)])
    assert tune.select(dcase, margin=0.03)["decode_device_split"] is True
    case["variants"] = [dict(expand_kernel="fused", shrink_target_blocks=132, us=[9.0, 30.0], rel_err=1e-3)]
    assert tune.select(case, margin=0.03)["shrink_target_blocks"] == 132
    assert {k for k, _ in tune.variants(300, tune.TARGETS)} == {"c1", "c4", "p", "p2", "p4", "p6", "p8", "p16"}
    # a sweep limited to some kinds (tune.py --kinds): only those, at the targets their path allows
    assert tune.variants(300, [264, 528], 16, {"p", "p4", "c1"}) == [("c1", 528), ("p", 264), ("p", 528), ("p4", 264), ("p4", 528)]


def test_sweep_gives_an_adapter_bucket_its_own_entry_where_its_counts_pick_another():
    tune = _tune_script()
    # p4 wins at 1 and 8 adapters and loses at 128: no entry for every count, one for "one" and "few"
    case = dict(hi=4096, out_sizes=[4096], rank=16, tokens=2048, adapters=[1, 8, 128], default_us=[30.0, 31.0, 52.0],
                variants=[dict(expand_kernel="p4", shrink_target_blocks=264, us=[22.0, 24.0, 58.0], rel_err=1e-3),
                          dict(expand_kernel="p16", shrink_target_blocks=264, us=[31.0, 32.0, 45.0], rel_err=1e-3)])
    entries = tune.entries_for(case, margin=0.03)
    assert [(e.get("adapter_bucket"), e["expand_kernel"], e["adapters"], e["us"]) for e in entries] == [
        ("one", "p4", [1], [22.0]), ("few", "p4", [8], [24.0]), ("many", "p16", [128], [45.0])]
    # where every count agrees: one entry, no bucket repeating it
    case["variants"][0]["us"] = [22.0, 24.0, 50.0]
    assert [(e.get("adapter_bucket"), e["expand_kernel"]) for e in tune.entries_for(case, margin=0.03)] == [(None, "p4"), ("many", "p16")]
    case["variants"] = case["variants"][:1]
    assert [(e.get("adapter_bucket"), e["expand_kernel"]) for e in tune.entries_for(case, margin=0.03)] == [(None, "p4")]
    # a sweep of one side only (decode buckets): the entry for every count alone
    case = dict(case, adapters=[1, 16], default_us=[30.0, 31.0], variants=[dict(expand_kernel="p4", shrink_target_blocks=264,
                                                                                us=[22.0, 24.0], rel_err=1e-3)])
    assert [e.get("adapter_bucket") for e in tune.entries_for(case, margin=0.03)] == [None]


def test_a_sweep_of_some_shapes_replaces_only_their_entries(tmp_path):
    tune = _tune_script()
    table = tmp_path / "table.json"
    old = [dict(arch=90, hi=4096, out_sizes=[4096], rank_bucket=16, token_bucket=16, expand_kernel="fused", shrink_target_blocks=132),
           dict(arch=90, hi=4096, out_sizes=[14336], rank_bucket=16, token_bucket=16, expand_kernel="o1", shrink_target_blocks=528),
           dict(arch=90, hi=4096, out_sizes=[14336], rank_bucket=16, token_bucket=64, expand_kernel="o1", shrink_target_blocks=528)]
    table.write_text(json.dumps(dict(measured=[dict(arch=90, commit="a")], entries=old)))
    new = dict(hi=4096, out_sizes=[14336], rank_bucket=16, token_bucket=16, expand_kernel="fused", shrink_target_blocks=264)
    # tune.py --shapes 4096:14336 --tokens 16: the other shape's bucket-16 entry and this shape's bucket 64 stay
    tune.write_table(str(table), 90, dict(arch=90, commit="b"), [new], {16}, swept={(4096, (14336,), 16)})
    doc = json.loads(table.read_text())
    assert sorted((tuple(e["out_sizes"]), e["token_bucket"], e["expand_kernel"]) for e in doc["entries"]) == [
        ((4096,), 16, "fused"), ((14336,), 16, "fused"), ((14336,), 64, "o1")]
    assert [m["commit"] for m in doc["measured"]] == ["a", "b"]
    assert tune.shape_spec(4096, (4096, 1024, 1024)) == "4096:4096|1024|1024"


def test_a_count_may_name_its_own_token_count_within_the_bucket():
    tune = _tune_script()
    assert tune.points(64, ((32, 32), 32, 64)) == [(32, 32), (64, 32), (64, 64)]
    # the decode step's batch (32 one-token adapters) loses: no entry for every count, one for "many"
    case = dict(hi=4096, out_sizes=[4096], rank=16, tokens=64, adapters=[32, 32, 64], point_tokens=[32, 64, 64],
                default_us=[10.0, 12.0, 14.0],
                variants=[dict(expand_kernel="fused", shrink_target_blocks=264, decode_device_split=True, us=[10.5, 11.0, 12.0], rel_err=1e-3)])
    entries = tune.entries_for(case, margin=0.03)
    assert [(e.get("adapter_bucket"), e["adapters"], e["point_tokens"], e["token_bucket"]) for e in entries] == [
        ("many", [64], [64], 64)]
