#!/usr/bin/env bash
# Everything the GPU host does for a release of the course, in one device call where it fits:
#   gpu_full.sh check   -> python -m fastmqa.gpucheck (grid, fuzz, sanitizer)
#   gpu_full.sh bench   -> python -m fastmqa.bench all + Nsight Compute counters (results/*.json)
#   gpu_full.sh books   -> the whole GPU check (as `check`) plus every notebook executed in place
#                          (outputs of this GPU) and nbval on them: one complete results/gpucheck.json
#   gpu_full.sh gputests -> pytest -m gpu tests/
# Steps can be combined: gpu_full.sh check bench books. Outputs come back as $OUT/run.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ext} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rc=0
python3 - <<'PY'   # build every kernel once, in parallel, before anything else uses them
import time; t = time.time()
from fastmqa import kernels, build
errs = {n: e for n, e in build.build_all(kernels.REGISTRY).items() if e}
print(f"built {len(kernels.REGISTRY)} kernels in {time.time() - t:.0f} s; failures: {list(errs)}")
for n, e in errs.items(): print(n, str(e)[-3000:])
PY
for step in "$@"; do
  case $step in
    check) python3 -m fastmqa.gpucheck --fuzz ${FUZZ:-25} 2>&1 | tee "$OUT/gpucheck.log" || rc=1 ;;
    bench) python3 -m fastmqa.bench ${SUITES:-all} 2>&1 | grep -v Warning | tee "$OUT/bench.log" || rc=1
           python3 -m fastmqa.profile --kernels ${PROFILE_KERNELS:-01_naive,02_smem_tiled,03_warp_shuffle,04_cublas,05_flash_fp32,06_flash_mma} \
             2>&1 | tail -40 | tee "$OUT/profile.log" || rc=1 ;;
    gputests) timeout ${GPUTEST_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -40 \
             | tee "$OUT/pytest_gpu.log" || rc=1 ;;
    books) timeout ${BOOKS_TIMEOUT:-540} python3 -m fastmqa.gpucheck --fuzz ${FUZZ:-25} --notebooks --nbval 2>&1 \
             | tee "$OUT/notebooks.log" || rc=1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  tar czf "$OUT/run.tar.gz" results notebooks/*.ipynb 2>/dev/null  # after every step: a timeout keeps what was done
done
exit $rc
