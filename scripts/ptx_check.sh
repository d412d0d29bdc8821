#!/usr/bin/env bash
# Compile every numba.cuda prototype kernel to PTX for sm_90 without a GPU (see
# scripts/ptx_check_prototypes.py). NVRTC comes from the nvidia-cuda-nvrtc wheel, unpacked in .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
mkdir -p .cache/wheels .cache/nvrtc
if [ -z "$(find .cache/nvrtc -name 'libnvrtc.so*' 2>/dev/null)" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .cache/wheels nvidia-cuda-nvrtc 2> >(grep -v "WARNING: Location" >&2)
  (cd .cache/nvrtc && unzip -q -o "$(ls ../wheels/nvidia_cuda_nvrtc-*.whl | head -1)" 'nvidia/*/lib/*')
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LD_LIBRARY_PATH="$(dirname "$(find $PWD/.cache/nvrtc -name 'libnvrtc.so*' | head -1)")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
$PY scripts/ptx_check_prototypes.py
