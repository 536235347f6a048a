#!/usr/bin/env bash
# Issue 9's measurement in one device call (under 10 minutes): compiled blocks
# (zoomless.models.compiled) with bf16 weights and fp32 masters (train/master.py) against the eager
# steps, on one GPU, at the Qwen2.5-VL-3B shape.
#   OUT=$OUT bash benchmarks/perf_compile_gpu.sh        # carry build/wheels-gpu (gpu_env.sh says how to make it)
# A: 1 prompt x 8 rollouts (the shape of the earlier tables), Vision-OPD and GRPO steps with bf16
#    weights + fp32 masters, eager, compiled in parts (as measured on 2026-12-07), compiled with
#    whole decoder layers and vision blocks in parts (opd-master-compiled-layers), compiled with
#    whole decoder layers and vision blocks (opd-master-compiled, the default), and the same with the
#    last decoder layers not checkpointed (opd-master-compiled-keep), with profiles (VARIANTS= picks
#    others, such as hf-plain,opd,opd-bf16,opd-bf16-aligned-fused-compiled). B: 4 prompts x 8 rollouts in
#    micro-batches of 16, eager vs compiled (VARIANTS4=): do larger kernels (fewer launches per
#    token) lift MFU? SYNCS=1: the same steps with 200 of 245 host syncs removed (see below).
# Each run stops at its time budget and keeps what it measured; everything comes back as
# $OUT/perf.tar (a call returns at most 8 files), packed again after each run.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
source benchmarks/gpu_env.sh
TOTAL=${TOTAL:-560}  # seconds for both runs
EXTRA=${EXTRA:-}     # more perf_3b.py arguments; EXTRA=--tiny is a CPU smoke test of this script
VARIANTS=${VARIANTS:-opd-master,opd-master-compiled-parts,opd-master-compiled-layers,opd-master-compiled,opd-master-compiled-keep,grpo-master,grpo-master-compiled}
VARIANTS4=${VARIANTS4:-opd-master,opd-master-compiled}  # the second run's
SECOND=${SECOND:-1}  # 0: no 4-prompt run
SYNCS=${SYNCS:-0}    # 1: also VARIANTS_SYNCS with benchmarks/patches/host-syncs.patch applied (below)
VARIANTS_SYNCS=${VARIANTS_SYNCS:-opd-master,opd-master-compiled}
RES=/tmp/zl-perf-results  # the runs write here; $OUT gets only perf.tar
rm -rf "$RES" && mkdir -p "$RES"
pack() {  # after each run, so that a call cut short at its limit still returns what ran before
  tar cf "$OUT/perf.tar.tmp" -C "$RES" $(cd "$RES" && ls -d perf1 perfs perf4 2>/dev/null) && mv "$OUT/perf.tar.tmp" "$OUT/perf.tar"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 benchmarks/perf_3b.py --out "$RES/perf1" --parts train --time-budget $((TOTAL * 3 / 4)) $EXTRA \
  --variants "$VARIANTS" \
  2>&1 | grep -v -E "^ {6,}[0-9.]+ ms|UserWarning|warnings.warn"
pack
# The patch (commit e0dceea, reverted in 7c0ee3a) builds the M-RoPE position ids and the shared-image
# gathers on the CPU: 245 -> 45 host syncs per step. Eager steps did not get faster (H200,
# 2026-12-06); compiled ones leave the CPU waiting in those syncs (145 ms per step, 2026-12-07).
left=$((TOTAL - SECONDS))
if [ "$SYNCS" = 1 ] && [ "$left" -gt 90 ]; then
  rm -rf /tmp/zl-syncs && mkdir -p /tmp/zl-syncs && cp -r src benchmarks tests /tmp/zl-syncs/ \
    && (cd /tmp/zl-syncs && patch -s -p1 < benchmarks/patches/host-syncs.patch \
    && python3 benchmarks/perf_3b.py --out "$RES/perfs" --work /tmp/zoomless-perf3b-s --parts train \
    --variants "$VARIANTS_SYNCS" --time-budget $((left * 3 / 5)) $EXTRA \
    2>&1 | grep -v -E "^ {6,}[0-9.]+ ms|UserWarning|warnings.warn" | tail -40)
  pack
fi
left=$((TOTAL - SECONDS))
if [ "$SECOND" = 1 ] && [ "$left" -gt 60 ]; then
  python3 benchmarks/perf_3b.py --out "$RES/perf4" --work /tmp/zoomless-perf3b-4 --parts train --prompts 4 \
    --micro 16 --variants "$VARIANTS4" --no-profile --time-budget "$left" $EXTRA \
    2>&1 | grep -v -E "UserWarning|warnings.warn" | tail -20
fi
pack
