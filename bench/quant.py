"""Suite `quant`: NF4 quantize and dequantize (double quantization on, block 64) against bitsandbytes."""

from __future__ import annotations

import torch

import lora_kernels

from .harness import Row, advance, device_peaks, expect, log_row, summarize, time_fn
from .problems import (bitsandbytes_functional, bnb_quantize_nf4, nf4_nbytes, our_backends, reference_nf4,
                       using_backend)

CPU_SHAPES = [(4096, 4096), (11008, 4096)]
GPU_SHAPES = [(4096, 4096), (8192, 28672)]


def _same(q, ref: dict) -> str:
    """'' when q holds exactly the reference bytes, else what differs."""
    for key in ("packed", "absmax", "nested_absmax", "offset"):
        if not torch.equal(getattr(q, key).cpu(), ref[key].cpu()):
            return f"{key} differs from the reference"
    return ""


def _time(rows, log, device, budget, case, impl, fn, nbytes, **fields) -> float:
    """Time fn into a row (Row `fields`: correct, note), appended and printed; its median ms."""
    row = summarize(Row("quant", case, impl, **fields), time_fn(fn, device, budget), nbytes)
    rows.append(row)
    log_row(log, row)
    return row.ms


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, rows: list[Row] | None = None
        ) -> tuple[list[Row], list[dict]]:
    """Rows go into `rows` when given (the caller keeps a stopped run's rows)."""
    shapes = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[: 1 if quick else None]
    budget = 0.3 if quick else 1.0
    expect(log, len(shapes))
    ours = our_backends(device, wanted, log)
    bnbF = bitsandbytes_functional(log)
    rows, goals = ([] if rows is None else rows), []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).to(device)
        ref, ref_deq = reference_nf4(w)
        n = w.numel()
        quant_bytes = 2 * n + nf4_nbytes(n)  # bf16 in; packed + codes + scales out
        name = f"{shape[0]}x{shape[1]} bf16"
        times = {}
        for backend in ours:
            with using_backend(backend):
                q = lora_kernels.quantize_nf4(w)
                problem = _same(q, ref)
                if not problem and not torch.equal(lora_kernels.dequantize_nf4(q), ref_deq):
                    problem = "dequantized values differ from the reference"
                if problem:
                    rows.append(Row("quant", f"quantize {name}", f"ours:{backend}", correct=False, note=f"WRONG: {problem}"))
                    log(f"ours:{backend} on {name} is WRONG ({problem}); not timed")
                    continue
                for op, fn in (("quantize", lambda: lora_kernels.quantize_nf4(w)), ("dequantize", lambda: lora_kernels.dequantize_nf4(q))):
                    times[(op, backend)] = _time(rows, log, device, budget, f"{op} {name}", f"ours:{backend}", fn,
                                                 quant_bytes, correct=True)
        if bnbF is not None:
            packed, qs = bnb_quantize_nf4(bnbF, w)
            same = torch.equal(packed.reshape(-1).cpu(), ref["packed"].cpu()) and torch.equal(qs.absmax.cpu(), ref["absmax"].cpu())
            note = "bytes identical to ours" if same else "bytes differ from ours"
            for op, fn in (
                ("quantize", lambda: bnb_quantize_nf4(bnbF, w)),
                ("dequantize", lambda: bnbF.dequantize_4bit(packed, qs)),
            ):
                times[(op, "bnb")] = _time(rows, log, device, budget, f"{op} {name}", "bitsandbytes", fn, quant_bytes,
                                           correct=same, note=note)
        goals += _goals(device, name, times, quant_bytes)
        advance(log, f"quant {name}")
    return rows, goals


def _goals(device, name, times, nbytes) -> list[dict]:
    """The speed goals of the quantization issue, as verdicts with their figures."""
    goals = []
    ours = "cuda" if device.type == "cuda" else "cpu"
    if device.type == "cpu":
        for op, factor in (("quantize", 20.0), ("dequantize", 3.0)):
            mine, theirs = times.get((op, ours)), times.get((op, "bnb"))
            if mine and theirs:
                speedup = theirs / mine
                goals.append(dict(goal=f"CPU {op} {name} >= {factor:g}x bitsandbytes", met=speedup >= factor,
                                  figure=f"{speedup:.2f}x ({mine:.2f} ms vs {theirs:.2f} ms)"))
    else:
        copy = device_peaks(device)["peak_copy_gbps"]
        for op in ("quantize", "dequantize"):
            mine, theirs = times.get((op, ours)), times.get((op, "bnb"))
            if mine:
                frac = nbytes / (mine * 1e-3) / 1e9 / copy
                goals.append(dict(goal=f"GPU {op} {name} >= 85% of copy bandwidth ({copy:.0f} GB/s)",
                                  met=frac >= 0.85, figure=f"{100 * frac:.1f}%"))
            if mine and theirs:
                goals.append(dict(goal=f"GPU {op} {name} faster than bitsandbytes", met=mine < theirs,
                                  figure=f"{theirs / mine:.2f}x"))
    return goals
