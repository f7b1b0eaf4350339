#!/usr/bin/env bash
# The one-call GPU check, sized for the lent H200 (15 minutes of device time, 10 minutes a command):
# it ends within GPU_CHECK_BUDGET_S (default 540 s, 9 minutes), so that a second run still fits.
#
#   bash scripts/gpu_check.sh OUT_DIR              on the GPU machine: bash scripts/gpu_check.sh $OUT
#   bash scripts/gpu_check.sh --dry-run OUT_DIR    the same flow on a machine without a GPU (CI)
#
# Steps, each with its cap in seconds (GPU / dry run); a step before the benchmark gets less when
# the benchmark would be left under BENCH_RESERVE_S, and the benchmark gets whatever is left:
#   peers        install .whl/*.whl (bitsandbytes, torchao) with pip --no-index --target    90 / 60
#   build        lora_kernels._C for this GPU's architecture only, MAX_JOBS=16              200 / 120
#   gpu tests    `-m gpu` (every backend test on cuda: cuda-cuda, cuda-triton ids)         120 / 60
#   triton tests the Triton ops' own tests (on cuda where there is one)                     90 / 60
#   dora tests   tests/test_dora.py, test_multi_lora.py less their cuda-* ids (run in gpu   60 / 60
#                tests): QDoRA vs PEFT's DoRA, many adapters vs PEFT's adapter_names
#   memcheck     compute-sanitizer on a few CUDA quantize, matmul and multi-adapter tests  75 / 30
#   racecheck    the same for shared-memory races, fewer tests                              60 / 30
#   bench quant  --suite quant,dora,multi: quant at 4096x4096 and 8192x28672; dora (QDoRA  200 / 90
#                vs our QLoRA and PEFT's DoRA) at Llama-3-8B's four shapes, M = 2048 and 8192;
#                multi (M = 1 / 16 / 64 rows over as many adapters vs PEFT's adapter_names)
#   bench layer  --suite forward,train,memory --quick (M = 1, 16, 4096; train M = 8192) at the goal
#                shapes 4096x4096 and 28672x8192: the rest of the budget, less END_RESERVE_S
# The dry run uses the CPU backends, the Triton interpreter and tiny shapes, and compute-sanitizer
# only if it is installed; the CUDA tests' ids become their CPU twins (cpu-cpu for cuda-cuda).
#
# OUT_DIR receives at most 8 files, no deeper than OUT_DIR/bench/ (what comes back from the GPU
# machine): summary.txt (the one-screen digest, also printed at the end), logs.tar.gz (every log,
# rewritten after each step), and in bench/ the benchmark's JSON and Markdown per run and its two
# PNG plots (the quant + dora + multi run's files get a -quant-dora suffix). Commit bench/ under
# bench/results/ as is.
# A benchmark stopped at its limit keeps the rows it measured (its JSON says "stopped").
#
# Peers: the GPU image has no bitsandbytes or torchao and no registry. Carry the wheels in .whl/
# (ignored by git; name it in the device call's `carry`); README "Running the GPU check" has the
# download command. A peer that is absent or fails to import is listed in the summary, and its
# benchmark rows are replaced by a printed "skipped" line.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (default
# "tests,sanitizer,bench": leave some out for a shorter rerun), CUDA_HOME, TORCH_CUDA_ARCH_LIST.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" && OUT="$(cd "$1" && pwd)" || exit 2
rm -rf "$OUT/summary.txt" "$OUT/logs.tar.gz" "$OUT/bench"
mkdir -p "$OUT/bench"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"
STEPS="$WORK/steps.txt"
mkdir -p "$LOGS"
: >"$STEPS"
PY="${PYTHON:-python3}"
STEPS_WANTED="${GPU_CHECK_STEPS:-tests,sanitizer,bench}"
if [ -z "${CUDA_HOME:-}" ]; then  # /usr/local/cuda, else the toolkit of the nvcc on PATH
  CUDA_HOME=/usr/local/cuda
  [ -x "$CUDA_HOME/bin/nvcc" ] || ! command -v nvcc >/dev/null || CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-16}"

# Per-mode values. CUDA_ID is the parametrize id of the CUDA backend's tests; each value is on a
# line of its own: tests/test_gpu_check_script.py reads them to collect every -k expression.
if [ "$DRY" = 1 ]; then
  MODE="dry run (CPU backends, Triton interpreter, tiny shapes)"
  CUDA_ID=cpu-cpu
  BUDGET_S="${GPU_CHECK_BUDGET_S:-240}"
  BENCH_RESERVE_S=90
  END_RESERVE_S=15
  CAP_PEERS=60 CAP_BUILD=120 CAP_GPU_TESTS=60 CAP_TRITON_TESTS=60 CAP_MEMCHECK=30 CAP_RACECHECK=30 CAP_DORA_TESTS=90
  CAP_QUANT_DORA=90
  BENCH_ARGS=(--device cpu --backend cpu --quick)
  QUANT_ARGS=(--quick)
  LAYER_SHAPES=256x512
  DORA_SHAPES=256x512
  BUILD_CUDA=0
else
  MODE="GPU"
  CUDA_ID=cuda-cuda
  BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
  # The benchmarks' share: quant + dora + multi (about 30 + 40 + 40 s expected, capped at 200) and
  # the layer run, which takes the rest.
  BENCH_RESERVE_S=300
  END_RESERVE_S=30
  CAP_PEERS=90 CAP_BUILD=200 CAP_GPU_TESTS=120 CAP_TRITON_TESTS=90 CAP_MEMCHECK=75 CAP_RACECHECK=60 CAP_DORA_TESTS=60
  CAP_QUANT_DORA=200
  BENCH_ARGS=(--device cuda --backend cuda,triton)
  QUANT_ARGS=()
  # The goals' shapes (issue 10): Llama-3-8B's q/o projection and Llama-3-70B's gate/up projection.
  LAYER_SHAPES=4096x4096,28672x8192
  # QDoRA (issue 11) at the dora suite's GPU default: Llama-3-8B's q/o, k/v, gate/up and down; the
  # multi suite (issue 12) at the same shapes (its goal: M = 64 over 64 adapters there).
  DORA_SHAPES=llama3-8b
  BUILD_CUDA=1
fi

START_S=$SECONDS
status=0
left() { echo $((BUDGET_S - (SECONDS - START_S))); }
# A pre-benchmark step's limit: its cap, cut so the benchmark keeps BENCH_RESERVE_S; at least 15 s.
limit() {
  local s=$(($(left) - BENCH_RESERVE_S))
  s=$((s < $1 ? s : $1))
  echo $((s < 15 ? 15 : s))
}
progress() { echo "== $1 ($((SECONDS - START_S)) s in)"; }
# result NAME SECONDS TEXT: one line of the summary's step table.
result() { printf '%-16s %4s s  %s\n' "$1" "$2" "$3" | tee -a "$STEPS"; }
fail() { status=1; }
save_logs() { tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs steps.txt 2>/dev/null; }
wanted() { [[ ",$STEPS_WANTED," == *",$1,"* ]]; }

# pytest's own verdict line ("12 passed, 3 skipped in 4.5s"), or the last line of the log.
pytest_line() {
  local line
  line="$(grep -E '([0-9]+ (passed|failed|skipped|errors?|deselected|xfailed))|no tests ran' "$1" | tail -n 1 | tr -d '=')"
  [ -n "$line" ] || line="$(tail -n 1 "$1")"
  echo "$line" | sed 's/^ *//; s/ *$//' | cut -c1-110
}

# ok; "absent" (dry run only: the sanitizer steps run their tests without it); or why the sanitizer
# steps do not run, which the summary says.
SAN_STATE=ok
if ! command -v compute-sanitizer >/dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then SAN_STATE=absent
  else SAN_STATE="NOT FOUND on PATH (CUDA_HOME=$CUDA_HOME)"; fi
fi

# run_pytest NAME CAP TOOL PYTEST_ARGS...: TOOL is "" or a compute-sanitizer tool.
run_pytest() {
  local name=$1 cap=$2 tool=$3 t0=$SECONDS lim rc log="$LOGS/$1.txt"
  shift 3
  local -a cmd=("$PY" -m pytest -q -rfE -p no:cacheprovider "$@")
  local -a env_vars=()
  if [ -n "$tool" ]; then
    if [ "$SAN_STATE" = ok ]; then
      # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees overruns
      # that would land inside a cached block.
      env_vars=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
      cmd=(compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "${cmd[@]}")
    elif [ "$SAN_STATE" != absent ]; then
      result "$name" 0 "NOT RUN: compute-sanitizer $SAN_STATE"
      return
    fi
  elif "$PY" -c "import xdist" >/dev/null 2>&1; then
    cmd+=(-n 8)  # Triton compiles on the CPU: 8 workers share the 16 cores; one GPU is enough for all
  fi
  lim=$(limit "$cap")
  progress "$name (limit $lim s)"
  env "${env_vars[@]}" timeout -k 10 "$lim" "${cmd[@]}" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) line
  line="$(pytest_line "$log")"
  if [ -n "$tool" ] && grep -q "Device not supported" "$log"; then
    SAN_STATE="REFUSED by this host (\"Device not supported\", logs/$name.txt): no memcheck or racecheck ran"
    result "$name" "$took" "REFUSED: compute-sanitizer says \"Device not supported\" here; no $tool check ran"
    return
  fi
  case $rc in
    0) result "$name" "$took" "ok: $line$([ -n "$tool" ] && [ "$SAN_STATE" = ok ] && echo " (under $tool)")" ;;
    5) result "$name" "$took" "NO TESTS SELECTED: the -k/-m expression matches nothing"; fail ;;
    4) result "$name" "$took" "PYTEST USAGE ERROR: $(grep -m1 ERROR "$log" | cut -c1-100)"; fail ;;
    99) result "$name" "$took" "$tool FOUND ERRORS: $(grep -m1 'ERROR SUMMARY' "$log" | tr -d '=' | sed 's/^ *//')"; fail ;;
    124 | 137) result "$name" "$took" "STOPPED at its $lim s limit: $line"; fail ;;
    *) result "$name" "$took" "FAILED (exit $rc): $line"; fail ;;
  esac
}

# run_bench NAME OUT_FOLDER LIMIT BENCH_ARGS...
run_bench() {
  local name=$1 dir=$2 lim=$3 t0=$SECONDS rc log="$LOGS/$1.txt"
  shift 3
  progress "$name (limit $lim s)"
  # SIGTERM at the limit: the bench writes the rows measured so far (its JSON says "stopped");
  # -k 20: time for that, then a hard kill.
  PYTHONUNBUFFERED=1 timeout -k 20 "$lim" "$PY" -m bench --verbose --out "$dir" "$@" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) rows
  rows="$(grep -c '^  [a-z].* ms ' "$log")"
  if ! ls "$dir"/*.json >/dev/null 2>&1; then
    result "$name" "$took" "FAILED (exit $rc), no results: $(tail -n 1 "$log" | cut -c1-90)"; fail
  elif grep -q "is WRONG" "$log"; then
    result "$name" "$took" "WRONG results: $(grep -m1 'is WRONG' "$log" | sed 's/^ *//' | cut -c1-90)"; fail
  elif grep -q "^  STOPPED" "$log" || [ "$rc" = 124 ]; then
    result "$name" "$took" "STOPPED at its $lim s limit: partial, $rows rows kept"
  elif [ "$rc" != 0 ]; then
    result "$name" "$took" "FAILED (exit $rc): $(tail -n 1 "$log" | cut -c1-90)"; fail
  else
    result "$name" "$took" "ok: $rows rows"
  fi
}

# ---- environment and peers -------------------------------------------------------------------
progress "environment ($MODE)"
{
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  command -v nvcc >/dev/null && nvcc --version
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version
} >"$LOGS/env.txt" 2>&1
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$LOGS/env.txt" 2>&1; then
    echo "no CUDA device visible to $PY (see env.txt); on a machine without a GPU use --dry-run" | tee "$OUT/summary.txt"
    save_logs
    exit 1
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
    export TORCH_CUDA_ARCH_LIST
  fi
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  t0=$SECONDS
  progress "peers from .whl/"
  if timeout -k 5 "$(limit $CAP_PEERS)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$WORK/site" .whl/*.whl >"$LOGS/peers.txt" 2>&1; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    result peers $((SECONDS - t0)) "installed: $(cd .whl && ls *.whl | cut -d- -f1,2 | tr '\n' ' ')"
  else
    result peers $((SECONDS - t0)) "INSTALL FAILED: $(tail -n 1 "$LOGS/peers.txt" | cut -c1-90)"; fail
  fi
fi
# Versions of the peers; the two carried as wheels are imported too (a wheel for another torch or
# CUDA fails there, and the benchmark would then skip it).
PEERS="$("$PY" - <<'PEERS' 2>/dev/null
import importlib, importlib.metadata as metadata
out = []
for name in ("bitsandbytes", "torchao", "peft", "matplotlib"):
    try:
        version = metadata.version(name)
        if name in ("bitsandbytes", "torchao"):
            importlib.import_module(name)
        out.append(f"{name} {version}")
    except metadata.PackageNotFoundError:
        out.append(f"{name} ABSENT")
    except Exception as exc:
        out.append(f"{name} {version} FAILS TO IMPORT ({type(exc).__name__})")
print(", ".join(out))
PEERS
)"
echo "peers: $PEERS" >>"$LOGS/env.txt"
save_logs

# ---- build -----------------------------------------------------------------------------------
t0=$SECONDS
if [ "$DRY" = 1 ] && [ -f lora_kernels/_C.so ] && [ -z "$(find csrc setup.py -newer lora_kernels/_C.so -type f)" ]; then
  # The dry run may run inside a test process that has _C.so loaded: rewriting it would crash that one.
  result build 0 "up to date (dry run: lora_kernels/_C.so newer than csrc/ and setup.py)"
else
  progress "build (LORA_KERNELS_CUDA=$BUILD_CUDA, arch ${TORCH_CUDA_ARCH_LIST:-none}, MAX_JOBS=$MAX_JOBS)"
  if LORA_KERNELS_CUDA=$BUILD_CUDA timeout -k 10 "$(limit $CAP_BUILD)" "$PY" setup.py build_ext --inplace \
      >"$LOGS/build.txt" 2>&1; then
    result build $((SECONDS - t0)) "ok ($([ "$BUILD_CUDA" = 1 ] && echo "CUDA kernels for arch $TORCH_CUDA_ARCH_LIST" || echo "CPU kernels only"))"
  else
    result build $((SECONDS - t0)) "FAILED: $(grep -m1 -iE 'error' "$LOGS/build.txt" | cut -c1-90)"; fail
  fi
fi
"$PY" -m lora_kernels.info >"$LOGS/info.txt" 2>&1
save_logs

# ---- tests -----------------------------------------------------------------------------------
if wanted tests; then
  # Every backend test on a GPU is marked gpu (ids cuda-cuda, cuda-triton); the dry run collects
  # and skips them.
  run_pytest gpu_tests $CAP_GPU_TESTS "" tests -m "gpu"
  save_logs
  # The Triton ops' own tests run on cuda where there is one (their compile-for-every-arch tests
  # need no GPU and run in CI).
  run_pytest triton_tests $CAP_TRITON_TESTS "" tests/test_triton_nf4.py tests/test_triton_nf4_matmul.py -k "not compiles"
  save_logs
  # QDoRA's and the adapter pool's own tests: their cuda-cuda and cuda-triton ids ran in gpu_tests;
  # the rest compare with PEFT's DoRA and adapter_names on bitsandbytes as installed here and check
  # caching, merging, slots, eviction, hot swap and adapter files.
  run_pytest dora_tests $CAP_DORA_TESTS "" tests/test_dora.py tests/test_multi_lora.py -k "not cuda-"
  save_logs
fi

# ---- compute-sanitizer -----------------------------------------------------------------------
if wanted sanitizer; then
  # memcheck: quantize/dequantize on ragged tails (4095, 3x1000, 65 elements) at two blocksizes,
  # the fused matmul at every rank and at M=17 (a partial row tile), and a mixed-adapter batch
  # (shrink, expand, the decode kernel's per-row epilogue) at M=17.
  run_pytest memcheck $CAP_MEMCHECK memcheck tests/test_quant.py tests/test_qlora_linear.py tests/test_multi_lora.py -x -k "$CUDA_ID and ((bfloat16 and (4095 or 1000 or 65) and (-64- or -4096-)) or ranks or 96-128-17 or (multi_lora and 17))"
  save_logs
  # racecheck: quantize uses warp shuffles, dequantize and the decode kernel shared tables.
  run_pytest racecheck $CAP_RACECHECK racecheck tests/test_quant.py tests/test_qlora_linear.py -x -k "$CUDA_ID and ((bfloat16 and 4095 and -64-dq) or 96-128-3- or 96-128-17-)"
  save_logs
fi

# ---- benchmarks ------------------------------------------------------------------------------
if wanted bench; then
  lim=$(($(left) - END_RESERVE_S - 20))
  lim=$((lim < CAP_QUANT_DORA ? lim : CAP_QUANT_DORA))
  if [ "$lim" -lt 20 ]; then
    result bench_quant_dora 0 "NOT RUN: $(left) s of the $BUDGET_S s budget left"; fail
  else
    # One run for the three (quant first: a stop during dora or multi keeps the earlier verdicts):
    # its JSON and Markdown, no plots (those are the forward suite's), keep OUT within 8 files.
    # --shapes is the layer suites' only (dora and multi here), --quick (dry run) shortens all.
    run_bench bench_quant_dora "$WORK/bench_quant_dora" "$lim" --suite quant,dora,multi --shapes "$DORA_SHAPES" \
      "${BENCH_ARGS[@]}" "${QUANT_ARGS[@]}"
    for f in "$WORK"/bench_quant_dora/*; do  # the layer run writes the same stem: suffix this run's
      [ -e "$f" ] || continue
      b="$(basename "$f")"
      mv "$f" "$OUT/bench/${b%%.*}-quant-dora.${b#*.}"
    done
  fi
  save_logs
  lim=$(($(left) - END_RESERVE_S - 20))
  if [ "$lim" -lt 30 ]; then
    result bench_layers 0 "NOT RUN: $(left) s of the $BUDGET_S s budget left"; fail
  else
    run_bench bench_layers "$OUT/bench" "$lim" --suite forward,train,memory --quick --shapes "$LAYER_SHAPES" "${BENCH_ARGS[@]}"
  fi
  save_logs
fi

# ---- summary ---------------------------------------------------------------------------------
"$PY" - "$OUT" "$STEPS" "$MODE" "$((SECONDS - START_S))" "$BUDGET_S" "$status" "$SAN_STATE" "$PEERS" \
  >"$OUT/summary.txt" 2>"$LOGS/summary_error.txt" <<'SUMMARY'
import glob, json, os, sys

out, steps, mode, took, budget, status, san, peers = sys.argv[1:]
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "bench", "*.json")))]
env = runs[0]["environment"] if runs else {}
print(f"GPU check, {mode}: {env.get('device', '?')}, torch {env.get('torch', '?')}, commit {env.get('commit', '?')}; "
      f"{took} s of the {budget} s budget")
print(f"peers: {peers}")
if san != "ok":
    print(f"compute-sanitizer: {'absent (dry run: its steps ran their tests without it)' if san == 'absent' else san}")
print()
print(open(steps).read().rstrip())
print()
verdicts = [v for run in runs for v in run["verdicts"]]
gpu = [v for v in verdicts if v.split(": ", 1)[-1].startswith("GPU")]
for run in runs:
    if run["environment"].get("stopped"):
        print(f"partial benchmark: {run['environment']['stopped']}")
# Issue 10's decode goal ">= 80% of HBM" has no bench verdict: read it off the M=1 rows (fraction
# of the measured copy bandwidth), eager and in a CUDA graph; the better of the two decides.
derived = []
for run in runs:
    rows = [r for r in run["rows"] if r["suite"] == "forward" and r["extra"].get("M") == 1]
    for r in rows:
        if r["impl"] in ("ours:cuda", "ours:triton") and not run["environment"]["device"].startswith("CPU"):
            graph = next((g for g in rows if g["case"] == r["case"] and g["impl"] == r["impl"] + " graph"), None)
            fracs = [x["extra"].get("bw_frac") for x in (r, graph) if x and x["extra"].get("bw_frac")]
            if fracs:
                shown = f"{fracs[0]:.0%} eager" + (f", {fracs[1]:.0%} in a CUDA graph" if len(fracs) > 1 else "")
                derived.append(f"{'met' if max(fracs) >= 0.8 else 'MISSED'}: GPU {r['case']}: {r['impl']} "
                               f">= 80% of copy bandwidth (from the rows): {shown}")
print(f"Goals ({len(gpu)} GPU verdicts from the bench's JSON{', and the 80% HBM goal read off its rows' if derived else ''}):")
for v in gpu + derived:
    print("  " + v)
if not gpu:
    print("  (no GPU goal in this run)" + (f"; the CPU verdicts: {len(verdicts)}" if verdicts else ""))
    for v in verdicts:
        print("  " + v)
met = sum(v.startswith("met") for v in gpu + derived)
if gpu or derived:
    print(f"{met} of {len(gpu) + len(derived)} GPU goals met.")
files = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
               if os.path.isfile(p) and os.path.basename(p) != "summary.txt")
print(f"files in {out}: summary.txt, {', '.join(files)}")
print(f"status {status}: " + ("every step ran clean" if status == "0" else "a step FAILED (see the table above and logs.tar.gz)"))
SUMMARY
[ -s "$OUT/summary.txt" ] || { cat "$LOGS/summary_error.txt"; cat "$STEPS" >"$OUT/summary.txt"; fail; }
save_logs
echo
cat "$OUT/summary.txt"
exit $status
