#!/usr/bin/env bash
# One device pass over the decode paths (T <= 64) in a tight device budget: the tests of what the
# decode kernels touch, each file in its own process with its own -k, beside compute-sanitizer
# memchecks; then the decode step with its launch variants re-captured ($DECODE_VARIANTS), the LoRA
# work alone under decode_ab.py's variants ($AB_VARIANTS), the ops grid's decode rows timed under
# $OPS_AB_DECODE beside the default, and ncu over the decode step's fused applies while time is
# left. Run from a tree holding tests/, benchmarks/, pyproject.toml:
#   WHEEL=path/to/loramux.whl COMMIT=sha bash benchmarks/gpu_decode_pass.sh      (results in $OUT)
export PYTHONUNBUFFERED=1
T0=$(date +%s); elapsed() { echo $(( $(date +%s) - T0 )); }
pip install -q --no-index --no-deps --target /tmp/site ${WHEEL:?} || exit 1
export PYTHONPATH=/tmp/site
L=/tmp/klogs; mkdir -p $L
python -c "import loramux, torch; from loramux import _core; print(torch.__version__, torch.cuda.get_device_name(), 'sm', _core.load_kernels(0))"
echo "compiled at $(elapsed) s"
TS=${TEST_S:-100}
PT="python -m pytest -q -m gpu -p no:cacheprovider --tb=short"
MC="compute-sanitizer --tool memcheck --error-exitcode 9"
run() {  # name, then the command: its log, rc and summary line
  local name=$1; shift
  ( timeout -s INT -k 15 $TS "$@" > $L/$name.log 2>&1; echo "$name rc=$? $(grep -E ' passed| failed| error|no tests ran|ERROR SUMMARY' $L/$name.log | tail -1)"
    grep -E "^(FAILED|ERROR)" $L/$name.log | head -5 ) &
}
run fused $PT tests/test_fused.py
run segments $PT tests/test_segments.py
run kernels $PT tests/test_kernels.py -k "${KERNELS_K:-not long_prefill}"
run launch $PT tests/test_launch_choices.py -k "${LAUNCH_K:-fused or flat or o1 or o4}"
run mc_fused $MC $PT tests/test_fused.py -k "${MC_FUSED_K:-item_count or graph or host_planned or workspace}"
run mc_segments $MC $PT tests/test_segments.py
run mc_kernels $MC $PT tests/test_kernels.py -k "${MC_KERNELS_K:-odd or dora or standalone or graph or mixed_ranks and not 300}"
wait
echo "tests done at $(elapsed) s"
timeout ${DECODE_S:-60} python benchmarks/decode_step.py --out $OUT/decode.json ${DECODE_VARIANTS:+--variants $DECODE_VARIANTS} > $L/decode.txt 2>&1
echo "decode rc=$? at $(elapsed) s"; grep -E "overhead|floor|variant" $L/decode.txt | tail -8
timeout ${AB_S:-35} python benchmarks/decode_ab.py --variants ${AB_VARIANTS:-fused,hostsplit} --batches ${AB_BATCHES:-32,64} --out $OUT/ab.json > $L/ab.txt 2>&1
echo "ab rc=$? at $(elapsed) s"; grep -E '^T=' $L/ab.txt | sed -E 's/.rel_diff_vs_first.: ([0-9.e-]+),/d=\1/'
timeout ${OPS_S:-50} python benchmarks/ops.py --grid quick --tokens ${OPS_TOKENS:-16,64} --orders random --commit "$COMMIT" \
  ${OPS_AB_DECODE:+--ab-decode $OPS_AB_DECODE} --out $OUT/ops.json > $L/ops.txt 2>&1
echo "ops rc=$? at $(elapsed) s rows $(grep -c '"kind": "op"' $OUT/ops.json)"
if [ $(elapsed) -lt ${NCU_IF_BEFORE:-260} ]; then
  timeout ${NCU_S:-40} ncu --clock-control none --kernel-name regex:lora_fused --launch-count 10 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats python benchmarks/profile_case.py --decode-step > $OUT/ncu.txt 2>&1
  echo "ncu rc=$? at $(elapsed) s"; grep -E "^  lora_|Duration|DRAM Throughput|Achieved Occupancy|Grid Size|Registers Per" $OUT/ncu.txt | head -30
fi
tar czf $OUT/logs.tgz -C /tmp klogs
