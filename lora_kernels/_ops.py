"""Every op of lora-kernels: its schema, its fake (for torch.compile), and the autograd of the layer.

All ops live in one namespace, `lora_kernels::`. No kernel is defined here: each backend module in
`lora_kernels/backends/` provides kernels, the C++ extension registers its CPU and CUDA kernels to
these same ops, the reference (`backends/torch.py`) is every op's default, and `routes.py` owns
which backend and which route run.

The NF4 weight travels as one bundle, `Tensor?[] weight` = [packed, absmax, nested_absmax,
nested_code, offset] (`NF4Weight.tensors`; the last three None for plain fp32 scales), with its
`blocksize` and its shape. Shapes:

    quantize_nf4(w [n] bf16/fp16/fp32, contiguous) -> packed uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]
    double_quantize(absmax fp32 [nblocks], code fp32 [256]) -> codes uint8 [nblocks],
        nested_absmax fp32 [ceil(nblocks/256)], offset fp32 []      (code: the 8-bit map, stored as nested_code)
    dequantize_nf4(weight, blocksize, numel, dtype) -> [numel] in dtype
    scale_columns(t [M, N], scale fp32 [N], bias [N]?) -> t * scale + bias per column, rounded once to t's dtype
    nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale,
               token_slots, slot_ranks, slot_scalings, route)
        W is [rows, cols] = [out_features, in_features].
        transpose=False: x [M, cols] -> [M, rows] = out_scale * (x . deq(W)^T + lora_scaling * lora_left . lora_right^T)
                                                   + bias
        transpose=True:  x [M, rows] -> [M, cols] = (the same, with x . deq(W))
        lora_left [M, r], lora_right [N, r] (N = the output width), bias [N], out_scale fp32 [N] (DoRA's
        magnitude over the row norm; broadcast over rows, applied in fp32 before the one rounding);
        route "fused" or "dequant_gemm".
        Per-row adapters (token_slots given; forward only, no out_scale): lora_right is [slots, N, R], token_slots
        int32 [M] (-1: the base alone), slot_ranks int32 [slots], slot_scalings fp32 [slots]; row m's LoRA term is
        slot_scalings[t] * lora_left[m, :rank_t] . lora_right[t, :, :rank_t]^T, t = token_slots[m] (lora_scaling unused).
    lora_shrink(x [M, K], lora_A_slots [slots, R, K], token_slots int32 [M], slot_ranks int32 [slots]) -> xa [M, R]
        in A's dtype: row m = x[m] . A[t, :rank_t]^T, rounded once, zero past rank_t and where t = -1.
    multi_lora_linear(x, weight, blocksize, out_features, lora_A_slots, lora_B_slots, slot_scalings, slot_ranks,
                      token_slots, bias) -> y [M, out]: many adapters in one batch; see `multi_lora_linear` below.
    qlora_linear(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias) -> (y, xa)
        the QLoRA layer with autograd; see `qlora_linear` below.
    qlora_linear_dx(dy, weight, blocksize, out_features, in_features, g, lora_A) -> dx, its input gradient.
    dora_linear(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias, magnitude,
                weight_sq_norm) -> (y, xa, u, norm): the DoRA layer with autograd; see `dora_linear` below.

Inputs are validated once, by the public functions in `api.py`; kernels assume valid input and
refuse only what no caller should send.
"""

from __future__ import annotations

import torch

# The kernels' schemas (the test-only emulated CUDA backend defines the same ones in a namespace of
# its own: backends/cuda_emulated.py).
SCHEMAS = {
    "quantize_nf4": "(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)",
    "double_quantize": "(Tensor absmax, Tensor code) -> (Tensor codes, Tensor nested_absmax, Tensor offset)",
    "dequantize_nf4": "(Tensor?[] weight, int blocksize, int numel, ScalarType dtype) -> Tensor",
    "nf4_matmul": "(Tensor x, Tensor?[] weight, int blocksize, int rows, int cols, bool transpose, Tensor? lora_left, "
                  "Tensor? lora_right, float lora_scaling, Tensor? bias, Tensor? out_scale, Tensor? token_slots, "
                  "Tensor? slot_ranks, Tensor? slot_scalings, str route) -> Tensor",
    "scale_columns": "(Tensor t, Tensor scale, Tensor? bias) -> Tensor",
    "lora_shrink": "(Tensor x, Tensor lora_A_slots, Tensor token_slots, Tensor slot_ranks) -> Tensor",
}
_lib = torch.library.Library("lora_kernels", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

# The kernels' names, for the backends that register them (routes.py registers them all).
KERNEL_OPS = ("quantize_nf4", "double_quantize", "dequantize_nf4", "nf4_matmul", "scale_columns", "lora_shrink")
NESTED_BLOCKSIZE = 256  # bitsandbytes' block of scales for double quantization


@torch.library.register_fake("lora_kernels::quantize_nf4", lib=_lib)
def _(w, blocksize):
    n = w.numel()
    return w.new_empty(((n + 1) // 2,), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.register_fake("lora_kernels::double_quantize", lib=_lib)
def _(absmax, code):
    n = absmax.numel()
    return (
        absmax.new_empty((n,), dtype=torch.uint8),
        absmax.new_empty((-(-n // NESTED_BLOCKSIZE),), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


@torch.library.register_fake("lora_kernels::dequantize_nf4", lib=_lib)
def _(weight, blocksize, numel, dtype):
    return weight[0].new_empty((numel,), dtype=dtype)


@torch.library.register_fake("lora_kernels::nf4_matmul", lib=_lib)
def _(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale, token_slots,
      slot_ranks, slot_scalings, route):
    return x.new_empty((x.shape[0], cols if transpose else rows))


@torch.library.register_fake("lora_kernels::lora_shrink", lib=_lib)
def _(x, lora_A_slots, token_slots, slot_ranks):
    return x.new_empty((x.shape[0], lora_A_slots.shape[1]), dtype=lora_A_slots.dtype)


@torch.library.register_fake("lora_kernels::scale_columns", lib=_lib)
def _(t, scale, bias):
    return torch.empty_like(t)


# The ops as Python callables. The public functions call them through these names (tests plant a
# wrong kernel by replacing one).
quantize_nf4 = torch.ops.lora_kernels.quantize_nf4.default
double_quantize = torch.ops.lora_kernels.double_quantize.default
dequantize_nf4 = torch.ops.lora_kernels.dequantize_nf4.default


def nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left=None, lora_right=None, lora_scaling=0.0,
               bias=None, out_scale=None, token_slots=None, slot_ranks=None, slot_scalings=None) -> torch.Tensor:
    """One NF4 matmul (see the module docstring), on the route routes.py picks for exactly these
    inputs. x: contiguous [M, K], validated by the caller."""
    route = routes.route_for(x, weight, blocksize, rows, cols, transpose)
    return torch.ops.lora_kernels.nf4_matmul.default(
        x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale, token_slots,
        slot_ranks, slot_scalings, route
    )


lora_shrink = torch.ops.lora_kernels.lora_shrink.default


# ---- the QLoRA layer with autograd --------------------------------------------------------------
def qlora_forward(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias, out_scale=None):
    """The layer's forward without autograd (the arguments of `qlora_linear`): the op's kernel, and
    what api.qlora_linear calls directly, eagerly, when no gradient is wanted. out_scale [out]: the
    DoRA layer with its scale m / norm known (eval, no gradient, see api.dora_linear), applied in the
    matmul's epilogue beside the LoRA term and the bias."""
    branch = x if lora_input is None else lora_input
    xa = (branch.to(lora_A.dtype) @ lora_A.t()).to(lora_A.dtype)  # .to(): autocast may have run the mm in bf16
    if out_scale is not None:
        out_scale = out_scale.float().contiguous()
    y = nf4_matmul(x, weight, blocksize, out_features, x.shape[1], False, xa, lora_B, scaling, bias, out_scale)
    return y, xa


@torch.library.custom_op("lora_kernels::qlora_linear", mutates_args=())
def qlora_linear(
    x: torch.Tensor,
    lora_input: torch.Tensor | None,
    weight: list[torch.Tensor | None],
    blocksize: int,
    out_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x . deq(W)^T + scaling * (branch . A^T) . B^T + bias, branch = lora_input (dropout
    applied) or x. x: [M, in] contiguous; returns (y [M, out], xa = branch . A^T [M, r] in A's
    dtype, kept for the backward)."""
    return qlora_forward(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias)


@qlora_linear.register_fake
def _(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias):
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)


@torch.library.custom_op("lora_kernels::qlora_linear_dx", mutates_args=())
def qlora_linear_dx(
    dy: torch.Tensor,
    weight: list[torch.Tensor | None],
    blocksize: int,
    out_features: int,
    in_features: int,
    g: torch.Tensor | None,
    lora_A: torch.Tensor,
) -> torch.Tensor:
    """The layer's input gradient, dx = dy . deq(W) + g . A (g = scaling * dy . B [M, r], or None
    for no LoRA term), the LoRA term in the matmul's epilogue. dy: [M, out] contiguous. An op of
    its own so that a compiled backward chooses the matmul's route when it runs, not when traced."""
    if g is None:
        return nf4_matmul(dy, weight, blocksize, out_features, in_features, True)
    return nf4_matmul(dy, weight, blocksize, out_features, in_features, True, g, lora_A.t().contiguous(), 1.0)


@qlora_linear_dx.register_fake
def _(dy, weight, blocksize, out_features, in_features, g, lora_A):
    return dy.new_empty((dy.shape[0], in_features))


_NEEDS_X, _NEEDS_LORA_INPUT, _NEEDS_A, _NEEDS_B, _NEEDS_BIAS = 0, 1, 5, 6, 8  # argument positions


def _qlora_setup_context(ctx, inputs, output):
    _save_layer(ctx, *inputs[:8], output[1])


def _save_layer(ctx, x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, xa, *more):
    """What the QLoRA and DoRA layers' backwards share: the weight's stored tensors (no copy), the
    LoRA factors, the rank-sized xa, the branch input only when A needs a gradient, then `more`
    (DoRA's); never a dequantized weight. The backward gets them back as
    list(saved[:ctx.weight_len]) and the rest."""
    branch = lora_input if lora_input is not None else x
    # (ctx.needs_input_grad is flattened here, the weight list with it; it has the arguments'
    # structure only in the backward.)
    ctx.save_for_backward(*weight, lora_A, lora_B, xa, branch if lora_A.requires_grad else None, *more)
    ctx.weight_len = len(weight)
    # The weight's "gradient" in the structure the op's autograd expects: one None per tensor of a
    # list of tensors, one None for a list holding None.
    ctx.no_weight_grad = None if any(t is None for t in weight) else [None] * len(weight)
    ctx.blocksize, ctx.out_features, ctx.in_features, ctx.scaling = blocksize, out_features, x.shape[1], scaling
    ctx.lora_on_x = lora_input is None
    ctx.lora_input_dtype = None if lora_input is None else lora_input.dtype


def _qlora_backward(ctx, dy, _dxa):
    saved = ctx.saved_tensors
    weight, (lora_A, lora_B, xa, branch) = list(saved[: ctx.weight_len]), saved[ctx.weight_len:]
    needs = ctx.needs_input_grad
    dy = dy.contiguous()
    dy_lora = dy.to(lora_B.dtype)
    # Rank first: g = scaling * dy . B is [M, r]; every LoRA gradient is a product with it, so no
    # [out, in] or [M, out] temporary is made for them.
    g = (dy_lora @ lora_B) * ctx.scaling
    dx = d_lora_input = d_a = d_b = d_bias = None
    if needs[_NEEDS_X]:  # dx = dy . deq(W) (+ g . A when the LoRA branch reads x itself)
        dx = qlora_linear_dx(dy, weight, ctx.blocksize, ctx.out_features, ctx.in_features,
                             g if ctx.lora_on_x else None, lora_A)
    if needs[_NEEDS_LORA_INPUT]:
        d_lora_input = (g @ lora_A).to(ctx.lora_input_dtype)
    if needs[_NEEDS_A]:
        d_a = g.t() @ branch.to(lora_A.dtype)
    if needs[_NEEDS_B]:
        d_b = (dy_lora.t() @ xa) * ctx.scaling
    if needs[_NEEDS_BIAS]:
        d_bias = dy.sum(0)
    return dx, d_lora_input, ctx.no_weight_grad, None, None, d_a, d_b, None, d_bias


qlora_linear.register_autograd(_qlora_backward, setup_context=_qlora_setup_context)


# ---- the DoRA layer with autograd (QDoRA: DoRA on the NF4 base) ---------------------------------
# DoRA (arXiv 2402.09353) scales each output column of the LoRA layer by s = m / ||W + c.B.A||_row,
# the norm a constant for autograd (the paper's section 4.3; PEFT detaches it too). The norm is
# never taken on a dense [out, in] tensor; per output row i,
#     ||W_i + c.(B.A)_i||^2 = ||W_i||^2 + 2c.(W.A^T)_i . B_i + c^2 . B_i (A.A^T) B_i^T
# where ||W_i||^2 is the frozen base's (computed once, `weight_sq_norm`), W.A^T [out, r] is an NF4
# matmul with A as its input (in training, r extra rows of the layer's own matmul), and A.A^T is r x r.
def dora_norm(weight_sq_norm, wa, lora_A, lora_B, scaling, dtype):
    """||W + scaling.B.A|| per output row, [out] in `dtype` (the magnitude's, as PEFT returns it).
    weight_sq_norm: fp32 [out]; wa: W.A^T as [r, out] (the NF4 matmul's output, any float dtype).

    A zero norm (a zero row of W + c.B.A) is clamped to the dtype's smallest normal number: PEFT
    divides by it and its whole output column turns NaN; here the column is m / tiny times a zero
    direction, so the layer's output stays finite."""
    b = lora_B.float()
    a = lora_A.float()
    cross = (wa.float().t() * b).sum(1)
    quadratic = ((b @ (a @ a.t())) * b).sum(1)
    squared = weight_sq_norm + (2.0 * scaling) * cross + (scaling * scaling) * quadratic
    # The expansion can round a zero norm to a tiny negative square.
    return squared.clamp_min(0.0).sqrt().to(dtype).clamp_min(torch.finfo(dtype).tiny)


def dora_weight_a(weight, blocksize, out_features, lora_A, dtype):
    """W.A^T as [r, out] in `dtype`: the NF4 matmul with A's r rows as its input."""
    a = lora_A.to(dtype).contiguous()
    return nf4_matmul(a, weight, blocksize, out_features, a.shape[1], False)


def dora_forward(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias, magnitude,
                 weight_sq_norm):
    """The DoRA layer's training forward without autograd (the arguments of `dora_linear`). One NF4
    matmul takes x, the dropped-out x (with dropout) and A's rows together, so W is read or
    dequantized once for the layer's output and for its norm. The scale m / norm is known only once
    that matmul ends, so it is applied after it, on the unscaled output u that the backward of m
    needs anyway (PEFT keeps the same [M, out] tensor)."""
    M, rank = x.shape[0], lora_A.shape[0]
    a_rows = lora_A.to(x.dtype)
    if lora_input is None:
        xa = (x.to(lora_A.dtype) @ lora_A.t()).to(lora_A.dtype)
        # The LoRA term rides in the epilogue of x's rows; A's rows get none (zero left factors).
        left = torch.cat([xa, xa.new_zeros(rank, rank)])
        out = nf4_matmul(torch.cat([x, a_rows]), weight, blocksize, out_features, x.shape[1], False, left, lora_B,
                         scaling)
        u, wa = out[:M], out[M:]
        norm = dora_norm(weight_sq_norm, wa, lora_A, lora_B, scaling, magnitude.dtype)
        return scale_columns(u, magnitude / norm, bias), xa, u, norm
    # Train mode with dropout, PEFT's form: y = x.W^T + bias + (s - 1).(x_d.W^T) + s.c.x_d.A^T.B^T
    xa = (lora_input.to(lora_A.dtype) @ lora_A.t()).to(lora_A.dtype)
    out = nf4_matmul(torch.cat([x, lora_input.to(x.dtype), a_rows]), weight, blocksize, out_features, x.shape[1],
                     False)
    base_x, base_d, wa = out[:M], out[M:2 * M], out[2 * M:]
    norm = dora_norm(weight_sq_norm, wa, lora_A, lora_B, scaling, magnitude.dtype)
    mag_scale = (magnitude / norm).float()
    lora = (xa @ lora_B.t()).float() * scaling
    u = base_d.float() + lora
    y = base_x.float() + (mag_scale - 1.0) * base_d.float() + mag_scale * lora
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), xa, u.to(x.dtype), norm


def scale_columns(t, scale, bias=None):
    """t * scale + bias per column, the DoRA scale on the matmul's output: t [M, N] contiguous in the
    compute dtype, scale [N] (fp32 or the adapters' dtype), bias [N] or None; in fp32, rounded once
    to t's dtype. The op's CPU kernel does it in one pass (torch's own ops, the reference, make an
    fp32 copy of t, which costs more than the arithmetic there)."""
    return torch.ops.lora_kernels.scale_columns.default(t, scale.float().contiguous(),
                                                         None if bias is None else bias.to(t.dtype).contiguous())


@torch.library.custom_op("lora_kernels::dora_linear", mutates_args=())
def dora_linear(
    x: torch.Tensor,
    lora_input: torch.Tensor | None,
    weight: list[torch.Tensor | None],
    blocksize: int,
    out_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    magnitude: torch.Tensor,
    weight_sq_norm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DoRA layer (reference.dora_linear): x [M, in] contiguous; magnitude m [out];
    weight_sq_norm: ||W_i||^2 of the dequantized base in x's dtype, fp32 [out]. Returns (y [M, out],
    xa [M, r], u [M, out] the unscaled output, norm [out] in m's dtype), the last three for the backward."""
    return dora_forward(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias, magnitude,
                        weight_sq_norm)


@dora_linear.register_fake
def _(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias, magnitude, weight_sq_norm):
    M = x.shape[0]
    return (x.new_empty((M, out_features)), x.new_empty((M, lora_A.shape[0]), dtype=lora_A.dtype),
            x.new_empty((M, out_features)), magnitude.new_empty((out_features,)))


_NEEDS_MAGNITUDE = 9


def _dora_setup_context(ctx, inputs, output):
    magnitude = inputs[_NEEDS_MAGNITUDE]
    _, xa, u, norm = output
    # u, the unscaled output, only for the magnitude's gradient
    _save_layer(ctx, *inputs[:8], xa, u if magnitude.requires_grad else None, norm, magnitude)


def _dora_backward(ctx, dy, _dxa, _du, _dnorm):
    saved = ctx.saved_tensors
    weight = list(saved[: ctx.weight_len])
    lora_A, lora_B, xa, branch, u, norm, magnitude = saved[ctx.weight_len:]
    needs = ctx.needs_input_grad
    dy = dy.contiguous()
    M = dy.shape[0]
    # Every term but the magnitude's sees dy scaled per output column by s = m / norm. No [M, out]
    # product dy . s is formed where it can be avoided: for the LoRA gradients s goes on the
    # rank-sized side (the rows of B, of dy^T . xa), for dx on the rows of W, i.e. its block scales.
    mag_scale = magnitude / norm
    dy_lora = dy.to(lora_B.dtype)
    g = (dy_lora @ (lora_B * mag_scale.to(lora_B.dtype)[:, None])) * ctx.scaling  # [M, r] = scaling (dy . s) . B
    dx = d_lora_input = d_a = d_b = d_m = d_bias = None
    if ctx.lora_on_x:
        if needs[_NEEDS_X]:
            scaled = rows_scaled(weight, ctx.blocksize, ctx.out_features, ctx.in_features, mag_scale)
            dy_s = dy if scaled is not None else scale_columns(dy, mag_scale)
            dx = qlora_linear_dx(dy_s, scaled or weight, ctx.blocksize, ctx.out_features, ctx.in_features, g, lora_A)
    elif needs[_NEEDS_X] or needs[_NEEDS_LORA_INPUT]:
        # x takes dy . W, the dropped-out x takes (dy . (s - 1)) . W + g . A: one transposed matmul on
        # both, the LoRA term in the epilogue of the second half only.
        dy_d = scale_columns(dy, mag_scale.float() - 1.0)
        both = qlora_linear_dx(torch.cat([dy, dy_d]), weight, ctx.blocksize, ctx.out_features, ctx.in_features,
                               torch.cat([torch.zeros_like(g), g]), lora_A)
        dx, d_lora_input = both[:M], both[M:].to(ctx.lora_input_dtype)
    if needs[_NEEDS_A]:
        d_a = g.t() @ branch.to(lora_A.dtype)
    if needs[_NEEDS_B]:
        d_b = (dy_lora.t() @ xa) * (mag_scale.to(lora_B.dtype)[:, None] * ctx.scaling)
    if needs[_NEEDS_MAGNITUDE]:  # sum_i dy[i, n] . u[i, n] / norm[n]
        # In fp16 the products could overflow: fp32 there. bf16 has fp32's range; its products are
        # rounded to bf16 (2^-9 each, as u itself is) and summed in fp32.
        wide = dy.dtype == torch.float16
        d_m = torch.linalg.vecdot(dy.float() if wide else dy, u.float() if wide else u, dim=0)
        d_m = (d_m.float() / norm.float()).to(magnitude.dtype)
    if needs[_NEEDS_BIAS]:
        d_bias = dy.sum(0)
    return dx, d_lora_input, ctx.no_weight_grad, None, None, d_a, d_b, None, d_bias, d_m, None


def rows_scaled(weight, blocksize, rows, cols, row_scale):
    """The NF4 weight with row i times row_scale[i]: the same packed bytes with new plain fp32 block
    scales, [nblocks] (the double-quantized ones decoded as reference.dequantize_absmax decodes
    them, then multiplied), so deq(W') = deq(W) * row_scale per row to one fp32 rounding of each
    scale. None where a block straddles two rows (cols not a multiple of the blocksize)."""
    if cols % blocksize:
        return None
    absmax = block_scales(weight)
    return [weight[0], (absmax.view(rows, cols // blocksize) * row_scale.float()[:, None]).reshape(-1), None, None,
            None]


def block_scales(weight):
    """The weight's fp32 block scales [nblocks], double quantization decoded with
    reference.dequantize_absmax's arithmetic, fp32(fp32(code[c] * nested) + offset), bit for bit,
    without its per-element gather and repeat (40 ms for a 4096 x 4096 weight here; this, under 1 ms)."""
    packed, absmax, nested_absmax, nested_code, offset = weight
    if nested_absmax is None:
        return absmax
    n = absmax.numel()
    values = torch.index_select(nested_code, 0, absmax.int())
    values = torch.nn.functional.pad(values, (0, (-n) % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    return (values * nested_absmax[:, None]).reshape(-1)[:n] + offset


dora_linear.register_autograd(_dora_backward, setup_context=_dora_setup_context)


# ---- many adapters in one batch on one NF4 base (inference) -------------------------------------
# Punica's SGMV / BGMV split, on the NF4 base: the shrink x . A^T per token (`lora_shrink`, rank-sized),
# the expand . B^T in the epilogue of the base matmul, each row with its own slot's adapter.
def multi_lora_forward(x, weight, blocksize, out_features, lora_A_slots, lora_B_slots, slot_scalings, slot_ranks,
                       token_slots, bias):
    """The op's kernel, and what api.multi_lora_linear calls directly, eagerly."""
    xa = lora_shrink(x, lora_A_slots, token_slots, slot_ranks)
    return nf4_matmul(x, weight, blocksize, out_features, x.shape[1], False, xa, lora_B_slots, 0.0, bias, None,
                      token_slots, slot_ranks, slot_scalings)


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def multi_lora_linear(
    x: torch.Tensor,
    weight: list[torch.Tensor | None],
    blocksize: int,
    out_features: int,
    lora_A_slots: torch.Tensor,
    lora_B_slots: torch.Tensor,
    slot_scalings: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y[m] = x[m] . deq(W)^T + slot_scalings[t] * (x[m] . A[t]^T) . B[t]^T + bias, t = token_slots[m]
    (-1: no adapter), each slot at its own rank (reference.multi_lora_linear). x: [M, in] contiguous;
    lora_A_slots [slots, R, in], lora_B_slots [slots, out, R] in one dtype; slot_scalings fp32
    [slots]; slot_ranks, token_slots int32. Inference only (no autograd)."""
    return multi_lora_forward(x, weight, blocksize, out_features, lora_A_slots, lora_B_slots, slot_scalings,
                              slot_ranks, token_slots, bias)


@multi_lora_linear.register_fake
def _(x, weight, blocksize, out_features, lora_A_slots, lora_B_slots, slot_scalings, slot_ranks, token_slots, bias):
    return x.new_empty((x.shape[0], out_features))

# Below the ops: the route owner, which loads the extension and registers every backend's kernels.
from . import routes  # noqa: E402
