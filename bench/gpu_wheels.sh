#!/usr/bin/env bash
# Downloads the wheels bench/gpu_check.sh installs on a bare GPU machine without network
# (torch with CUDA present there, Python 3.12 on x86-64 Linux): DeepSpeed and what it imports,
# Hydra/OmegaConf (trainer.config), pyarrow (data_pipeline.storage). Exactly these, no deps:
#
#   bash bench/gpu_wheels.sh [DIR]      # DIR defaults to build/gpu-wheels (git-ignored)
#   WITH_RAY=1 NO_PYARROW=1 bash bench/gpu_wheels.sh   # + Ray and what ray.train imports, for
#                                       # bench/gpu_full.sh (Ray's wheel without its Java jar and
#                                       # dashboard front end; NO_PANDAS=1 where the image has it)
#
# Then carry DIR to the GPU machine and run  bash bench/gpu_check.sh DIR  there (with the
# device tool: run(command="bash bench/gpu_check.sh build/gpu-wheels",
# carry=["build/gpu-wheels"], timeout_s=540); results come back in $OUT/gpu_check.jsonl). The versions
# are the ones the CPU tests run with. DeepSpeed and antlr4 are published as source only: they
# are built here into pure-Python wheels (DeepSpeed with no pre-compiled ops; it JIT-builds
# what it needs, and the engine path here needs none). Prints the total size (it must stay
# under the 64 MiB a device call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-build/gpu-wheels}
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
ABI=cp${PYVER/./}
mkdir -p "$DIR"

# Pure-Python wheels (any platform).
PURE=(
    hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 packaging==26.4 tqdm==4.70.1
    pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    hydra-core==1.3.8 omegaconf==2.3.1
)
# Compiled wheels for the GPU machine's Python. pyarrow is 53 MiB of the total: leave it out
# with NO_PYARROW=1 where the machine has it (the lent machines' image does).
BINARY=(pydantic_core==2.50.5 msgpack==1.2.4 psutil==7.2.2 ninja==1.13.2 PyYAML==6.0.4)
[ "${NO_PYARROW:-0}" = 1 ] || BINARY+=(pyarrow==26.0.1)
# Source-only on PyPI: built here into py3-none-any wheels.
SOURCE=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)

if [ "${WITH_RAY:-0}" = 1 ]; then  # what ray and ray.train import (versions of the CPU venv)
    PURE+=(click==8.5.1 filelock==4.3.2 jsonschema==4.26.0 attrs==26.1.0 referencing==0.37.0
           jsonschema-specifications==2025.9.1 requests==2.34.2 urllib3==2.8.0 idna==3.21
           certifi==2026.10.19.post1 fsspec==2026.9.0 tensorboardX==2.6.5)
    BINARY+=(ray==2.60.0 protobuf==7.36.2 rpds-py==2026.9.1 charset-normalizer==3.5.3)
    [ "${NO_PANDAS:-0}" = 1 ] || {
        PURE+=(python-dateutil==2.9.0.post0 six==1.17.0)
        BINARY+=(pandas==3.1.1)
    }
fi

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "${PURE[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DIR" "${BINARY[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$DIR" "${SOURCE[@]}"
for whl in "$DIR"/ray-*.whl; do  # 31 MiB of Java and the dashboard's front end: not used here
    [ -e "$whl" ] && "$PY" bench/strip_wheel.py "$whl" ray/jars/ ray/dashboard/client/build/
done

echo "wheels in $DIR:"
ls -l "$DIR" | awk 'NR > 1 {printf "  %10d  %s\n", $5, $9}'
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB)"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "over the 64 MiB a device call carries" >&2
    exit 1
fi
