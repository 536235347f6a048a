#!/usr/bin/env bash
# Issue 7 probe on a GPU machine: BASE (crop-only) and CEILING (full-view) ZoomWorld models from scratch.
#   OUT=/some/folder bash benchmarks/zoomworld_models.sh --train-n 30000 --steps 1500
# Arguments go to benchmarks/zoomworld_models.py. Missing pure-Python wheels (pydantic on the GPU
# image) are installed from build/wheels-gpu when that folder exists. $OUT gets: console.log,
# results.json, logs_evals.tar.gz (train logs, metrics, eval folders) and the two trained model
# directories (without optimizer state) as models.tar split into 15 MB parts.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
if ! python3 -c "import pydantic" 2>/dev/null && [ -d build/wheels-gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/wheels-gpu/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=${WORK:-/tmp/zoomworld}
RES=/tmp/zoomworld-out
{
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
  python3 benchmarks/zoomworld_models.py --out "$RES" --work "$WORK" "$@"
} 2>&1 | tee "$OUT/console.log"
cp "$RES/results.json" "$OUT/"
tar czf "$OUT/logs_evals.tar.gz" -C "$RES" .
tar cf - -C "$WORK/ship" . | split -b 15m - "$OUT/models.tar.part-"
ls -la "$OUT"
