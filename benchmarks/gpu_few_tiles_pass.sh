#!/bin/bash
# What limits the batches of few tiles (the T = 256..512 regime, furthest from its target, and one
# adapter at T = 16..64), measured before the next kernel change there. Parts of under 600 s each:
#   PART=1: ncu durations, DRAM throughput and grids of the shrink and expand at T = 256 / 512 over
#           1, 8 and 32 adapters (r16, r64 at one adapter); then ops.py at T = 256 / 512 against the
#           default under other shrink split targets and expand spans, the same run.
#   PART=2: shrink split targets below the sweep's floor at T = 1024 / 2048; one adapter at
#           T = 16 / 64 under other spans and splits; ncu of those.
#   WHEEL=.gpu/wNEW KCACHE=.gpu/kcNEW PART=1 bash benchmarks/gpu_few_tiles_pass.sh   (carry both dirs)
export PYTHONUNBUFFERED=1
[ -n "$KCACHE" ] && export LORAMUX_KERNEL_CACHE=$PWD/$KCACHE
pip install -q --no-index --no-deps --target /tmp/site ${WHEEL:-.gpu}/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site
python -c "import loramux, torch; print(loramux.__file__, torch.__version__, torch.cuda.get_device_name())"
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
ST=LORAMUX_SHRINK_TARGET_BLOCKS; SPAN=LORAMUX_EXPAND_SPAN_TILES
METRICS=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
ncu_cases() {  # $1: output name, $2: cases (T:n:module,...), $3: rank
  timeout 150 ncu --clock-control none --metrics $METRICS --kernel-name regex:lora \
    python benchmarks/profile_case.py --cases $2 --rank $3 > $OUT/$1.txt 2>&1
  el "$1 rc=$?"
  grep -E "^  lora_|gpu__time|dram__|grid_size|registers|warps_active" $OUT/$1.txt | head -90
}
ops_ab() {  # $1: output name, $2: seconds; the rest: ops.py's arguments
  local name=$1 secs=$2; shift 2
  timeout $secs python benchmarks/ops.py --grid quick --commit "$COMMIT" --orders random --out $OUT/$name.json "$@" \
    > $OUT/$name.log 2>&1
  el "$name rc=$?"
  python benchmarks/ab_summary.py $OUT/$name.json 2>&1 | tail -25
}
if [ "${PART:-1}" = 1 ]; then
  ncu_cases ncu-mid-r16 256:1:4,256:8:4,256:32:4,512:1:4,512:32:4 16
  ncu_cases ncu-mid-r64 256:1:4,512:8:4 64
  ops_ab ops-mid 300 --tokens 256,512 --adapters 1,8,32 \
    --ab-small $ST=66 --ab-small $ST=528 --ab-small $SPAN=2 --ab $ST=66 --ab $ST=528 --ab $SPAN=2
fi
if [ "${PART}" = 2 ]; then
  ops_ab ops-large 220 --tokens 1024,2048 --ab $ST=132 --ab $ST=66 --ab $ST=528
  ops_ab ops-one 120 --tokens 16,64 --adapters 1 --ab-decode $SPAN=2 --ab-decode $SPAN=4 \
    --ab-decode $ST=8 --ab-decode $ST=4 --ab-decode $ST=8,$SPAN=2
  ncu_cases ncu-one 64:1:4,16:1:4,2048:8:4,2048:1:4 16
fi
