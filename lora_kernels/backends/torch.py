"""The reference backend: every op in plain PyTorch (lora_kernels/reference.py, the spec). It is
every op's default kernel on every device, and the oracle of the tests."""

from __future__ import annotations

import torch

from .. import reference
from . import Status

NAME = "torch"
RUNS_ON = ("cpu", "cuda")
ROUTES = ("dequant_gemm",)


def status() -> Status:
    return Status(True, "pure-PyTorch reference (lora_kernels/reference.py)")


def fused_problem(p) -> str | None:
    return "the reference has no fused route"


def quantize_nf4(w, blocksize):
    return reference.quantize_nf4_blocks(w, blocksize)


def double_quantize(absmax, code):
    return reference.double_quantize(absmax, code)


def dequantize_nf4(weight, blocksize, numel, dtype):
    packed, absmax, nested_absmax, nested_code, offset = weight
    if nested_absmax is not None:
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    return reference.dequantize_nf4_blocks(packed, absmax, blocksize, numel, dtype)


def nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale,
               token_slots, slot_ranks, slot_scalings, route):
    if route != "dequant_gemm":
        raise RuntimeError(f"lora_kernels: the torch backend has only the dequant_gemm route, got {route!r}")
    w = dequantize_nf4(weight, blocksize, rows * cols, x.dtype).view(rows, cols)
    out = x @ w if transpose else x @ w.t()
    if token_slots is not None:
        return _add_slot_lora(out, lora_left, lora_right, token_slots, slot_ranks, slot_scalings, bias)
    if lora_left is not None:
        out = out + (lora_scaling * (lora_left @ lora_right.t())).to(out.dtype)
    if out_scale is not None:
        # out_scale [N] fp32 scales the product and the LoRA term, not the bias; in fp32, rounded
        # once, as the fused kernels do
        return scale_columns(out, out_scale, bias)
    if bias is not None:
        out = out + bias
    return out


def _add_slot_lora(out, lora_left, lora_right, token_slots, slot_ranks, slot_scalings, bias):
    """out + each row's own adapter's term (the nf4_matmul contract with token_slots), in fp32,
    rounded once, + bias. One masked product per slot: the rows of other slots and the columns past
    the slot's rank take zeros (the reference favours plain over fast)."""
    acc = out.float()
    left = lora_left.float()
    columns = torch.arange(left.shape[1], device=left.device)
    for t in range(lora_right.shape[0]):
        rows = (token_slots == t)[:, None] & (columns < slot_ranks[t])[None, :]
        acc = acc + slot_scalings[t] * (torch.where(rows, left, 0.0) @ lora_right[t].float().t())
    out = acc.to(out.dtype)
    return out if bias is None else out + bias


def lora_shrink(x, lora_A_slots, token_slots, slot_ranks):
    """xa [M, R] in A's dtype: row m = x[m] . A[t]^T (t = token_slots[m]) in fp32, rounded once, zero
    past the slot's rank and where t = -1."""
    slots = token_slots.long()
    a = lora_A_slots[slots.clamp_min(0)].float()  # [M, R, K]
    xa = torch.bmm(a, x.float()[:, :, None])[:, :, 0]
    columns = torch.arange(lora_A_slots.shape[1], device=x.device)
    keep = (slots >= 0)[:, None] & (columns[None, :] < slot_ranks[slots.clamp_min(0)].long()[:, None])
    return torch.where(keep, xa, 0.0).to(lora_A_slots.dtype)


def scale_columns(t, scale, bias):
    """t * scale + bias per column, in fp32, rounded once to t's dtype."""
    out = t.float() * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(t.dtype)


KERNELS = {
    "quantize_nf4": quantize_nf4,
    "double_quantize": double_quantize,
    "dequantize_nf4": dequantize_nf4,
    "nf4_matmul": nf4_matmul,
    "scale_columns": scale_columns,
    "lora_shrink": lora_shrink,
}
