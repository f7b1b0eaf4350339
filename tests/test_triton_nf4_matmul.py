"""triton_ops.nf4_matmul's two routes against a plain PyTorch oracle, and the fused kernel's compile
for sm_80/sm_90. The fused kernel (nf4_matmul) takes forward matmuls with an even in_features;
dequant_gemm takes every case, forward and transposed.

Oracle: W dequantized by the spec (reference.dequantize_nf4_blocks, double-quantized scales decoded
first by reference.dequantize_absmax) and rounded once to x's dtype,
as the kernel must round it to feed tl.dot in that dtype on the GPU (for fp32 x this is the fp32
dequantization itself); then matmul, LoRA, out_scale and bias all in fp32, unrounded.

Under the interpreter each program is about 1 ms per K step, and the interpreter config tiles
16 x 32 x 32: the largest fused cases here (M = 17, 130 x 70; M = 17, 160 x 130) are 10 programs of
5 K steps.
"""

import pytest
import torch
from conftest import compile_triton_for_gpu

pytest.importorskip("triton")

from lora_kernels import reference  # noqa: E402
from triton_ops.nf4_matmul import dequant_gemm, nf4_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])
# (rows, cols, blocksize): aligned; blocks straddling rows (70 % 64); odd rows * cols with
# straddling 32-blocks (33 * 45 = 1485: dequant_gemm only, the fused kernel takes even cols); one
# block spanning many rows.
SHAPES = [(64, 128, 64), (130, 70, 64), (33, 45, 32), (96, 192, 4096)]
# double-quantized: 650 blocks of 32, i.e. three nested blocks of 256 scales, the last partial;
# blocks straddle rows (130 % 32)
DQ_SHAPES = SHAPES + [(160, 130, 32)]
# epilogue: (lora rank or None, bias, out_scale); the scale alone, with the bias, with LoRA, with both
EPILOGUES = [(None, False, False), (None, True, False), (1, False, False), (8, True, False), (None, False, True),
             (None, True, True), (1, False, True), (8, True, True)]
LAUNCHERS = {"fused": nf4_matmul, "dequant_gemm": dequant_gemm}


def routes(cols, transpose):
    """The routes that take this matmul: the fused kernel is forward-only and needs an even cols."""
    return ["fused", "dequant_gemm"] if not transpose and cols % 2 == 0 else ["dequant_gemm"]


def matmul_params(shapes, extra=((),)):
    """pytest params (rows, cols, blocksize, transpose, route, *extra) for every route that takes each case."""
    return [
        pytest.param(*shape, transpose, route, *e, id=f"{shape}-{'dx' if transpose else 'fwd'}-{route}{list(e) or ''}")
        for shape in shapes for transpose in (False, True) for route in routes(shape[1], transpose) for e in extra
    ]


def tolerance(dtype, ref, magnitude, route):
    """Allowed |out - ref| elementwise, with its reason. magnitude: (|x| @ |W|^T + |LoRA term|) * |out_scale|
    + |bias| elementwise, a bound of every partial sum (scaled as the sum it joins is)."""
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        # same products, same fp32 accumulator: only the summation order differs
        return 1e-5 * scale
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    if route == "dequant_gemm":
        # the GEMM output, the LoRA sum and the bias sum each rounded to the 16-bit type, and the two
        # LoRA factors rounded to it (csrc's add_epilogue): five roundings of at most half an ulp of
        # a value bounded by the magnitude
        return 2.5 * ulp * magnitude + 1e-5 * scale
    # the fused kernel rounds the output once to a 16-bit type: half an ulp, at most 2^-8 (bf16) or
    # 2^-11 (fp16) of the value; allow a whole ulp for a rounding flipped by the summation order,
    # plus a small atol for values that cancel to near zero
    return ulp * ref.abs() + 1e-5 * scale


def make_case(rows, cols, blocksize, M, transpose, dtype, rank, with_bias, lora_dtype=torch.float32, seed=0,
              double_quant=False, with_scale=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    packed, absmax = reference.quantize_nf4_blocks(w, blocksize)
    weight = (packed, absmax, None, None, None)
    if double_quant:
        codes, nested_absmax, offset = reference.double_quantize(absmax)
        weight = (packed, codes, nested_absmax, reference.dynamic_map(), offset)
    K, N = (rows, cols) if transpose else (cols, rows)
    x = torch.randn(M, K, generator=g).to(dtype)
    left = right = None
    if rank is not None:
        left = torch.randn(M, rank, generator=g).to(lora_dtype)
        right = (torch.randn(N, rank, generator=g) * 0.1).to(lora_dtype)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    # fp32, both signs (drawn last: the other tensors stay those of the unscaled case)
    out_scale = torch.rand(N, generator=g) * 4 - 2 if with_scale else None
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(
        x=on(x), weight=tuple(on(t) for t in weight), blocksize=blocksize, rows=rows, cols=cols,
        transpose=transpose, lora_left=on(left), lora_right=on(right), lora_scaling=0.5, bias=on(bias),
        out_scale=on(out_scale),
    )


def oracle(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling, bias, out_scale):
    packed, absmax, nested_absmax, nested_code, offset = weight
    if nested_absmax is not None:
        absmax = reference.dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    w = reference.dequantize_nf4_blocks(packed, absmax, blocksize, rows * cols, x.dtype).float()
    w = w.reshape(rows, cols)
    w = w if transpose else w.T
    out = x.float() @ w
    magnitude = x.float().abs() @ w.abs()
    if lora_left is not None:
        out = out + lora_scaling * (lora_left.float() @ lora_right.float().T)
        magnitude = magnitude + abs(lora_scaling) * (lora_left.float().abs() @ lora_right.float().abs().T)
    if out_scale is not None:
        out = out * out_scale
        magnitude = magnitude * out_scale.abs()
    if bias is not None:
        out = out + bias.float()
        magnitude = magnitude + bias.float().abs()
    return out, magnitude


def check(case, route="fused"):
    got = LAUNCHERS[route](**case)
    want, magnitude = oracle(**case)
    x = case["x"]
    assert got.dtype == x.dtype and got.shape == want.shape
    err = (got.float() - want).abs()
    tol = tolerance(x.dtype, want, magnitude, route)
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside tolerance; max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,blocksize,transpose,route", matmul_params(SHAPES))
@pytest.mark.parametrize("M", [1, 3, 17])
def test_matches_oracle(M, rows, cols, blocksize, transpose, route, dtype):
    # the epilogue varies with the case instead of multiplying the grid by four
    index = (SHAPES.index((rows, cols, blocksize)) + [1, 3, 17].index(M) + transpose) % len(EPILOGUES)
    rank, with_bias, with_scale = EPILOGUES[index]
    check(make_case(rows, cols, blocksize, M, transpose, dtype, rank, with_bias, with_scale=with_scale), route)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,blocksize,transpose,route", matmul_params(DQ_SHAPES))
def test_double_quant_matches_oracle(rows, cols, blocksize, transpose, route, dtype):
    """Double-quantized scales decoded in the kernel, every epilogue in turn."""
    rank, with_bias, with_scale = EPILOGUES[(DQ_SHAPES.index((rows, cols, blocksize)) + transpose) % len(EPILOGUES)]
    check(make_case(rows, cols, blocksize, 17, transpose, dtype, rank, with_bias, double_quant=True,
                    with_scale=with_scale), route)


@pytest.mark.parametrize("rank,with_bias,with_scale", EPILOGUES, ids=lambda v: str(v))
@pytest.mark.parametrize("transpose,route", [(False, "fused"), (False, "dequant_gemm"), (True, "dequant_gemm")])
def test_every_epilogue(rank, with_bias, with_scale, transpose, route):
    check(make_case(130, 70, 64, 17, transpose, torch.bfloat16, rank, with_bias, with_scale=with_scale), route)


@pytest.mark.parametrize("rank", [16, 100, 128])  # one BLOCK_R chunk, ragged chunks, two full chunks
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("route", list(LAUNCHERS))
def test_lora_ranks_and_dtypes(rank, lora_dtype, route):
    check(make_case(64, 128, 64, 3, False, torch.bfloat16, rank, True, lora_dtype=lora_dtype), route)


def test_many_row_tiles():
    """M = 145: ten row tiles of 16 under the interpreter, more than one GROUP_M group of 8."""
    check(make_case(64, 96, 64, 145, False, torch.bfloat16, 8, True))
    check(make_case(64, 96, 64, 145, False, torch.float32, 8, True))
    check(make_case(64, 96, 64, 145, True, torch.float32, 8, True), "dequant_gemm")


@pytest.mark.parametrize("transpose,route", [(False, "fused"), (True, "dequant_gemm")])
def test_mixed_lora_dtypes(transpose, route):
    case = make_case(64, 128, 64, 3, transpose, torch.float32, 8, False)
    case["lora_right"] = case["lora_right"].to(torch.bfloat16)
    check(case, route)


@pytest.mark.parametrize("transpose,cols", [(True, 128), (False, 45)])
def test_fused_refuses_what_it_cannot_take(transpose, cols):
    """The route owner sends these to dequant_gemm; called directly, the fused launcher says so."""
    case = make_case(64, cols, 32, 3, transpose, torch.float32, None, False)
    with pytest.raises(ValueError, match="use dequant_gemm"):
        nf4_matmul(**case)


@pytest.mark.parametrize("route", list(LAUNCHERS))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_strided_inputs(double_quant, route):
    """Stride-0 and transposed views are made contiguous, not read as garbage."""
    case = make_case(64, 128, 64, 3, False, torch.float32, 8, True, double_quant=double_quant, with_scale=True)
    case["x"] = case["x"][:1].expand(3, -1)  # stride 0 along M
    case["lora_left"] = case["lora_left"].t().contiguous().t()  # column-major
    case["bias"] = case["bias"][:1].expand(64)
    case["out_scale"] = case["out_scale"][:1].expand(64)
    packed, absmax, nested_absmax, nested_code, offset = case["weight"]
    absmax = absmax[:1].expand(absmax.shape)  # every block the first block's scale (or code)
    if double_quant:
        nested_absmax = nested_absmax[:1].expand(nested_absmax.shape)
    case["weight"] = (packed, absmax, nested_absmax, nested_code, offset)
    check(case, route)


@pytest.mark.parametrize("route", list(LAUNCHERS))
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_empty_batch(double_quant, route):
    case = make_case(64, 128, 64, 1, False, torch.bfloat16, None, False, double_quant=double_quant)
    case["x"] = case["x"][:0]
    got = LAUNCHERS[route](**case)
    assert got.shape == (0, 64) and got.dtype == torch.bfloat16


# ---- compile for real GPUs without one -------------------------------------------------------

ARCHS = [80, 90]

_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_ops.nf4_matmul as matmul_module
from triton_ops._nf4 import compile_options

kernel = matmul_module._nf4_matmul_kernel.fn  # the jitted function under @triton.autotune

def compile_ptx(dtype, arch, bn, bk, warps, stages, double_quant=False, whole_blocks=True):
    signature, constexprs = matmul_module.compile_args(dtype, double_quant, whole_blocks, bn, bk)
    signature.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": warps, "num_stages": stages, **compile_options(double_quant)}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return k.asm["ptx"]

def summary(ptx):
    return {
        "mma": sorted(set(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)[\w.]*", ptx))),
        "cvt": sorted(set(re.findall(r"\bcvt\.\w+\.(?:bf16|f16)(?:x2)?\.f32\b", ptx))),
    }

out = {}
for arch in ARCHS:
    out[f"bf16-{arch}"] = summary(compile_ptx("bf16", arch, 64, 128, 4, 3))
    out[f"bf16-straddling-{arch}"] = summary(compile_ptx("bf16", arch, 32, 128, 4, 3, whole_blocks=False))
    out[f"bf16-dq-{arch}"] = summary(compile_ptx("bf16", arch, 16, 64, 4, 3, double_quant=True))
    out[f"fp32-{arch}"] = summary(compile_ptx("fp32", arch, 64, 64, 4, 3))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return compile_triton_for_gpu(f"ARCHS = {ARCHS!r}\n" + _SCRIPT)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["bf16", "bf16-straddling", "bf16-dq"])
def test_bf16_kernel_compiles_to_tensor_cores(compiled, variant, arch):
    ops = compiled[f"{variant}-{arch}"]
    assert any("bf16" in op for op in ops["mma"]), ops  # bf16 operands on tensor cores, not FMA loops
    assert ops["cvt"] and all(op.startswith("cvt.rn.") for op in ops["cvt"]), ops  # round to nearest


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_kernel_compiles(compiled, arch):
    ops = compiled[f"fp32-{arch}"]
    # input_precision="ieee": fp32 x is multiplied in fp32, not tf32 on tensor cores
    assert not any("tf32" in op for op in ops["mma"]), ops
