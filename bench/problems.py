"""What the suites share: the problems they time, the layers they time them on, and the check that
comes before every timing.

- Problems: a bf16 weight (std 0.02), its reference NF4 form, fp32 LoRA factors at rank `RANK`
  (lora_alpha `ALPHA`), inputs, and for a training step its fp32 reference gradients.
- Layers: ours (`QLoRALinear`), the peers (bitsandbytes, PEFT's LoRA on a bitsandbytes Linear4bit,
  torchao's NF4) and the dense bf16 + LoRA baseline.
- Our backends: which ones a suite times on a device, the routes each offers, and blocks that
  force one (`using_backend`, `using_route`).
- Checks: `mismatch` against the fp32 reference, `measure` (check, then time).

The suites import this module, the harness, shapes and report, never one another. `routes_of` is
the one place in bench/ that reads a lora_kernels internal (everything else is public API or
`lora_kernels.reference`, the spec).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import reference

from .harness import Row, log_row, summarize, time_fn
from .shapes import as_cases, layer_cases

RANK, ALPHA = 16, 32  # scaling = ALPHA / RANK = 2, PEFT's default ratio in QLoRA recipes
# bf16 output: each value is rounded once (relative 2^-9), the fp32-accumulated sums differ from the
# fp32 reference by order-of-summation only, and bitsandbytes' CPU kernel rounds its block scales
# to bf16 (another 2^-9 relative). 2% of the output's magnitude covers all of these with margin;
# a wrong layout, a wrong scale or a dropped LoRA term errs by tens of percent.
REL_TOL = 2e-2
PEFT = "PEFT LoRA on bnb Linear4bit"
PEFT_DORA = "PEFT DoRA on bnb Linear4bit"
BF16_NN_LORA = "bf16 nn.Linear + LoRA"  # the training step's unquantized baseline (train, memory)
# Training-step cases (train, memory): tokens a step on a GPU: a micro-batch of 8 sequences of
# 1024, or 2 of 4096; on the CPU small enough for a 2-core machine.
STEP_GPU_M = 8192
STEP_CPU_CASES = [("", (4096, 4096), 512), ("", (4096, 4096), 2048)]  # issue 13's training-step goals
STEP_CPU_QUICK_CASES = [("", (1024, 1024), 64)]


# ---- our backends -------------------------------------------------------------------------------
def routes_of(backend: str) -> tuple[str, ...]:
    """The routes `backend` offers (lora_kernels.set_route accepts them)."""
    # Not public API: the bench's only read of a lora_kernels internal (the route table).
    return lora_kernels.routes.ROUTES[backend]


def our_backends(device: torch.device, wanted: list[str] | None, log) -> list[str]:
    """Our backends to time on `device` (usable, and in `wanted` when given); a printed line for
    each compiled or Triton one left out, and why."""
    status = lora_kernels.backends()
    timed = ["cuda", "triton", "torch"] if device.type == "cuda" else ["cpu", "torch"]
    for name in timed:
        if name != "torch" and not status[name].usable:
            log(f"ours:{name} skipped: {status[name].detail}")
    if device.type == "cpu":
        log("ours:triton skipped: Triton runs on the CPU only under its interpreter, for tests")
    return [n for n in timed if status[n].usable and (not wanted or n in wanted)]


@contextlib.contextmanager
def using_backend(backend: str | None):
    """Every op of the block on `backend`, then back to the automatic choice."""
    lora_kernels.set_backend(backend)
    try:
        yield
    finally:
        lora_kernels.set_backend(None)


@contextlib.contextmanager
def using_route(route: str | None):
    """Every nf4 matmul of the block on `route`, then back to the route table's choice."""
    lora_kernels.set_route(route)
    try:
        yield
    finally:
        lora_kernels.set_route(None)


def main_backend(ours: list[str]) -> str | None:
    """The backend the goals judge: the first usable one other than torch (cpu on the CPU, cuda
    or else triton on a GPU); None when only torch is timed."""
    return next((b for b in ours if b != "torch"), None)


# ---- checks -------------------------------------------------------------------------------------
def mismatch(got: torch.Tensor, ref: torch.Tensor, what: str = "output") -> str:
    """'' when got matches the fp32 reference within REL_TOL of its largest magnitude, else why not."""
    if tuple(got.shape) != tuple(ref.shape):
        return f"{what} has shape {tuple(got.shape)}, the reference {tuple(ref.shape)}"
    got = got.detach().float()
    if not torch.isfinite(got).all():
        return f"{what} has NaN or Inf"
    err = (got - ref).abs().max().item()
    tol = REL_TOL * ref.abs().max().item()
    return "" if err <= tol else f"{what}: max abs error {err:.3g} > {tol:.3g} ({REL_TOL:g} x max |ref|)"


def measure(rows, log, device, budget, case, impl, fn, check, *, suite, ours, note="", nbytes=None, flops=None,
            warmup=2, extra=None):
    """Run fn once, check it (check(result) -> '' or the problem), then time it. Appends and returns
    the Row (with `extra` in row.extra), or None for a peer that could not run (a printed line says why)."""
    try:
        problem = check(fn())
    except Exception as exc:  # ours failing is a wrong row; a peer failing is a printed skip
        if not ours:
            log(f"{impl} skipped on {case}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        problem = f"raised {type(exc).__name__}: {exc}"
    if problem:
        row = Row(suite, case, impl, correct=False, note=f"WRONG: {problem}", extra=dict(extra or {}))
        rows.append(row)
        log(f"{impl} on {case} is WRONG ({problem}); not timed")
        return row
    row = summarize(Row(suite, case, impl, correct=True, note=note, extra=dict(extra or {})),
                    time_fn(fn, device, budget, warmup=warmup, cold=True), nbytes, flops)
    rows.append(row)
    log_row(log, row)
    return row


# ---- problems -----------------------------------------------------------------------------------
def nf4_nbytes(n: int) -> int:
    """Bytes of an NF4 weight of n elements, block 64, double quant: packed + uint8 absmax codes +
    fp32 nested scales (one per 256 blocks)."""
    return n // 2 + n // 64 + 4 * (n // 64 // 256)


def reference_nf4(w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """w [out, in] bf16 -> (the reference NF4 quantization, block 64, double quant: packed, absmax,
    nested_absmax, offset; its dequantization, bf16 [out, in]: what a bf16 kernel multiplies by)."""
    ref = reference.quantize_nf4(w, 64, True)
    w_deq = reference.dequantize_nf4(ref["packed"], ref["absmax"], tuple(w.shape), torch.bfloat16, 64,
                                     ref["nested_absmax"], reference.dynamic_map(w.device), ref["offset"])
    return ref, w_deq


def make_problem(device, out_f, in_f, rank, seed=0):
    """The weight (bf16 [out, in], std 0.02), its reference NF4 dequantization (bf16, what a bf16
    kernel multiplies by), and the LoRA factors A [r, in], B [out, r] (fp32, B non-zero)."""
    g = torch.Generator(device).manual_seed(seed)
    w = (torch.randn(out_f, in_f, device=device, generator=g) * 0.02).to(torch.bfloat16)
    _, w_deq = reference_nf4(w)
    lora_A = torch.randn(rank, in_f, device=device, generator=g) / in_f**0.5
    lora_B = torch.randn(out_f, rank, device=device, generator=g) * 0.1
    return w, w_deq, lora_A, lora_B


# ---- the layers: ours, the dense baseline, the peers ---------------------------------------------
def build_ours(w, lora_A, lora_B, rank, magnitude=None):
    """QLoRALinear.from_linear on an nn.Linear holding w, with the given LoRA factors; with
    `magnitude` [out], a DoRA layer (use_dora) with that magnitude."""
    out_f, in_f = w.shape
    linear = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    layer = lora_kernels.QLoRALinear.from_linear(linear, r=rank, lora_alpha=2 * rank, compute_dtype=torch.bfloat16,
                                                 use_dora=magnitude is not None)
    with torch.no_grad():
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
        if magnitude is not None:
            layer.lora_magnitude_vector.copy_(magnitude)
    return layer


def lora_term(x, lora_A, lora_B, scaling):
    """PEFT's LoRA branch: in the adapters' dtype, rounded to x's dtype before the sum."""
    return (F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling).to(x.dtype)


class DenseLoRA(torch.nn.Module):
    """The unquantized baseline: frozen bf16 nn.Linear plus PEFT-style fp32 LoRA factors."""

    def __init__(self, w_bf16, lora_A, lora_B, scaling):
        super().__init__()
        out_f, in_f = w_bf16.shape
        self.base = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        self.base.weight = torch.nn.Parameter(w_bf16, requires_grad=False)
        self.lora_A = torch.nn.Parameter(lora_A.clone())
        self.lora_B = torch.nn.Parameter(lora_B.clone())
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + lora_term(x, self.lora_A, self.lora_B, self.scaling)


def build_peft(w, lora_A, lora_B, rank, log, case, magnitude=None):
    """PEFT's LoRA (r, alpha 2r, no dropout) on a bitsandbytes Linear4bit (NF4, double quant, block
    64, bf16 compute) holding w, as PEFT wraps a model transformers loaded in 4 bits (its bnb 4-bit
    LoRA layer); with `magnitude` [out], PEFT's DoRA (use_dora) with that magnitude. None, with a
    printed line, when it cannot be built here."""
    impl = PEFT if magnitude is None else PEFT_DORA
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, inject_adapter_in_model
    except Exception as exc:
        log(f"{impl} skipped: {type(exc).__name__}: {exc}")
        return None
    try:
        model = bnb_nf4_model(bnb, w)
        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                   use_dora=magnitude is not None, target_modules=["proj"]), model)
        with torch.no_grad():
            model.proj.lora_A["default"].weight.copy_(lora_A)
            model.proj.lora_B["default"].weight.copy_(lora_B)
            if magnitude is not None:
                model.proj.lora_magnitude_vector["default"].weight.copy_(magnitude)
        return model.proj
    except Exception as exc:
        log(f"{impl} skipped on {case}: cannot build it here: {type(exc).__name__}: {exc}")
        return None


def bnb_nf4_model(bnb, w):
    """A module whose `proj` is a bitsandbytes Linear4bit (NF4, double quant, block 64, bf16 compute, no
    bias) holding w [out, in], marked as transformers marks a model loaded in 4 bits, so that PEFT wraps
    it with its bnb 4-bit layers."""
    out_f, in_f = w.shape
    model = torch.nn.Module()
    model.proj = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                   quant_type="nf4", device="meta")
    model.proj.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                          blocksize=64)
    model.to(w.device)  # Params4bit quantizes on its first move
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then uses its bnb 4-bit layer
    return model


def bitsandbytes_functional(log):
    """bitsandbytes.functional, or None after a printed line saying why (a missing peer is a
    printed line, never a silent gap)."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception as exc:
        log(f"bitsandbytes skipped: {type(exc).__name__}: {exc}")
        return None
    return bnbF


def bnb_quantize_nf4(bnbF, w):
    """bitsandbytes' NF4 form of w as the suites compare it with ours: block 64, double quant
    (compress_statistics). Returns (packed, QuantState)."""
    return bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


class BnbNF4:
    """bitsandbytes' NF4 weight for one shape, and how its gemv_4bit must be called here.
    base_ref(M) -> (x [M, in] bf16, its fp32 x . deq(W)^T): what a plain NF4 matmul must return."""

    def __init__(self, bnbF, w, base_ref, log, case):
        self.bnbF = bnbF
        self.packed, self.state = bnb_quantize_nf4(bnbF, w)
        self.gemv_B, self.gemv_state, self.gemv_note = self.packed.t(), self.state, ""
        x1, ref1 = base_ref(1)
        problem = mismatch(bnbF.gemv_4bit(x1, self.gemv_B, state=self.gemv_state), ref1)
        if problem and w.device.type == "cpu":
            # bitsandbytes 0.50 on an AVX512-BF16 CPU: gemv_4bit reads the layout Linear4bit
            # repacks its weight to at eval time (`_convert_weight_packed_for_cpu`: 32-row tiles,
            # bf16 block scales, no double quant); with the standard layout it returns garbage.
            try:
                from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

                if has_avx512bf16():
                    B, st = _convert_weight_packed_for_cpu(self.packed.clone(), copy.deepcopy(self.state))
                    repacked_problem = mismatch(bnbF.gemv_4bit(x1, B, state=st), ref1)
                    if repacked_problem:
                        log(f"bitsandbytes gemv_4bit on {case} is wrong with the standard layout ({problem}) "
                            f"and with the AVX512-BF16 one ({repacked_problem})")
                    else:
                        log(f"bitsandbytes gemv_4bit on {case} is wrong with the standard layout on this CPU "
                            f"({problem}); timed with the AVX512-BF16 layout Linear4bit repacks to at eval")
                        self.gemv_B, self.gemv_state = B, st
                        self.gemv_note = "AVX512-BF16 packed layout (as Linear4bit at eval), bf16 scales"
            except Exception as exc:
                log(f"bitsandbytes CPU repacking failed: {type(exc).__name__}: {exc}")

    def gemv(self, x):
        return self.bnbF.gemv_4bit(x, self.gemv_B, state=self.gemv_state)

    def dequant_linear(self, x):
        return F.linear(x, self.bnbF.dequantize_4bit(self.packed, self.state).to(x.dtype))


def torchao_nf4():
    """(to_nf4, linear_nf4) from the installed torchao; raises ImportError saying what is missing.
    torchao 0.18 keeps them in quantization/quantize_/workflows/nf4 (to_nf4 is also exported from
    torchao.quantization); releases before 0.15 had torchao.dtypes.nf4tensor."""
    import torchao

    for module in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            mod = __import__(module, fromlist=["to_nf4", "linear_nf4"])
            return mod.to_nf4, mod.linear_nf4
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"torchao {torchao.__version__} has no to_nf4 / linear_nf4 where this bench looks")


def torchao_qlora(x, weight, lora_A, lora_B, scaling, linear_nf4):
    """torchtune's QLoRA forward: torchao's NF4 linear plus the LoRA branch."""
    return linear_nf4(x, weight) + lora_term(x, lora_A, lora_B, scaling)


# ---- the training step (train, memory) ----------------------------------------------------------
def step_cases(device: torch.device, quick: bool, shapes=None) -> list[tuple[str, tuple[int, int], int]]:
    """(label, (out, in), M) of the training-step suites (train, memory): --shapes if given (at the
    device's M)."""
    if device.type == "cuda":
        return [(label, shape, STEP_GPU_M) for label, shape in layer_cases(True, quick, shapes)]
    default = STEP_CPU_QUICK_CASES if quick else STEP_CPU_CASES
    return [(label, shape, default[0][2]) for label, shape in as_cases(shapes)] if shapes else default


def prepare_step(device, out_f, in_f, M, rank):
    """The training-step problem of one case: (w bf16, w_deq bf16, lora_A, lora_B, x requiring
    grad, dy, check), check comparing (y, dx, dA, dB) with autograd through the fp32 reference."""
    w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, rank)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, out_f, device=device, generator=g).to(torch.bfloat16)
    xr = x.detach().float().requires_grad_()
    Ar, Br = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
    yr = reference.qlora_linear(xr, w_deq.float(), Ar, Br, ALPHA / RANK)
    yr.backward(dy.float())
    return w, w_deq, lora_A, lora_B, x, dy, step_checker((yr.detach(), xr.grad, Ar.grad, Br.grad))


def step_checker(refs):
    """check(result) -> '' or the first gradient that is missing or off the reference. refs and
    result: (y, dx, dA, dB) and, for DoRA, dm; a None reference is not checked."""

    def check(result):
        for name, got, ref in zip(("y", "dx", "dA", "dB", "dm"), result, refs):
            if ref is None:
                continue
            if got is None:
                return f"{name} was not computed"
            problem = mismatch(got, ref, name)
            if problem:
                return problem
        return ""

    return check


def step_fn(layer, x, dy, *params):
    """The timed training step: clears the grads of x and the trained params (lora_A, lora_B, ...)
    so none accumulate, forward, backward. Returns (y, dx, the params' grads) for the check."""

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        y = layer(x)
        y.backward(dy)
        return (y, x.grad) + tuple(p.grad for p in params)

    return step


def step_implementations(device, ours, w, w_deq, lora_A, lora_B, rank, log, shape):
    """Yield (impl, layer, its lora_A, its lora_B, note) of a training step for ours per backend
    (with that backend set while the consumer runs it), the bf16 baseline and PEFT; each layer is
    built when its turn comes."""
    layer = build_ours(w, lora_A, lora_B, rank)
    for backend in ours:
        with using_backend(backend):
            yield (f"ours:{backend}", layer, layer.lora_A, layer.lora_B, backend)
    del layer
    dense = DenseLoRA(w_deq, lora_A, lora_B, ALPHA / RANK)
    yield (BF16_NN_LORA, dense, dense.lora_A, dense.lora_B, "frozen bf16 weight, fp32 LoRA")
    del dense
    peft_layer = build_peft(w, lora_A, lora_B, rank, log, shape)
    if peft_layer is not None:
        # Training mode with x requiring grad: bitsandbytes keeps its standard layout (its
        # AVX512-BF16 CPU repacking, used at eval, has no backward).
        peft_layer.train()
        yield (PEFT, peft_layer, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
               "bf16 LoRA factors (PEFT follows the compute dtype)")
