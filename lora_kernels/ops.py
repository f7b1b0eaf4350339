"""Op schemas, fake kernels and backend dispatch.

Three ops live in the `lora_kernels` namespace:

    lora_kernels::quantize_nf4(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)
        w: flat [n] bf16/fp16/fp32, contiguous; packed: uint8 [ceil(n/2)]; absmax: fp32 [ceil(n/blocksize)]
    lora_kernels::dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax,
                                 Tensor? nested_code, Tensor? offset, int blocksize, int numel,
                                 ScalarType dtype) -> Tensor
        absmax: fp32 [nblocks], or uint8 codes with nested_absmax fp32 [ceil(nblocks/256)],
        nested_code fp32 [256] and offset fp32 []; returns flat [numel] in dtype.
    lora_kernels::double_quantize(Tensor absmax) -> (Tensor codes, Tensor nested_absmax, Tensor offset)

Each has a CPU and a CUDA kernel and a fake, so `torch.compile(fullgraph=True)` traces them. The
kernel picks a backend: on a CUDA tensor the CUDA extension, else Triton, else the reference; on a
CPU tensor the C++ extension, else the reference. `LORA_KERNELS_BACKEND` or `set_backend()` forces one.
Inputs are validated by the public functions in `api.py`; the ops assume valid input.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

from . import reference

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")

# ---- the compiled extension ---------------------------------------------------------------------
try:
    importlib.import_module("lora_kernels._C")  # registers torch.ops.lora_kernels_C.*
    _EXT_ERROR: str | None = None
except ModuleNotFoundError:
    _EXT_ERROR = "the compiled extension lora_kernels._C is not built (pip install -e . builds it)"
except ImportError as exc:  # built against another torch, or a missing library
    _EXT_ERROR = f"the compiled extension lora_kernels._C did not load: {exc}"


def _ext_has(device_key: str) -> bool:
    return _EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lora_kernels_C::quantize_nf4", device_key
    )


def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly, for testing)"
    return None


class BackendStatus(NamedTuple):
    usable: bool
    detail: str


def backends() -> dict[str, BackendStatus]:
    """Which backends are usable here and, for each missing one, why."""
    return dict(_backend_status())


@functools.cache
def _backend_status() -> dict[str, BackendStatus]:
    # Looked up once a process: what was built and which devices exist do not change, and every
    # op call consults it.
    status = {}
    if not _ext_has("CUDA"):
        why = _EXT_ERROR or "the extension was built without CUDA sources"
        status["cuda"] = BackendStatus(False, why)
    elif not torch.cuda.is_available():
        status["cuda"] = BackendStatus(False, "built with CUDA, but no CUDA device is visible")
    else:
        status["cuda"] = BackendStatus(True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    problem = _triton_problem()
    status["triton"] = BackendStatus(problem is None, problem or "Triton kernels")
    if _ext_has("CPU"):
        isa = torch.ops.lora_kernels_C.cpu_isa()
        status["cpu"] = BackendStatus(True, f"C++ kernels, {torch.get_num_threads()} threads, {isa} code paths")
    else:
        status["cpu"] = BackendStatus(False, _EXT_ERROR or "the extension has no CPU kernels")
    status["torch"] = BackendStatus(True, "pure-PyTorch reference (lora_kernels/reference.py)")
    return status


# ---- the one global: which backend is forced ----------------------------------------------------
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for every op (`cuda`, `triton`, `cpu`, `torch`), or None for automatic choice."""
    global _forced
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or None")
    _forced = name


def get_backend() -> str | None:
    return _forced


set_backend(os.environ.get("LORA_KERNELS_BACKEND") or None)

_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# Which device types each backend can run on.
_RUNS_ON = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpu": ("cpu",), "torch": ("cuda", "cpu")}


@torch.compiler.assume_constant_result
def _usable_backends() -> tuple[str, ...]:
    # A constant for torch.compile: it neither traces nor guards on the lookup behind it.
    return tuple(name for name, st in _backend_status().items() if st.usable)


def pick_backend(device: torch.device) -> str:
    """The backend that runs an op on `device`."""
    usable = _usable_backends()
    if _forced is not None:
        if device.type not in _RUNS_ON[_forced]:
            raise RuntimeError(f"backend {_forced!r} is forced but cannot run on a {device.type} tensor")
        if _forced not in usable:
            raise RuntimeError(f"backend {_forced!r} is forced but not usable here: {backends()[_forced].detail}")
        return _forced
    for name in _AUTO.get(device.type, ("torch",)):
        if name in usable:
            return name
    return "torch"


# ---- the ops ----------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::quantize_nf4", mutates_args=())
def quantize_nf4_op(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    backend = pick_backend(w.device)
    if backend in ("cuda", "cpu"):
        return torch.ops.lora_kernels_C.quantize_nf4(w, blocksize)
    if backend == "triton":
        from triton_ops import quant

        return quant.quantize_nf4(w, blocksize)
    return reference.quantize_nf4_blocks(w, blocksize)


@quantize_nf4_op.register_fake
def _(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.numel()
    packed = w.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = w.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return packed, absmax


@torch.library.custom_op("lora_kernels::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    backend = pick_backend(packed.device)
    args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, numel, dtype)
    if backend in ("cuda", "cpu"):
        return torch.ops.lora_kernels_C.dequantize_nf4(*args)
    if backend == "triton":
        from triton_ops import quant

        return quant.dequantize_nf4(*args)
    if nested_absmax is not None:
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    return reference.dequantize_nf4_blocks(packed, absmax, blocksize, numel, dtype)


@dequantize_nf4_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.custom_op("lora_kernels::double_quantize", mutates_args=())
def double_quantize_op(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block scales fp32 [nblocks] -> (codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)],
    offset fp32 []). It works on numel / blocksize values: the C++ backend has a kernel, the others
    share the reference. Being an op keeps torch.compile from re-deriving (and re-rounding) its
    arithmetic."""
    if pick_backend(absmax.device) == "cpu":
        return torch.ops.lora_kernels_C.double_quantize(absmax, reference.dynamic_map_lut("cpu"))
    return reference.double_quantize(absmax)


@double_quantize_op.register_fake
def _(absmax: torch.Tensor):
    n = absmax.numel()
    nested = (n + reference.NESTED_BLOCKSIZE - 1) // reference.NESTED_BLOCKSIZE
    return (
        absmax.new_empty((n,), dtype=torch.uint8),
        absmax.new_empty((nested,), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


# ---- the fused NF4 matmul ---------------------------------------------------------------------
#
#     nf4_matmul(x, W, transpose, lora_left, lora_right, lora_scaling, bias)
#         transpose=False: x [M, in]  -> [M, out] = x . deq(W)^T + lora_scaling * left . right^T + bias
#         transpose=True:  x [M, out] -> [M, in]  = x . deq(W)   + (the same epilogue)
#
# W is an NF4 matrix [out, in] given by its stored tensors. Routes: "fused" (the kernel reads the
# packed bytes; no dequantized weight is ever written) and "dequant_gemm" (dequantize into a buffer,
# then the vendor GEMM). Which backend offers which route:
ROUTES = {"cuda": ("fused", "dequant_gemm"), "triton": ("fused",), "cpu": ("fused", "dequant_gemm"), "torch": ("dequant_gemm",)}
_ROUTE_CODES = {"fused": 1, "dequant_gemm": 2}

# The largest M for which the fused route is picked, per (backend, device architecture); above it
# dequantize + GEMM wins. CPU: both routes forced and timed side by side (bf16, 4096x4096, 2
# threads, a Xeon with AVX-512 BF16 and AMX, 2026-11-28): fused 0.56x / 1.15x / 2.1x the time of
# bf16 F.linear at M = 1 / 4 / 8, dequant+GEMM 1.6x at all three; see `python -m bench --suite
# forward` for the current figures. CUDA: the decode kernel's own limit (kDecodeMaxRows), not yet
# measured on a GPU. Where an architecture is missing, the "default" entry applies.
FUSED_MAX_ROWS = {
    "cpu": {"default": 4},
    "cuda": {"default": 16},
}

_forced_route: str | None = None


def set_route(name: str | None) -> None:
    """Force a route ("fused" or "dequant_gemm") for every nf4 matmul, or None for the table's choice.
    For tests and benchmarks; a backend that lacks the route raises when asked to run it. The CPU
    and CUDA fused kernels are forward-only: under a forced "fused", the backward's dx is unfused."""
    global _forced_route
    if name is not None and name not in _ROUTE_CODES:
        raise ValueError(f"unknown route {name!r}; choose one of {tuple(_ROUTE_CODES)} or None")
    _forced_route = name


def get_route() -> str | None:
    return _forced_route


@torch.compiler.assume_constant_result
def _arch(device: torch.device) -> str:
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else "default"


@functools.cache
def _cuda_arch(index: int) -> str:  # looked up once a device: every decode step asks
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def choose_route(backend: str, device: torch.device, M: int, cols: int, blocksize: int, transpose: bool) -> tuple[str, str]:
    """(route, why) for one nf4 matmul: the forced route, or the table's choice."""
    offered = ROUTES[backend]
    fusable = not transpose and cols % blocksize == 0
    if _forced_route is not None:
        if _forced_route not in offered:
            raise RuntimeError(f"route {_forced_route!r} is forced but backend {backend!r} offers only {offered}")
        if _forced_route == "fused" and backend != "triton" and transpose:
            return "dequant_gemm", f"backend {backend!r} fuses only forward matmuls; the backward's dx is unfused"
        if _forced_route == "fused" and backend != "triton" and not fusable:
            raise RuntimeError(
                f"route 'fused' is forced but backend {backend!r} fuses only the forward matmul with "
                f"in_features ({cols}) a multiple of the blocksize ({blocksize})"
            )
        return _forced_route, "forced with set_route()"
    if len(offered) == 1:
        return offered[0], f"the only route backend {backend!r} has"
    if not fusable:
        why = "a transposed matmul (backward)" if transpose else f"in_features {cols} is not a multiple of {blocksize}"
        return "dequant_gemm", f"{why}: the fused kernel does not cover it"
    table = FUSED_MAX_ROWS[backend]
    arch = _arch(device)
    limit = table.get(arch, table["default"])
    if M <= limit:
        return "fused", f"M={M} <= {limit}, the fused kernel's measured range on {backend}/{arch}"
    return "dequant_gemm", f"M={M} > {limit}: dequantize + GEMM measured faster on {backend}/{arch}"


def explain(device: torch.device | str, M: int, in_features: int, blocksize: int = 64, transpose: bool = False) -> dict:
    """Which backend and route a matmul of M rows would take here, and why."""
    device = torch.device(device)
    backend = pick_backend(device)
    route, why = choose_route(backend, device, M, in_features, blocksize, transpose)
    return {"backend": backend, "route": route, "why": why}


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    rows: int,
    cols: int,
    transpose: bool,
    lora_left: torch.Tensor | None = None,
    lora_right: torch.Tensor | None = None,
    lora_scaling: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch one nf4 matmul (see above). x: contiguous [M, K]; inputs already validated."""
    backend = pick_backend(x.device)
    route, _ = choose_route(backend, x.device, x.shape[0], cols, blocksize, transpose)
    if backend in ("cuda", "cpu"):
        return torch.ops.lora_kernels_C.nf4_matmul(
            x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, transpose,
            lora_left, lora_right, lora_scaling, bias, _ROUTE_CODES[route],
        )
    if backend == "triton":
        return nf4_matmul_triton_op(
            x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, transpose,
            lora_left, lora_right, lora_scaling, bias,
        )
    weight = dequantize_nf4_op(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows * cols, x.dtype)
    weight = weight.view(rows, cols)
    out = x @ weight if transpose else x @ weight.t()
    if lora_left is not None:
        out = out + (lora_scaling * (lora_left @ lora_right.t())).to(out.dtype)
    if bias is not None:
        out = out + bias
    return out


def _matmul_out_shape(x: torch.Tensor, rows: int, cols: int, transpose: bool) -> tuple[int, int]:
    return (x.shape[0], cols if transpose else rows)


@torch.library.register_fake("lora_kernels_C::nf4_matmul")
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, transpose,
      lora_left, lora_right, lora_scaling, bias, route):
    return x.new_empty(_matmul_out_shape(x, rows, cols, transpose))


@torch.library.custom_op("lora_kernels::nf4_matmul_triton", mutates_args=())
def nf4_matmul_triton_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    rows: int,
    cols: int,
    transpose: bool,
    lora_left: torch.Tensor | None,
    lora_right: torch.Tensor | None,
    lora_scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    from triton_ops import qlora_matmul

    if nested_absmax is not None:  # numel / blocksize values, decoded exactly by the reference
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    return qlora_matmul.nf4_linear(
        x, packed, absmax, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias
    )


@nf4_matmul_triton_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, transpose,
      lora_left, lora_right, lora_scaling, bias):
    return x.new_empty(_matmul_out_shape(x, rows, cols, transpose))


# ---- the QLoRA layer with autograd --------------------------------------------------------------
def qlora_forward(x, lora_input, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features,
                  lora_A, lora_B, scaling, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's forward, without autograd (see qlora_linear_op for the arguments): the op's
    kernel, and what api.qlora_linear calls directly when no gradient is wanted."""
    branch = x if lora_input is None else lora_input
    xa = (branch.to(lora_A.dtype) @ lora_A.t()).to(lora_A.dtype)  # .to(): autocast may have run the mm in bf16
    y = nf4_matmul(
        x, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features, x.shape[1], False,
        xa, lora_B, scaling, bias,
    )
    return y, xa


@torch.library.custom_op("lora_kernels::qlora_linear", mutates_args=())
def qlora_linear_op(
    x: torch.Tensor,
    lora_input: torch.Tensor | None,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, in] contiguous; lora_input: [M, in] (dropout applied) or None for x itself.
    Returns (y [M, out], xa = lora_input . A^T [M, r] in A's dtype, kept for the backward)."""
    return qlora_forward(x, lora_input, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                         out_features, lora_A, lora_B, scaling, bias)


@qlora_linear_op.register_fake
def _(x, lora_input, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features,
      lora_A, lora_B, scaling, bias):
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)


def _qlora_setup_context(ctx, inputs, output):
    (x, lora_input, packed, absmax, nested_absmax, nested_code, offset, blocksize, out_features,
     lora_A, lora_B, scaling, bias) = inputs
    _, xa = output
    # Saved: the weight's stored tensors (no copy), the LoRA factors, the rank-sized xa, and the
    # branch input only when A needs a gradient. Never a dequantized weight.
    branch = lora_input if lora_input is not None else x
    needs_a = ctx.needs_input_grad[9]
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, xa,
                          branch if needs_a else None)
    ctx.blocksize, ctx.out_features, ctx.in_features, ctx.scaling = blocksize, out_features, x.shape[1], scaling
    ctx.lora_on_x = lora_input is None
    ctx.x_dtype = x.dtype
    ctx.lora_input_dtype = None if lora_input is None else lora_input.dtype


def _qlora_backward(ctx, dy, _dxa):
    packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, xa, branch = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dy = dy.contiguous()
    dy_lora = dy.to(lora_B.dtype)
    # Rank first: g = scaling * dy . B is [M, r]; every LoRA gradient is a product with it, so no
    # [out, in] or [M, out] temporary is made for them.
    g = (dy_lora @ lora_B) * ctx.scaling
    dx = d_lora_input = d_a = d_b = d_bias = None
    weight = (packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize, ctx.out_features, ctx.in_features)
    if needs[0]:
        if ctx.lora_on_x:  # dx = dy . deq(W) + g . A, the LoRA term in the kernel's epilogue
            dx = nf4_matmul(dy, *weight, True, g, lora_A.t().contiguous(), 1.0, None)
        else:
            dx = nf4_matmul(dy, *weight, True)
    if needs[1]:
        d_lora_input = (g @ lora_A).to(ctx.lora_input_dtype)
    if needs[9]:
        d_a = g.t() @ branch.to(lora_A.dtype)
    if needs[10]:
        d_b = (dy_lora.t() @ xa) * ctx.scaling
    if needs[12]:
        d_bias = dy.sum(0)
    return dx, d_lora_input, None, None, None, None, None, None, None, d_a, d_b, None, d_bias


qlora_linear_op.register_autograd(_qlora_backward, setup_context=_qlora_setup_context)
