"""Many adapters on one NF4 model: `AdapterPool`, for serving or sampling many fine-tunes at once.

    pool = AdapterPool(model, max_adapters=8, max_rank=16)   # model: QLoRALinear layers (replace_linear)
    pool.load("support", "adapters/support")                 # a PEFT folder, or a state dict
    pool.load("legal", state_dict, lora_alpha=32)
    with pool.use(["support", None, "legal", "support"]):    # one name a batch row, None: the base alone
        out = model.generate(**batch)

Each QLoRALinear gets fixed-size slot storage: A [slots, R, in] and B [slots, out, R] in the
adapters' dtype, each slot's scaling (fp32) and rank (int32). Inside `use()` every layer runs
`multi_lora_linear`: one pass over its NF4 weight, each row with its slot's adapter at that
adapter's own rank (the layer's own lora_A / lora_B are not applied there). Loading, replacing,
unloading or moving an adapter into a slot writes tensor contents only, never shapes or Python
constants: under torch.compile nothing recompiles, and a decode step on CUDA can be captured in a
graph with the slot map as a device tensor.

Adapters beyond the slots live in host memory (pinned on CUDA) and move into a slot when a batch
names them; the least recently used adapter is evicted, never one the batch uses. Engines that
schedule their own batches pass a slot per token instead: `slots = pool.prepare(names)` (name ->
slot, resident until the next prepare / use), then `with pool.use_token_slots(token_slots):`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from typing import Iterable, Mapping

import torch

from .modules import MAGNITUDE_KEY, QLoRALinear, lora_layers

SLOT_BUFFERS = ("pool_lora_A", "pool_lora_B", "pool_scalings", "pool_ranks")


class _BatchState:
    """What the pooled layers read at each forward: the slot of each batch row (or of each token),
    None outside `use()`. Shared by the pool and all its layers."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # int32 [rows]: use()
        self.token_slots: torch.Tensor | None = None  # int32 [tokens]: use_token_slots()
        self._per_m: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.row_slots is not None or self.token_slots is not None

    def slots_for(self, x: torch.Tensor, M: int) -> torch.Tensor:
        """int32 [M], the slot of each of a layer's M input rows (x: [..., in])."""
        if self.token_slots is not None:
            if self.token_slots.shape[0] != M:
                raise ValueError(f"use_token_slots() was given {self.token_slots.shape[0]} slots, the layer has "
                                 f"{M} tokens")
            return self.token_slots
        rows = self.row_slots.shape[0]
        if (x.dim() > 2 and x.shape[0] != rows) or M % rows:
            raise ValueError(f"use() was given {rows} adapter names, one a batch row, but the layer's input has shape "
                             f"{tuple(x.shape)}")
        if torch.compiler.is_compiling():
            return self.row_slots[:, None].expand(rows, M // rows).reshape(M)
        cached = self._per_m.get(M)
        if cached is None:
            cached = self._per_m[M] = self.row_slots.repeat_interleave(M // rows)
        return cached


class _Adapter:
    """One adapter, in host memory: {layer path: (A [r, in], B [out, r], scaling)}."""

    def __init__(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self.layers = layers


class AdapterPool:
    """Slots for `max_adapters` adapters of rank <= `max_rank` on every QLoRALinear of `model`.

    dtype: the slots' dtype (default: each layer's lora_A dtype, so a row computes what that layer
    would with the adapter loaded into it). Memory on the model's device: `bytes_per_slot` times
    max_adapters, plus one host copy of every adapter loaded."""

    def __init__(self, model: torch.nn.Module, max_adapters: int, max_rank: int, *,
                 dtype: torch.dtype | None = None) -> None:
        for name, value in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        layers = lora_layers(model)
        if not layers:
            raise ValueError("the model has no QLoRALinear layers; swap them in first (lora_kernels.replace_linear)")
        taken = [name for name, layer in layers.items() if layer.adapter_pool is not None]
        if taken:
            raise ValueError(f"layers {taken[:3]}{'...' if len(taken) > 3 else ''} already belong to an AdapterPool")
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self._layers = layers
        self._state = _BatchState()
        for layer in layers.values():
            layer._attach_pool(self._state, max_adapters, max_rank, dtype or layer.lora_A.dtype)
        self._device = next(iter(layers.values())).pool_ranks.device
        self._adapters: dict[str, _Adapter] = {}
        self._slot_names: list[str | None] = [None] * max_adapters
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._in_use: frozenset[str] = frozenset()

    # ---- what is loaded ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every adapter loaded, in a slot or in host memory."""
        return list(self._adapters)

    def resident(self) -> dict[str, int]:
        """{name: slot} of the adapters now in a slot."""
        return dict(self._resident)

    @property
    def bytes_per_slot(self) -> int:
        """Device memory one slot takes over all layers: R * (in + out) factor elements a layer, plus
        its scaling and rank."""
        return sum(layer.pool_lora_A[0].nbytes + layer.pool_lora_B[0].nbytes + 8 for layer in self._layers.values())

    # ---- load / unload ---------------------------------------------------------------------------
    def load(self, name: str, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
             lora_alpha: float | None = None, use_rslora: bool | None = None) -> None:
        """Register (or replace) adapter `name` from a PEFT adapter folder or a state dict of adapter
        tensors (PEFT's keys, `base_model.model.<module>.lora_A.weight`, or ours: `<module>.lora_A`).

        A folder brings its lora_alpha, alpha_pattern and use_rslora; for a state dict they are the
        keywords, by default each layer's own (lora_alpha / r with the adapter's own r). Every layer
        the adapter holds tensors for must be a QLoRALinear of the model, with A [r, in] and B [out, r],
        1 <= r <= max_rank; layers it does not target contribute nothing to its rows. Everything is
        checked before anything changes: on a problem a ValueError names each one and the pool is as
        it was. Replacing an adapter now in a slot rewrites that slot in place."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter's name is a non-empty str, got {name!r}")
        if name in self._in_use and name in self._adapters:
            raise ValueError(f"adapter {name!r} is used by the batch running now; replace it after use()")
        adapter = self._read(source, lora_alpha, use_rslora)
        self._adapters[name] = adapter
        if name in self._resident:
            self._write_slot(self._resident[name], adapter)

    def unload(self, name: str) -> None:
        """Forget adapter `name` and free its slot (its rank there becomes 0)."""
        self._known([name])
        if name in self._in_use:
            raise ValueError(f"adapter {name!r} is used by the batch running now; unload it after use()")
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._slot_names[slot] = None
            self._clear_slot(slot)
        del self._adapters[name]

    # ---- batches -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, adapter_names: Iterable[str | None]):
        """Run the model with one adapter a batch row (None: the base alone) inside the block. Every
        name must be loaded, at most max_adapters distinct ones."""
        names = list(adapter_names)
        if not names:
            raise ValueError("use() needs one adapter name (or None) a batch row")
        slots = self.prepare(names)
        row_slots = torch.tensor([-1 if n is None else slots[n] for n in names], dtype=torch.int32)
        with self._active(set(slots)):
            self._state.row_slots = row_slots.to(self._device, non_blocking=True)
            yield self

    @contextlib.contextmanager
    def use_token_slots(self, token_slots: torch.Tensor):
        """Run the model with a slot a token (int32 [tokens], -1: no adapter), for engines that
        schedule their own batches: slots from `prepare()`. The tokens are the rows of every layer's
        input flattened to [tokens, in]. The slot map is used as given (a device tensor: no sync);
        its values are the caller's promise."""
        if not isinstance(token_slots, torch.Tensor) or token_slots.dim() != 1 or token_slots.dtype != torch.int32:
            raise ValueError("token_slots must be a 1-D int32 tensor, a slot a token (-1: no adapter)")
        if token_slots.device != self._device:
            raise ValueError(f"token_slots is on {token_slots.device}, the pool's slots on {self._device}")
        with self._active({n for n in self._slot_names if n is not None}):
            self._state.token_slots = token_slots
            yield self

    def prepare(self, adapter_names: Iterable[str | None]) -> dict[str, int]:
        """Put every named adapter in a slot (evicting the least recently used ones the names do not
        include) and return {name: slot}. Checked first: an unknown name, or more distinct names than
        slots, is a ValueError and nothing moves."""
        if self._state.active:
            raise ValueError("a batch is running (inside use()); adapters cannot move between slots now")
        wanted = list(dict.fromkeys(n for n in adapter_names if n is not None))
        self._known(wanted)
        if len(wanted) > self.max_adapters:
            raise ValueError(f"the batch names {len(wanted)} distinct adapters, the pool has {self.max_adapters} slots")
        for name in wanted:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            slot = self._free_slot(set(wanted))
            self._write_slot(slot, self._adapters[name])
            self._slot_names[slot] = name
            self._resident[name] = slot
        return {name: self._resident[name] for name in wanted}

    # ---- internals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _active(self, names: set[str]):
        if self._state.active:
            raise ValueError("use() / use_token_slots() do not nest")
        self._in_use = frozenset(names)
        self._state._per_m.clear()
        try:
            yield
        finally:
            self._state.row_slots = self._state.token_slots = None
            self._state._per_m.clear()
            self._in_use = frozenset()

    def _known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {sorted(self._adapters)}")

    def _free_slot(self, keep: set[str]) -> int:
        if None in self._slot_names:
            return self._slot_names.index(None)
        for name, slot in self._resident.items():  # least recently used first
            if name not in keep:
                del self._resident[name]
                self._slot_names[slot] = None
                return slot
        raise AssertionError("prepare() checked that the batch fits the slots")

    def _write_slot(self, slot: int, adapter: _Adapter) -> None:
        with torch.no_grad():
            for path, layer in self._layers.items():
                entry = adapter.layers.get(path)
                if entry is None:
                    layer.pool_ranks[slot] = 0
                    layer.pool_scalings[slot] = 0.0
                    continue
                a, b, scaling = entry
                r = a.shape[0]
                layer.pool_lora_A[slot, :r].copy_(a, non_blocking=True)
                layer.pool_lora_A[slot, r:].zero_()
                layer.pool_lora_B[slot, :, :r].copy_(b, non_blocking=True)
                layer.pool_lora_B[slot, :, r:].zero_()
                layer.pool_ranks[slot] = r
                layer.pool_scalings[slot] = scaling

    def _clear_slot(self, slot: int) -> None:
        with torch.no_grad():
            for layer in self._layers.values():
                layer.pool_ranks[slot] = 0
                layer.pool_scalings[slot] = 0.0

    def _read(self, source, lora_alpha, use_rslora) -> _Adapter:
        """The adapter's per-layer factors in host memory, every problem collected before raising."""
        from .integrations import _pattern_value, _read_adapter, split_factor_key

        if isinstance(source, (str, os.PathLike)):
            if lora_alpha is not None or use_rslora is not None:
                raise TypeError("an adapter folder brings its own lora_alpha and use_rslora (adapter_config.json)")
            _, settings, tensors = _read_adapter(source)
            if settings["use_dora"]:
                raise ValueError(f"{source}: a DoRA adapter (use_dora); the pool serves LoRA adapters")
            where, prefix = str(source), "base_model.model."

            def alpha_of(path, layer):
                return _pattern_value(settings["alpha_pattern"], path, settings["lora_alpha"]), settings["use_rslora"]
        elif isinstance(source, Mapping):
            tensors, where, prefix = source, "the state dict", None

            def alpha_of(path, layer):
                return (layer.lora_alpha if lora_alpha is None else lora_alpha,
                        layer.use_rslora if use_rslora is None else use_rslora)
        else:
            raise TypeError(f"an adapter comes from a PEFT folder (a path) or a state dict, got {type(source).__name__}")

        problems, factors = [], {}
        for key, t in tensors.items():
            split = split_factor_key(key, prefix)
            if split is None:
                problems.append(f"{key}: not a LoRA factor (expected <module>.lora_A / lora_B, PEFT's names or ours)")
                continue
            path, kind = split
            if kind == MAGNITUDE_KEY:
                problems.append(f"{key}: a DoRA magnitude; the pool serves LoRA adapters")
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                problems.append(f"{key}: a LoRA factor is a floating-point tensor")
                continue
            factors.setdefault(path, {})[kind] = t
        layers = {}
        for path, pair in factors.items():
            layer = self._layers.get(path)
            if layer is None:
                problems.append(f"{path}: the model has no QLoRALinear of that name")
                continue
            if set(pair) != {"lora_A", "lora_B"}:
                problems.append(f"{path}: has {sorted(pair)}, an adapter needs lora_A and lora_B")
                continue
            a, b = pair["lora_A"], pair["lora_B"]
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (layer.out_features, r):
                problems.append(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, the layer needs "
                                f"[r, {layer.in_features}] and [{layer.out_features}, r]")
                continue
            if not 1 <= r <= self.max_rank:
                problems.append(f"{path}: rank {r}, the pool's slots take ranks 1..{self.max_rank} (max_rank)")
                continue
            alpha, rslora = alpha_of(path, layer)
            scaling = float(alpha) / (math.sqrt(r) if rslora else r)
            dtype = layer.pool_lora_A.dtype
            layers[path] = (_host_copy(a, dtype), _host_copy(b, dtype), scaling)
        if not factors and not problems:
            problems.append("it holds no LoRA tensors")
        if problems:
            raise ValueError(f"adapter from {where} does not fit the pool, nothing loaded:\n  " + "\n  ".join(problems))
        return _Adapter(layers)


def _host_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The adapter's copy in host memory, in the slots' dtype; pinned where a GPU can copy from it
    asynchronously."""
    out = t.detach().to("cpu", dtype).contiguous().clone()
    return out.pin_memory() if torch.cuda.is_available() else out


__all__ = ["AdapterPool"]
