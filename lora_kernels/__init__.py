"""lora-kernels: NF4 quantization and fused QLoRA kernels, byte-compatible with bitsandbytes."""

from .api import dequantize_nf4, quantize_nf4
from .nf4 import NF4Weight
from .ops import backends, get_backend, set_backend

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "backends",
    "dequantize_nf4",
    "get_backend",
    "quantize_nf4",
    "set_backend",
]
