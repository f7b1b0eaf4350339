#!/usr/bin/env bash
# The one-call GPU check: on a machine with an NVIDIA GPU and no registry access, build the
# extension for that GPU, run the whole test suite (GPU tests included), run the CUDA tests under
# compute-sanitizer, run every benchmark suite (python -m bench: quant, forward, train, memory),
# and leave every log and result in one folder. It is sized for 20 minutes on an H100 / H200:
# the benchmark gets what is left of GPU_CHECK_BUDGET_S (default 1140 s) after the other steps,
# and a benchmark stopped at that limit still writes the rows it measured (marked partial).
#
#   scripts/gpu_check.sh [OUT_DIR]          (default: gpu_check_out/)
#
# OUT_DIR/summary.txt is the digest; bench.txt the benchmark's log; OUT_DIR/bench/ its JSON,
# Markdown and PNGs (also copied to bench/results/).
#
# Missing peers: the benchmark compares against bitsandbytes, PEFT and torchao. A GPU machine
# without registry access gets them from wheels carried in ./wheels/ in the working tree (the
# folder is not ignored by git, so a copy of the working tree takes it along; do not commit it).
# On a machine with a registry, for the GPU machine's Python (here 3.12) and platform:
#
#   pip download bitsandbytes torchao --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d wheels/
#   pip download peft --no-deps -d wheels/     # only if the GPU image lacks it; PEFT also needs
#                                              # transformers, accelerate, safetensors, huggingface_hub
#
# Pick a torchao built for the GPU machine's torch (torchao's README has the table). Wheels are
# installed with --no-deps; one missing still leaves a complete run: its tests skip and its
# benchmark rows are replaced by a printed "skipped" line, and summary.txt lists what was absent.
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
BUDGET_S="${GPU_CHECK_BUDGET_S:-1140}"
BENCH_RESERVE_S="${GPU_CHECK_BENCH_RESERVE_S:-540}"  # the steps before the benchmark leave it this much
START_S=$SECONDS
step() { echo "== $1 ($((SECONDS - START_S)) s in)" | tee -a "$OUT/summary.txt"; }
# Seconds a step before the benchmark may take (at least 30): the budget left less the reserve.
pre_limit() { local s=$((BUDGET_S - (SECONDS - START_S) - BENCH_RESERVE_S)); echo $((s < 30 ? 30 : s)); }

step "environment"
{ nvidia-smi; python -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)'; } >"$OUT/env.txt" 2>&1
if ls wheels/*.whl >/dev/null 2>&1; then
  python -m pip install --no-index --find-links wheels --no-deps wheels/*.whl >"$OUT/wheels.txt" 2>&1 \
    || echo "installing wheels/ failed (see wheels.txt)" | tee -a "$OUT/summary.txt"
fi
for pkg in bitsandbytes peft torchao matplotlib tqdm; do
  python -c "import $pkg" >/dev/null 2>&1 || echo "absent: $pkg (carry a wheel in wheels/, see the header)" \
    | tee -a "$OUT/summary.txt"
done

step "build (arch $TORCH_CUDA_ARCH_LIST)"
LORA_KERNELS_CUDA=1 python -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.txt" 2>&1 \
  || { echo "build FAILED (see build.txt)" | tee -a "$OUT/summary.txt"; exit 1; }
python -m lora_kernels.info | tee -a "$OUT/summary.txt"

step "tests"
timeout -k 10 "$(pre_limit)" python -m pytest tests -q -rs >"$OUT/tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"

step "compute-sanitizer memcheck on the CUDA tests"
SAN="compute-sanitizer --error-exitcode 1"
timeout -k 10 "$(pre_limit)" $SAN --tool memcheck python -m pytest tests/test_quant.py -q -x -k "cuda-cuda and (4095 or 3, 1000 or 65)" \
  >"$OUT/memcheck.txt" 2>&1 || status=1
tail -n 3 "$OUT/memcheck.txt" | tee -a "$OUT/summary.txt"
step "compute-sanitizer racecheck (quantize uses warp shuffles, dequantize a shared table)"
timeout -k 10 "$(pre_limit)" $SAN --tool racecheck python -m pytest tests/test_quant.py -q -x -k "cuda-cuda and 4095 and bfloat16" \
  >"$OUT/racecheck.txt" 2>&1 || status=1
tail -n 3 "$OUT/racecheck.txt" | tee -a "$OUT/summary.txt"

step "compute-sanitizer memcheck + racecheck on the QLoRA matmul (decode kernel: shared tables and reductions)"
timeout -k 10 "$(pre_limit)" $SAN --tool memcheck python -m pytest tests/test_qlora_linear.py -q -x -k "cuda-cuda and (ranks or 96-128-17)" \
  >"$OUT/memcheck_qlora.txt" 2>&1 || status=1
tail -n 3 "$OUT/memcheck_qlora.txt" | tee -a "$OUT/summary.txt"
timeout -k 10 "$(pre_limit)" $SAN --tool racecheck python -m pytest tests/test_qlora_linear.py -q -x -k "cuda-cuda and 96-128-3-" \
  >"$OUT/racecheck_qlora.txt" 2>&1 || status=1
tail -n 3 "$OUT/racecheck_qlora.txt" | tee -a "$OUT/summary.txt"

LEFT_S=$((BUDGET_S - (SECONDS - START_S)))
step "benchmarks, all suites (limit ${LEFT_S} s)"
if [ "$LEFT_S" -lt 120 ]; then
  echo "benchmarks skipped: only ${LEFT_S} s of the ${BUDGET_S} s budget left" | tee -a "$OUT/summary.txt"
  status=1
else
  # --verbose: every row is in bench.txt as it is timed; SIGTERM at the limit writes the rows so far.
  PYTHONUNBUFFERED=1 timeout -k 30 "$LEFT_S" python -m bench --suite all --verbose --out "$OUT/bench" \
    >"$OUT/bench.txt" 2>&1 || status=1
  grep -E "^  (met|MISSED)|STOPPED|skipped|WRONG|wrote|measured peaks" "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
  mkdir -p bench/results && cp "$OUT"/bench/* bench/results/ 2>/dev/null
fi

step "done, status $status"
exit $status
