#!/bin/bash
# One GPU pass for the adapter cache: the gpu-marked cache tests, then benchmarks/cache_gpu.py
# (JSON lines + table); logs to $OUT. Run from the repository root of the GPU machine with .gpu
# (the wheel) and .gpuwork (copies of tests/ and benchmarks/) carried.
export PYTHONUNBUFFERED=1
pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site
cd .gpuwork
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout ${TEST_S:-180} python -m pytest -q -m gpu tests/test_cache_gpu.py > $OUT/cache_pytest.log 2>&1
echo "cache pytest rc=$?"; tail -20 $OUT/cache_pytest.log | grep -vE "^\s*$"
timeout ${BENCH_S:-180} python benchmarks/cache_gpu.py $CACHE_BENCH_ARGS > $OUT/cache_gpu.txt 2>&1
echo "cache_gpu rc=$?"; tail -20 $OUT/cache_gpu.txt
