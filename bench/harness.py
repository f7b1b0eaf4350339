"""The one timing harness: warm-up, then the median (with p20 / p80) of repeated runs.

On CUDA it times with CUDA events; on the CPU with perf_counter, repeating until about
`budget_s` has passed (at least `min_runs`). Every kernel is checked before it is timed: a row
whose check fails is reported as wrong and gets no time.

The roofline: at the start of a run `device_peaks` measures the device's copy bandwidth and a
large bf16 matmul's FLOP/s. Each timed row reports the GB/s and TFLOP/s it achieved (from the
bytes it must move and the FLOPs it must do, given by its suite) and, in row.extra, bw_frac and
flop_frac: those figures as fractions of the measured peaks.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Row:
    suite: str
    case: str  # e.g. "quantize 4096x4096 bf16"
    impl: str  # e.g. "ours:cpu", "bitsandbytes"
    ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None  # bytes the implementation must move / median time
    tflops: float | None = None  # FLOPs it must do / median time
    correct: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


_FLUSH_BUFFERS: dict[str, torch.Tensor] = {}


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or (50 << 20)
    try:  # Linux: the CPU's last-level cache, e.g. "307200K"
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return 64 << 20


def flush_cache(device: torch.device) -> None:
    """Evict the last-level cache by writing twice its size, so the next call reads its weights
    from memory, as a layer of a real model (far larger than any cache) does. Without it, a 32 MB
    bf16 weight timed over and over sits in a 300 MB L3 and a dense baseline looks faster than it
    is in a model."""
    buf = _FLUSH_BUFFERS.get(device.type)
    if buf is None:
        nbytes = min(2 * _last_level_cache_bytes(device), 1 << 30)
        buf = _FLUSH_BUFFERS[device.type] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    buf.fill_(1)


def time_fn(fn, device: torch.device, budget_s: float = 1.0, min_runs: int = 5, warmup: int = 2,
            cold: bool = False) -> list[float]:
    """Milliseconds per call, one entry per timed run. cold: flush the last-level cache before each
    timed call (the flush itself is not timed)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        start_all = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 200):
            if cold:
                flush_cache(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    start_all = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 200):
        if cold:
            flush_cache(device)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def time_paired(fns: dict, budget_s: float = 2.0, min_rounds: int = 10, warmup: int = 2,
                cold: bool = False) -> dict[str, list[float]]:
    """CPU: milliseconds per call of each function, the functions called in turn, round after
    round. On a noisy machine (a shared 2-core VM here) separate timing windows see different
    noise; interleaved calls see the same, so the ratio of their medians is the fairer comparison."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start_all < budget_s and rounds < 200):
        for name, fn in fns.items():
            if cold:
                flush_cache(torch.device("cpu"))
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
        rounds += 1
    return times


def summarize(row: Row, times: list[float], nbytes: int | None = None, flops: int | None = None) -> Row:
    times = sorted(times)
    row.ms = statistics.median(times)
    row.p20_ms = times[int(0.2 * (len(times) - 1))]
    row.p80_ms = times[int(0.8 * (len(times) - 1))]
    if nbytes:
        row.gbps = nbytes / (row.ms * 1e-3) / 1e9
        row.extra["bytes"] = nbytes
    if flops:
        row.tflops = flops / (row.ms * 1e-3) / 1e12
        row.extra["flops"] = flops
    row.extra["runs"] = len(times)
    return row


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU: {_cpu_model()}",
    }
    for pkg in ("triton", "bitsandbytes", "peft", "torchao", "matplotlib", "lora_kernels"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as exc:  # a missing peer is recorded, not hidden
            env[pkg] = f"not available ({type(exc).__name__})"
    if device.type == "cuda":
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return env


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Measured device copy bandwidth (bytes read + written), the roofline for memory-bound kernels."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = min(time_fn(lambda: dst.copy_(src), device, budget_s=0.5))  # a peak: the best run
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int) -> float:
    """Measured bf16 TFLOP/s of an n x n x n torch.mm on random data, the roofline for compute-bound kernels."""
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=g).to(torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = min(time_fn(lambda: torch.mm(a, b, out=out), device, budget_s=0.5, warmup=3))  # a peak: the best run
    return 2 * n**3 / (ms * 1e-3) / 1e12


# GPU: 8192^3 (1.1 TFLOP, ~1.4 ms on an H100) reaches the tensor cores' sustained rate, so the
# largest layer matmuls (up to 8192 x 28672 x 8192) do not read above 100%; CPU: 2048^3 runs in
# tens of milliseconds on a few cores.
PEAK_MATMUL_N = {"cuda": 8192, "cpu": 2048}


@functools.cache
def device_peaks(device: torch.device) -> dict:
    """The measured peaks of `device`, once a process: copy GB/s and bf16 matmul TFLOP/s."""
    n = PEAK_MATMUL_N.get(device.type, 2048)
    return {"peak_copy_gbps": copy_bandwidth_gbps(device), "peak_matmul_tflops": matmul_tflops(device, n),
            "peak_matmul": f"bf16 torch.mm {n}x{n}x{n}"}


def add_roofline(rows: list[Row], env: dict) -> None:
    """row.extra bw_frac / flop_frac: the row's GB/s and TFLOP/s as fractions of env's measured peaks."""
    for r in rows:
        if r.gbps and env.get("peak_copy_gbps"):
            r.extra["bw_frac"] = r.gbps / env["peak_copy_gbps"]
        if r.tflops and env.get("peak_matmul_tflops"):
            r.extra["flop_frac"] = r.tflops / env["peak_matmul_tflops"]


# ---- what the suites print through ---------------------------------------------------------------
class Log:
    """The suites' `log`: log(line) always prints (skips, wrong kernels, notes); log.row(row) prints
    a timed row only with verbose; expect(n) / advance(what) drive a progress bar on stderr (shown
    only when stderr is a terminal). Suites also accept a plain callable (tests pass one)."""

    def __init__(self, verbose: bool = False, bar: bool | None = None):
        self.verbose = verbose
        self.bar = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=0, unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def __call__(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write("  " + line, file=sys.stdout)
        else:
            print("  " + line, flush=True)

    def row(self, row: Row) -> None:
        if self.verbose:
            self(format_row(row))

    def expect(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def advance(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(what[:40], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_row(row: Row) -> str:
    gb = f" {row.gbps:8.1f} GB/s" if row.gbps else ""
    tf = f" {row.tflops:8.3f} TFLOP/s" if row.tflops else ""
    return f"{row.case:34s} {row.impl:46s} {row.ms:10.4f} ms{gb}{tf}"


def log_row(log, row: Row) -> None:
    if hasattr(log, "row"):
        log.row(row)
    else:
        log(format_row(row))


def expect(log, n: int) -> None:
    if hasattr(log, "expect"):
        log.expect(n)


def advance(log, what: str) -> None:
    if hasattr(log, "advance"):
        log.advance(what)


def _git(*args) -> str:
    return _run(["git", *args], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(cmd, cwd=None) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
