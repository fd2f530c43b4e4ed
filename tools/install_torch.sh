#!/usr/bin/env bash
# Install PyTorch into the given Python environment without ever pulling a CUDA build onto a
# machine that has no NVIDIA GPU.
#   - torch already importable (a GPU user's own build, or a previous install): keep it.
#   - an NVIDIA GPU (nvidia-smi works): the default PyPI build, which ships CUDA.
#   - otherwise: the CPU build of $TORCH_VERSION, from a local wheel folder if pip is set up
#     with one (--no-index never touches the network), else from PyTorch's CPU index.
set -euo pipefail
PY=${1:?usage: install_torch.sh PYTHON}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install_torch: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "install_torch: NVIDIA GPU found, installing the CUDA build of torch"
  "$PY" -m pip install "torch"
  exit 0
fi
echo "install_torch: no GPU, installing the CPU build torch==$TORCH_VERSION"
# A local wheel folder (pip's find-links) may hold the CPU wheel: take it without touching any
# index, then let pip resolve its small dependencies as configured. Otherwise use PyTorch's CPU
# index (PyPI's Linux build would pull several GB of CUDA libraries).
if "$PY" -m pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
else
  "$PY" -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi
