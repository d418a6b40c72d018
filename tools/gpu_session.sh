#!/usr/bin/env bash
# The GPU measurements this project still owes, as one call of the device tool (../shared/GPU.md):
# issue 13's airbench94_muon and airbench94_hive, 25 runs each on the CIFAR-10-JPEG stand-in,
# then compare.py on the two. Every study runs under its own timeout, so that a slow compile of the
# first leaves the second its turn; a study stopped so keeps its finished runs (study.py's SIGTERM).
# What comes back in $OUT: gpu.txt (device, clocks, torch), <recipe>.log, logs/<recipe>/<study>/,
# compare.txt. Prepare the data once (GPU.md), then:
#
#   run  carry [".data"]  timeout_s 600  command: bash tools/gpu_session.sh
#
# RECIPES, RUNS, STUDY_TIMEOUT (seconds a study), DEVICE, PYTHON and STUDY_ARGS_<recipe> (--set ...)
# change what it does; with CIFAR10_DIR set, that data is used instead of the stand-in (the suite
# runs it so: on the CPU, on tiny data).
set -uo pipefail
shopt -s nullglob  # a study stopped before its log began adds no folder
: "${OUT:?OUT must name the folder to bring back (the device tool sets it)}"
RECIPES=${RECIPES:-airbench94_muon airbench94_hive}  # compare.py: the second against the first
RUNS=${RUNS:-25}
STUDY_TIMEOUT=${STUDY_TIMEOUT:-280}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}  # the device's has torch
cd "$(dirname "$0")/.."

if [ -z "${CIFAR10_DIR:-}" ]; then
    [ -f .data/decode.py ] || { echo "gpu_session.sh: no .data/decode.py; carry the stand-in as GPU.md says" >&2; exit 2; }
    "$python" .data/decode.py /tmp/c10 || exit 2
    export CIFAR10_DIR=/tmp/c10
fi
{
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/gpu.txt"

studies=()
for recipe in $RECIPES; do
    more="STUDY_ARGS_$recipe"  # study.py arguments for this recipe alone, split at spaces, never globbed
    read -ra more <<< "${!more:-}"
    timeout --signal=TERM "$STUDY_TIMEOUT" "$python" study.py "$recipe" --runs "$RUNS" --seed 0 \
        --device "$DEVICE" --log-dir "$OUT/logs" "${more[@]}" 2>&1 | tee "$OUT/$recipe.log"
    echo "gpu_session.sh: $recipe ended with status ${PIPESTATUS[0]}" | tee -a "$OUT/$recipe.log"
    studies+=("$OUT"/logs/"$recipe"/*/)
done
[ ${#studies[@]} -gt 0 ] || { echo "gpu_session.sh: no study got as far as its log; see $OUT/*.log" >&2; exit 1; }
"$python" compare.py "${studies[@]}" 2>&1 | tee "$OUT/compare.txt"
