"""Suite `memory`: peak memory of one training step (forward + backward) of a layer, CUDA only.

The step and the implementations are the train suite's (bench.problems: step_fn and
step_implementations: ours per usable backend, bf16 nn.Linear + LoRA, PEFT's LoRA on a
bitsandbytes Linear4bit), each checked against the fp32 reference first.
The figure: torch.cuda.max_memory_allocated during the step minus what was allocated before it
(the layer, x and dy are already there), in bytes and as a multiple of one bf16 copy of the
layer's weight (2 out in bytes): a QLoRA step that materializes the dequantized weight shows it
here. On the CPU there is no allocator to ask: the suite prints that and adds no rows.
"""

from __future__ import annotations

import torch

from .harness import Row, advance, expect
from .problems import RANK, our_backends, prepare_step, step_cases, step_fn, step_implementations
from .shapes import case_name

SUITE = "memory"


def peak_bytes(step, device) -> int:
    """Bytes the step allocates at its peak above what was allocated before it. On the CPU (no
    allocator statistics) from the profiler's memory records: each op's own allocations and frees,
    summed in time order (allocations inside a C++ kernel that bypass torch's allocator are unseen)."""
    if device.type != "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
        live = peak = 0
        for e in events:
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
        return peak
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = RANK,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    if device.type != "cuda":
        log("memory suite skipped: it measures torch.cuda.max_memory_allocated, CUDA only; no rows on the CPU")
        return [], []
    todo = step_cases(device, quick, shapes)
    expect(log, len(todo))
    ours = our_backends(device, wanted, log)
    rows = [] if rows is None else rows
    for model_name, (out_f, in_f), M in todo:
        shape = f"{out_f}x{in_f}"
        case = case_name(SUITE, model_name, shape, M)
        w, w_deq, lora_A, lora_B, x, dy, check = prepare_step(device, out_f, in_f, M, rank)
        weight_bytes = 2 * out_f * in_f  # one bf16 copy of W
        for impl, layer, A, B, note in step_implementations(device, ours, w, w_deq, lora_A, lora_B, rank, log, shape):
            step = step_fn(layer, x, dy, A, B)
            extra = dict(model=model_name, shape=shape, M=M, bf16_weight_bytes=weight_bytes)
            try:
                problem = check(step())  # also the warm-up: workspaces and caches exist before the measurement
            except Exception as exc:
                if not impl.startswith("ours"):
                    log(f"{impl} skipped on {case}: {type(exc).__name__}: {exc}")
                    continue
                problem = f"raised {type(exc).__name__}: {exc}"
            if problem:
                rows.append(Row(SUITE, case, impl, correct=False, note=f"WRONG: {problem}", extra=extra))
                log(f"{impl} on {case} is WRONG ({problem}); not measured")
                continue
            peak = peak_bytes(step, device)
            extra.update(peak_bytes=peak, peak_vs_bf16_weight=peak / weight_bytes)
            rows.append(Row(SUITE, case, impl, correct=True, extra=extra,
                            note=f"{note + '; ' if impl.startswith(('bf16', 'PEFT')) else ''}"
                                 f"peak +{peak / 2**20:.0f} MiB = {peak / weight_bytes:.2f}x one bf16 W "
                                 f"({weight_bytes / 2**20:.0f} MiB)"))
            log(f"{case}: {impl}: fwd+bwd peak above inputs {peak / 2**20:.0f} MiB, "
                f"{peak / weight_bytes:.2f}x one bf16 copy of W")
        del w, w_deq, x, dy
        advance(log, case)
    return rows, []
