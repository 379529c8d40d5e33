#!/usr/bin/env bash
# One device call: the CUDA tests, the CUDA speed benchmark and (TRAIN=1) the bundled prior's training.
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOG/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$LOG/gpu.txt" 2>&1
status=0
python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$LOG/gpu_tests.log" || status=1
python3 scripts/benchmark.py speed --device cuda --record "$LOG/speed_cuda.md" > "$LOG/bench.log" 2>&1 || status=1
if [ "${TRAIN:-1}" = 1 ]; then
    python3 scripts/train_score.py --config configs/prior/source_brain.yaml --out /tmp/prior \
        --time-limit "${TRAIN_SECONDS:-300}" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -n 200 > "$LOG/train.log" || status=1
    for f in /tmp/prior/*.safetensors /tmp/prior/*.png /tmp/prior/*.csv /tmp/prior/*.json; do
        case "$f" in *optim*) continue ;; esac
        [ -f "$f" ] && cp "$f" "$LOG/"
    done
fi
ls -la "$LOG"
exit $status
