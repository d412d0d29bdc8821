#!/usr/bin/env bash
# First-light check of the foundation on the GPU host: build, grid check, sanitizer, quick bench.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TORCH_EXTENSIONS_DIR=/tmp/ext MAX_JOBS=16 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, numba, numpy; print(torch.__version__, torch.version.cuda, numba.__version__, numpy.__version__)"
python3 -m fastmqa.gpucheck --kernels 01_naive 2>&1 | tee $OUT/gpucheck.log
python3 -m fastmqa.bench fp32 --quick --results $OUT 2>&1 | tee $OUT/bench.log
python3 -c "
import json; d=json.load(open('$OUT/fp32.json')); print(d['ceilings'])
for r in d['rows']: print(r['impl'], r['Sq'], r['ms'], r['tflops'])"
