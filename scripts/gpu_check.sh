#!/usr/bin/env bash
# The one-call GPU check: on a machine with an NVIDIA GPU and no registry access, build the
# extension for that GPU, run the whole test suite (GPU tests included), run the CUDA tests under
# compute-sanitizer, run the benchmarks, and leave every log and result in one folder.
#
#   scripts/gpu_check.sh [OUT_DIR]          (default: gpu_check_out/)
#
# Missing Python packages (bitsandbytes has no wheel on the GPU machine) are installed from wheels
# carried into ./wheels/ (pip download bitsandbytes -d wheels/ on a machine with a registry);
# with no wheel, the bitsandbytes tests and baseline rows are skipped and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
status=0
step() { echo "== $1" | tee -a "$OUT/summary.txt"; }

step "environment"
{ nvidia-smi; python -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)'; } >"$OUT/env.txt" 2>&1
if ls wheels/*.whl >/dev/null 2>&1; then
  python -m pip install --no-index --find-links wheels --no-deps wheels/*.whl >"$OUT/wheels.txt" 2>&1 || true
fi

step "build (arch $TORCH_CUDA_ARCH_LIST)"
LORA_KERNELS_CUDA=1 python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.txt" 2>&1 \
  || { echo "build FAILED (see build.txt)" | tee -a "$OUT/summary.txt"; exit 1; }
python -m lora_kernels.info | tee -a "$OUT/summary.txt"

step "tests"
python -m pytest tests -q -rs >"$OUT/tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"

step "compute-sanitizer memcheck on the CUDA tests"
SAN="compute-sanitizer --error-exitcode 1"
$SAN --tool memcheck python -m pytest tests/test_quant.py -q -x -k "cuda-cuda and (4095 or 3, 1000 or 65)" \
  >"$OUT/memcheck.txt" 2>&1 || status=1
tail -n 3 "$OUT/memcheck.txt" | tee -a "$OUT/summary.txt"
step "compute-sanitizer racecheck (quantize uses warp shuffles, dequantize a shared table)"
$SAN --tool racecheck python -m pytest tests/test_quant.py -q -x -k "cuda-cuda and 4095 and bfloat16" \
  >"$OUT/racecheck.txt" 2>&1 || status=1
tail -n 3 "$OUT/racecheck.txt" | tee -a "$OUT/summary.txt"

step "compute-sanitizer memcheck + racecheck on the QLoRA matmul (decode kernel: shared tables and reductions)"
$SAN --tool memcheck python -m pytest tests/test_qlora_linear.py -q -x -k "cuda-cuda and (ranks or 96-128-17)" \
  >"$OUT/memcheck_qlora.txt" 2>&1 || status=1
tail -n 3 "$OUT/memcheck_qlora.txt" | tee -a "$OUT/summary.txt"
$SAN --tool racecheck python -m pytest tests/test_qlora_linear.py -q -x -k "cuda-cuda and 96-128-3-" \
  >"$OUT/racecheck_qlora.txt" 2>&1 || status=1
tail -n 3 "$OUT/racecheck_qlora.txt" | tee -a "$OUT/summary.txt"

step "benchmarks"
python -m bench --out bench/results >"$OUT/bench.txt" 2>&1 || status=1
grep -E "met|MISSED|wrote" "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
cp bench/results/*.json bench/results/*.md "$OUT/" 2>/dev/null

step "done, status $status"
exit $status
