"""NF4 format facts the Triton kernels need, kept here so triton_ops depends on nothing else.

The values are the exact fp32 numbers of csrc/nf4.h (written there as hex floats, copied here
verbatim): float.fromhex gives a Python float equal to that fp32 value, so a kernel constant or a
table built from it agrees with the spec to the bit (tests/test_triton_nf4.py checks this).
"""

from __future__ import annotations

import torch

# The 16 NF4 values in code order 0..15 (QLoRA paper, arXiv 2305.14314, appendix E; bitsandbytes
# get_4bit_type("nf4")).
NF4_VALUES = tuple(
    float.fromhex(v)
    for v in (
        "-0x1.0p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.946540p-2",
        "-0x1.23449ap-2", "-0x1.7a6a7ep-3", "-0x1.74f0e2p-4", "0x0.0p+0",
        "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
        "0x1.c3497p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1.0p+0",
    )
)  # fmt: skip

# The 15 decision boundaries, fp32((v[i] + v[i + 1]) / 2), as bitsandbytes computes them: a value
# takes the number of midpoints strictly below it as its code.
NF4_MIDPOINTS = tuple(
    float.fromhex(v)
    for v in (
        "-0x1.b239bp-1", "-0x1.38a4ep-1", "-0x1.d709p-2", "-0x1.5bd4ecp-2", "-0x1.e079d8p-3",
        "-0x1.1a7178p-3", "-0x1.74f0e2p-5", "0x1.45f5fep-5", "0x1.ec90c4p-4", "0x1.a0cfcp-3",
        "0x1.2b05a8p-2", "0x1.8ea7f2p-2", "0x1.00da08p-1", "0x1.491b5ep-1", "0x1.b913b4p-1",
    )
)  # fmt: skip

# Double quantization (bitsandbytes compress_statistics): one fp32 scale per 256 block scales.
NESTED_BLOCKSIZE = 256

_code_tables: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device) -> torch.Tensor:
    """NF4_VALUES as an fp32 [16] tensor on `device` (one copy per device), for the kernels' lookup."""
    device = torch.device(device)
    if device not in _code_tables:
        _code_tables[device] = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return _code_tables[device]


def compile_options(double_quant: bool) -> dict:
    """Launch options for a kernel that decodes block scales.

    A double-quantized scale is fp32(fp32(nested_code[c] * nested_absmax) + offset), two roundings
    (bitsandbytes; the spec's dequantize_absmax in reference.py). By default Triton lets LLVM
    contract a * b + c into one fma and passes ptxas --fmad=true, which changes the last bit.
    enable_fp_fusion=False turns both off (PTX mul.rn / add.rn, which ptxas never fuses, and
    --fmad=false). Plain fp32 scales keep the default so that path compiles as before.
    tests/test_triton_compile.py compiles with these options and checks the PTX and SASS.
    """
    return {} if not double_quant else {"enable_fp_fusion": False}
