"""Every CPU code path on this one machine: the suites that check the C++ kernels against the
reference (quantize / dequantize bytes, both matmul routes) rerun with the kernels capped at each
lower instruction set (LORA_KERNELS_CPU_ISA, read once a process, hence a subprocess each)."""

import os
import subprocess
import sys

import pytest

import lora_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_cpu_kernels_at_each_isa(isa):
    if not lora_kernels.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")
    env = dict(os.environ, LORA_KERNELS_CPU_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/test_quant.py", "tests/test_qlora_linear.py", "-k", "cpu_routes or (cpu-cpu and not triton)"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
