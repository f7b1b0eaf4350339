"""PEFT's LoRA initialisations on an NF4 base: `replace_linear(model, init_lora_weights=..., loftq_iter=...)`.

The names and definitions are PEFT 0.21's (`peft/tuners/lora/layer.py`: reset_lora_parameters, pissa_init,
olora_init, loftq_init; `peft/utils/loftq_utils.py`). W [out, in] is each nn.Linear's weight in fp32,
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), A = lora_A [r, in], B = lora_B [out, r]:

    True             A Kaiming-uniform, B = 0: QLoRALinear's own (modules.py builds it, not this module)
    "gaussian"       A ~ N(0, std 1/r), B = 0
    False            A and B as nn.Linear initialises them (uniform in +-1/sqrt(in) and +-1/sqrt(r)): B is
                     not zero, so a fresh layer does not compute the base alone (PEFT: for debugging)
    "pissa"          W = U diag(S) Vh (torch.linalg.svd): B = U_r sqrt(S_r / s), A = sqrt(S_r / s) Vh_r
    "pissa_niter_K"  the same from torch.svd_lowrank(W, r, niter=K)'s randomized SVD (K >= 1), up to the
                     sign of each singular pair (see _svd_lowrank)
    "olora"          W = Q R (reduced QR, torch.linalg.qr): B = Q[:, :r], A = R[:r]
    "loftq"          loftq_iter rounds of quantize and fit (_loftq); default 1

PiSSA and OLoRA move W's part s.B.A into the adapter; where PEFT leaves the residual W - s.B.A in the base
layer's weight, the NF4 base here holds it: quantize_nf4(residual in the compute dtype, the layer's blocksize
and double quantization), as QLoRALinear.from_linear quantizes a weight. Every layer records its
initialisation (`layer.init_lora_weights`; `layer.loftq_iter` too for LoftQ) and, for the three that change
the base (PiSSA, OLoRA, LoftQ), keeps its initial factors as the buffers `init_lora_A` [r, in] and
`init_lora_B` [out, r] (not in the state dict), from which `save_peft_adapter(..., convert_to_lora=True)`
writes the adapter as a plain LoRA delta against the original weights (PEFT's
`path_initial_model_for_weight_conversion`).

The global RNG is drawn as PEFT's get_peft_model draws it: for each layer, in the model's order, the
initialisations of nn.Linear(in, r) and nn.Linear(r, out) that PEFT makes the factors with, then the draws
of the initialisation itself (gaussian's normal_, svd_lowrank's projection), so with the same seed "gaussian"
and False give PEFT's factors, and "pissa_niter_K" PEFT's up to signs. (True goes through QLoRALinear's
constructor, which draws differently.)

LoftQ differs from PEFT's in three ways, on purpose: the quantizer inside the rounds is ours (quantize_nf4
in the compute dtype then dequantize, the very quantizer that makes the final base; PEFT's is bitsandbytes'
fp32 NF4 without double quantization, on CUDA only); and the scaling enters the fit (s.B.A is the rank-r fit,
B = L / sqrt(s), A = R / sqrt(s) of PEFT's L.R), so deq(Q) + s.B.A approximates W for any lora_alpha (PEFT's
A = R, B = L is right only for s = 1, where the two agree); and the rank-r fit is a randomized SVD (q = r + 8
columns, 2 power iterations, as torch.svd_lowrank computes it) where PEFT's is exact: on SmolLM2-135M its
weight error is within 0.3% of the exact SVD's, ~10x faster (see _randomized_lowrank).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re

import torch
from torch import nn

from .api import quantize_nf4

# PEFT 0.21's initialisations that lora-kernels builds (pissa_niter_K aside), and those it does not
SUPPORTED = (True, False, "gaussian", "pissa", "pissa_niter_K", "olora", "loftq")
_NOT_SUPPORTED = {
    "corda": "needs calibration data run through the model (PEFT's preprocess_corda)",
    "eva": "needs activations of a data set (PEFT's initialize_lora_eva_weights)",
    "orthogonal": "is not implemented here",
    "mica": "is not implemented here",
    "lora_ga": "needs gradients of a data set (PEFT's preprocess_loraga)",
}
# Initialisations that move part of W into the adapter, so the base is no longer W's own quantization
CHANGES_BASE = ("pissa", "olora", "loftq")
# PEFT's inits (of every kind, also those not built here) after which an adapter is trained against a changed base
PEFT_CHANGES_BASE = ("pissa", "olora", "loftq", "corda", "lora_ga")

# LoftQ's rank-r fit: a randomized SVD with q = r + LOFTQ_OVERSAMPLE columns (at most min(out, in)) and
# LOFTQ_NITER power iterations. SmolLM2-135M, r = 16, 5 rounds, mean weight error (see _randomized_lowrank):
# oversample 0 / 4 / 8 / 16 with 2 iterations 0.0797 / 0.0790 / 0.0789 / 0.0788, 1 iteration 0.0831.
LOFTQ_NITER = 2
LOFTQ_OVERSAMPLE = 8
# A batch of same-shape layers holds at most this many bytes of fp32 weights (with LoftQ about 4 such
# tensors are alive at once), so a large model's group of equal layers is cut into several batches.
_BATCH_BYTES = 256 * 2**20

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_init(init_lora_weights) -> tuple[object, int | None]:
    """(kind, niter): kind one of True, False, "gaussian", "pissa", "olora", "loftq"; niter the K of
    "pissa_niter_K" (None for exact "pissa" and the others). A ValueError lists what is accepted."""
    if init_lora_weights is True or init_lora_weights is False:
        return init_lora_weights, None
    if isinstance(init_lora_weights, str):
        name = init_lora_weights
        # PEFT compares these two case-insensitively (reset_lora_parameters, update_layer)
        if name.lower() in ("gaussian", "olora"):
            return name.lower(), None
        if name in ("pissa", "loftq"):
            return name, None
        match = _PISSA_NITER.fullmatch(name)
        if match and int(match.group(1)) >= 1:
            return "pissa", int(match.group(1))
    accepted = ("True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K a positive integer: the power iterations of "
                "torch.svd_lowrank), 'olora', 'loftq' (with loftq_iter)")
    why = ""
    if isinstance(init_lora_weights, str) and init_lora_weights in _NOT_SUPPORTED:
        why = f" (PEFT's {init_lora_weights!r} {_NOT_SUPPORTED[init_lora_weights]})"
    raise ValueError(f"init_lora_weights must be one of {accepted}; got {init_lora_weights!r}{why}")


def canonical_name(init_lora_weights) -> object:
    """The value PEFT's config records for this initialisation: True, False, "gaussian", "pissa",
    "pissa_niter_K", "olora" or "loftq"."""
    kind, niter = parse_init(init_lora_weights)
    return f"pissa_niter_{niter}" if niter is not None else kind


def changes_base(init_lora_weights) -> bool:
    """Whether an adapter of this initialisation (any of PEFT's names, or a value of a config file) trains
    against a changed base: PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA."""
    return isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(PEFT_CHANGES_BASE)


def check_init(init_lora_weights, loftq_iter, caller: str) -> None:
    """Refuse an initialisation lora-kernels does not build, or a loftq_iter that does not fit (a positive
    integer, and only with init_lora_weights="loftq"; None: not given)."""
    try:
        kind, _ = parse_init(init_lora_weights)
    except ValueError as exc:
        raise ValueError(f"{caller}: {exc}") from None
    if loftq_iter is None:
        return
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, numbers.Integral) or loftq_iter < 1:
        raise ValueError(f"{caller}: loftq_iter must be a positive integer (the rounds of LoftQ's alternation), "
                         f"got {loftq_iter!r}")
    if kind != "loftq":
        raise ValueError(f"{caller}: loftq_iter applies to init_lora_weights='loftq' only; "
                         f"init_lora_weights is {init_lora_weights!r}")


# ---- the factors ----------------------------------------------------------------------------------
def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S / s) Vh, B = U sqrt(S / s), so that s.B.A = U diag(S) Vh (PEFT's pissa_init: the
    singular values shared between the factors). U: [..., out, r], S: [..., r], Vh: [..., r, in]."""
    root = torch.sqrt(S / scaling)
    return root.unsqueeze(-1) * Vh, U * root.unsqueeze(-2)


def _residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - s.B.A, grouped as PEFT groups it ((s * B) @ A), so the bytes match quantize_nf4 of PEFT's residual."""
    return W - (scaling * B) @ A


def _pissa_exact(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's factors from the exact SVD of W [out, in]: (A [r, in], B [out, r])."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return _split(U[:, :r], S[:r], Vh[:r], scaling)


def _olora(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's factors from the reduced QR of W [out, in]: (A = R[:r] [r, in], B = Q[:, :r] [out, r])."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def _svd_lowrank(M: torch.Tensor, R: torch.Tensor, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank(M, q, niter) (Halko et al. 2009, algorithms 4.4 and 5.1, as torch 2.14's
    torch/_lowrank.py computes it) for a batch of matrices, each with its own random projection
    (torch.svd_lowrank takes one for a whole batch; PEFT calls it layer by layer, each drawing its own).

    M: [G, m, n]; R: [G, min(m, n), q] the projections (torch transposes a wide matrix and draws R for
    the tall one: [n, q] when m >= n, else [m, q]). Returns U [G, m, q], S [G, q], Vh [G, q, n]."""
    wide = M.shape[-2] < M.shape[-1]
    tall = M.mH if wide else M
    Q = torch.linalg.qr(tall @ R).Q
    for _ in range(niter):
        Q = torch.linalg.qr(tall.mH @ Q).Q
        Q = torch.linalg.qr(tall @ Q).Q
    # torch takes the SVD of the small wide [q, n] matrix Q^H.tall; here that of its transpose tall^H.Q
    # = V S U^H. LAPACK's (MKL's) SVD of a wide matrix stalls in OpenMP barriers on a busy CPU: 60 x
    # [16, 576], 2 cores at load 3: 0.02 s quiet, 0.1 to 7 s busy; the tall one 0.007 to 0.018 s. So the
    # factors are torch.svd_lowrank's up to the sign of each singular pair (and rounding).
    V, S, Uh = torch.linalg.svd(tall.mH @ Q, full_matrices=False)
    U = Q @ Uh.mH
    if wide:  # M = tall^H = V S U^H
        return V, S, U.mH
    return U, S, V.mH


def _exact_lowrank(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-r truncated SVD of each matrix of M [G, m, n]: PEFT's _low_rank_decomposition. U [G, m, r],
    S [G, r], Vh [G, r, n]."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :r], S[..., :r], Vh[..., :r, :]


def _randomized_lowrank(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank-r SVD of each matrix of M [G, m, n] from a randomized SVD with q = min(r + LOFTQ_OVERSAMPLE,
    m, n) columns and LOFTQ_NITER power iterations. SmolLM2-135M, r = 16, 5 LoftQ rounds, 2 CPU cores: 8 s
    for the 210 layers, mean weight error 0.0789; the exact SVD (PEFT's) takes ~19 s a round, and on 35 of
    the layers gave 0.0788 where a randomized SVD gave 0.0790."""
    m, n = M.shape[-2:]
    q = min(r + LOFTQ_OVERSAMPLE, m, n)
    R = torch.randn(M.shape[0], min(m, n), q, device=M.device, dtype=M.dtype)
    U, S, Vh = _svd_lowrank(M, R, LOFTQ_NITER)
    return U[..., :r], S[..., :r], Vh[..., :r, :]


def _loftq(W: torch.Tensor, r: int, scaling: float, num_iter: int, quantize, lowrank=_randomized_lowrank):
    """LoftQ's alternation (PEFT's loftq_utils.loftq_init) for a batch of weights W [G, out, in] fp32:

        residual = W
        num_iter times:  Q = quantize(residual);  s.B.A = the rank-r fit of W - deq(Q)   (lowrank)
                         residual = W - s.B.A     (not after the last round)

    so the final bytes are quantize(W - s.B.A) with the factors of the round before the last (W itself
    when num_iter = 1), and the returned factors are the fit of the final base's error. quantize(residual
    [out, in] fp32) -> NF4Weight. Returns ([NF4Weight] * G, A [G, r, in], B [G, out, r])."""
    residual = W
    for i in range(num_iter):
        qs = [quantize(residual[g]) for g in range(W.shape[0])]
        error = W - torch.stack([q.dequantize(torch.float32) for q in qs])
        A, B = _split(*lowrank(error, r), scaling)
        if i + 1 == num_iter:
            break
        residual = _residual(W, A, B, scaling)
    return qs, A, B


# ---- building the layers --------------------------------------------------------------------------
def _defaults() -> dict:
    """QLoRALinear's keyword defaults (r, lora_alpha, use_rslora, compute_dtype, ...)."""
    import inspect

    from .modules import QLoRALinear

    return {k: p.default for k, p in inspect.signature(QLoRALinear.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _layer_problem(linear: nn.Linear, init_lora_weights, kind, r: int) -> str | None:
    """Why this layer cannot be initialised so, or None."""
    weight = linear.weight
    if weight.is_meta:
        return (f"init_lora_weights={init_lora_weights!r} sets the LoRA factors (and, for PiSSA, OLoRA and LoftQ, "
                "the base) from the weight now, and a meta-device weight has no values: load the weights first, "
                "or use init_lora_weights=True")
    smaller = min(linear.in_features, linear.out_features)
    if kind in CHANGES_BASE and r > smaller:
        # PEFT 0.21 makes a rank-min(in, out) adapter then, whose tensors do not fit its own config's r
        return (f"r={r} exceeds min(in_features, out_features) = {smaller} of this [{linear.out_features}, "
                f"{linear.in_features}] layer; {init_lora_weights!r} takes r directions of its weight, which has "
                f"at most {smaller} (use r <= {smaller}, or leave the layer out)")
    # NaN and Inf reach the sum; a finite sum that overflowed (|W| near fp32's max) is checked value by value
    if not (torch.isfinite(weight.detach().sum()) or torch.isfinite(weight.detach()).all()):
        return "the linear layer's weight contains NaN or Inf; NF4 cannot represent them"
    return None


def _peft_draws(linear: nn.Linear, r: int, kind, niter: int | None):
    """The draws PEFT's get_peft_model makes for one layer, in its order: nn.Linear(in, r) and
    nn.Linear(r, out) initialise lora_A [r, in] and lora_B [out, r] (Kaiming-uniform, on the default
    device), then "gaussian" redraws A (normal_, std 1/r) and "pissa_niter_K" draws svd_lowrank's projection
    [min(out, in), r] on the weight's device. Returns (A, B, projection or None)."""
    A = nn.init.kaiming_uniform_(torch.empty(r, linear.in_features), a=math.sqrt(5))
    B = nn.init.kaiming_uniform_(torch.empty(linear.out_features, r), a=math.sqrt(5))
    if kind == "gaussian":
        nn.init.normal_(A, std=1 / r)
    projection = None
    if kind == "pissa" and niter is not None:
        projection = torch.randn(min(linear.out_features, linear.in_features), r, device=linear.weight.device)
    return A, B, projection


def _batches(chosen: list[tuple[str, nn.Linear]]) -> list[list[int]]:
    """Indices of same-shape layers on the same device, in batches of at most _BATCH_BYTES of fp32 weight."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, linear) in enumerate(chosen):
        groups.setdefault((linear.out_features, linear.in_features, linear.weight.device), []).append(i)
    batches = []
    for (out_features, in_features, _), indices in groups.items():
        size = max(1, _BATCH_BYTES // (4 * out_features * in_features))
        batches += [indices[i:i + size] for i in range(0, len(indices), size)]
    return batches


@contextlib.contextmanager
def _rng_kept(chosen: list[tuple[str, nn.Linear]]):
    """The global RNG (CPU, and each CUDA device of the weights) as it was: what runs inside draws nothing
    from the stream PEFT's draws came from."""
    cuda = sorted({linear.weight.device.index or 0 for _, linear in chosen if linear.weight.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


def _progress_bar(total: int, desc: str, progress: bool):
    if progress:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="layer")
        except ImportError:
            pass
    return None


def build_initialised(chosen: list[tuple[str, nn.Linear]], kwargs: dict, init_lora_weights, loftq_iter,
                      progress: bool) -> list[tuple[str, nn.Module]]:
    """QLoRALinear layers for `chosen` [(name, nn.Linear)], initialised as `init_lora_weights` says (any of
    SUPPORTED but True, which modules.py builds); kwargs: QLoRALinear's keywords, checked by the caller.
    Every layer is checked before any work, and nothing in the model changes here; a ValueError names the
    layer. Returns [(name, QLoRALinear)]."""
    from .modules import QLoRALinear

    kind, niter = parse_init(init_lora_weights)
    record = canonical_name(init_lora_weights)
    rounds = 1 if loftq_iter is None else int(loftq_iter)
    layer_kwargs = dict(kwargs)
    # as QLoRALinear.from_linear: blocksize and double quantization make the weight, and the layer takes them from it
    blocksize = layer_kwargs.pop("blocksize", 64)
    double_quant = layer_kwargs.pop("double_quant", True)
    settings = {**_defaults(), **layer_kwargs}
    r, compute_dtype = settings["r"], settings["compute_dtype"]
    scaling = settings["lora_alpha"] / (math.sqrt(r) if settings["use_rslora"] else r)  # QLoRALinear.scaling

    for name, linear in chosen:
        problem = _layer_problem(linear, init_lora_weights, kind, r)
        if problem:
            raise ValueError(f"{name}: {problem}")

    def quantize(weight: torch.Tensor):
        return quantize_nf4(weight.to(compute_dtype), blocksize=blocksize, double_quant=double_quant)

    draws = [_peft_draws(linear, r, kind, niter) for _, linear in chosen]
    bar = _progress_bar(len(chosen) * (rounds if kind == "loftq" else 1), f"{record} + NF4", progress)
    # factors[i] = (A [r, in], B [out, r], the NF4 base)
    factors: list[tuple[torch.Tensor, torch.Tensor, object] | None] = [None] * len(chosen)
    try:
        with torch.no_grad(), _rng_kept(chosen):
            if kind in (True, False, "gaussian"):
                for i, (_, linear) in enumerate(chosen):
                    A, B, _ = draws[i]
                    if kind == "gaussian":
                        B = torch.zeros_like(B)
                    factors[i] = (A, B, quantize(linear.weight.detach()))
                    if bar is not None:
                        bar.update(1)
            elif kind == "olora" or (kind == "pissa" and niter is None):
                # one layer at a time: batched, the exact SVD is slower on the CPU (SmolLM2: 23 s against 19 s),
                # and these are PEFT's very calls, so the residual is PEFT's to the bit
                for i, (_, linear) in enumerate(chosen):
                    W = linear.weight.detach().to(torch.float32)
                    A, B = _olora(W, r) if kind == "olora" else _pissa_exact(W, r, scaling)
                    factors[i] = (A, B, quantize(_residual(W, A, B, scaling)))
                    if bar is not None:
                        bar.update(1)
            else:  # "pissa_niter_K" and "loftq": same-shape layers batched
                for batch in _batches(chosen):
                    W = torch.stack([chosen[i][1].weight.detach().to(torch.float32) for i in batch])
                    if kind == "pissa":
                        projections = torch.stack([draws[i][2] for i in batch])
                        U, S, Vh = _svd_lowrank(W, projections, niter)
                        A, B = _split(U, S, Vh, scaling)
                        residual = _residual(W, A, B, scaling)
                        qs = [quantize(residual[g]) for g in range(len(batch))]
                        steps = len(batch)
                    else:
                        qs, A, B = _loftq(W, r, scaling, rounds, quantize)
                        steps = len(batch) * rounds
                    for g, i in enumerate(batch):
                        factors[i] = (A[g], B[g], qs[g])
                    if bar is not None:
                        bar.update(steps)

            built = []
            for (name, linear), (A, B, q) in zip(chosen, factors):
                try:
                    built.append((name, _layer(QLoRALinear, linear, q, A, B, layer_kwargs, record, kind, rounds)))
                except (ValueError, TypeError) as exc:
                    raise type(exc)(f"{name}: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    return built


def _layer(cls, linear: nn.Linear, q, A: torch.Tensor, B: torch.Tensor, layer_kwargs: dict, record, kind,
           rounds: int):
    """A QLoRALinear on the NF4 base q, with lora_A = A, lora_B = B (in its lora_dtype), the linear's bias
    (in the compute dtype) and the initialisation's record."""
    layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, _weight=q, **layer_kwargs)
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias.detach().to(layer.bias.dtype))
    if layer.use_dora:  # PEFT's DoRA magnitude: the row norms of the initialised layer's weight
        layer.reset_dora_magnitude()
    layer.init_lora_weights = record
    if kind == "loftq":
        layer.loftq_iter = rounds
    if kind in CHANGES_BASE:
        # the initial factors, as the layer holds them, for save_peft_adapter(convert_to_lora=True)
        layer.register_buffer("init_lora_A", layer.lora_A.detach().clone(), persistent=False)
        layer.register_buffer("init_lora_B", layer.lora_B.detach().clone(), persistent=False)
    return layer
