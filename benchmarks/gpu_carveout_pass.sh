#!/bin/bash
# Whether the base GEMM should leave SMs to its LoRA branch beside it (LORAMUX_BESIDE_SM_CARVEOUT,
# python/loramux/ops/gemm_carveout.py), in one call of about 300 s: the beside op tests (the
# carveout's among them), then the decode step at batch 32 with 0 / 8 / 16 / 32 SMs kept from the
# GEMM (each with --batches 8,64), the default again last (its spread), and the step's timeline at 16.
#   WHEEL=.gpu/wNEW KCACHE=.gpu/kcNEW bash benchmarks/gpu_carveout_pass.sh   (carry both dirs)
export PYTHONUNBUFFERED=1
[ -n "$KCACHE" ] && export LORAMUX_KERNEL_CACHE=$PWD/$KCACHE
pip install -q --no-index --no-deps --target /tmp/site ${WHEEL:-.gpu}/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site
python -c "import loramux, torch; print(loramux.__file__, torch.__version__, torch.cuda.get_device_name())"
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_beside.py tests/test_gemm_carveout.py > $OUT/tests.log 2>&1
el "tests rc=$? $(grep -E ' passed| failed| error' $OUT/tests.log | tail -1)"; grep -E '^(FAILED|ERROR)' $OUT/tests.log | head -5
for sms in 0 8 16 32 0b; do
  LORAMUX_BESIDE_SM_CARVEOUT=${sms%b} timeout 100 python benchmarks/decode_step.py --no-peft --batches 8,64 --commit "$(git rev-parse --short HEAD 2>/dev/null)" \
    --out $OUT/decode-carve$sms.json > $OUT/decode-carve$sms.log 2>&1
  el "carveout $sms rc=$?"
  python - $OUT/decode-carve$sms.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ("switches", "base_us", "overhead_us", "overhead_beside_us", "overhead_beside_over_floor", "overhead_static_beside_us",
        "beside_vs_in_order_rel", "beside_by_batch")
print({k: d.get(k) for k in keys})
PY
done
LORAMUX_BESIDE_SM_CARVEOUT=16 timeout 120 python benchmarks/step_timeline.py --modes base,beside --out $OUT/timeline-carve16.json > $OUT/timeline.log 2>&1
el "timeline rc=$?"; tail -3 $OUT/timeline.log | cut -c1-1200
