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
# BASE=build/head (a tree with benchmarks/ and src/ of another commit, carried along; made with
#   rm -rf build/head && mkdir -p build/head && git archive HEAD benchmarks src | tar -x -C build/head)
#   first runs VARIANTS_BASE of that tree at A's shape, and at B's shape VARIANTS4B_BASE: the
#   baseline on the same machine (perf1-base, perf4b-base).
# VARIANTS_ALT (empty: none) runs those variants at A's shape once more with the environment
#   ALT_ENV (perf1-alt): PERF_GC=per-step (the old garbage collector),
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the caching allocator without its retries).
# First, the GPU branches of the tests a CPU skips (-k cuda: the flash kernels fast_vision calls
#   itself, the bf16 EMA teacher's compiled update, the masters' chunked step), into perf-gputests/
#   (GPUTESTS=0: not run).
# Each run stops at its time budget and keeps what it measured; everything comes back as
# $OUT/perf.tar (a call returns at most 8 files), packed again after each run.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
TOTAL=${TOTAL:-560}  # seconds for all runs
EXTRA=${EXTRA:-}     # more perf_3b.py arguments; EXTRA=--tiny is a CPU smoke test of this script
VARIANTS=${VARIANTS:-opd-master,opd-master-compiled,opd-master-compiled-keep,grpo-master,grpo-master-compiled}
SHAPE4B=${SHAPE4B:-1}  # 0: no Qwen3-VL-4B run
VARIANTS4B=${VARIANTS4B:-grpo-master,grpo-master-compiled}
SECOND=${SECOND:-1}  # 0: no 4-prompt run
VARIANTS4=${VARIANTS4:-opd-master,opd-master-compiled}  # the 4-prompt run's
BASE=${BASE:-}  # a baseline tree (see above); empty: none
VARIANTS_BASE=${VARIANTS_BASE:-opd-master-compiled,grpo-master-compiled}
VARIANTS4B_BASE=${VARIANTS4B_BASE:-grpo-master-compiled}
VARIANTS_ALT=${VARIANTS_ALT:-}
ALT_ENV=${ALT_ENV:-}
GPUTESTS=${GPUTESTS:-1}
STEPS=${STEPS:-4}  # timed steps per variant (2-step medians moved by 10-40% with variant order)
RES=/tmp/zl-perf-results  # the runs write here; $OUT gets only perf.tar
rm -rf "$RES" && mkdir -p "$RES"
pack() {  # after each run, so that a call cut short at its limit still returns what ran before
  tar cf "$OUT/perf.tar.tmp" -C "$RES" $(cd "$RES" && ls -d perf* 2>/dev/null) && mv "$OUT/perf.tar.tmp" "$OUT/perf.tar"
}
perf() {  # perf() TREE NAME ARGS...: perf_3b.py of TREE (its own src first), results in $RES/NAME
  local tree=$1 name=$2
  shift 2
  (cd "$tree" && PYTHONPATH="$PWD/src:$PYTHONPATH" python3 benchmarks/perf_3b.py --out "$RES/$name" --parts train \
    --steps "$STEPS" "$@" $EXTRA 2>&1 | grep -v -E "^ {6,}[0-9.]+ ms|UserWarning|warnings.warn" | tail -60)
  pack
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [ "$GPUTESTS" = 1 ]; then
  mkdir -p "$RES/perf-gputests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fast_vision.py tests/test_train_common.py tests/test_master.py -k cuda \
    2>&1 | tail -20 \
    | tee "$RES/perf-gputests/pytest.txt"
  pack
fi
if [ -n "$BASE" ]; then
  perf "$BASE" perf1-base --variants "$VARIANTS_BASE" --no-profile --time-budget $((TOTAL / 5))
fi
perf . perf1 --variants "$VARIANTS" --time-budget $((TOTAL * 2 / 5 - SECONDS / 2))
if [ -n "$VARIANTS_ALT" ]; then
  (export $ALT_ENV && perf . perf1-alt --variants "$VARIANTS_ALT" --no-profile --time-budget $((TOTAL / 5)))
fi
left=$((TOTAL - SECONDS))
if [ "$SHAPE4B" = 1 ] && [ "$left" -gt 90 ]; then
  if [ -n "$BASE" ]; then
    perf "$BASE" perf4b-base --shape qwen3-vl-4b --work /tmp/zoomless-perf3b-4b --variants "$VARIANTS4B_BASE" \
      --no-profile --time-budget $((left * 2 / 5))
  fi
  left=$((TOTAL - SECONDS))
  [ "$SECOND" = 1 ] && left=$((left / 2))
  perf . perf4b --shape qwen3-vl-4b --work /tmp/zoomless-perf3b-4b --variants "$VARIANTS4B" --time-budget "$left"
fi
left=$((TOTAL - SECONDS))
if [ "$SECOND" = 1 ] && [ "$left" -gt 60 ]; then
  perf . perf4 --work /tmp/zoomless-perf3b-4 --prompts 4 --micro 16 --variants "$VARIANTS4" --no-profile \
    --time-budget "$left"
fi
