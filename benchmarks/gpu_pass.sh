#!/bin/bash
# One GPU pass (see docs/kernel-notes.md): install the wheel, check, test, benchmark; logs to $OUT.
# Run from the repository root of the GPU machine with .gpu (the wheel) and .gpuwork (tests,
# benchmarks) carried. STEPS picks what runs: any of env test ab bench decode ncu memcheck.
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"env test bench decode"}
pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site
cd .gpuwork
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has env; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv > $OUT/env.txt
  python -c "import loramux,torch;from loramux.ops import kernels;from loramux import _core;print(loramux.__file__,_core.__file__,torch.__version__,kernels.nvrtc_library(),_core.nvrtc_version(),kernels.available());print('arch',_core.load_kernels(0))" >> $OUT/env.txt 2>&1
  cat $OUT/env.txt
fi
if has test; then
  timeout ${TEST_S:-150} python -m pytest -q --maxfail=8 -m gpu tests/test_kernels.py > $OUT/pytest.log 2>&1
  echo "pytest rc=$?"; tail -40 $OUT/pytest.log | grep -vE "^\s*$" | tail -25
fi
if has ab; then
  timeout ${AB_S:-120} python benchmarks/decode_ab.py --out $OUT/ab.json > $OUT/ab.txt 2>&1
  echo "ab rc=$?"; cat $OUT/ab.txt | tail -20
fi
if has bench; then
  timeout ${BENCH_S:-220} python benchmarks/ops.py --out $OUT/ops.json $BENCH_ARGS > $OUT/ops.txt 2>&1
  echo "ops rc=$?"; head -1 $OUT/ops.txt; tail -2 $OUT/ops.txt
  python benchmarks/plot.py $OUT/ops.json $OUT/roofline.png; echo "plot rc=$?"
fi
if has decode; then
  timeout ${DECODE_S:-150} python benchmarks/decode_step.py --out $OUT/decode.json > $OUT/decode.txt 2>&1
  echo "decode rc=$?"; tail -30 $OUT/decode.txt
fi
if has ncu; then
  timeout ${NCU_S:-120} ncu --kernel-name regex:lora --launch-skip 2 --launch-count 5 --section SpeedOfLight --section Occupancy --section LaunchStats python benchmarks/profile_case.py > $OUT/ncu.txt 2>&1
  echo "ncu rc=$?"; grep -E "lora_|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" $OUT/ncu.txt | head -40
fi
if has memcheck; then
  timeout ${MEMCHECK_S:-150} compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -m gpu tests/test_kernels.py -k "${MEMCHECK_K:-odd or dora or standalone}" >> $OUT/pytest.log 2>&1
  echo "memcheck rc=$?"; tail -4 $OUT/pytest.log
fi
