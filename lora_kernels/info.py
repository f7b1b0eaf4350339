"""`python -m lora_kernels.info`: what was built, what is usable here, and why not."""

import torch

from . import __version__, backends, explain, get_backend
from .backends import cpu as cpu_backend


def main() -> None:
    print(f"lora-kernels {__version__}  torch {torch.__version__} (CUDA {torch.version.cuda})")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    for name, status in backends().items():
        print(f"  {name:13s} {'usable' if status.usable else 'missing':8s} {status.detail}")
    print(f"forced backend: {get_backend() or 'none (automatic)'}")
    paths = cpu_backend.code_paths()
    if any(paths.values()):
        untested = [p for p, here in paths.items() if not here]
        print(f"CPU code paths this machine runs: {', '.join(p for p, here in paths.items() if here)}; "
              f"cannot run here (untested here): {', '.join(untested) or 'none'}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"matmul routes on {device} (in_features 4096):")
    for m in (1, 16, 64, 4096):
        choice = explain(device, m, 4096)
        print(f"  M={m:<5d} {choice['backend']}/{choice['route']}: {choice['why']}")


if __name__ == "__main__":
    main()
