#!/bin/bash
# GPU pass for the model integration: the gpu-marked tests of test_ops / test_models / test_runtime
# (PEFT parity on CUDA, fp32 on the reference, bf16 through loramux.ops.kernels) and the whole-model
# generate benchmark. From the repo root, with an abi3 wheel in .gpu/models (carried):
#   maturin build --release -o .gpu/models     # on the dev machine
#   run: bash benchmarks/gpu_models.sh         # carry .gpu/models; logs in $OUT
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/models/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import loramux, loramux.ops.kernels as k, torch, transformers, peft; print(loramux.__file__, 'kernels', k.available(), torch.__version__, transformers.__version__, peft.__version__)"
timeout ${TEST_S:-140} python3 -m pytest -q -m gpu tests/test_ops.py tests/test_models.py tests/test_runtime.py tests/test_siblings.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_models_tests.log" | tail -40
timeout ${BENCH_S:-120} python3 benchmarks/model_generate.py --repeats 2 $BENCH_ARGS 2>&1 | grep -v -i warn \
  | tee "$OUT/model_generate.log"
