#!/bin/bash
# One short device pass for the kernels: install the wheel, compile the kernels once, every
# gpu-marked test file in its own process (in parallel: a CUDA fault ends only its file) beside
# compute-sanitizer memcheck of the kernel and segment tests; then, alone on the GPU, the launch
# sweep (benchmarks/tune.py, its table installed for what follows), the decode step and, when time
# is left, the peer rows of ops.py; `ops` (not in the default STEPS) runs ops.py's grid $OPS_GRID;
# `decode_ab` times the decode step again with every decode apply on two kernels, then fused;
# `ab` times the step's LoRA work alone under benchmarks/decode_ab.py's variants $AB_VARIANTS;
# `ncu` profiles the fused kernel on the decode step's applies (profile_case.py --decode-step).
# OPS_AB=LORAMUX_PREFILL=legacy times each prefill case of the grid again under that environment
# (OPS_AB2: again under a second one; OPS_AB_DECODE / OPS_AB_DECODE2 the same for the decode cases).
# MEMCHECKS may name "launch" (test_launch_choices -k $MEMCHECK_LAUNCH_K). DECODE_ARGS go to
# decode_step.py (e.g. "--variants plain,m4": the step under launch variants).
# TEST_K selects tests by pytest -k in every file of FILES (a pass over what changed); TEST_SPLITS
# runs "file|expr" parts (expr goes to pytest -k; empty or no "|": the whole file), one process
# each, instead of FILES.
# Run from a tree holding tests/, benchmarks/, pyproject.toml:
#   WHEEL=path/to/loramux.whl COMMIT=sha bash benchmarks/gpu_tune_pass.sh      (results in $OUT)
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"tests memcheck tune decode peers"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
T0=$(date +%s); elapsed() { echo $(( $(date +%s) - T0 )); }
# --upgrade: on a warm machine /tmp/site may hold an earlier run's wheel, which pip would otherwise keep
pip install -q --no-index --no-deps --upgrade --target /tmp/site ${WHEEL:?} || exit 1
# the serving tests' packages (openai, uvicorn, ...; the device reaches no registry): wheels in $DEPS
DEPS=${DEPS:-.gpu/deps}; ls $DEPS/*.whl > /dev/null 2>&1 && pip install -q --no-index --no-deps --upgrade --target /tmp/site $DEPS/*.whl
export PYTHONPATH=/tmp/site
LOGS=/tmp/klogs; rm -rf $LOGS; mkdir -p $LOGS  # an earlier run's logs stay on a warm machine
python -c "import loramux, torch; from loramux import _core; print(loramux.__file__, torch.__version__, torch.cuda.get_device_name(), 'sm', _core.load_kernels(0))" 2>&1 | tee $LOGS/env.txt
python -c "import zipfile, sys; z = zipfile.ZipFile(sys.argv[1]); n = next(f for f in z.namelist() if f.endswith('.so')); sys.exit(z.read(n) != open('/tmp/site/' + n, 'rb').read())" $WHEEL && echo "installed: $(basename $WHEEL)" || echo "WARNING: /tmp/site does not hold $WHEEL"
echo "compiled at $(elapsed) s"
has tests && [ -z "$TEST_SPLITS" ] && for f in ${FILES:-test_kernels test_fused test_launch_choices test_ops test_segments test_models test_dora test_siblings test_beside test_serving_gpu test_cache_gpu test_runtime test_tp}; do
  ( timeout -s INT -k 20 ${TEST_S:-130} python -m pytest -q -m gpu -p no:cacheprovider --tb=short --durations=8 tests/$f.py ${TEST_K:+-k "$TEST_K"} > $LOGS/$f.log 2>&1
    echo "$f rc=$? $(grep -E ' passed| failed| error|no tests ran' $LOGS/$f.log | tail -1)"; grep -E "^(FAILED|ERROR)" $LOGS/$f.log | head -5 ) &
done
# TEST_SPLITS="file|expr;file|;file;...": one process per part (a long file split over several)
if has tests && [ -n "$TEST_SPLITS" ]; then
  i=0; IFS=';' read -ra parts <<< "$TEST_SPLITS"
  for part in "${parts[@]}"; do
    f=${part%%|*}; k=""; [[ "$part" == *"|"* ]] && k=${part#*|}; i=$((i + 1))
    ( timeout -s INT -k 20 ${TEST_S:-130} python -m pytest -q -m gpu -p no:cacheprovider --tb=short --durations=4 tests/$f.py ${k:+-k "$k"} > $LOGS/$f-$i.log 2>&1
      echo "$f [$k] rc=$? $(grep -E ' passed| failed| error|no tests ran' $LOGS/$f-$i.log | tail -1)"; grep -E "^(FAILED|ERROR)" $LOGS/$f-$i.log | head -5 ) &
  done
fi
MEMCHECKS=${MEMCHECKS:-"segments fused kernels"}
has memcheck && [[ " $MEMCHECKS " == *" segments "* ]] && ( timeout ${TEST_S:-130} compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu -p no:cacheprovider tests/test_segments.py > $LOGS/memcheck_segments.log 2>&1
  echo "memcheck segments rc=$? $(tail -1 $LOGS/memcheck_segments.log)" ) &
has memcheck && [[ " $MEMCHECKS " == *" fused "* ]] && ( timeout ${TEST_S:-130} compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py ${MEMCHECK_FUSED_K:+-k "$MEMCHECK_FUSED_K"} > $LOGS/memcheck_fused.log 2>&1
  echo "memcheck fused rc=$? $(tail -1 $LOGS/memcheck_fused.log)" ) &
has memcheck && [[ " $MEMCHECKS " == *" kernels "* ]] && ( timeout ${TEST_S:-130} compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "${MEMCHECK_K:-odd or dora or standalone or every_adapter_token}" > $LOGS/memcheck_kernels.log 2>&1
  echo "memcheck kernels rc=$? $(tail -1 $LOGS/memcheck_kernels.log)" ) &
has memcheck && [[ " $MEMCHECKS " == *" launch "* ]] && ( timeout ${TEST_S:-130} compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu -p no:cacheprovider tests/test_launch_choices.py -k "${MEMCHECK_LAUNCH_K:-p-300 or p1-300 or p4-1000 or p-1000}" > $LOGS/memcheck_launch.log 2>&1
  echo "memcheck launch rc=$? $(tail -1 $LOGS/memcheck_launch.log)" ) &
wait
echo "tests done at $(elapsed) s"
TABLE=/tmp/site/loramux/ops/launch_table.json
if has tune; then
  timeout ${TUNE_S:-110} python benchmarks/tune.py --out $TABLE --log $OUT/tune.jsonl --commit "$COMMIT" $TUNE_ARGS > $LOGS/tune.txt 2>&1
  echo "tune rc=$? at $(elapsed) s"; tail -3 $LOGS/tune.txt; cp $TABLE $OUT/launch_table.json
fi
if has decode; then
  timeout ${DECODE_S:-140} python benchmarks/decode_step.py --out $OUT/decode.json $DECODE_ARGS > $LOGS/decode.txt 2>&1
  echo "decode rc=$? at $(elapsed) s"; grep "overhead by variant" $LOGS/decode.txt; python -c "
import json; d=json.loads(open('$OUT/decode.json').read().splitlines()[-1])
print({k: (round(v,3) if isinstance(v,float) else v) for k,v in d.items() if k in ('base_us','lora_us','overhead_us','lora_floor_us','overhead_over_floor','overhead_beside_us','overhead_beside_over_floor','overhead_static_us','overhead_static_beside_us','beside_vs_in_order_rel','lora_beside_error','ops_only_7_per_layer_us','ops_only_4_fused_per_layer_us','overhead_unfused_us','graph_replay_rel_err','kernel_vs_torch_ref_rel','kernel_vs_peft_rel_of_lora_term','lora_capture_error','peft_error')})" 2>&1 | tail -3
fi
if has decode_ab; then  # LORAMUX_DECODE_FUSED=0: every decode apply on two kernels; =1: every one fused
  for v in 0:twokernel 1:fusedall; do
    LORAMUX_DECODE_FUSED=${v%%:*} timeout ${DECODE_S:-140} python benchmarks/decode_step.py --out $OUT/decode_${v#*:}.json > $LOGS/decode_${v#*:}.txt 2>&1
    echo "decode ${v#*:} rc=$? at $(elapsed) s"; python -c "
import json; d=json.loads(open('$OUT/decode_${v#*:}.json').read().splitlines()[-1])
print({k: (round(v,3) if isinstance(v,float) else v) for k,v in d.items() if k in ('base_us','overhead_us','lora_floor_us','overhead_over_floor','overhead_beside_us','ops_only_7_per_layer_us','ops_only_4_fused_per_layer_us')})" 2>&1 | tail -3
  done
fi
if has ab; then
  timeout ${AB_S:-150} python benchmarks/decode_ab.py --variants ${AB_VARIANTS:-fused,plain,m4} --batches ${AB_BATCHES:-32,64,1,16} --out $OUT/ab.json > $LOGS/ab.txt 2>&1
  echo "ab rc=$? at $(elapsed) s"; grep -E '^T=' $LOGS/ab.txt | sed -E 's/.rel_diff_vs_first.: ([0-9.e-]+),/d=\1/'
fi
if has ncu && [ $(elapsed) -lt ${NCU_IF_BEFORE:-420} ]; then
  timeout ${NCU_S:-90} ncu --clock-control none --kernel-name regex:lora_fused --launch-count ${NCU_COUNT:-10} --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis python benchmarks/profile_case.py --decode-step > $OUT/ncu.txt 2>&1
  echo "ncu rc=$?"; grep -E "^  lora_|Duration|DRAM Throughput|Achieved Occupancy|Grid Size|Warp Cycles Per Issued" $OUT/ncu.txt | head -60
fi
if has peers && [ $(elapsed) -lt ${PEERS_IF_BEFORE:-330} ]; then
  timeout ${PEERS_S:-80} python benchmarks/ops.py --grid peers --commit "$COMMIT" --out $OUT/peers.json > $LOGS/peers.txt 2>&1
  echo "peers rc=$? at $(elapsed) s"; grep -vE '^\{' $LOGS/peers.txt | tail -10
fi
if has ops; then  # rows are written as they come: a run cut short keeps the cases it finished
  timeout ${OPS_S:-200} python benchmarks/ops.py --grid ${OPS_GRID:-quick} --orders ${OPS_ORDERS:-random,contiguous} --commit "$COMMIT" ${OPS_AB:+--ab $OPS_AB} ${OPS_AB2:+--ab $OPS_AB2} ${OPS_AB_SMALL:+--ab-small $OPS_AB_SMALL} ${OPS_AB_DECODE:+--ab-decode $OPS_AB_DECODE} ${OPS_AB_DECODE2:+--ab-decode $OPS_AB_DECODE2} ${OPS_TOKENS:+--tokens $OPS_TOKENS} --out $OUT/ops.json > $LOGS/ops.txt 2>&1
  echo "ops rc=$? at $(elapsed) s rows $(grep -c '"kind": "op"' $OUT/ops.json)"
fi
tar czf $OUT/logs.tgz -C /tmp klogs
