#!/usr/bin/env bash
# The worker's GPU path on a bare single-GPU machine without network, in under 8 minutes.
#
#   bash bench/gpu_check.sh [WHEELS_DIR]     # on the GPU machine (torch with CUDA present)
#   bash bench/gpu_check.sh --cpu-dry-run    # here: the same steps on the CPU (gloo), the
#                                            # same model configs shrunk to a few layers
#   PY=<a venv with torch alone>/bin/python bash bench/gpu_check.sh --cpu-dry-run WHEELS_DIR
#                                            # the bare machine's install, on the CPU
#
# Ray does not fit there (no wheel within the 64 MiB a device call carries), so this runs what a
# Ray Train GPU worker runs in ONE process per step (torch.distributed with NCCL, world size
# 1): bench/gpu_check.py builds gpt2-124m and gpt-1.3b (conf/model/*.yaml) in bf16 with flash
# SDPA, trains them with trainer.worker.engine at ZeRO-0/2/3 (ZeRO-3 built partitioned),
# checks eval, a guarded NaN skip, a checkpoint save/load through trainer.checkpoint.format,
# generation, and prints tokens/s and MFU against the GPU's datasheet bf16 peak and against a
# bare PyTorch loop of the same model (plain AdamW, autocast bf16).
#
# WHEELS_DIR (default build/gpu-wheels, made by bench/gpu_wheels.sh; carry it along) holds
# DeepSpeed, Hydra/OmegaConf, pyarrow and what they import; only the distributions the
# machine lacks are installed, into a private folder on PYTHONPATH (nothing of the machine's
# own is replaced). Every step runs under its own `timeout`, and the steps stop starting once
# the 8-minute budget (GPU_CHECK_BUDGET_S, default 470 s) is spent; the order puts the
# checks before the larger model. Results: one JSON line per step in $RESULTS (default
# $OUT/gpu_check.jsonl where $OUT is set, else build/gpu_check.jsonl), a table at the end.
# Exit status: 0 when every step that ran passed.
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
# The GPU machine installs from the default folder; a dry run only from one it is given (a
# bare venv with torch alone then runs what the GPU machine runs, on the CPU).
[ "$DRY" = 0 ] && WHEELS=${WHEELS:-build/gpu-wheels}
SITE=${GPU_CHECK_SITE:-/tmp/raygpt-site}
START=$SECONDS
# A dry run on a 2-core machine is slower than the GPU (and builds a CPU op once): more time.
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 1800 || echo 470)}
SCALE=$([ "$DRY" = 1 ] && echo 2 || echo 1)  # per-step caps x this
if [ -n "${OUT:-}" ]; then RESULTS=${RESULTS:-$OUT/gpu_check.jsonl}; else RESULTS=${RESULTS:-build/gpu_check.jsonl}; fi
mkdir -p "$(dirname "$RESULTS")"
: >"$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export RAYGPT_CACHE=${RAYGPT_CACHE:-/tmp/raygpt-cache}
FAILED=0

MODELS=(gpt2-124m gpt-1.3b)
if [ "$DRY" = 1 ]; then
    PY=${PY:-.venv/bin/python}
    # The same models' configs shrunk to a few layers (gpu_check.py's TINY), few steps, and a
    # given peak: the CPU's measured peak is not what this checks.
    FLAGS=(--cpu-dry-run --peak-flops 1e11 --warmup 1 --steps 2)
    # DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op; a step killed by its
    # timeout mid-build would leave a lock that blocks every later build in the shared
    # ~/.cache/torch_extensions. A folder of this script's own, its stale locks cleared.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
else
    PY=${PY:-python3}
    FLAGS=()
fi

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, what the budget has
# left); a step that cannot start with 20 s left is reported as skipped.
step() {
    local name=$1 cap=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: SKIPPED (budget spent: $((SECONDS - START)) s of $BUDGET)"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== $name (timeout ${cap}s, $((SECONDS - START)) s into the budget)"
    # Steps run one at a time: a JIT-build lock in the dry run's own folder is a killed step's.
    [ "$DRY" = 1 ] && find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
    local t0=$SECONDS
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs programs
        export -f "$1"
        export PY WHEELS SITE
        timeout --kill-after=10 "$cap" bash -c "$*"
    else
        timeout --kill-after=10 "$cap" "$@"
    fi
    local rc=$?
    if [ "$rc" = 0 ]; then
        echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        [ "$rc" = 124 ] && echo "=== $name: TIMED OUT after ${cap}s" || echo "=== $name: FAILED (exit $rc)"
        FAILED=1
    fi
}

install_wheels() {  # bench/gpu_install.sh: the wheels this Python lacks, into $SITE
    bash bench/gpu_install.sh "$WHEELS" "$SITE" "$PY"
}

if [ -n "$WHEELS" ]; then
    step install 120 install_wheels
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

step environment 90 env DS_ACCELERATOR="$([ "$DRY" = 1 ] && echo cpu || echo cuda)" "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('gpu', repr(torch.cuda.get_device_name(0)), 'bf16', torch.cuda.is_bf16_supported(),
          'flash sdpa', getattr(torch.backends.cuda, 'is_flash_attention_available', bool)())
import deepspeed, hydra, omegaconf, pyarrow
from deepspeed.accelerator import get_accelerator
print('deepspeed', deepspeed.__version__, 'accelerator', get_accelerator().device_name(),
      get_accelerator().communication_backend_name(), 'hydra', hydra.__version__,
      'pyarrow', pyarrow.__version__)
from trainer.worker.observability.metrics import gpu_peak_flops
if torch.cuda.is_available():
    try:
        print('datasheet bf16 peak', gpu_peak_flops('bf16', 0))
    except ValueError as e:
        print(e)
"

if [ "$DRY" = 1 ]; then  # built once, with time to spare, before the timed steps
    step "DeepSpeed CPU comm op" 300 env DS_ACCELERATOR=cpu "$PY" -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
fi

check() {  # check NAME CAP ARGS...: one bench/gpu_check.py invocation
    local name=$1 cap=$2
    shift 2
    step "$name" "$cap" "$PY" -m bench.gpu_check "${FLAGS[@]}" --out "$RESULTS" "$@"
}

small=${MODELS[0]} big=${MODELS[1]}
# The smaller model: every check at every stage, then its bare loop.
check "$small zero0" 120 --model "$small" --stage 0 --checkpoint --generate
check "$small zero2" 120 --model "$small" --stage 2 --checkpoint --generate
check "$small zero3" 150 --model "$small" --stage 3 --checkpoint --generate
check "$small bare" 90 --model "$small" --bare
# The larger one (activation checkpointing on): speed, eval and the guard; its checkpoints
# (18 GB with Adam state) do not fit the budget.
check "$big zero2" 150 --model "$big" --stage 2
check "$big bare" 120 --model "$big" --bare
check "$big zero3" 180 --model "$big" --stage 3 --generate
check "$big zero0" 150 --model "$big" --stage 0

echo
"$PY" -m bench.gpu_check --summary "$RESULTS"
echo "total $((SECONDS - START)) s; results in $RESULTS"
exit $FAILED
