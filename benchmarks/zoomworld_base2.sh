#!/usr/bin/env bash
# ZoomWorld BASE, second try, on a GPU machine (see benchmarks/zoomworld_base2.py):
#   OUT=/some/folder SRC=build/head-src/src bash benchmarks/zoomworld_base2.sh --train-seconds 330
# SRC: the package source to run (default src). The pure-Python wheels the GPU image lacks
# (pydantic) are installed from build/wheels-gpu, as in zoomworld_story.sh. $OUT gets
# console.log, results.json, logs.tar.gz and the model as model.tar.part-* (15 MB parts). The
# Python script runs under `timeout $BUDGET` so that the results are packed whatever happens.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
if ! python3 -c "import pydantic" 2>/dev/null && [ -d build/wheels-gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/wheels-gpu/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${SRC:-src}:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RES=/tmp/zoomworld2-out
{
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pydantic, zoomless; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__, 'zoomless from', zoomless.__file__)"
  timeout -s INT "${BUDGET:-500}" python3 benchmarks/zoomworld_base2.py --res "$RES" --ship "$OUT" "$@"
  echo "exit $?"; date -u
} 2>&1 | tee "$OUT/console.log"
cp "$RES/results.json" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$RES" . 2>/dev/null
ls -la "$OUT"
