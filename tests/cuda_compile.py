"""The codegen tests' one compile of a csrc/cuda/*.cu file, without a GPU and without torch headers:
one nvcc call for every architecture setup.py builds by default (its DEFAULT_CUDA_ARCH_LIST, with
its NVCC_FLAGS), keeping each architecture's PTX and ptxas' report of every kernel. The object it
writes also links into a host program, so the launchers' own parameter checks run on the CPU.

`python tests/cuda_compile.py csrc/cuda/quant.cu` prints the per-architecture register table."""

import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_ERROR_INVALID_VALUE = 1  # cudaErrorInvalidValue


def setup_constant(name):
    """A module-level literal of setup.py, read without running setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"setup.py defines no {name}")


ARCHS = [arch.replace(".", "") for arch in setup_constant("DEFAULT_CUDA_ARCH_LIST").split(";")]  # "80", ...
NVCC_FLAGS = setup_constant("NVCC_FLAGS")


def nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    registers: int
    stack_frame: int  # bytes
    spill_stores: int  # bytes
    spill_loads: int  # bytes


@dataclasses.dataclass
class Build:
    obj: str  # host object with the fatbinary of every architecture
    log: str  # nvcc's stdout + stderr, ptxas -v included
    ptx: dict  # arch ("80") -> PTX text
    kernels: dict  # arch -> {mangled kernel name: KernelReport}


def parse_ptxas(log):
    """{arch: {kernel: KernelReport}} from `ptxas -v` output (nvcc -Xptxas -v)."""
    kernels = {}
    for block in re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]:
        head = re.match(r"'([^']+)' for 'sm_(\d+)'", block)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        registers = re.search(r"Used (\d+) registers", block)
        assert head and frame and registers, block
        report = KernelReport(int(registers.group(1)), *map(int, frame.groups()))
        kernels.setdefault(head.group(2), {})[head.group(1)] = report
    return kernels


def compile_cuda(source, workdir):
    """Compiles `source` (a path under csrc/cuda) for every architecture of ARCHS in one nvcc call,
    one architecture after another (nvcc -t 2 was slower on the 2 shared CI cores)."""
    compiler = nvcc()
    assert compiler is not None, "nvcc not found"
    workdir = str(workdir)
    stem = os.path.splitext(os.path.basename(source))[0]
    obj = os.path.join(workdir, stem + ".o")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [compiler, *NVCC_FLAGS, *gencode, "-c", "-Xptxas", "-v", "-keep", "-keep-dir", workdir,
           "-I", os.path.join(ROOT, "csrc"), source, "-o", obj]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    ptx = {}
    for arch in ARCHS:
        with open(os.path.join(workdir, f"{stem}.compute_{arch}.ptx")) as f:
            ptx[arch] = f.read()
    return Build(obj, log, ptx, parse_ptxas(log))


def run_host_program(code, objects, workdir):
    """Links C++ `code` (it includes kernels.h) with `objects` and runs it on the CPU: only host code
    runs, nothing may launch. Returns (exit status, output)."""
    exe = os.path.join(str(workdir), "host_check")
    src = exe + ".cpp"
    with open(src, "w") as f:
        f.write(code)
    cmd = [nvcc(), "-std=c++17", "-I", os.path.join(ROOT, "csrc"), src, *objects, "-o", exe]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout + run.stderr


# A host program's checks: EXPECT(call, status) prints and counts any call that returns another status.
HOST_PRELUDE = r"""
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include "kernels.h"
using namespace lora_kernels;
static int failures = 0;
#define EXPECT(call, status)                                                        \
  do {                                                                              \
    const int got = (call);                                                         \
    if (got != (status)) {                                                          \
      std::printf("%s returned %d, expected %d\n", #call, got, static_cast<int>(status)); \
      ++failures;                                                                   \
    }                                                                               \
  } while (0)
"""


def unaligned_vector_views(source_text):
    """Local arrays read or written through a uint4 pointer but not declared alignas(16): the
    reinterpretation needs the array's address 16-byte aligned, and a T[8] of a 16-bit T is only
    2-byte aligned (undefined behaviour; the compiler may emit vector accesses to local memory)."""
    names = set(re.findall(r"reinterpret_cast<\s*(?:const\s+)?uint4\s*\*\s*>\(\s*(\w+)\s*\)", source_text))
    bad = []
    for name in sorted(names):
        declared = re.findall(rf"^\s*(.*?)\b[\w:<>]+\s+{name}\s*\[", source_text, flags=re.M)
        if declared and not all("alignas(16)" in prefix for prefix in declared):
            bad.append(name)
    return bad


def unchecked_launches(source_text):
    """Launches whose error is not their own: triple-chevron launches (they return nothing), and
    cudaGetLastError() (it returns the oldest unread error, maybe an earlier launch's)."""
    code = re.sub(r"//[^\n]*", "", source_text)
    return re.findall(r"<<<|cudaGetLastError|cudaPeekAtLastError", code)


def demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [re.sub(r"lora_kernels::cuda::\(anonymous namespace\)::|\(.*\)$|^void ", "", n) for n in out]


def register_table(build):
    """Per kernel: registers / stack frame / spill stores / spill loads, one column an architecture."""
    names = sorted(build.kernels[ARCHS[0]])
    lines = ["kernel".ljust(48) + "".join(f"sm_{a}".rjust(14) for a in ARCHS)]
    for name, readable in zip(names, demangle(names)):
        cells = []
        for arch in ARCHS:
            r = build.kernels[arch].get(name)
            cells.append((f"{r.registers}/{r.stack_frame}/{r.spill_stores}/{r.spill_loads}" if r else "-").rjust(14))
        lines.append(readable.ljust(48) + "".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    for path in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            print(path, "(registers/stack/spill stores/spill loads)")
            print(register_table(compile_cuda(os.path.abspath(path), tmp)))
