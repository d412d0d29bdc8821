#!/usr/bin/env bash
# Compile-check every kernels/*.cu with nvcc (no GPU needed), then the generated torch binding
# against the CUDA build's torch headers (the CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h).
# Headers come from the CUDA torch wheel and the nvidia-cublas wheel, unpacked into .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CACHE=.cache/headers
mkdir -p $CACHE .cache/wheels
TORCH_WHEEL_VERSION=${TORCH_WHEEL_VERSION:-2.14.1}
if [ ! -f $CACHE/torch/include/torch/extension.h ] || [ -z "$(find $CACHE/nvidia -name curand.h 2>/dev/null)" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d .cache/wheels \
    "torch==$TORCH_WHEEL_VERSION" nvidia-cublas nvidia-cusparse nvidia-cusolver nvidia-curand 2> >(grep -v "WARNING: Location" >&2)
  (cd $CACHE && unzip -q -o ../wheels/torch-$TORCH_WHEEL_VERSION-*.whl 'torch/include/*' \
     && for w in cublas cusparse cusolver curand; do
          unzip -q -o "$(ls ../wheels/nvidia_$w-*.whl | head -1)" 'nvidia/*include/*'; done)
fi
CUBLAS_INC=$(dirname "$(find $CACHE/nvidia -name cublas_v2.h | head -1)")
INC="-Ikernels -I$CUBLAS_INC"
fail=0
for f in kernels/*.cu; do
  if $NVCC -c -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a $INC "$f" -o /tmp/fastmqa_check.o; then
    echo "compiled $f"
  else
    echo "FAILED to compile $f"; fail=1
  fi
done
# The bindings fastmqa.build generates, in one translation unit (torch/extension.h is the slow part):
# the forward's (with the cuBLAS line, strides and run_paged, a superset of every kernel's) and the backward's.
python3 - > /tmp/fastmqa_binding.cpp <<'PY'
import importlib.util, pathlib
spec = importlib.util.spec_from_file_location("b", pathlib.Path("fastmqa/build.py"))
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
print(b.binding_source("kcheck", uses_cublas=True, strided=True, paged=True))
print(b.binding_source("kcheck", backward=True))
PY
PYINC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
if g++ -fsyntax-only -std=c++20 -DTORCH_EXTENSION_NAME=check -I$CACHE/torch/include \
     -I$CACHE/torch/include/torch/csrc/api/include -I/usr/local/cuda/include -I$CUBLAS_INC $(find $CACHE/nvidia -type d -name include -printf '-I%p ') -I$PYINC -Ikernels \
     /tmp/fastmqa_binding.cpp; then
  echo "compiled the generated torch binding"
else
  echo "FAILED to compile the generated torch binding"; fail=1
fi
exit $fail
