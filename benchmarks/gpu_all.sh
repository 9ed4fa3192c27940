#!/bin/bash
# One GPU pass over everything but the kernel grid (benchmarks/gpu_pass.sh has that): the wheel in
# .gpu installed into /tmp/site, every gpu-marked test file in its own process (a CUDA fault ends
# only its file), the put and serving benchmarks. STEPS picks: tests put serving. Logs: $OUT/logs.tgz.
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"tests put serving"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site
LOGS=/tmp/logs; mkdir -p $LOGS
python -c "import loramux, torch; print(loramux.__file__, torch.__version__, torch.cuda.get_device_name())" | tee $LOGS/env.txt
if has tests; then
  for f in ${FILES:-test_cache_gpu test_kernels test_ops test_segments test_siblings test_models test_runtime test_dora test_tp test_serving_gpu}; do
    timeout ${TEST_S:-100} python -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/$f.py > $LOGS/$f.log 2>&1
    echo "$f rc=$? $(grep -E ' passed| failed| error' $LOGS/$f.log | tail -1)"
    grep -E "^(FAILED|ERROR)" $LOGS/$f.log | head -6
  done
fi
if has put; then
  timeout ${PUT_S:-60} python benchmarks/cache_put.py > $LOGS/cache_put.log 2>&1
  echo "cache_put rc=$?"; tail -7 $LOGS/cache_put.log
fi
if has serving; then
  timeout ${SERVE_S:-200} python benchmarks/serving.py --device cuda --model llama1b ${SERVE_ARGS} --out $OUT/serving_h200_llama1b.json > $LOGS/serving.log 2>&1
  echo "serving rc=$?"; tail -12 $LOGS/serving.log
fi
tar czf $OUT/logs.tgz -C /tmp logs
