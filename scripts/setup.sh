#!/usr/bin/env bash
# Set up .venv in the repository: PyTorch, then this package with its test, notebook and faiss extras
# (faiss: the optional approximate first stage of runtime.search, so that the tests cover it).
# Idempotent and quick when nothing changed. Called by scripts/run.sh and scripts/test.sh.
#   PYTHON=python3.11 bash scripts/setup.sh      # choose the interpreter (3.10+)
#   TORCH_SPEC="torch==2.5.1" bash scripts/setup.sh   # choose the PyTorch build yourself
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        spec=$TORCH_SPEC
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch>=2.4"            # a CUDA workstation: PyPI's default build carries CUDA
    else
        spec="torch>=2.4,<2.14"      # no GPU: 2.13.0+cpu, where a local wheel of it is offered (CI), else PyPI's
    fi
    echo "setup: installing $spec into .venv" >&2
    "${PIP[@]}" install "$spec"
fi
stamp=.venv/.imram-min-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing imram-min and its extras into .venv" >&2
    "${PIP[@]}" install --no-build-isolation -e ".[test,notebooks,faiss]"
    echo "$want" > "$stamp"
fi
