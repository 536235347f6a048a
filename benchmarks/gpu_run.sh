#!/usr/bin/env bash
# Run one benchmark script on the GPU machine, its console kept in $OUT/console.log:
#   OUT=$OUT BUDGET=560 bash benchmarks/gpu_run.sh benchmarks/zoomworld_fast.py models --out $OUT
# Carry build/wheels-gpu (gpu_env.sh says how to make it).
# The script runs under `timeout $BUDGET` (seconds) so that what it wrote still comes back.
set -uo pipefail  # not -e: whatever happens, the console comes back
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
source benchmarks/gpu_env.sh
{
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  timeout -s INT "${BUDGET:-560}" python3 "$@"
  echo "exit $?"; date -u
} 2>&1 | grep -v -E "UserWarning|warnings.warn|^USDT" | tee "$OUT/console.log"
# $OUT/logs (many small files) comes back as one archive: a call returns at most 8 files.
[ -d "$OUT/logs" ] && tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -la "$OUT"
