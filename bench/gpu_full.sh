#!/usr/bin/env bash
# The whole product on one GPU, then the engine A/B of the GPU defaults, within 8 minutes, on a
# bare single-GPU machine without network (torch with CUDA present there):
#
#   bash bench/gpu_full.sh [WHEELS_DIR]      # there; WHEELS_DIR (default build/gpu-wheels):
#                                            # WITH_RAY=1 NO_PYARROW=1 bash bench/gpu_wheels.sh
#   bash bench/gpu_full.sh --cpu-dry-run     # here: every stage on the CPU, tiny and fp32
#
# Stages (bench/gpu_full.py), each under its own `timeout`; once the budget (GPU_FULL_BUDGET_S,
# default 470 s; dry run 2400 s) is spent the rest are reported as skipped, never started:
#   install   the carried wheels this Python lacks, into a private folder (bench/gpu_install.sh)
#   ray       prepare the smoke corpus; `python -m trainer.train` through Ray Train
#             (cluster.launch=ray, 1 worker, 1 GPU): a reference run with eval and checkpoints,
#             the same run SIGKILLed after its first checkpoint and resumed (losses compared),
#             export to Hugging Face
#   ab        per model (gpt2-124m, then gpt-1.3b): the engine with the config as it is, then
#             each setting of bench/gpu_full.py's AB table flipped alone, then the bare loop
# Results: one JSON line per record, with the commit measured (set RAYGPT_COMMIT where the
# tree has no .git), in $RESULTS (default $OUT/gpu_full.jsonl where $OUT is set, else
# build/gpu_full.jsonl); copy a GPU run's file to bench/results/gpu_full_<gpu>_<date>.jsonl.
# Exit status: 0 when every stage that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
WHEELS=
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        *) WHEELS=$arg ;;
    esac
done
[ "$DRY" = 0 ] && WHEELS=${WHEELS:-build/gpu-wheels}
SITE=${GPU_FULL_SITE:-/tmp/raygpt-site}
START=$SECONDS
BUDGET=${GPU_FULL_BUDGET_S:-$([ "$DRY" = 1 ] && echo 2400 || echo 470)}
SCALE=$([ "$DRY" = 1 ] && echo 4 || echo 1)  # per-stage caps x this on a 2-core CPU
if [ -n "${OUT:-}" ]; then RESULTS=${RESULTS:-$OUT/gpu_full.jsonl}; else RESULTS=${RESULTS:-build/gpu_full.jsonl}; fi
mkdir -p "$(dirname "$RESULTS")"
: >"$RESULTS"
WORK=${GPU_FULL_WORK:-/tmp/raygpt-gpu-full}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The GPU machine is bare: its caches (peak FLOP/s, DeepSpeed ops) in /tmp. A dry run keeps the
# user's (~/.cache/raygpt), where DeepSpeed's CPU comm op is already built once per environment.
[ "$DRY" = 0 ] && export RAYGPT_CACHE=${RAYGPT_CACHE:-/tmp/raygpt-cache}
export RAYGPT_COMMIT=${RAYGPT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
FAILED=0
if [ "$DRY" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    DRYFLAG=(--cpu-dry-run)
else
    PY=${PY:-python3}
    DRYFLAG=()
fi

# stage NAME CAP_SECONDS COMMAND...: COMMAND under timeout min(CAP x SCALE, budget left).
stage() {
    local name=$1 cap=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: SKIPPED (budget spent: $((SECONDS - START)) s of $BUDGET)"
        echo "{\"kind\": \"skipped\", \"stage\": \"$name\", \"commit\": \"$RAYGPT_COMMIT\"}" >>"$RESULTS"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (timeout ${cap}s, $((SECONDS - START)) s into the budget)"
    local t0=$SECONDS
    timeout --kill-after=10 "$cap" "$@"
    local rc=$?
    if [ "$rc" = 0 ]; then
        echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        [ "$rc" = 124 ] && echo "=== $name: TIMED OUT after ${cap}s" || echo "=== $name: FAILED (exit $rc)"
        FAILED=1
    fi
}

if [ -n "$WHEELS" ]; then
    stage install 90 bash bench/gpu_install.sh "$WHEELS" "$SITE" "$PY"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DRY" = 1 ]; then  # DeepSpeed's CPU comm op, built once with time to spare (a build
    # killed by a later stage's timeout would leave a lock that blocks every build after it)
    stage "DeepSpeed CPU comm op" 150 env DS_ACCELERATOR=cpu "$PY" -c "
from trainer.worker.engine import comm_op_build_dir
comm_op_build_dir()  # the folder raygpt's workers use (trainer/worker/engine.py)
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
fi
# The Ray path first: it is what has never run on a GPU. ~4 x (Ray start + build) + prepare.
stage ray 200 "$PY" -m bench.gpu_full ray "${DRYFLAG[@]}" --work "$WORK" --out "$RESULTS" \
    --stage-timeout $((90 * SCALE))
# The A/B: each model's variants stop starting once its share is spent (--budget).
stage "ab gpt2-124m" 120 "$PY" -m bench.gpu_full ab "${DRYFLAG[@]}" --model gpt2-124m \
    --out "$RESULTS" --budget $((110 * SCALE))
stage "ab gpt-1.3b" 150 "$PY" -m bench.gpu_full ab "${DRYFLAG[@]}" --model gpt-1.3b \
    --out "$RESULTS" --budget $((140 * SCALE))

echo
"$PY" -m bench.gpu_full summary "$RESULTS"
echo "total $((SECONDS - START)) s; results in $RESULTS (commit $RAYGPT_COMMIT)"
exit $FAILED
