#!/usr/bin/env bash
# Download the wheels a GPU machine without network lacks, for bench/gpu_check.py (bench/README.md).
#
# The lent H200 machine has Python 3.12 with torch, triton, transformers, accelerate, peft and
# the rest of the engine's dependencies, but not diffusers, bitsandbytes or optimum-quanto, and
# it cannot reach PyPI. This fetches those three, built for Python 3.12 on manylinux x86_64, at
# the versions this project's suite is green with (.ci/versions-green.txt, the last green CI
# run's pip freeze, when it names them; else the versions below), into .whl/ (git-ignored),
# which travels with the working tree (the device tool's limit is 64 MiB, tree included).
# Their own dependencies are on that machine already (huggingface-hub >= 1.32, safetensors
# >= 0.8, regex, requests, Pillow, numpy, filelock, ninja, packaging); diffusers' importlib_metadata
# is only imported on Python < 3.8. Usage: bench/device_wheels.sh [FOLDER]   (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"

declare -A FALLBACK=([diffusers]=0.42.1 [bitsandbytes]=0.50.2 [optimum-quanto]=0.2.7)

version() {  # the green run's version of $1, else the fallback
    local found=""
    if [ -f .ci/versions-green.txt ]; then
        found=$(grep -i -E "^$1==" .ci/versions-green.txt | head -n 1 | cut -d= -f3 | cut -d+ -f1 || true)
    fi
    echo "${found:-${FALLBACK[$1]}}"
}

mkdir -p "$DEST"
specs=()
for name in diffusers bitsandbytes optimum-quanto; do
    rm -f "$DEST/${name//-/_}"-*.whl  # one version of each: two would stop the install there
    specs+=("$name==$(version "$name")")
done
echo "downloading ${specs[*]} for Python 3.12 manylinux x86_64 into $DEST/"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${specs[@]}"
ls -l "$DEST"/*.whl
echo "total: $(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1) bytes (the device tool carries at most 64 MiB with the tree)"
