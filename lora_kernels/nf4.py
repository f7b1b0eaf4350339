"""NF4Weight: packed NF4 bytes + block scales, and conversion to and from bitsandbytes.

The state dict layout is bitsandbytes' `Linear4bit` layout (keys `weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`), so a checkpoint written by either library loads in the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from . import reference

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


@dataclass
class NF4Weight:
    """A weight of `shape` and `dtype` stored as NF4.

    packed:        uint8 [ceil(numel / 2)], two codes a byte, first element in the high nibble.
    absmax:        fp32 [nblocks] block scales; or, when double-quantized, their uint8 codes.
    nested_absmax: fp32 [ceil(nblocks / 256)] scales of the scale codes (double quantization only).
    nested_code:   fp32 [256] the 8-bit map the scale codes index (double quantization only).
    offset:        fp32 [] the mean subtracted from the scales before coding them (double quantization only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        self.validate()

    # ---- facts derived from the fields -------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def tensors(self) -> list[torch.Tensor | None]:
        """The stored tensors as the ops take them (`Tensor?[] weight`, lora_kernels/_ops.py):
        [packed, absmax, nested_absmax, nested_code, offset], the last three None for fp32 scales."""
        return [self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset]

    def nbytes(self) -> int:
        """Bytes held, scales included."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self) -> str:
        dq = "double-quantized" if self.double_quant else "fp32 scales"
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"{dq}, device={self.device}, {self.nbytes() / 2**20:.2f} MiB)"
        )

    def validate(self) -> None:
        """Check every field against the others; raise ValueError naming the first problem."""
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"NF4Weight dtype must be bfloat16, float16 or float32, got {self.dtype}")
        if self.blocksize not in reference.BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {reference.BLOCKSIZES}, got {self.blocksize}")
        if self.numel == 0:
            raise ValueError(f"NF4Weight shape {tuple(self.shape)} has no elements")
        _expect(self.packed, "packed", torch.uint8, (self.numel + 1) // 2)
        device = self.packed.device
        tensors = {"absmax": self.absmax}
        if self.double_quant:
            if self.nested_code is None or self.offset is None:
                raise ValueError("double-quantized NF4Weight needs nested_absmax, nested_code and offset together")
            _expect(self.absmax, "absmax (double-quantized codes)", torch.uint8, self.nblocks)
            nested = -(-self.nblocks // reference.NESTED_BLOCKSIZE)
            _expect(self.nested_absmax, "nested_absmax", torch.float32, nested)
            _expect(self.nested_code, "nested_code", torch.float32, 256)
            if self.offset.dtype != torch.float32 or self.offset.numel() != 1:
                raise ValueError(
                    f"offset must be one float32 value, got {self.offset.dtype} with {self.offset.numel()} elements"
                )
            tensors.update(nested_absmax=self.nested_absmax, nested_code=self.nested_code, offset=self.offset)
        else:
            _expect(self.absmax, "absmax", torch.float32, self.nblocks)
        for name, t in tensors.items():
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but packed is on {device}: move them together with .to()")

    # ---- conversions ---------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> NF4Weight:
        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    def cuda(self) -> NF4Weight:
        return self.to("cuda")

    def cpu(self) -> NF4Weight:
        return self.to("cpu")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from .api import dequantize_nf4

        return dequantize_nf4(self, dtype)

    def block_scales(self) -> torch.Tensor:
        """The fp32 block scales [nblocks], decoding double quantization if present."""
        if not self.double_quant:
            return self.absmax
        return reference.dequantize_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset)

    # ---- state dicts (bitsandbytes Linear4bit layout) ------------------------------------------
    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The bitsandbytes `Linear4bit` layout, keys under `prefix` (default `weight`)."""
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        out = {
            prefix: self.packed.reshape(-1, 1),
            f"{prefix}.absmax": self.absmax,
            # copies: the code books are shared constants (reference.py), which a caller's in-place
            # change to its state dict must not reach
            f"{prefix}.quant_map": reference.nf4_code(self.device).clone(),
        }
        if self.double_quant:
            meta.update(
                nested_blocksize=reference.NESTED_BLOCKSIZE,
                nested_dtype="float32",
                # a meta tensor holds no value: 0.0 stands in, as meta parameters stand in for theirs
                nested_offset=0.0 if self.offset.is_meta else float(self.offset.item()),
            )
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
        meta_bytes = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(meta_bytes), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight", device: torch.device | str | None = None
    ) -> NF4Weight:
        """Load the bitsandbytes `Linear4bit` layout (ours or theirs). Every field is checked first:
        the keys, the quant_state JSON (each key present with its type: shape a list of positive ints,
        blocksize an int, a dtype we know, a finite nested_offset), the code books (`quant_map` the NF4
        code book, `nested_quant_map` bitsandbytes' 8-bit dynamic map), finite non-negative scales, and
        every tensor's length and dtype. Raises ValueError naming `prefix` and the key; nothing is
        half-built. The tensors are copied, contiguous, onto `device`: the result never shares storage
        with the state dict (as nn.Linear's load copies), so a strided tensor loads as well as a dense one."""
        meta_key = f"{prefix}.{_QUANT_STATE_KEY}"
        for key in (prefix, f"{prefix}.absmax", meta_key):
            if key not in state_dict:
                if key == meta_key and f"{prefix}.quant_state.bitsandbytes__fp4" in state_dict:
                    raise ValueError(f"{prefix} is quantized as fp4; lora-kernels reads nf4 only")
                raise ValueError(f"state dict has no key {key!r}")
        for key in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map", f"{prefix}.nested_absmax",
                    f"{prefix}.nested_quant_map"):
            if key in state_dict and not isinstance(state_dict[key], torch.Tensor):
                raise ValueError(f"{key} must be a tensor, got {type(state_dict[key]).__name__}")
        meta = _read_quant_state(state_dict[meta_key], meta_key)
        quant_map = state_dict.get(f"{prefix}.quant_map")
        if quant_map is not None and not _equal(quant_map, reference.nf4_code()):
            raise ValueError(f"{prefix}.quant_map is not the NF4 code book")
        nested = None
        if "nested_absmax" in meta or "nested_offset" in meta or f"{prefix}.nested_absmax" in state_dict:
            for key in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"):
                if key not in state_dict:
                    raise ValueError(f"state dict has no key {key!r}")
            nested_blocksize = meta.get("nested_blocksize")
            if type(nested_blocksize) is not int or nested_blocksize != reference.NESTED_BLOCKSIZE:  # 256.0 too
                raise ValueError(f"{meta_key}: nested_blocksize must be {reference.NESTED_BLOCKSIZE}, "
                                 f"got {meta.get('nested_blocksize')!r}")
            if meta.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"{meta_key}: nested_dtype must be float32, got {meta.get('nested_dtype')!r}")
            offset = meta.get("nested_offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"{meta_key}: nested_offset must be a finite number, got {offset!r}")
            # bitsandbytes 0.50 double-quantizes the scales with create_dynamic_map(signed=True); a file
            # with another map would decode to other scales than the ones it was written with.
            if not _equal(state_dict[f"{prefix}.nested_quant_map"], reference.dynamic_map()):
                raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' 8-bit dynamic map "
                                 "(create_dynamic_map(signed=True)), the only nested code map lora-kernels reads")
            nested = dict(
                nested_absmax=state_dict[f"{prefix}.nested_absmax"],
                nested_code=state_dict[f"{prefix}.nested_quant_map"],
                offset=torch.tensor(offset, dtype=torch.float32),
            )
        packed = _as_bytes(state_dict[prefix])
        device = torch.device(device) if device is not None else packed.device
        tensors = dict(packed=packed.reshape(-1), absmax=state_dict[f"{prefix}.absmax"], **(nested or {}))
        for name in ("absmax", "nested_absmax"):
            t = tensors.get(name)
            if t is None or not t.is_floating_point() or t.is_meta:
                continue  # double-quantized absmax is uint8 codes; a wrong dtype is named by validate()
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"{prefix}.{name} must hold finite, non-negative block scales "
                                 "(a NaN, Inf or negative scale corrupts every output of its block)")
        tensors = {k: v.to(device=device, copy=True, memory_format=torch.contiguous_format) for k, v in tensors.items()}
        try:
            return cls(shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                       blocksize=meta["blocksize"], **tensors)
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from None

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """From a bitsandbytes `Params4bit` (or its packed data) and its `QuantState`, no copy of the bytes."""
        qs = quant_state
        if qs.quant_type != "nf4":
            raise ValueError(f"quant_type is {qs.quant_type!r}; lora-kernels reads nf4 only")
        nested = {}
        if qs.nested:
            if qs.state2.blocksize != reference.NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize must be {reference.NESTED_BLOCKSIZE}, got {qs.state2.blocksize}")
            offset = torch.as_tensor(qs.offset, dtype=torch.float32).reshape(())
            nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, offset=offset)
        packed = _as_bytes(packed.data if hasattr(packed, "data") else packed)
        return cls(
            packed=packed.reshape(-1),
            absmax=qs.absmax,
            shape=torch.Size(qs.shape),
            dtype=qs.dtype,
            blocksize=qs.blocksize,
            **nested,
        )

    def to_bnb(self):
        """(packed [ceil(numel / 2), 1] uint8, bitsandbytes QuantState): what `Params4bit` holds."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(
                absmax=self.nested_absmax,
                code=self.nested_code,
                blocksize=reference.NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        qs = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=reference.nf4_code(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed.reshape(-1, 1), qs


def _expect(t: torch.Tensor, name: str, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements for this shape and blocksize, got {t.numel()}")


def _read_quant_state(t: torch.Tensor, key: str) -> dict:
    """The quant_state JSON (a uint8 tensor of UTF-8 bytes), every field we use checked for presence
    and type: a hostile or damaged file gets a ValueError naming `key` and the field."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor of JSON bytes, got {t.dtype} of shape {tuple(t.shape)}")
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{key} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(meta).__name__}")
    for field in ("quant_type", "shape", "blocksize", "dtype"):
        if field not in meta:
            raise ValueError(f"{key} has no field {field!r}")
    if meta["quant_type"] != "nf4":
        raise ValueError(f"{key}: quant_type is {meta['quant_type']!r}; lora-kernels reads nf4 only")
    shape = meta["shape"]
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"{key}: shape must be a list of positive integers, got {shape!r}")
    blocksize = meta["blocksize"]
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):  # 64.9 is refused, never truncated
        raise ValueError(f"{key}: blocksize must be an integer, got {blocksize!r}")
    if meta["dtype"] not in _DTYPE_NAMES.values():
        raise ValueError(f"{key}: dtype must be one of {sorted(_DTYPE_NAMES.values())}, got {meta['dtype']!r}")
    return meta


def _equal(t: torch.Tensor, expected: torch.Tensor) -> bool:
    return tuple(t.shape) == tuple(expected.shape) and torch.equal(t.float().cpu(), expected)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """bitsandbytes may store the packed bytes in another dtype (`quant_storage`); reinterpret."""
    if t.dtype == torch.uint8:
        return t
    return t.contiguous().reshape(-1).view(torch.uint8)
