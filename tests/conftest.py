import os

import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. It must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lora_kernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "bigmem: needs about 12 GB of free RAM")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def backend():
    """Yields a function that forces a backend for the rest of the test, then restores the default."""
    saved = lora_kernels.get_backend()
    yield lora_kernels.set_backend
    lora_kernels.set_backend(saved)


def spec_weight(q, dtype=torch.float32) -> torch.Tensor:
    """The NF4 weight q dequantized by the spec itself (lora_kernels/reference.py), never through the
    dispatcher: the oracle of the matmul and layer tests, which must not share a bug with the
    kernel under test (dequantizing through `q.dequantize()` would run the very backend tested)."""
    from lora_kernels import reference

    return reference.dequantize_nf4(q.packed, q.absmax, tuple(q.shape), dtype, q.blocksize, q.nested_absmax,
                                    q.nested_code, q.offset)


def randomize_lora(model, seed=1, scale=0.05):
    """Random lora_B for every QLoRALinear of the model (a fresh layer's B is zero, which would hide
    a wrong LoRA term); lora_A is already random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_kernels.modules.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def present_backends(device: str) -> list[str]:
    """The compiled and Triton backends usable for tensors on `device` (the reference is the oracle).
    On the CPU that includes the CUDA kernels under the emulator (`cuda_emulated`, built by make test)."""
    status = lora_kernels.backends()
    wanted = ("cuda", "triton") if device == "cuda" else ("cpu", "triton", "cuda_emulated")
    return [name for name in wanted if status[name].usable]


def compile_triton_for_gpu(code: str) -> dict:
    """Run `code` (which prints one JSON line last) in a subprocess without TRITON_INTERPRET, so
    triton.compile builds real GPU code on a machine without a GPU; skip where Triton cannot."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        if "ptxas" in run.stderr or "GPUTarget" in run.stderr:
            pytest.skip(f"cannot compile Triton for a GPU here: {run.stderr.strip().splitlines()[-1]}")
        raise AssertionError(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def kernel_kind(device: str, backend_name: str) -> str:
    """Whose kernels a (device, backend) pair runs: "cuda" for the CUDA kernels, on a GPU or under
    the emulator; otherwise the device type. Tests pick dtypes and rules by it."""
    return "cuda" if backend_name in ("cuda", "cuda_emulated") else device


def backend_params():
    """(device, backend) pairs: every backend present here, GPU ones marked."""
    params = []
    for name in present_backends("cpu"):
        params.append(pytest.param("cpu", name, id=f"cpu-{name}"))
    for name in ("cuda", "triton"):
        params.append(pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu))
    return params
