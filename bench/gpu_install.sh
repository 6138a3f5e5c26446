#!/usr/bin/env bash
# Installs the carried wheels (bench/gpu_wheels.sh) that this Python lacks into a private folder
# (nothing of the machine's own is replaced); bench/gpu_check.sh and bench/gpu_full.sh put
# that folder on PYTHONPATH.
#
#   bash bench/gpu_install.sh WHEELS_DIR SITE_DIR PYTHON
set -uo pipefail
WHEELS=$1 target=$2 PY=$3
if [ ! -d "$WHEELS" ]; then
    echo "no wheels folder $WHEELS: assuming the packages are installed"
    exit 0
fi
rm -rf "$target"  # this script's own folder: what the last run installed goes
# The wheels of distributions this Python does not have (by distribution name).
mapfile -t missing < <("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(whl)
EOF
)
if [ "${#missing[@]}" = 0 ]; then
    echo "every carried wheel's distribution is already installed"
    exit 0
fi
echo "installing into $target: ${missing[*]##*/}"
if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$target" "${missing[@]}" || exit 1
else  # a Python without pip: a wheel is a zip of what goes on the path
    mkdir -p "$target"
    for whl in "${missing[@]}"; do "$PY" -m zipfile -e "$whl" "$target" || exit 1; done
    # zipfile drops the executable bits Ray's own programs (raylet, gcs_server) need
    [ -d "$target/ray/core/src" ] && find "$target/ray/core/src" -type f -exec chmod u+x {} +
fi
exit 0
