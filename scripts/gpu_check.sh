#!/usr/bin/env bash
# One device call: the CUDA tests, the CUDA speed and memory benchmarks and (TRAIN=1) the bundled prior's training.
# Logs and results go to $OUT (the device tool's return folder) or ./gpu_logs.
#   bash scripts/gpu_check.sh                 # tests + benchmark + 300 s of prior training
#   TRAIN=0 bash scripts/gpu_check.sh         # tests + benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-gpu_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # packages missing on the device travel as wheels (see docs/results/speed.md)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOG/gpu_tests.log" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$LOG/gpu_tests.log" 2>&1
status=0
python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee -a "$LOG/gpu_tests.log" || status=1
python3 scripts/benchmark.py speed --device cuda --record "$LOG/speed_cuda.md" > "$LOG/bench.log" 2>&1 || status=1
python3 scripts/benchmark.py memory --device cuda --cuda-limit-gb 8 --record "$LOG/memory_cuda.md" >> "$LOG/bench.log" 2>&1 || status=1
if [ "${TRAIN:-1}" = 1 ]; then
    python3 scripts/train_score.py --config configs/prior/source_brain.yaml --out /tmp/prior --no-progress \
        --time-limit "${TRAIN_SECONDS:-300}" > "$LOG/train.log" 2>&1 || status=1
    # the device tool brings back at most 8 files: the weights, the latest sample grid, the curve, the rest as a tarball
    cp /tmp/prior/checkpoint.safetensors /tmp/prior/loss_curve.png "$LOG/" 2>/dev/null
    latest=$(ls /tmp/prior/samples_*.png 2>/dev/null | sort | tail -n 1)
    [ -n "$latest" ] && cp "$latest" "$LOG/samples.png"
    tar -czf "$LOG/prior_run.tar.gz" -C /tmp/prior config.yaml loss.csv $(cd /tmp/prior && ls samples_*.png) 2>/dev/null
fi
ls -la "$LOG"
exit $status
