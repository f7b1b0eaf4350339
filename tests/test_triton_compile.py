"""The Triton kernels compiled for real GPUs (sm_80, sm_90) without one: this catches what the
interpreter cannot (the GPU code generator's rules) and checks the arithmetic the spec relies on:
IEEE division (no approximate `div.full`), no flush-to-zero, no fused multiply-add, and
round-to-nearest conversions. The compile runs in a child process without TRITON_INTERPRET.

Double-quantized scales are fp32(fp32(nested_code[c] * nested_absmax) + offset), two roundings.
By default Triton contracts that into one fma (LLVM) and lets ptxas fuse too (--fmad=true); the
launchers compile those variants with triton_ops._nf4.compile_options(True), which turns both off.
The kernels here are compiled with the same options and their PTX and SASS checked; the default
options are compiled too, to show the check would catch a fused decode."""

import pytest
import torch
from conftest import compile_triton_for_gpu

pytest.importorskip("triton")

ARCHS = [80, 90]
DTYPES = {"bf16": "cvt.rn.bf16.f32", "fp16": "cvt.rn.f16.f32", "fp32": None}
BLOCKSIZES = [32, 64, 4096]

_SCRIPT = r"""
import collections, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_ops.nf4_matmul as matmul_module
from triton_ops import quant
from triton_ops._nf4 import compile_options

def compile_kernel(fn, signature, constexprs, arch, options=None):
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options or {})

def ops(k):
    return sorted(set(re.findall(r"\b(?:mul|div|rcp|fma|add|sub|cvt)\.[\w.]*f(?:16|32)\b[\w.]*", k.asm["ptx"])))

def fp_counts(k):  # how many fp32 multiply / add / fused multiply-add instructions in PTX and SASS
    ptx = collections.Counter(re.findall(r"\b(fma|mul|add)\.[\w.]*f32\b", k.asm["ptx"]))
    sass = collections.Counter(re.findall(r"\b(FFMA|FMUL|FADD)\b", k.asm["sass"]))
    return {"ptx_fma": ptx["fma"], "ptx_mul": ptx["mul"], "ptx_add": ptx["add"],
            "sass_ffma": sass["FFMA"], "sass_fmul": sass["FMUL"], "sass_fadd": sass["FADD"]}

def dequantize(dt, arch, double_quant, options):
    return compile_kernel(quant._dequantize_kernel,
        {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32", "nested_absmax_ptr": "*fp32",
         "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{dt}", "n": "i64"},
        {"BS": 64, "BYTES": 1024, "DOUBLE_QUANT": double_quant, "INTERPRET": False}, arch, options)

def matmul(dt, arch, double_quant, options):
    signature, constexprs = matmul_module.compile_args(dt, double_quant, False, 32, 64)
    options = {"num_warps": 4, "num_stages": 2, **options}
    return compile_kernel(matmul_module._nf4_matmul_kernel.fn, signature, constexprs, arch, options)

out = {}
for arch in ARCHS:
    for dt in DTYPES:
        for bs in BLOCKSIZES:
            out[f"quantize-{dt}-{bs}-{arch}"] = ops(compile_kernel(quant._quantize_kernel,
                {"w_ptr": f"*{dt}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64"},
                {"BS": bs, "BLOCKS": max(1, 4096 // bs)}, arch))
        for dq in (False, True):
            k = dequantize(dt, arch, dq, compile_options(dq))
            out[f"dequantize-{dt}-{dq}-{arch}"] = {"ops": ops(k), "fp": fp_counts(k)}
        k = matmul(dt, arch, True, compile_options(True))
        out[f"matmul-{dt}-{arch}"] = fp_counts(k)
    # the same kernels with Triton's default options, fp fusion on: what the check must catch
    out[f"dequantize-fused-{arch}"] = fp_counts(dequantize("fp32", arch, True, {}))
    out[f"matmul-fused-{arch}"] = fp_counts(matmul("bf16", arch, True, {}))
    # fp32 x: the dot is an fma loop on CUDA cores; the plain-scale kernel with the same options
    # tells how many of its fma are the dot's
    out[f"matmul-fp32-plain-{arch}"] = fp_counts(matmul("fp32", arch, False, compile_options(True)))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    return compile_triton_for_gpu(f"ARCHS = {ARCHS!r}\nDTYPES = {list(DTYPES)!r}\nBLOCKSIZES = {BLOCKSIZES!r}\n" + _SCRIPT)


def _clean(ops):
    return not any(".ftz" in op or "approx" in op or "div.full" in op or op.startswith("fma") for op in ops)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_kernel_codegen(compiled, dtype, blocksize, arch):
    ops = compiled[f"quantize-{dtype}-{blocksize}-{arch}"]
    assert "div.rn.f32" in ops, ops  # the reciprocal and the tail division, correctly rounded
    assert _clean(ops), ops


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_kernel_codegen(compiled, dtype, double_quant, arch):
    got = compiled[f"dequantize-{dtype}-{double_quant}-{arch}"]
    ops, fp = got["ops"], got["fp"]
    assert _clean(ops), ops
    if DTYPES[dtype]:
        assert DTYPES[dtype] in ops, ops  # one rounding, to nearest even
    # no fma in the PTX, and none made by ptxas (SASS)
    assert fp["ptx_fma"] == 0 and fp["sass_ffma"] == 0, fp
    if double_quant:
        # the decode's multiply and add, each rounded: .rn in PTX, which ptxas may not fuse
        assert "mul.rn.f32" in ops and "add.rn.f32" in ops, ops
        assert fp["sass_fmul"] > 0 and fp["sass_fadd"] > 0, fp


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_double_quant_matmul_has_no_fma(compiled, dtype, arch):
    """16-bit x: the dot runs on tensor cores, so any fp32 fma would be the scale decode's (or the
    epilogue's); there is none in the PTX or the SASS."""
    fp = compiled[f"matmul-{dtype}-{arch}"]
    assert fp["ptx_fma"] == 0 and fp["sass_ffma"] == 0, fp
    assert fp["sass_fmul"] > 0 and fp["sass_fadd"] > 0, fp  # the decode is there, unfused


@pytest.mark.parametrize("arch", ARCHS)
def test_double_quant_matmul_fp32_decode_adds_no_fma(compiled, arch):
    """fp32 x: the ieee dot is itself an fma loop; the double-quant decode adds no fma to it."""
    dq, plain = compiled[f"matmul-fp32-{arch}"], compiled[f"matmul-fp32-plain-{arch}"]
    assert dq["ptx_fma"] == plain["ptx_fma"] and dq["sass_ffma"] == plain["sass_ffma"], (dq, plain)
    assert dq["sass_fmul"] > 0 and dq["sass_fadd"] > 0, dq


@pytest.mark.parametrize("arch", ARCHS)
def test_default_options_would_fuse_the_decode(compiled, arch):
    """The check above has teeth: with Triton's default options the same kernels hold fma."""
    assert compiled[f"dequantize-fused-{arch}"]["ptx_fma"] > 0, compiled[f"dequantize-fused-{arch}"]
    assert compiled[f"dequantize-fused-{arch}"]["sass_ffma"] > 0, compiled[f"dequantize-fused-{arch}"]
    assert compiled[f"matmul-fused-{arch}"]["sass_ffma"] > 0, compiled[f"matmul-fused-{arch}"]


def _recorded_launch(monkeypatch, module, name):
    """Replace module.name (a jitted kernel) by a recorder of its launch keywords."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(module, name, Recorder())
    return launches


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_launchers_pass_the_checked_options(monkeypatch, double_quant):
    """The launchers use compile_options(double_quant), the options compiled above."""
    import triton_ops.nf4_matmul as matmul_module
    from triton_ops import quant
    from triton_ops._nf4 import compile_options

    absmax = torch.ones(2) if not double_quant else torch.zeros(2, dtype=torch.uint8)
    nested = (None, None, None) if not double_quant else (torch.ones(1), torch.zeros(256), torch.zeros(()))
    weight = (torch.zeros(64, dtype=torch.uint8), absmax, *nested)
    dequantize_launches = _recorded_launch(monkeypatch, quant, "_dequantize_kernel")
    quant.dequantize_nf4(weight, 64, 128, torch.float32)
    matmul_launches = _recorded_launch(monkeypatch, matmul_module, "_nf4_matmul_kernel")
    matmul_module.nf4_matmul(torch.ones(1, 16), weight, 64, 8, 16, False)
    launches = dequantize_launches + matmul_launches
    assert len(launches) == 2
    wanted = compile_options(double_quant)
    assert wanted == ({"enable_fp_fusion": False} if double_quant else {})
    for kwargs in launches:
        assert kwargs["DOUBLE_QUANT"] == double_quant
        assert {k: kwargs[k] for k in ("enable_fp_fusion",) if k in kwargs} == wanted
