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
    nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, route)
        W is [rows, cols] = [out_features, in_features].
        transpose=False: x [M, cols] -> [M, rows] = x . deq(W)^T + lora_scaling * lora_left . lora_right^T + bias
        transpose=True:  x [M, rows] -> [M, cols] = x . deq(W)   + (the same epilogue)
        lora_left [M, r], lora_right [N, r] (N = the output width), bias [N]; route "fused" or "dequant_gemm".
    qlora_linear(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias) -> (y, xa)
        the QLoRA layer with autograd; see `qlora_linear` below.
    qlora_linear_dx(dy, weight, blocksize, out_features, in_features, g, lora_A) -> dx, its input gradient.

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
                  "Tensor? lora_right, float lora_scaling, Tensor? bias, str route) -> Tensor",
}
_lib = torch.library.Library("lora_kernels", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

# The kernels' names, for the backends that register them (routes.py registers them all).
KERNEL_OPS = ("quantize_nf4", "double_quantize", "dequantize_nf4", "nf4_matmul")
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
def _(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, route):
    return x.new_empty((x.shape[0], cols if transpose else rows))


# The ops as Python callables. The public functions call them through these names (tests plant a
# wrong kernel by replacing one).
quantize_nf4 = torch.ops.lora_kernels.quantize_nf4.default
double_quantize = torch.ops.lora_kernels.double_quantize.default
dequantize_nf4 = torch.ops.lora_kernels.dequantize_nf4.default


def nf4_matmul(x, weight, blocksize, rows, cols, transpose, lora_left=None, lora_right=None, lora_scaling=0.0,
               bias=None) -> torch.Tensor:
    """One NF4 matmul (see the module docstring), on the route routes.py picks for exactly these
    inputs. x: contiguous [M, K], validated by the caller."""
    route = routes.route_for(x, weight, blocksize, rows, cols, transpose)
    return torch.ops.lora_kernels.nf4_matmul.default(
        x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, route
    )


# ---- the QLoRA layer with autograd --------------------------------------------------------------
def qlora_forward(x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias):
    """The layer's forward without autograd (the arguments of `qlora_linear`): the op's kernel, and
    what api.qlora_linear calls directly, eagerly, when no gradient is wanted."""
    branch = x if lora_input is None else lora_input
    xa = (branch.to(lora_A.dtype) @ lora_A.t()).to(lora_A.dtype)  # .to(): autocast may have run the mm in bf16
    y = nf4_matmul(x, weight, blocksize, out_features, x.shape[1], False, xa, lora_B, scaling, bias)
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
    x, lora_input, weight, blocksize, out_features, lora_A, lora_B, scaling, bias = inputs
    _, xa = output
    # Saved: the weight's stored tensors (no copy), the LoRA factors, the rank-sized xa, and the
    # branch input only when A needs a gradient. Never a dequantized weight.
    branch = lora_input if lora_input is not None else x
    # (ctx.needs_input_grad is flattened here, the weight list with it; it has the arguments'
    # structure only in the backward.)
    ctx.save_for_backward(*weight, lora_A, lora_B, xa, branch if lora_A.requires_grad else None)
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

# Below the ops: the route owner, which loads the extension and registers every backend's kernels.
from . import routes  # noqa: E402
