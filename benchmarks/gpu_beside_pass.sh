#!/bin/bash
# The device pass that gates the beside merge (cuda/lora_merge.cu), in parts of well under 600 s
# each (PART unset runs 1 and 2):
#   PART=1: its tests; the decode step in order, beside, and both as a static batch at batch 32, in
#           order and beside at 8, 64 and 128; memcheck of the op tests (the decision, first).
#   PART=2: the kernel GPU test files three at a time, then the model and serving files again with
#           LORAMUX_LORA_BESIDE_BASE=1.
#   PART=3: the decode step at 32 with the side stream at high priority; the step's timeline in
#           order and beside (benchmarks/step_timeline.py).
#   WHEEL=.gpu/w21b KCACHE=.gpu/kc21b PART=1 bash benchmarks/gpu_beside_pass.sh   (carry both dirs)
export PYTHONUNBUFFERED=1
[ -n "$KCACHE" ] && export LORAMUX_KERNEL_CACHE=$PWD/$KCACHE
pip install -q --no-index --no-deps --target /tmp/site ${WHEEL:-.gpu}/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site
python -c "import loramux, torch; print(loramux.__file__, torch.cuda.get_device_name())"
run() {  # $1: test file, $2: seconds, $3: log name (default: the file's)
  local log=$OUT/${3:-$1}.log
  timeout -s INT -k 20 $2 python -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/$1.py > $log 2>&1
  echo "${3:-$1} rc=$? $(grep -E ' passed| failed| error' $log | tail -1)"
  grep -E '^(FAILED|ERROR)' $log | head -5
}
decode() {  # $1: output name, $2: decode_step.py's extra arguments; the rest: environment for the run
  local name=$1 extra=$2; shift 2
  env "$@" timeout ${DECODE_S:-280} python benchmarks/decode_step.py $extra --out $OUT/$name.json > $OUT/$name.log 2>&1
  echo "$name rc=$?"
  python - $OUT/$name.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ("base_us", "overhead_us", "overhead_over_floor", "overhead_beside_us", "overhead_beside_over_floor", "beside_vs_in_order_rel",
        "overhead_static_us", "overhead_static_beside_us", "ops_only_4_fused_per_layer_us", "graph_replay_rel_err",
        "kernel_vs_peft_rel_of_lora_term", "lora_beside_error", "lora_static_beside_error", "beside_by_batch")
print({k: d.get(k) for k in keys})
PY
}
if [ "${PART:-1}" = 1 ]; then
run test_beside 150
decode decode "--batches 8,64,128" LORAMUX_SIDE_STREAM_PRIORITY=normal
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu -p no:cacheprovider tests/test_beside.py -k op > $OUT/memcheck.log 2>&1
echo "memcheck rc=$?"; tail -2 $OUT/memcheck.log
fi
if [ "${PART}" = 3 ]; then
  DECODE_S=250 decode decode-high --no-peft LORAMUX_SIDE_STREAM_PRIORITY=high
  timeout 300 python benchmarks/step_timeline.py --modes base,in_order,beside --out $OUT/timeline.json > $OUT/timeline.log 2>&1
  echo "timeline rc=$?"; tail -4 $OUT/timeline.log | cut -c1-1500
  exit 0
fi
[ "${PART:-2}" = 2 ] || exit 0
for f in ${FILES:-test_kernels test_launch_choices test_segments test_ops test_siblings test_models test_serving_gpu test_fused}; do
  while [ "$(jobs -rp | wc -l)" -ge 3 ]; do sleep 1; done
  run $f ${TEST_S:-170} &
done
# the model and serving paths with every projection's branch beside its GEMM (the serving graphs'
# static batches merged by lora_merge.cu), as the default would run them if it turns on
for f in test_siblings test_models test_serving_gpu; do
  while [ "$(jobs -rp | wc -l)" -ge 3 ]; do sleep 1; done
  LORAMUX_LORA_BESIDE_BASE=1 run $f ${TEST_S:-170} $f-beside &
done
wait
