#!/usr/bin/env bash
# The GPU measurements this project still owes, as one call of the device tool (../shared/GPU.md):
# issue 13's airbench94_muon and airbench94_hive, 25 runs each on the CIFAR-10-JPEG stand-in, then
# compare.py on the two. The studies share one deadline: each may use what is left of it divided by
# the studies still to run, so a fast first study leaves the second more, and a study stopped at its
# limit keeps its finished runs (study.py's SIGTERM). What comes back in $OUT: gpu.txt (device,
# clocks, torch), <recipe>.log (with the warm-up's compile time), logs/<recipe>/<study>/, compare.txt.
# Prepare the data once (GPU.md), then:
#
#   run  carry [".data"]  timeout_s 600  command: bash tools/gpu_session.sh
#
# Settings: RECIPES (names of this folder's recipes; compare.py sets the second against the first),
# RUNS, SECONDS_FOR_STUDIES (the shared deadline), DEVICE, PYTHON, and STUDY_ARGS_<recipe> (more
# study.py arguments for that recipe, split at spaces: --set opt.lr=9.5, values written without
# spaces). With CIFAR10_DIR set, that data is used instead of the stand-in (the suite runs it so, on
# the CPU, on tiny data). The status is 1 when a study did not complete.
set -uo pipefail
shopt -s nullglob  # a study stopped before its log began adds no folder
: "${OUT:?OUT must name the folder to bring back (the device tool sets it)}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
RECIPES=${RECIPES:-airbench94_muon airbench94_hive}
RUNS=${RUNS:-25}
SECONDS_FOR_STUDIES=${SECONDS_FOR_STUDIES:-540}  # of a 600-second call: decoding and compare.py need less
DEVICE=${DEVICE:-cuda}
python=${PYTHON:-python3}  # the device's has torch
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 2

if [ -z "${CIFAR10_DIR:-}" ]; then
    if [ ! -f .data/decode.py ]; then
        echo "gpu_session.sh: no .data/decode.py; carry the stand-in as GPU.md says" >&2
        exit 2
    fi
    "$python" .data/decode.py /tmp/c10 || exit 2
    export CIFAR10_DIR=/tmp/c10
fi
{
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$OUT/gpu.txt"

read -ra recipes <<< "$RECIPES"
deadline=$((SECONDS + SECONDS_FOR_STUDIES))
studies=() incomplete=()
for index in "${!recipes[@]}"; do
    recipe=${recipes[index]}
    limit=$(( (deadline - SECONDS) / (${#recipes[@]} - index) ))
    if [ "$limit" -lt 30 ]; then  # (timeout 0 would mean no limit at all)
        echo "gpu_session.sh: $recipe not started: the deadline is past" | tee "$OUT/$recipe.log"
        incomplete+=("$recipe")
        continue
    fi
    more="STUDY_ARGS_${recipe//[^A-Za-z0-9_]/_}"
    read -ra more <<< "${!more:-}"
    echo "gpu_session.sh: $recipe, at most $limit s" | tee "$OUT/$recipe.log"
    timeout --signal=TERM --kill-after=20 "$limit" "$python" study.py "$recipe" --runs "$RUNS" --seed 0 \
        --device "$DEVICE" --log-dir "$OUT/logs" "${more[@]}" 2>&1 | tee -a "$OUT/$recipe.log"
    status=${PIPESTATUS[0]}
    echo "gpu_session.sh: $recipe ended with status $status" | tee -a "$OUT/$recipe.log"
    [ "$status" -eq 0 ] || incomplete+=("$recipe")
    studies+=("$OUT"/logs/"$recipe"/*/)
done
if [ ${#studies[@]} -gt 0 ]; then
    "$python" compare.py "${studies[@]}" 2>&1 | tee "$OUT/compare.txt"
fi
if [ ${#incomplete[@]} -gt 0 ]; then
    echo "gpu_session.sh: not complete: ${incomplete[*]} (their lines are in $OUT)" >&2
    exit 1
fi
