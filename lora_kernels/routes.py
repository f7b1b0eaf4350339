"""The one owner of two choices: which backend runs the `lora_kernels::` ops, and which route an
NF4 matmul takes. `explain()` reports the very decision the ops act on.

Backends. Every op's kernel is chosen by torch's dispatcher from the tensor's device:
  - the reference (backends/torch.py) is every op's default (CompositeExplicitAutograd);
  - the C++ extension registers its CPU and CUDA kernels (csrc/torch_bindings.cpp), which win on
    their devices; without them, on CUDA, the Triton kernels are registered in their place;
  - `set_backend(name)` (or LORA_KERNELS_BACKEND at import) registers the named backend's kernels
    over those, on the devices it runs on, and kernels that refuse on the others; ops a Python
    backend lacks run the reference. `set_backend(None)` removes that registration.

Routes of nf4_matmul: "fused" (the kernel reads the packed bytes and scales and multiplies in the
same pass; no dequantized weight is written) or "dequant_gemm" (dequantize into a buffer, then the
vendor GEMM). The choice sees everything a kernel needs (backend, architecture, dtype of x, M,
alignment of x and of the packed bytes, blocksize divisibility, transpose); a kernel refuses only
what no caller should send.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .backends import BACKENDS, MatmulProblem, Status

BACKEND_NAMES = tuple(BACKENDS)
ROUTE_NAMES = ("fused", "dequant_gemm")
ROUTES = {name: module.ROUTES for name, module in BACKENDS.items()}
# The backend each device type uses when none is forced, in order of preference.
_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# The largest M for which the fused route is picked, per backend and device architecture (the CPU's
# code path, csrc/cpu/isa.h, or the GPU's sm_XY), and where a kernel differs by dtype, per
# (architecture, dtype); above it dequantize + GEMM wins. Where neither key is listed, "default".
# CPU, both routes forced and timed side by side (4096x4096, r=16, 2 threads, a Xeon with AVX-512
# BF16 and AMX): without AMX (or for fp16/fp32 x) the GEMV-style kernel runs M <= 4 (fused 0.56x /
# 1.15x / 2.1x the time of bf16 F.linear at M = 1 / 4 / 8, dequant+GEMM 1.6x, 2026-11-28); with AMX,
# bf16 x from M = 3 takes the AMX kernel (csrc/cpu/nf4_matmul.cpp says why 3), two runs 2026-12-01:
# fused 2.13 / 2.38, 3.87 / 4.33, 13.1 / 15.6, 29.0 / 36.0, 153 / 156 ms against dequant+GEMM 3.57 /
# 3.74, 6.31 / 8.68, 14.2 / 17.3, 28.5 / 43.8, 68.3 / 151 ms at M = 16, 64, 256, 512, 2048: fused up
# to 256, where it still wins and writes no dequantized copy of W. See `python -m bench --suite
# forward`. CUDA: the decode kernel's own limit (backends/cuda.py), not yet measured on a GPU.
# Triton: a forecast, not measured on a GPU (issue 10's review: the fused kernel tiles M by 16 and is
# bound by reading W; above that Triton dequantize + cuBLAS should win).
FUSED_MAX_ROWS = {
    "cpu": {"default": 4, ("amx", torch.bfloat16): 256},
    "cuda": {"default": 16},
    "triton": {"default": 16},
}
FUSED_MAX_ROWS["cuda_emulated"] = FUSED_MAX_ROWS["cuda"]  # the CUDA kernels, run by the CPU emulator
_MEASURED_LIMITS = ("cpu",)  # the others are forecasts until a GPU measures them


# ---- backends ------------------------------------------------------------------------------------
def backends() -> dict[str, Status]:
    """Which backends are usable here and, for each missing one, why."""
    return dict(_backend_status())


@functools.cache
def _backend_status() -> dict[str, Status]:
    # Looked up once a process: what was built and which devices exist do not change.
    return {name: module.status() for name, module in BACKENDS.items()}


@torch.compiler.assume_constant_result
def _usable_backends() -> tuple[str, ...]:
    # A constant for torch.compile: it neither traces nor guards on the lookup behind it.
    return tuple(name for name, st in _backend_status().items() if st.usable)


_forced: str | None = None
_forced_registration: torch.library.Library | None = None


def get_backend() -> str | None:
    return _forced


def set_backend(name: str | None) -> None:
    """Force a backend for every op (`cuda`, `triton`, `cpu`, `torch`), or None for automatic choice."""
    global _forced, _forced_registration
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or None")
    if _forced_registration is not None:
        _forced_registration._destroy()
        _forced_registration = None
    _forced = name
    if name is not None:
        _forced_registration = _register_forced(name)


def backend_for(device: torch.device) -> str:
    """The backend whose kernels run an op on `device`: the forced one, or the first usable one."""
    if _forced is not None:
        problem = _forced_problem(_forced, device.type)
        if problem:
            raise RuntimeError(problem)
        return _forced
    usable = _usable_backends()
    for name in _AUTO.get(device.type, ("torch",)):
        if name in usable:
            return name
    return "torch"


def _forced_problem(name: str, device_type: str) -> str | None:
    if device_type not in BACKENDS[name].RUNS_ON:
        return f"backend {name!r} is forced but cannot run on a {device_type} tensor"
    if name not in _usable_backends():
        return f"backend {name!r} is forced but not usable here: {_backend_status()[name].detail}"
    return None


def _register(lib: torch.library.Library, name: str, dispatch_key: str) -> None:
    """Backend `name`'s Python kernels on `dispatch_key`, the reference's for the ops it lacks."""
    from ._ops import KERNEL_OPS

    kernels = {**BACKENDS["torch"].KERNELS, **BACKENDS[name].KERNELS}
    for op in KERNEL_OPS:
        lib.impl(op, kernels[op], dispatch_key)


def _register_forced(name: str) -> torch.library.Library:
    from ._ops import KERNEL_OPS

    lib = torch.library.Library("lora_kernels", "IMPL")
    with warnings.catch_warnings():
        # Overriding the C++ kernels is the point here; torch < 2.12 warns about it once.
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        for device_type, key in _DISPATCH_KEYS.items():
            problem = _forced_problem(name, device_type)
            if problem:
                for op in KERNEL_OPS:
                    lib.impl(op, _refuser(problem), key)
            elif BACKENDS[name].KERNELS:  # a C++ backend's kernels are registered on its device already
                _register(lib, name, key)
    return lib


def _refuser(message: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    return refuse


def _register_defaults() -> torch.library.Library:
    """The kernels that run when no backend is forced: the reference everywhere (under the C++
    kernels where the extension has them); on CUDA without the extension, Triton if usable."""
    from . import backends as _backends

    _backend_status()  # what the extension registered, asked before anything of ours is
    lib = torch.library.Library("lora_kernels", "IMPL")
    _register(lib, "torch", "CompositeExplicitAutograd")
    if torch.cuda.is_available() and not _backends.extension.has_kernels("CUDA") and "triton" in _usable_backends():
        _register(lib, "triton", "CUDA")
    return lib


# ---- routes ------------------------------------------------------------------------------------
_forced_route: str | None = None


def set_route(name: str | None) -> None:
    """Force a route ("fused" or "dequant_gemm") for every nf4 matmul, or None for the table's choice.
    For tests and benchmarks. A backend that lacks the route raises; where the fused kernel cannot
    take a problem it raises too, except the backward's dx on the CPU and CUDA, which is unfused."""
    global _forced_route
    if name is not None and name not in ROUTE_NAMES:
        raise ValueError(f"unknown route {name!r}; choose one of {ROUTE_NAMES} or None")
    _forced_route = name


def get_route() -> str | None:
    return _forced_route


@torch.compiler.assume_constant_result
def _arch(device: torch.device) -> str:
    if device.type == "cpu":
        return _cpu_arch()
    if device.type != "cuda" or not torch.cuda.is_available():  # explain() may ask about CUDA anywhere
        return "default"
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cpu_arch() -> str:
    """The CPU kernels' code path (csrc/cpu/isa.h, capped by LORA_KERNELS_CPU_ISA), or "default"
    without them. Read once a process, as the kernels read it."""
    if "cpu" not in _usable_backends():
        return "default"
    return torch.ops.lora_kernels.cpu_isa()


@functools.cache
def _cuda_arch(index: int) -> str:  # looked up once a device: every decode step asks
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def choose_route(backend: str, p: MatmulProblem) -> tuple[str, str]:
    """(route, why) for one nf4 matmul on `backend`: the forced route, or the table's choice."""
    offered = ROUTES[backend]
    problem = BACKENDS[backend].fused_problem(p) if "fused" in offered else None
    if _forced_route is not None:
        if _forced_route not in offered:
            raise RuntimeError(f"route {_forced_route!r} is forced but backend {backend!r} offers only {offered}")
        if _forced_route == "fused" and problem:
            if p.transpose:
                return "dequant_gemm", f"{problem}: unfused even under set_route('fused')"
            raise RuntimeError(f"route 'fused' is forced but backend {backend!r} cannot take this matmul: {problem}")
        return _forced_route, "forced with set_route()"
    if len(offered) == 1:
        return offered[0], f"the only route backend {backend!r} has"
    if problem:
        return "dequant_gemm", problem
    table = FUSED_MAX_ROWS[backend]
    limit = table.get((p.arch, p.dtype), table.get(p.arch, table["default"]))
    basis = "measured" if backend in _MEASURED_LIMITS else "forecast, not yet measured"
    if p.M <= limit:
        return "fused", f"M={p.M} <= {limit}, the fused kernel's range on {backend}/{p.arch} ({basis})"
    return "dequant_gemm", f"M={p.M} > {limit}: dequantize + GEMM is faster on {backend}/{p.arch} ({basis})"


def _aligned(t: torch.Tensor) -> bool:
    """Whether t's data starts on a 16-byte boundary; False for a traced tensor, which has no data
    (the layer's ops choose their routes when they run, so only a direct caller traces this)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return t.data_ptr() % 16 == 0
    except (RuntimeError, TypeError):  # a fake tensor, traced outside dynamo
        return False


def route_for(x: torch.Tensor, weight, blocksize: int, rows: int, cols: int, transpose: bool) -> str:
    """The route of one nf4_matmul call on these very tensors (x: [M, K] contiguous)."""
    return _decide(x, weight, blocksize, rows, cols, transpose)[1]


def _decide(x, weight, blocksize, rows, cols, transpose) -> tuple[str, str, str]:
    backend = backend_for(x.device)
    p = MatmulProblem(x.device.type, _arch(x.device), x.dtype, x.shape[0], rows, cols, blocksize, transpose,
                      _aligned(x), _aligned(weight[0]))
    return (backend, *choose_route(backend, p))


def explain(device_or_x, M_or_weight, in_features: int | None = None, blocksize: int = 64,
            transpose: bool = False, *, dtype: torch.dtype = torch.bfloat16, out_features: int | None = None,
            aligned: bool = True) -> dict:
    """Which backend and route an NF4 matmul takes here, and why: {"backend", "route", "why"}.

    explain(x, qweight, transpose=False): for these tensors (x [..., in] and an NF4Weight [out, in];
        transposed, x is [..., out] as in the backward's dx).
    explain(device, M, in_features, blocksize=64, transpose=False, dtype=bf16, aligned=True): for
        a matmul of M rows described by its facts.
    """
    if isinstance(device_or_x, torch.Tensor):
        x, q = device_or_x, M_or_weight
        rows, cols = q.shape
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # as qlora_linear passes it on
        backend, route, why = _decide(x2, q.tensors, q.blocksize, rows, cols, transpose)
        return {"backend": backend, "route": route, "why": why}
    device = torch.device(device_or_x)
    backend = backend_for(device)
    cols = in_features
    rows = out_features if out_features is not None else in_features
    p = MatmulProblem(device.type, _arch(device), dtype, M_or_weight, rows, cols, blocksize, transpose, aligned,
                      aligned)
    route, why = choose_route(backend, p)
    return {"backend": backend, "route": route, "why": why}


_default_registration = _register_defaults()
set_backend(os.environ.get("LORA_KERNELS_BACKEND") or None)
