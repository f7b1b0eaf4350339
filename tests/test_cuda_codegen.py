"""The CUDA kernels compiled to PTX for sm_90 without a GPU (nvcc only): the .cu file builds on its
own, without torch headers, and its float arithmetic is what the spec needs: correctly rounded
division and reciprocal, no fused multiply-add (the scale decode rounds twice), no flush-to-zero,
round-to-nearest conversions to bf16 / fp16."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@pytest.fixture(scope="module")
def ptx_ops(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("ptx") / "quant.ptx"
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "--ptx", "-I", os.path.join(ROOT, "csrc"),
           os.path.join(ROOT, "csrc", "cuda", "quant.cu"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return set(re.findall(r"\b(?:fma|mul|add|sub|div|rcp|cvt)\.[a-z0-9.]*f(?:16|32)\b[a-z0-9.]*", out.read_text()))


def test_cuda_float_arithmetic(ptx_ops):
    assert {"div.rn.f32", "rcp.rn.f32", "mul.rn.f32", "add.rn.f32"} <= ptx_ops, ptx_ops
    assert {"cvt.rn.bf16.f32", "cvt.rn.f16.f32"} <= ptx_ops, ptx_ops
    bad = {op for op in ptx_ops if op.startswith("fma") or ".ftz" in op or "approx" in op or "div.full" in op}
    assert not bad, bad
