"""The spec: NF4 quantization in plain PyTorch.

Every other backend (C++ CPU, CUDA, Triton) must reproduce these functions bit for bit. They are
written to be read first and to be fast second. Format facts come from bitsandbytes 0.50 (the
CPU backend, which is what our tests can run side by side) and the QLoRA paper (arXiv 2305.14314).

Shapes: a weight of any shape is flattened row-major to ``n`` elements and cut into
``nblocks = ceil(n / blocksize)`` blocks; the last block may be partial.
"""

from __future__ import annotations

import torch

# The 16 NF4 values in code order 0..15 (QLoRA paper, appendix E; bitsandbytes `get_4bit_type("nf4")`).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_CODE = 7

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes 0.50 accepts
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 block scales
# The smallest divisor bitsandbytes uses when it scales a block (its `clamp(min=1e-38)`).
MIN_SCALE_DIVISOR = 1e-38


def _nf4_code() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), fp32 [256], sorted.

    Built from the recipe of Dettmers 2015 (arXiv 1511.04561) with 7 exponent bits: for each
    exponent i, the midpoints of a linspace(0.1, 1) of 2**i + 1 points scaled by 10**(i - 6),
    mirrored for the sign, plus 0 and 1.
    """
    values: list[float] = []
    exponent_bits = 7
    for i in range(exponent_bits):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (i - (exponent_bits - 1))
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


LUT_SIZE = 65536


def _dynamic_map_lut(code: torch.Tensor) -> torch.Tensor:
    """The nearest-code table bitsandbytes 0.50's CPU backend uses to quantize the block scales.

    [-1, 1] is cut into 65536 points v_i = -1 + 2i / 65535 (fp32); entry i is the number of map
    midpoints strictly below v_i. This approximates nearest-value rounding (about 0.15% of codes
    differ from the nearest); we reproduce it exactly so that double-quantized scales are
    byte-identical with bitsandbytes. uint8 [65536].
    """
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    v = -1.0 + (2.0 * i) / float(LUT_SIZE - 1)
    return torch.searchsorted(mids, v, side="left").to(torch.uint8)


# Constants, built once on the CPU; `_on(device, name)` hands out per-device copies.
_CONSTANTS = {"nf4_code": _nf4_code(), "dynamic_map": _dynamic_map()}
_CONSTANTS["nf4_midpoints"] = (_CONSTANTS["nf4_code"][:-1] + _CONSTANTS["nf4_code"][1:]) / 2
_CONSTANTS["dynamic_map_lut"] = _dynamic_map_lut(_CONSTANTS["dynamic_map"])
_per_device: dict[tuple[str, torch.device], torch.Tensor] = {}


def _on(device: torch.device | str, name: str) -> torch.Tensor:
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _CONSTANTS[name].to(device)
    key = (name, device)
    if key not in _per_device:
        _per_device[key] = _CONSTANTS[name].to(device)
    return _per_device[key]


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as fp32, [16]."""
    return _on(device, "nf4_code")


def nf4_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 decision boundaries, [15], each an fp32 sum halved (as bitsandbytes computes them)."""
    return _on(device, "nf4_midpoints")


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map, fp32 [256] (see `_dynamic_map`)."""
    return _on(device, "dynamic_map")


def dynamic_map_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [65536], see `_dynamic_map_lut`."""
    return _on(device, "dynamic_map_lut")


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [nblocks, blocksize], the tail zero-padded."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)


def quantize_nf4_blocks(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize without double quantization.

    w: any shape, bf16/fp16/fp32, finite. Returns packed uint8 [ceil(n / 2)] and absmax fp32 [nblocks].
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)  # NaN propagates: callers check absmax for non-finite values
    divisor = absmax.clamp(min=MIN_SCALE_DIVISOR)
    # bitsandbytes 0.50 multiplies full blocks by the fp32 reciprocal of absmax but divides the
    # partial tail block; the two differ in the last bit now and then, which can move a code.
    scaled = blocks * (1.0 / divisor)[:, None]
    tail = n % blocksize
    if tail:
        scaled[-1] = blocks[-1] / divisor[-1]
        # bitsandbytes stores the clamped divisor as the tail block's absmax.
        absmax[-1] = divisor[-1]
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    # The code is the number of midpoints strictly below the value: a value exactly on a midpoint
    # takes the lower code (bitsandbytes uses `bucketize`, right=False).
    codes = torch.bucketize(scaled, nf4_midpoints(w.device)).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    # bitsandbytes 0.50: the first element of a pair goes in the high nibble.
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_nf4_blocks(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """packed uint8 [ceil(numel / 2)], absmax fp32 [nblocks] -> flat [numel] in dtype.

    Each weight is round_to_dtype(fp32(nf4[code] * absmax)), rounded once.
    """
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel]
    values = nf4_code(packed.device)[codes.long()]
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype)


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map, as bitsandbytes 0.50's CPU backend does it.

    x: fp32 [n]; code: the sorted 8-bit map fp32 [256] (default: the dynamic map). Returns codes
    uint8 [n] and absmax fp32 [ceil(n / blocksize)].
    A block of zeros gets absmax 0 and codes 0 (bitsandbytes' choice; code 0 times 0 is 0).
    """
    n = x.numel()
    blocks = _blocks(x.float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = 1.0 / absmax
    normed = (blocks * inverse[:, None]).clamp(-1, 1)
    # Each fp32 step rounded separately: ((v + 1) * 0.5) * 65535 + 0.5, then truncated.
    index = (((normed + 1.0) * 0.5) * float(LUT_SIZE - 1) + 0.5).to(torch.int64)
    if code is None or code is _per_device.get(("dynamic_map", x.device)):  # the default map: its cached table
        lut = dynamic_map_lut(x.device)
    else:
        lut = _dynamic_map_lut(code.float().cpu()).to(x.device)
    codes = lut[index.clamp(0, LUT_SIZE - 1)]
    codes = torch.where((absmax == 0)[:, None], torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """codes uint8 [n], absmax fp32 [nblocks] -> fp32 [n] = fp32(code_map[c] * absmax)."""
    n = codes.numel()
    return code_map[codes.long()] * absmax.repeat_interleave(blocksize)[:n]


def double_quantize(
    absmax: torch.Tensor, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress block scales: absmax fp32 [nblocks] -> (codes uint8 [nblocks], nested_absmax fp32
    [ceil(nblocks / 256)], offset fp32 []), coded with `code` (default: the dynamic map).

    offset is torch's own fp32 mean on the tensor's device, as bitsandbytes computes it, so the
    offset is bit-identical with a bitsandbytes checkpoint made on the same device type.
    """
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, code=code)
    return codes, nested_absmax, offset


def dequantize_absmax(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The inverse of double_quantize: fp32(fp32(map[code] * scale) + offset), two roundings
    (bitsandbytes; a fused multiply-add would change the last bit)."""
    return dequantize_blockwise_8bit(codes, nested_absmax, nested_code) + offset


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """The whole quantization, as a dict of the stored tensors (see nf4.NF4Weight)."""
    packed, absmax = quantize_nf4_blocks(w, blocksize)
    if not double_quant:
        return {"packed": packed, "absmax": absmax}
    codes, nested_absmax, offset = double_quantize(absmax)
    return {"packed": packed, "absmax": codes, "nested_absmax": nested_absmax, "offset": offset}


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Back to a dense tensor of the given shape and dtype."""
    if nested_absmax is not None:
        absmax = dequantize_absmax(absmax, nested_absmax, nested_code, offset)
    numel = 1
    for d in shape:
        numel *= d
    return dequantize_nf4_blocks(packed, absmax, blocksize, numel, dtype).reshape(shape)


def qlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The QLoRA layer, as PEFT computes it on a bitsandbytes Linear4bit.

    x: [..., in] in the compute dtype; weight: the dequantized base [out, in]; lora_A: [r, in];
    lora_B: [out, r] (fp32 or the compute dtype); bias: [out] or None; lora_input: the LoRA branch's
    input when it differs from x (dropout), else None. Returns [..., out] in x.dtype:

        y = x . weight^T + bias + (scaling * (lora_input . A^T) . B^T) in x.dtype

    The LoRA branch runs in the adapters' dtype and is rounded to x.dtype before the sum (PEFT).
    Gradients come from autograd; this function is the oracle the kernels are tested against.
    """
    base = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    branch_input = x if lora_input is None else lora_input
    lora = torch.nn.functional.linear(torch.nn.functional.linear(branch_input.to(lora_A.dtype), lora_A), lora_B)
    return base + (lora * scaling).to(x.dtype)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * B . A|| of each output row, [out], as PEFT's DoRA computes it (peft 0.21
    `DoraLinearLayer.get_weight_norm`): on the dense sum in the adapters' dtype, returned in it.

    weight: the dequantized base [out, in]; lora_A: [r, in]; lora_B: [out, r]. Nothing guards a zero
    norm here, as in PEFT; the kernels' layer does (see `_ops.dora_scale`)."""
    dense = weight.to(lora_A.dtype) + scaling * (lora_B @ lora_A)
    return torch.linalg.vector_norm(dense, dim=1).to(lora_A.dtype)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DoRA layer (arXiv 2402.09353), as PEFT computes it on a bitsandbytes Linear4bit.

    x: [..., in] in the compute dtype; weight: the dequantized base [out, in]; lora_A: [r, in];
    lora_B: [out, r]; magnitude: m [out]; bias: [out] or None; lora_input: the dropped-out x (train
    mode with lora_dropout), else None. With n = dora_weight_norm(...) treated as a constant (the
    paper's section 4.3: no gradient flows through it) and s = m / n, per output column:

        y = s * (x . W^T + scaling * x . A^T . B^T) + bias                       (lora_input None)
        y = x . W^T + bias + (s - 1) * (x_d . W^T) + s * scaling * x_d . A^T . B^T  (x_d = lora_input)

    The second is PEFT's train-mode form with dropout: its base term is taken once on x and the
    magnitude's correction on the dropped-out x_d. The base runs in the compute dtype (rounded
    there, as Linear4bit returns it), the DoRA terms in the adapters' dtype, and the sum is rounded
    to x.dtype. Gradients come from autograd; this is the oracle the kernels are tested against.
    """
    base = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    branch = (x if lora_input is None else lora_input).to(lora_A.dtype)
    norm = dora_weight_norm(weight, lora_A, lora_B.detach(), scaling).detach()
    mag_scale = magnitude / norm
    lora = torch.nn.functional.linear(torch.nn.functional.linear(branch, lora_A), lora_B)
    if lora_input is None:
        base_term = base if bias is None else base - bias
    else:
        base_term = torch.nn.functional.linear(branch, weight.to(branch.dtype))
    return (base + (mag_scale - 1) * base_term + mag_scale * lora * scaling).to(x.dtype)


def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """The VeRA layer (arXiv 2310.11454), as PEFT computes it (peft 0.21 `vera.layer.Linear.forward`).

    x: [..., in] in the compute dtype; weight: the dequantized base [out, in]; vera_A: [r, in] and
    vera_B: [out, r], the frozen shared random projections already sliced to this layer (PEFT slices
    vera_A[:, :in] and vera_B[:out, :] from the pair built for the widest layer); lambda_d: [r],
    lambda_b: [out], the trained scaling vectors; lora_input: the dropped-out x, else None.

        y = x . W^T + bias + lambda_b * ((lambda_d * (x_d . A^T)) . B^T)   in x.dtype

    The branch runs in the vectors' dtype and is rounded to x.dtype with the sum. No scaling factor:
    VeRA has no lora_alpha. It is the LoRA layer with A' = diag(lambda_d) . A and B' = diag(lambda_b) . B.
    """
    base = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    branch = (x if lora_input is None else lora_input).to(lambda_d.dtype)
    down = lambda_d * torch.nn.functional.linear(branch, vera_A.to(lambda_d.dtype))
    return (base + lambda_b * torch.nn.functional.linear(down, vera_B.to(lambda_d.dtype))).to(x.dtype)


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    ia3_l: torch.Tensor,
    bias: torch.Tensor | None = None,
    feedforward: bool = False,
) -> torch.Tensor:
    """The IA3 layer (arXiv 2205.05638), as PEFT computes it (peft 0.21 `ia3.layer.Linear.forward`).

    x: [..., in] in the compute dtype; weight: the dequantized base [out, in]; ia3_l: the learned
    vector, [out] on an output layer, [in] on a feed-forward layer (PEFT's `feedforward_modules`);
    bias: [out] or None. The product with the vector is taken in fp32 and rounded once to x.dtype:

        y = (x . W^T + bias) * l          (output: the bias is scaled too, as PEFT scales the base result)
        y = (x * l) . W^T + bias          (feed-forward: x * l rounded to x.dtype before the matmul)
    """
    if feedforward:
        scaled = (x.float() * ia3_l.float()).to(x.dtype)
        return torch.nn.functional.linear(scaled, weight.to(x.dtype), bias)
    base = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    return (base.float() * ia3_l.float()).to(x.dtype)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A_slots: torch.Tensor,
    lora_B_slots: torch.Tensor,
    slot_scalings: torch.Tensor,
    slot_ranks: torch.Tensor,
    token_slots: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Many adapters in one batch: each row runs the QLoRA layer (`qlora_linear`) with its own adapter.

    x: [M, in]; weight: the dequantized base [out, in]; lora_A_slots: [slots, R, in]; lora_B_slots:
    [slots, out, R]; slot_scalings: [slots]; slot_ranks: [slots], adapter t is A[t, :rank_t],
    B[t, :, :rank_t]; token_slots: [M], the slot of each row, -1 for the base alone. Row by row, as
    one single-adapter layer a row would compute it (what PEFT's `adapter_names` does too). Inference:
    no autograd is expected through it.
    """
    rows = []
    for m in range(x.shape[0]):
        t = int(token_slots[m])
        if t < 0:
            rows.append(torch.nn.functional.linear(x[m:m + 1], weight.to(x.dtype), bias))
            continue
        r = int(slot_ranks[t])
        rows.append(qlora_linear(x[m:m + 1], weight, lora_A_slots[t, :r], lora_B_slots[t, :, :r],
                                 float(slot_scalings[t]), bias))
    if not rows:
        return x.new_empty((0, weight.shape[0]))
    return torch.cat(rows)
