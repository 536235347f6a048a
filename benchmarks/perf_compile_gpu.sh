#!/usr/bin/env bash
# Issue 9's measurement in one device call (under 10 minutes): compiled blocks
# (zoomless.models.compiled) with bf16 weights and fp32 masters (train/master.py) against the eager
# steps, on one GPU, at the Qwen2.5-VL-3B shape.
#   OUT=$OUT bash benchmarks/perf_compile_gpu.sh        # carry build/wheels-gpu (gpu_env.sh says how to make it)
# A: 1 prompt x 8 rollouts (the shape of the earlier tables), Vision-OPD and GRPO steps with bf16
#    weights + fp32 masters, eager, compiled with whole decoder layers and vision blocks
#    (opd-master-compiled, the default), and the same with the last decoder layers not checkpointed
#    (opd-master-compiled-keep), with profiles (VARIANTS= picks others, such as hf-plain,
#    opd-master-compiled-parts, opd-master-compiled-layers). B: the same at the Qwen3-VL-4B shape
#    (SHAPE4B=0: not run), GRPO only by default: the 4B Vision-OPD step does not fit 80 GB with
#    bf16_weights (2026-12-07). C: 4 prompts x 8 rollouts in micro-batches of 16 (SECOND=0: not run).
# Each run stops at its time budget and keeps what it measured; everything comes back as
# $OUT/perf.tar (a call returns at most 8 files), packed again after each run.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
source benchmarks/gpu_env.sh
TOTAL=${TOTAL:-560}  # seconds for all runs
EXTRA=${EXTRA:-}     # more perf_3b.py arguments; EXTRA=--tiny is a CPU smoke test of this script
VARIANTS=${VARIANTS:-opd-master,opd-master-compiled,opd-master-compiled-keep,grpo-master,grpo-master-compiled}
SHAPE4B=${SHAPE4B:-1}  # 0: no Qwen3-VL-4B run
VARIANTS4B=${VARIANTS4B:-grpo-master,grpo-master-compiled}
SECOND=${SECOND:-1}  # 0: no 4-prompt run
VARIANTS4=${VARIANTS4:-opd-master,opd-master-compiled}  # the 4-prompt run's
RES=/tmp/zl-perf-results  # the runs write here; $OUT gets only perf.tar
rm -rf "$RES" && mkdir -p "$RES"
pack() {  # after each run, so that a call cut short at its limit still returns what ran before
  tar cf "$OUT/perf.tar.tmp" -C "$RES" $(cd "$RES" && ls -d perf1 perf4b perf4 2>/dev/null) && mv "$OUT/perf.tar.tmp" "$OUT/perf.tar"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 benchmarks/perf_3b.py --out "$RES/perf1" --parts train --time-budget $((TOTAL / 2)) $EXTRA \
  --variants "$VARIANTS" \
  2>&1 | grep -v -E "^ {6,}[0-9.]+ ms|UserWarning|warnings.warn"
pack
left=$((TOTAL - SECONDS))
if [ "$SHAPE4B" = 1 ] && [ "$left" -gt 90 ]; then
  python3 benchmarks/perf_3b.py --shape qwen3-vl-4b --out "$RES/perf4b" --work /tmp/zoomless-perf3b-4b --parts train \
    --variants "$VARIANTS4B" --steps 4 --time-budget $((left * 3 / 5)) $EXTRA \
    2>&1 | grep -v -E "^ {6,}[0-9.]+ ms|UserWarning|warnings.warn" | tail -40
  pack
fi
left=$((TOTAL - SECONDS))
if [ "$SECOND" = 1 ] && [ "$left" -gt 60 ]; then
  python3 benchmarks/perf_3b.py --out "$RES/perf4" --work /tmp/zoomless-perf3b-4 --parts train --prompts 4 \
    --micro 16 --variants "$VARIANTS4" --no-profile --time-budget "$left" $EXTRA \
    2>&1 | grep -v -E "UserWarning|warnings.warn" | tail -20
fi
pack
