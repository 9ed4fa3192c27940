#!/bin/bash
# One GPU pass (see docs/kernel-notes.md): install the wheel, check, test, benchmark; logs to $OUT.
# Run from the repository root of the GPU machine with .gpu (the wheel) and .gpuwork (tests,
# benchmarks, cuda, COMMIT) carried. STEPS picks what runs: any of
# env test peers decode bench memcheck variants ab ncu (run in that order).
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"env test peers decode bench memcheck"}
pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site
cd .gpuwork
COMMIT=$(cat COMMIT 2>/dev/null)
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has env; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv > $OUT/env.txt
  python -c "import loramux,torch;from loramux.ops import kernels;from loramux import _core;print(loramux.__file__,_core.__file__,torch.__version__,kernels.nvrtc_library(),_core.nvrtc_version(),kernels.available());print('arch',_core.load_kernels(0))" >> $OUT/env.txt 2>&1
  cat $OUT/env.txt
fi
if has test; then
  timeout ${TEST_S:-150} python -m pytest -q --maxfail=8 -m gpu ${TEST_FILES:-tests/test_kernels.py tests/test_segments.py tests/test_ops.py tests/test_siblings.py} > $OUT/pytest.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|Error|error" $OUT/pytest.log | tail -15
fi
if has peers; then  # the cases measured beside the best open-source peer
  timeout ${PEERS_S:-90} python benchmarks/ops.py --grid peers --commit "$COMMIT" --out $OUT/peers.json > $OUT/peers.txt 2>&1
  echo "peers rc=$?"; grep -vE '^\{"kind": "summary' $OUT/peers.txt | tail -14
fi
if has decode; then
  timeout ${DECODE_S:-150} python benchmarks/decode_step.py --out $OUT/decode.json > $OUT/decode.txt 2>&1
  echo "decode rc=$?"; python -c "
import json; d=json.loads(open('$OUT/decode.json').read().splitlines()[-1])
print({k: (round(v,3) if isinstance(v,float) else v) for k,v in d.items() if k in ('base_us','lora_us','overhead_us','lora_floor_us','overhead_over_floor','ops_only_7_per_layer_us','ops_only_4_fused_per_layer_us','overhead_unfused_us','graph_replay_rel_err','kernel_vs_torch_ref_rel','kernel_vs_peft_rel_of_lora_term','peft_us','lora_graphed','lora_capture_error','peft_error')})" 2>&1 | tail -5
fi
if has bench; then
  timeout ${BENCH_S:-220} python benchmarks/ops.py --commit "$COMMIT" --out $OUT/ops.json $BENCH_ARGS > $OUT/ops.txt 2>&1
  echo "ops rc=$?"; head -1 $OUT/ops.txt; grep '"kind": "summary"' $OUT/ops.txt | python -c "
import json,sys
f=lambda v,p='%.1f': '-' if v is None else p%v
for l in sys.stdin:
    s=json.loads(l); print(s['regime'],s['order'],s['cases'],'roof geo/med',f(s['geomean_pct_roofline']),f(s['median_pct_roofline']),'worst',f(s['worst_ratio_to_floor']),s['worst_case'],'peft geo/min',f(s['geomean_speedup_vs_peft'],'%.2f'),f(s['min_speedup_vs_peft'],'%.2f'),'bmm min',f(s['min_speedup_vs_bmm'],'%.2f'),'slower',s['slower_than_a_peer'])"
fi
if has memcheck; then
  timeout ${MEMCHECK_S:-150} compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu tests/test_kernels.py tests/test_segments.py -k "${MEMCHECK_K:-odd or dora or standalone or every_adapter_token}" > $OUT/memcheck.log 2>&1
  echo "memcheck rc=$?"; tail -4 $OUT/memcheck.log
fi
if has variants; then  # A/B of launch choices (rust/src/cuda/plan.rs env overrides), one ops.py per variant
  for v in ${VARIANTS:-"default:X=1" "o1w:LORAMUX_EXPAND_OPT=1w" "c4:LORAMUX_EXPAND_TILE_COLS=4" "t512:LORAMUX_SMALL_ITEMS_MAX_T=512"}; do
    name=${v%%:*}; envs=${v#*:}
    env $envs timeout ${VAR_S:-60} python benchmarks/ops.py --grid ab --orders random --commit "$COMMIT" --out $OUT/ab-$name.json > /dev/null 2>&1
    echo "variant $name rc=$?"
  done
  python - $OUT/ab-*.json <<'PY'
import json, sys
runs = {p.split("ab-")[1][:-5]: [json.loads(l) for l in open(p)] for p in sys.argv[1:]}
keys = None
table = {}
for name, lines in runs.items():
    for w in lines:
        if w.get("kind") == "op":
            table.setdefault((w["hi"], w["ho"], w["adapters"], w["tokens"]), {})[name] = w["ours_us"]
names = sorted(runs)
for name, lines in runs.items():
    errs = [w["rel_err_vs_fp32"] for w in lines if w.get("kind") == "op"]
    print(name, "cases", len(errs), "max rel err vs fp32", max(errs) if errs else None)
print("case", *names)
for k, v in sorted(table.items()):
    print(k, *[f"{v.get(n, float('nan')):.1f}" for n in names])
PY
fi
if has ab; then
  timeout ${AB_S:-120} python benchmarks/decode_ab.py --out $OUT/ab.json > $OUT/ab.txt 2>&1
  echo "ab rc=$?"; cat $OUT/ab.txt | tail -20
fi
if has ncu; then
  timeout ${NCU_S:-120} ncu --clock-control none --kernel-name regex:lora --launch-skip 0 --launch-count 24 --section SpeedOfLight --section Occupancy --section LaunchStats python benchmarks/profile_case.py > $OUT/ncu.txt 2>&1
  echo "ncu rc=$?"; grep -E "^  lora_|Duration|DRAM Throughput|Achieved Occupancy" $OUT/ncu.txt | awk '/^  lora_/{if(k)print k,d,m,o; k=$1" "$2; d=m=o=""} /Duration/{d="dur "$NF$(NF-1)} /DRAM Throughput/{m="dram% "$NF} /Achieved Occupancy/{o="occ% "$NF} END{print k,d,m,o}' | head -30
fi
# At most 8 files come back from $OUT: the logs travel as one archive beside the JSON results.
cd $OUT && ls *.txt *.log >/dev/null 2>&1 && tar czf logs.tgz *.txt *.log && rm -f *.txt *.log
