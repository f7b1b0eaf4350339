"""The public functions: validate once here, at the boundary, then call the ops (_ops.py)."""

from __future__ import annotations

import math

import torch

from . import _ops, reference
from .nf4 import NF4Weight

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_nf4(w: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a bf16, fp16 or fp32 tensor of any shape to NF4, byte-compatible with bitsandbytes.

    w: any shape; flattened row-major into blocks of `blocksize` elements (the last may be partial).
    double_quant: also quantize the fp32 block scales to 8 bits (0.127 instead of 0.5 bits a weight).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4 supports bfloat16, float16 and float32 weights, got {w.dtype}")
    if blocksize not in reference.BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {reference.BLOCKSIZES}, got {blocksize}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    flat = w.contiguous().reshape(-1)
    packed, absmax = _ops.quantize_nf4(flat, blocksize)
    if not torch.compiler.is_compiling() and not w.is_meta:  # a meta tensor has no values to check
        _check_finite(absmax, blocksize)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    nested_code = reference.dynamic_map(w.device)
    codes, nested_absmax, offset = _ops.double_quantize(absmax, nested_code)
    return NF4Weight(
        packed=packed,
        absmax=codes,
        shape=w.shape,
        dtype=w.dtype,
        blocksize=blocksize,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=offset,
    )


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Weight -> dense tensor of the original shape, in `dtype` (default: the original dtype)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4 expects an NF4Weight, got {type(q).__name__}")
    dtype = dtype or q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dequantize_nf4 can produce bfloat16, float16 or float32, got {dtype}")
    return _ops.dequantize_nf4(q.tensors, q.blocksize, q.numel, dtype).view(q.shape)


def _check_finite(absmax: torch.Tensor, blocksize: int) -> None:
    """Every kernel propagates NaN and Inf into its block's absmax, so one look at the scales
    (numel / blocksize values) tells whether the weight was finite."""
    bad = ~torch.isfinite(absmax)
    if bool(bad.any()):
        block = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"weight contains NaN or Inf (first in block {block}, elements "
            f"{block * blocksize}..{(block + 1) * blocksize - 1} of the flattened tensor); "
            "NF4 cannot represent them"
        )


def qlora_linear(
    x: torch.Tensor,
    qweight: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x . deq(W)^T + scaling * (dropout(x) . A^T) . B^T + bias, with autograd.

    x: [..., in] bf16 / fp16 / fp32 (the compute dtype; the output has it too); qweight: NF4 [out, in];
    lora_A: [r, in]; lora_B: [out, r], fp32 or the compute dtype, one dtype for both; bias: [out] or None.
    dropout_p / training: dropout on the LoRA branch's input, as PEFT's lora_dropout. lora_input:
    [..., in], the branch input to use instead (e.g. a mask applied by the caller); overrides dropout.
    W gets no gradient; x, A, B and bias get theirs when they require it. Without any gradient to
    compute, the call goes straight to the compiled kernel (no Python op, no autograd record).
    """
    out_features, in_features = _check_qlora_args(x, qweight, lora_A, lora_B, bias)
    lead = x.shape[:-1]
    x2, lora_input, lora_A, lora_B, bias = _layer_inputs(x, in_features, lora_A, lora_B, bias, dropout_p, training,
                                                         lora_input)
    # Under torch.compile the op stays one opaque node, and its route is chosen when it runs.
    forward = _ops.qlora_linear if _wants_grad(x, lora_A, lora_B, bias, lora_input) or torch.compiler.is_compiling() \
        else _ops.qlora_forward
    y, _ = forward(x2, lora_input, qweight.tensors, qweight.blocksize, out_features, lora_A, lora_B,
                   float(scaling), bias)
    return y.view(*lead, out_features)


def dora_linear(
    x: torch.Tensor,
    qweight: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    lora_input: torch.Tensor | None = None,
    *,
    weight_sq_norm: torch.Tensor | None = None,
    mag_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DoRA layer on an NF4 base (QDoRA), with autograd; no [out, in] tensor is ever made.

        y = s * (x . deq(W)^T + scaling * x . A^T . B^T) + bias,  s = m / ||deq(W) + scaling * B . A||_row

    the norm a constant for autograd (the DoRA paper's section 4.3, as PEFT). Arguments as in
    `qlora_linear`, plus magnitude: m [out] (a floating dtype; the norm and s come in it, as PEFT's).
    With dropout (train mode, dropout_p > 0) or lora_input, PEFT's form: the magnitude's correction
    and the LoRA term are taken on the dropped-out x (see reference.dora_linear).
    weight_sq_norm: ||deq(W)_i||^2 in x's dtype, fp32 [out] (`weight_row_sq_norms`); computed here,
    one dequantization of W, when not given: a layer keeps it. mag_scale: s itself [out], when the
    caller has it (an eval layer's cache); only without gradients, and it must be s of these very
    tensors. The gradient of m, A, B, x and bias match PEFT's DoRA; W gets none.
    """
    out_features, in_features = _check_qlora_args(x, qweight, lora_A, lora_B, bias)
    _check_vector(magnitude, "magnitude", out_features, x.device, floating=True)
    lead = x.shape[:-1]
    x2, lora_input, lora_A, lora_B, bias = _layer_inputs(x, in_features, lora_A, lora_B, bias, dropout_p, training,
                                                         lora_input)
    wants_grad = _wants_grad(x, lora_A, lora_B, bias, lora_input, magnitude)
    if mag_scale is not None:
        if wants_grad:
            raise ValueError("mag_scale is a cached scale for inference; with gradients wanted the layer computes it")
        _check_vector(mag_scale, "mag_scale", out_features, x.device, floating=True)
    if lora_input is None and not wants_grad and not torch.compiler.is_compiling():
        if mag_scale is None:
            mag_scale = magnitude / dora_weight_norm(qweight, lora_A, lora_B, scaling, dtype=x.dtype,
                                                     out_dtype=magnitude.dtype, weight_sq_norm=weight_sq_norm)
        y, _ = _ops.qlora_forward(x2, None, qweight.tensors, qweight.blocksize, out_features, lora_A, lora_B,
                                  float(scaling), bias, out_scale=mag_scale)
        return y.view(*lead, out_features)
    if weight_sq_norm is None:
        weight_sq_norm = weight_row_sq_norms(qweight, x.dtype)
    _check_vector(weight_sq_norm, "weight_sq_norm", out_features, x.device, dtype=torch.float32)
    forward = _ops.dora_linear if wants_grad or torch.compiler.is_compiling() else _ops.dora_forward
    y = forward(x2, lora_input, qweight.tensors, qweight.blocksize, out_features, lora_A, lora_B, float(scaling), bias,
                magnitude, weight_sq_norm)[0]
    return y.view(*lead, out_features)


def multi_lora_linear(
    x: torch.Tensor,
    qweight: NF4Weight,
    lora_A_slots: torch.Tensor,
    lora_B_slots: torch.Tensor,
    scalings: torch.Tensor,
    token_slots: torch.Tensor,
    bias: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many adapters in one batch on one NF4 base, each row with its own (inference, no autograd):

        y[m] = x[m] . deq(W)^T + scalings[t] * (x[m] . A[t, :r_t]^T) . B[t, :, :r_t]^T + bias,  t = token_slots[m]

    the base alone where t = -1. x: [..., in] (bf16 / fp16 / fp32); qweight: NF4 [out, in];
    lora_A_slots: [slots, R, in] and lora_B_slots: [slots, out, R], one floating dtype; scalings:
    [slots] (lora_alpha / r of each adapter); token_slots: [M] integers, M = x's rows (x.numel() / in);
    ranks: [slots], each slot's own rank r_t <= R (default: R for every slot); a slot costs its own
    rank, and rank 0 adds nothing. One pass over W: the shrink x . A^T per row first, the expand in
    the epilogue of the base matmul (reference.multi_lora_linear is the spec). The slot values are
    checked here (on CUDA that reads them back, a sync; AdapterPool builds its slot maps itself and
    skips it, so its decode steps can be captured in a CUDA graph)."""
    for name, t in (("lora_A_slots", lora_A_slots), ("lora_B_slots", lora_B_slots)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] < 1:
            raise ValueError(f"{name} must be a 3-D tensor with one entry a slot (lora_A_slots [slots, R, in], "
                             f"lora_B_slots [slots, out, R]), got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if lora_A_slots.shape[0] != lora_B_slots.shape[0]:
        raise ValueError(f"lora_A_slots has {lora_A_slots.shape[0]} slots, lora_B_slots {lora_B_slots.shape[0]}")
    # each slot's factors are checked as one adapter's (shapes, dtypes, devices) on the first slot
    out_features, in_features = _check_qlora_args(x, qweight, lora_A_slots[0], lora_B_slots[0], bias)
    slots, max_rank = lora_A_slots.shape[:2]
    if not isinstance(token_slots, torch.Tensor) or token_slots.dim() != 1 or token_slots.is_floating_point():
        raise ValueError(f"token_slots must be a 1-D integer tensor, one slot a row of x (-1: no adapter), got "
                         f"{token_slots!r:.80}")
    M = x.numel() // in_features
    if token_slots.shape[0] != M:
        raise ValueError(f"token_slots has {token_slots.shape[0]} entries, x has {M} rows of {in_features} features")
    if ranks is None:
        ranks = torch.full((slots,), max_rank, dtype=torch.int32, device=x.device)
    if not isinstance(scalings, torch.Tensor):
        scalings = torch.tensor(scalings, dtype=torch.float32, device=x.device)
    for name, t in (("scalings", scalings), ("ranks", ranks), ("token_slots", token_slots)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if tuple(scalings.shape) != (slots,) or tuple(ranks.shape) != (slots,):
        raise ValueError(f"scalings and ranks must be [{slots}], one a slot, got {tuple(scalings.shape)} and "
                         f"{tuple(ranks.shape)}")
    if not torch.compiler.is_compiling():
        bad = (token_slots < -1) | (token_slots >= slots)
        if bool(bad.any()):
            m = int(bad.nonzero()[0, 0])
            raise ValueError(f"token_slots[{m}] = {int(token_slots[m])} is not a slot (-1 to {slots - 1})")
        if bool(((ranks < 0) | (ranks > max_rank)).any()):
            raise ValueError(f"ranks must be within 0..{max_rank} (the slots' R), got {ranks.tolist()}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A_slots, lora_B_slots,
                                                                                   bias)):
        raise ValueError("multi_lora_linear is for inference and has no backward; call it under torch.no_grad() "
                         "(train one adapter at a time with qlora_linear / QLoRALinear)")
    x2, _, lora_A_slots, lora_B_slots, bias = _layer_inputs(x, in_features, lora_A_slots, lora_B_slots, bias, 0.0,
                                                            False, None)
    y = multi_lora_call(x2, qweight, lora_A_slots, lora_B_slots, scalings.float().contiguous(),
                        ranks.to(torch.int32).contiguous(), token_slots.to(torch.int32).contiguous(), bias)
    return y.view(*x.shape[:-1], out_features)


def multi_lora_call(x2, qweight, lora_A_slots, lora_B_slots, slot_scalings, slot_ranks, token_slots, bias):
    """The op on checked inputs (x2 [M, in] contiguous; int32 slots and ranks, fp32 scalings): eagerly
    the kernels directly (no Python op), under torch.compile the custom op, one opaque node."""
    forward = _ops.multi_lora_linear if torch.compiler.is_compiling() else _ops.multi_lora_forward
    return forward(x2, qweight.tensors, qweight.blocksize, qweight.shape[0], lora_A_slots, lora_B_slots, slot_scalings,
                   slot_ranks, token_slots, bias)


def dora_weight_norm(qweight: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                     dtype: torch.dtype = torch.bfloat16, out_dtype: torch.dtype | None = None,
                     weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """||deq(W) + scaling * B . A|| of each output row, [out] in out_dtype (default: the factors'),
    with W dequantized in `dtype` (the compute dtype), no gradient: one thin NF4 matmul (A's r rows)
    and rank-sized work, no [out, in] tensor. weight_sq_norm: `weight_row_sq_norms(qweight, dtype)`."""
    with torch.no_grad():
        if weight_sq_norm is None:
            weight_sq_norm = weight_row_sq_norms(qweight, dtype)
        wa = _ops.dora_weight_a(qweight.tensors, qweight.blocksize, qweight.shape[0], lora_A, dtype)
        return _ops.dora_norm(weight_sq_norm, wa, lora_A, lora_B, float(scaling), out_dtype or lora_A.dtype)


# Elements dequantized at a time by weight_row_sq_norms: 16 MiB of fp32.
_ROW_NORM_CHUNK = 1 << 22


def weight_row_sq_norms(qweight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """||deq(W)_i||^2 for each row of a 2-D NF4 weight, with W dequantized in `dtype` as the matmul
    kernels round it: fp32 [rows]. Dequantized a few rows at a time (about 16 MiB), never whole."""
    rows, cols = qweight.shape
    scales = _ops.block_scales(qweight.tensors)  # fp32 [nblocks]: a chunk needs only its own blocks' scales
    # A chunk starts on a block boundary and on a byte (an even element): its rows are a multiple of
    # blocksize / gcd(cols, blocksize) (the blocksize is even, so the byte follows).
    step = qweight.blocksize // math.gcd(cols, qweight.blocksize)
    chunk_rows = max(step, _ROW_NORM_CHUNK // max(cols, 1) // step * step)
    out = torch.empty(rows, dtype=torch.float32, device=qweight.device)
    for first in range(0, rows, chunk_rows):
        last = min(rows, first + chunk_rows)
        start, numel = first * cols, (last - first) * cols
        block0 = start // qweight.blocksize
        nblocks = -(-numel // qweight.blocksize)
        part = [qweight.packed[start // 2: (start + numel + 1) // 2], scales[block0: block0 + nblocks], None, None,
                None]
        w = _ops.dequantize_nf4(part, qweight.blocksize, numel, dtype).view(last - first, cols).float()
        out[first:last] = (w * w).sum(1)
    return out


def _layer_inputs(x, in_features, lora_A, lora_B, bias, dropout_p, training, lora_input):
    """x as a contiguous [M, in], the LoRA branch's input (lora_input, or dropout(x) in training, or
    None), the factors and the bias as the kernels read them."""
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if lora_input is not None:
        if lora_input.shape != x.shape:
            raise ValueError(f"lora_input has shape {tuple(lora_input.shape)}, x has {tuple(x.shape)}")
        lora_input = lora_input.reshape(-1, in_features).contiguous()
    elif training and dropout_p > 0.0:
        lora_input = torch.nn.functional.dropout(x2, dropout_p, True)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    # The kernels read the factors and the bias densely (the epilogues row by row): a view (transposed,
    # strided) is copied here rather than refused further down with the kernels' names for it.
    lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return x2, lora_input, lora_A, lora_B, bias


def _wants_grad(x, lora_A, lora_B, bias, lora_input, magnitude=None) -> bool:
    """Whether the layer's call must record autograd (a DoRA layer's `magnitude` too)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or lora_A.requires_grad
        or lora_B.requires_grad
        or (bias is not None and bias.requires_grad)
        or (lora_input is not None and lora_input.requires_grad)
        or (magnitude is not None and magnitude.requires_grad)
    )


def _check_vector(t, name: str, length: int, device, *, floating: bool = False, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must be [{length}] (one value an output feature), got shape {tuple(t.shape)}")
    if floating and t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


_FP64_HINT = (" (float64 is not supported: the kernels compute in bf16, fp16 or fp32; a layer moved with "
              ".double() or .to(torch.float64) goes back with .float())")


def _check_qlora_args(x, qweight, lora_A, lora_B, bias) -> tuple[int, int]:
    """Validate once at the boundary; returns (out_features, in_features)."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be a 2-D [out, in] weight, got shape {tuple(qweight.shape)}")
    out_features, in_features = qweight.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}), "
                         f"the layer expects {in_features}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}{_FP64_HINT if x.dtype == torch.float64 else ''}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but the layer's weight is on {qweight.device}; move one with .to()")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must be [r, in] and lora_B [out, r] with r >= 1, got {tuple(lora_A.shape)} "
                         f"and {tuple(lora_B.shape)}")
    rank = lora_A.shape[0]
    if tuple(lora_A.shape) != (rank, in_features) or tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_A must be [{rank}, {in_features}] and lora_B [{out_features}, {rank}], got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} is {t.dtype}; the LoRA factors must be bfloat16, float16 or float32"
                             f"{_FP64_HINT if t.dtype == torch.float64 else ''}")
    if lora_A.dtype != lora_B.dtype:
        raise ValueError(f"lora_A and lora_B must share one dtype, got {lora_A.dtype} and {lora_B.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    return out_features, in_features
