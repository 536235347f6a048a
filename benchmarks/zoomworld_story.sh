#!/usr/bin/env bash
# Issues 7 and 8 on one GPU machine, in one call: ZoomWorld BASE, then CEILING and Vision-OPD variants
# from BASE side by side (benchmarks/zoomworld_models.py), evaluated in both views.
#   OUT=/some/folder MODELS_ARGS="--base-seconds 180 --opd-variant plain=lr=1e-4" bash benchmarks/zoomworld_story.sh
# Missing pure-Python wheels (pydantic on the GPU image) are installed from build/wheels-gpu. $OUT gets:
# console.log, results.json, logs.tar.gz (train logs, metrics, eval folders) and the
# BASE, CEILING and first-seed OPD model directories (bf16 copies, see ship_bf16 below) as models.tar.
set -uo pipefail  # not -e: whatever happens, the logs and what was trained come back
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
  python3 benchmarks/zoomworld_models.py --out "$RES/models" --work "$WORK" ${MODELS_ARGS:-}
} 2>&1 | tee "$OUT/console.log"
cp "$RES/models/results.json" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$RES" .
python3 benchmarks/ship_bf16.py "$WORK/ship" /tmp/ship-bf16
tar cf - -C /tmp/ship-bf16 . | split -b 15m - "$OUT/models.tar.part-"
ls -la "$OUT"
