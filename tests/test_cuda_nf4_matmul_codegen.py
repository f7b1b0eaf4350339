"""The NF4 matmul's CUDA fused route, the decode kernel (csrc/cuda/nf4_matmul.cu), compiled for
sm_90 without a GPU (nvcc only): it builds on its own, without torch headers and without warnings; no kernel spills or uses a stack frame
(local memory in the hot loop would cost more than the weight stream it hides); the packed bytes
and x come in as 16-byte read-only loads; and its float arithmetic is what the spec needs: the scale
decode rounds twice (mul.rn, add.rn), no flush-to-zero, no approximate operations, round-to-nearest
conversions to bf16 / fp16."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "nf4_matmul.cu")
# The M = 1 kernels must leave room for >= 16 resident warps an SM (65536 registers): the decode
# path needs that many bytes in flight to reach DRAM bandwidth.
MAX_REGISTERS_M1 = 128


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _compile(tmp_path_factory, kind):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp(kind) / f"nf4_matmul.{kind}"
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", f"--{kind}", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"),
           SOURCE, "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    out, log = _compile(tmp_path_factory, "ptx")
    assert "warning" not in log.lower(), log
    return out.read_text()


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    """{kernel name: (registers, stack frame bytes, spill store bytes, spill load bytes)}."""
    _, log = _compile(tmp_path_factory, "cubin")
    assert "warning" not in log.lower(), log
    report = {}
    for block in re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]:
        name = re.match(r"'([^']+)'", block).group(1)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        assert frame and registers, block
        report[name] = (int(registers.group(1)), *map(int, frame.groups()))
    return report


def test_every_kernel_instantiated(ptxas_report):
    # x in bf16 and fp16, M rounded up to 1, 2, 4, 8 and 16
    assert len(ptxas_report) == 10, sorted(ptxas_report)


def test_no_spills_no_stack(ptxas_report):
    bad = {name: r for name, r in ptxas_report.items() if r[1] or r[2] or r[3]}
    assert not bad, bad


def test_registers_of_the_m1_kernels(ptxas_report):
    m1 = {name: r[0] for name, r in ptxas_report.items() if "Li1ELi" in name}
    assert len(m1) == 2, sorted(ptxas_report)
    assert max(m1.values()) <= MAX_REGISTERS_M1, m1


def test_vector_loads(ptx):
    # the packed bytes and x: 16-byte loads through the read-only (non-coherent) path
    assert "ld.global.nc.v4.u32" in ptx


def test_float_arithmetic(ptx):
    ops = set(re.findall(r"\b(?:fma|mul|add|sub|div|rcp|cvt|ex2|lg2|sqrt|rsqrt)\.[a-z0-9.]*f(?:16|32)\b[a-z0-9.]*",
                         ptx))
    assert {"mul.rn.f32", "add.rn.f32", "fma.rn.f32"} <= ops, ops
    assert {"cvt.rn.bf16.f32", "cvt.rn.f16.f32"} <= ops, ops
    bad = {op for op in ops if ".ftz" in op or "approx" in op or "div.full" in op}
    assert not bad, bad
