"""Every CPU code path the dispatcher can pick (lora_kernels.backends.cpu.CODE_PATHS: scalar, AVX2,
AVX-512, AVX-512 BF16), each forced by name with LORA_KERNELS_CPU_ISA (read once a process, hence a
subprocess each): the cap must take effect, and the suites that check the C++ kernels against the
reference (quantize / dequantize bytes, the fixed edge cases, both matmul routes, the dequant_gemm
route's tiles) must pass on it.
A path this machine lacks is skipped with its name, so the skips list what went untested here
(also printed by `python -m lora_kernels.info`)."""

import os
import subprocess
import sys

import pytest

import lora_kernels
from lora_kernels.backends import cpu as cpu_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _needs_cpu_kernels():
    if not lora_kernels.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")


@pytest.mark.parametrize("isa", cpu_backend.CODE_PATHS)
def test_cpu_kernels_at_each_isa(isa):
    _needs_cpu_kernels()
    if not cpu_backend.code_paths()[isa]:
        pytest.skip(f"this machine cannot run the {isa} path: untested here")
    env = dict(os.environ, LORA_KERNELS_CPU_ISA=isa)
    probe = subprocess.run([sys.executable, "-c", "import lora_kernels, torch; print(torch.ops.lora_kernels.cpu_isa())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == isa, probe.stdout + probe.stderr  # the cap took effect
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "tests/test_quant.py", "tests/test_quant_edges.py", "tests/test_qlora_linear.py", "tests/test_multi_lora.py",
           "tests/test_cpu_tiles.py", "-k", "cpu_routes or (cpu-cpu and not triton) or tiles"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_paths_this_machine_lacks_are_named():
    """The paths are the dispatcher's, lowest first; a machine runs a prefix of them, and info says
    which ones it cannot run."""
    _needs_cpu_kernels()
    paths = cpu_backend.code_paths()
    assert tuple(paths) == ("scalar", "avx2", "avx512", "avx512bf16", "amx")
    runs = [here for here in paths.values()]
    assert runs == sorted(runs, reverse=True) and runs[0]  # a prefix, scalar always
    info = subprocess.run([sys.executable, "-m", "lora_kernels.info"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    untested = [p for p, here in paths.items() if not here]
    assert f"cannot run here (untested here): {', '.join(untested) or 'none'}" in info.stdout, info.stdout
