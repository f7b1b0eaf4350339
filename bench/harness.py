"""The one timing harness: warm-up, then the median (with p20 / p80) of repeated runs.

On CUDA it times with CUDA events; on the CPU with perf_counter, repeating until about
`budget_s` has passed (at least `min_runs`). Every kernel is checked before it is timed: a row
whose check fails is reported as wrong and gets no time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    suite: str
    case: str  # e.g. "quantize 4096x4096 bf16"
    impl: str  # e.g. "ours:cpu", "bitsandbytes"
    ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    correct: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def time_fn(fn, device: torch.device, budget_s: float = 1.0, min_runs: int = 5, warmup: int = 2) -> list[float]:
    """Milliseconds per call, one entry per timed run."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        start_all = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 200):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    start_all = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start_all < budget_s and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def summarize(row: Row, times: list[float], nbytes: int | None = None) -> Row:
    times = sorted(times)
    row.ms = statistics.median(times)
    row.p20_ms = times[int(0.2 * (len(times) - 1))]
    row.p80_ms = times[int(0.8 * (len(times) - 1))]
    if nbytes:
        row.gbps = nbytes / (row.ms * 1e-3) / 1e9
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
    for pkg in ("triton", "bitsandbytes", "lora_kernels"):
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
    ms = statistics.median(time_fn(lambda: dst.copy_(src), device, budget_s=0.5))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def write_results(rows: list[Row], env: dict, verdicts: list[str], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    tag = env["device"].replace("CPU: ", "cpu-").replace(" ", "-").replace("/", "-").lower()[:40]
    stem = os.path.join(out_dir, f"{env['date'][:10]}-{tag}-{env['commit']}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows], "verdicts": verdicts}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# Benchmark: {env['device']}\n\n")
        f.write(f"{env['date']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}, torch {env['torch']}, "
                f"bitsandbytes {env['bitsandbytes']}, {env['cpu_threads']} CPU threads\n\n")
        f.write(markdown_table(rows) + "\n\n## Goals\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n")
    return stem + ".json", stem + ".md"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| case | implementation | median ms | p20-p80 ms | GB/s | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r.ms is None:
            lines.append(f"| {r.case} | {r.impl} | - | - | - | {r.note} |")
        else:
            gb = f"{r.gbps:.1f}" if r.gbps else "-"
            lines.append(f"| {r.case} | {r.impl} | {r.ms:.2f} | {r.p20_ms:.2f}-{r.p80_ms:.2f} | {gb} | {r.note} |")
    return "\n".join(lines)


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
