"""Suite `family`: the rest of the LoRA family on the NF4 base (issue 14), side by side in one run.

Part 1, initialisation quality on a real model (left out of --quick: a 15 s model load and a few
minutes of fine-tuning): SmolLM2-135M-Instruct in fp32, all 210 linear layers swapped at r = 16,
lora_alpha = 16, once per initialisation (plain NF4 with PEFT's default zero B, PiSSA with a randomized
SVD of 4 iterations and exact, OLoRA, LoftQ with 5 alternations). For each: the time replace_linear took,
the mean over layers of the relative weight error ||W - (deq(Q) + s B A)|| / ||W|| (W the fp32 weight the
layer was made from), the held-out perplexity right after initialisation, and after a short fine-tune
(the same steps, batches, seed and optimizer for every start) the last training losses and the
held-out perplexity. Reported as measured, whichever way they go: weight error is not output error.

Part 2, training steps at one layer (forward + backward with dx, bf16, M = 512 at 4096 x 4096 on the
CPU): our LoRA (r = 16), our VeRA (r = 256, PEFT's default, and r = 16), our IA3 on an output layer and
on a feed-forward layer; PEFT's IA3 on a bitsandbytes Linear4bit holding the same NF4 bytes, PEFT's VeRA
on a dense bf16 nn.Linear (PEFT has no 4-bit VeRA layer). Each checked against autograd through the fp32
spec (reference.qlora_linear / vera_linear / ia3_linear) before it is timed; ours timed again
interleaved; the peak memory of one step beside each.

Goals (issue 14): LoftQ (5 iterations) lowers the mean relative weight error by >= 15% against plain
NF4; "pissa_niter_4" initialises the 210 layers in <= 5 s and LoftQ-5 in <= 30 s; VeRA and IA3 steps
within 1.15x of our LoRA step; our IA3 >= 1.5x faster than PEFT's IA3 on a bitsandbytes Linear4bit.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch

import lora_kernels

from .harness import Row, advance, expect, time_paired
from .memory import peak_bytes
from .problems import bnb_nf4_model, main_backend, measure, mismatch, nf4_nbytes, our_backends, using_backend

SUITE = "family"
INIT_RANK, INIT_ALPHA = 16, 16
# (label, replace_linear keywords): PEFT's names for each initialisation.
INITS = (("plain NF4 (B = 0)", dict(init_lora_weights=True)),
         ("PiSSA niter 4", dict(init_lora_weights="pissa_niter_4")),
         ("PiSSA exact SVD", dict(init_lora_weights="pissa")),
         ("OLoRA", dict(init_lora_weights="olora")),
         ("LoftQ 5 iterations", dict(init_lora_weights="loftq", loftq_iter=5)))
FINETUNE_STEPS, SEQ_LEN, BATCH, LR = 20, 64, 4, 5e-4


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = 16,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    rows, goals = ([] if rows is None else rows), []
    backend = main_backend(our_backends(device, wanted, log)) or "torch"
    goals += _initialisations(rows, log, device, quick, backend)
    goals += _steps(rows, log, device, quick, backend)
    return rows, goals


# ---- part 1: initialisations on SmolLM2 ---------------------------------------------------------
def _initialisations(rows, log, device, quick, backend) -> list[dict]:
    case = f"{SUITE} init SmolLM2-135M r={INIT_RANK}"
    if quick:
        log(f"{case} left out of --quick (a 15 s model load and a few minutes of fine-tuning)")
        return []
    from .multi import _example

    expect(log, len(INITS) + 1)
    example = _example("smollm2_qdora")
    try:
        tokenizer, dense = example.load_smollm2()
    except (Exception, SystemExit) as exc:
        log(f"{case} skipped: SmolLM2 not available here ({type(exc).__name__}: {exc})")
        return []
    dense = dense.to(device)
    train_ids, held_ids = example.token_splits(tokenizer)
    originals = {name: m.weight.detach().float().clone() for name, m in dense.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    full_ppl = example.perplexity(dense, held_ids, SEQ_LEN)
    rows.append(Row(SUITE, case, "fp32 model", correct=True, note=f"held-out ppl {full_ppl:.2f}",
                    extra=dict(model="SmolLM2-135M", ppl=full_ppl)))
    advance(log, case)
    errors, seconds = {}, {}
    for label, kwargs in INITS:
        model = copy.deepcopy(dense)
        torch.manual_seed(0)
        with warnings.catch_warnings(), using_backend(backend):
            warnings.filterwarnings("ignore", message="not swapping lm_head")
            started = time.perf_counter()
            try:
                names = lora_kernels.replace_linear(model, r=INIT_RANK, lora_alpha=INIT_ALPHA,
                                                    compute_dtype=torch.bfloat16, progress=False, **kwargs)
            except Exception as exc:  # ours failing is a wrong row
                rows.append(Row(SUITE, f"{case} {label}", f"ours:{backend}", correct=False,
                                note=f"WRONG: raised {type(exc).__name__}: {exc}"))
                log(f"{label}: raised {type(exc).__name__}: {exc}")
                continue
            seconds[label] = time.perf_counter() - started
            layers = lora_kernels.modules.lora_layers(model)
            rel = [float(torch.linalg.matrix_norm(originals[n] - layer.merged_weight(torch.float32))
                         / torch.linalg.matrix_norm(originals[n])) for n, layer in layers.items()]
            errors[label] = statistics.fmean(rel)
            ppl_init = example.perplexity(model, held_ids, SEQ_LEN)
            losses = _finetune(model, example, train_ids)
            ppl_tuned = example.perplexity(model, held_ids, SEQ_LEN)
        last = statistics.fmean(losses[-5:])
        extra = dict(model="SmolLM2-135M", layers=len(names), rank=INIT_RANK, init_seconds=seconds[label],
                     mean_rel_weight_error=errors[label], ppl_init=ppl_init, ppl_finetuned=ppl_tuned,
                     first_loss=losses[0], last5_loss=last, steps=FINETUNE_STEPS)
        # one measurement (an initialisation is run once): its p20 and p80 are itself
        ms = seconds[label] * 1e3
        rows.append(Row(SUITE, f"{case} {label}", f"ours:{backend}", ms=ms, p20_ms=ms, p80_ms=ms, correct=True,
                        note=(f"{len(names)} layers in {seconds[label]:.1f} s; rel weight err {errors[label]:.4f}; "
                              f"ppl {ppl_init:.2f} at init, {ppl_tuned:.2f} after {FINETUNE_STEPS} steps "
                              f"(loss {losses[0]:.3f} -> {last:.3f})"), extra=extra))
        log(f"{label}: {rows[-1].note}")
        del model
        advance(log, f"{case} {label}")
    goals = []
    plain, loftq = errors.get(INITS[0][0]), errors.get("LoftQ 5 iterations")
    if plain and loftq:
        goals.append(dict(goal=f"CPU {case}: LoftQ (5 iterations) lowers the mean relative weight error by >= 15% "
                               "against plain NF4", met=loftq <= 0.85 * plain,
                          figure=f"{100 * (1 - loftq / plain):.1f}% lower ({loftq:.4f} vs {plain:.4f})"))
    for label, limit in (("PiSSA niter 4", 5.0), ("LoftQ 5 iterations", 30.0)):
        if label in seconds:
            goals.append(dict(goal=f"CPU {case}: {label} initialises the 210 layers in <= {limit:g} s",
                              met=seconds[label] <= limit, figure=f"{seconds[label]:.1f} s"))
    return goals


def _finetune(model, example, train_ids) -> list[float]:
    """FINETUNE_STEPS AdamW steps on the same batches for every start; the training losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    model.train()
    for tokens in example.batches(train_ids, SEQ_LEN, BATCH, FINETUNE_STEPS, seed=0):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# ---- part 2: training steps at one layer -------------------------------------------------------
STEP_CASES = {"cpu": ((4096, 4096), 512), "cuda": ((4096, 4096), 8192)}
QUICK_CASE = ((1024, 1024), 64)
VERA_RANKS = (256, 16)  # PEFT's default VeRA rank, and the LoRA rank it is compared with
LORA = "LoRA r=16"
PEFT_IA3 = "PEFT IA3 on bnb Linear4bit"
PEFT_VERA = "PEFT VeRA r=256 on dense bf16 nn.Linear"
DENSE_IA3 = "bf16 nn.Linear + IA3 output (no quantization)"


def _linear(w):
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(w, requires_grad=False)
    return linear


def _ours(w, lora_A, lora_B, rank, g):
    """(kind, layer, trained params, spec(x, w_deq, *params) -> y) of each of our layers on w, with
    random non-default adapters (a fresh VeRA / IA3 layer is the bare base, which would hide a wrong term)."""
    from lora_kernels import ia3, reference, vera

    from .problems import ALPHA, RANK, build_ours

    device = w.device
    out_f, in_f = w.shape
    lora = build_ours(w, lora_A, lora_B, rank)
    yield (LORA, lora, [lora.lora_A, lora.lora_B],
           lambda x, w_deq, A, B: reference.qlora_linear(x, w_deq, A, B, ALPHA / RANK))
    # LoRA at VeRA's rank: what the rank-256 factors VeRA derives each step cost by themselves
    big = VERA_RANKS[0]
    lora_big = build_ours(w, torch.randn(big, in_f, device=device, generator=g) / in_f**0.5,
                          torch.randn(out_f, big, device=device, generator=g) * 0.1, big)
    yield (f"LoRA r={big}", lora_big, [lora_big.lora_A, lora_big.lora_B],
           lambda x, w_deq, A, B: reference.qlora_linear(x, w_deq, A, B, 2.0))
    for r, dtype in [(r, torch.float32) for r in VERA_RANKS] + [(big, torch.bfloat16)]:
        layer = vera.QVeRALinear.from_linear(_linear(w), r=r, compute_dtype=torch.bfloat16, lora_dtype=dtype)
        with torch.no_grad():
            layer.vera_lambda_d.copy_(torch.randn(r, device=device, generator=g))
            layer.vera_lambda_b.copy_(torch.randn(out_f, device=device, generator=g) * 0.1)
        A = layer.vera_projection.vera_A[:, :in_f].float()
        B = layer.vera_projection.vera_B[:out_f].float()
        yield (f"VeRA r={r}" + (", bf16 vectors" if dtype == torch.bfloat16 else ""), layer,
               layer.adapter_parameters(), lambda x, w_deq, d, b, A=A, B=B: reference.vera_linear(x, w_deq, A, B, d, b))
    for feedforward in (False, True):
        layer = ia3.QIA3Linear.from_linear(_linear(w), feedforward=feedforward, compute_dtype=torch.bfloat16)
        with torch.no_grad():
            layer.ia3_l.copy_(1 + 0.1 * torch.randn(layer.ia3_l.shape, device=device, generator=g))
        yield (f"IA3 {'feed-forward' if feedforward else 'output'}", layer, layer.adapter_parameters(),
               lambda x, w_deq, l, ff=feedforward: reference.ia3_linear(x, w_deq, l, feedforward=ff))


def _peft_ia3(w, l, feedforward, log):
    """PEFT's IA3 on a bitsandbytes Linear4bit (NF4, double quant, block 64, bf16 compute) holding w (PEFT's
    bnb 4-bit IA3 layer, train mode: bitsandbytes' CPU repacking at eval has no backward), its vector set
    to l; (layer, [its vector]) or None with a printed line."""
    try:
        import bitsandbytes as bnb
        from peft import IA3Config, inject_adapter_in_model
    except Exception as exc:
        log(f"{PEFT_IA3} skipped: {type(exc).__name__}: {exc}")
        return None
    try:
        model = inject_adapter_in_model(IA3Config(target_modules=["proj"],
                                                  feedforward_modules=["proj"] if feedforward else []),
                                        bnb_nf4_model(bnb, w))
        vector = model.proj.ia3_l["default"]
        with torch.no_grad():
            vector.copy_(l.detach().reshape(vector.shape))
        return model.proj.train(), [vector]
    except Exception as exc:
        log(f"{PEFT_IA3} skipped: cannot build it here: {type(exc).__name__}: {exc}")
        return None


class DenseIA3(torch.nn.Module):
    """The floor of an IA3 step without quantization: a frozen bf16 weight and the vector on the output
    (the two bf16 GEMMs of a step, forward and dx, and nothing else of substance)."""

    def __init__(self, w_bf16, l):
        super().__init__()
        self.base = _linear(w_bf16)
        self.ia3_l = torch.nn.Parameter(l.detach().clone())

    def forward(self, x):
        return (self.base(x).float() * self.ia3_l).to(x.dtype)


def _peft_vera(w_deq, log):
    """PEFT's VeRA (r = 256, its default) on a dense bf16 nn.Linear holding the dequantized weight, with
    random lambdas; (layer, [lambda_d, lambda_b], spec) or None with a printed line."""
    from lora_kernels import reference

    try:
        from peft import VeraConfig, get_peft_model
    except Exception as exc:
        log(f"{PEFT_VERA} skipped: {type(exc).__name__}: {exc}")
        return None
    try:
        model = torch.nn.Module()
        model.proj = _linear(w_deq.to(torch.bfloat16))
        # (VeRA's shared projection lives on PEFT's tuner: get_peft_model, not inject_adapter_in_model)
        layer = get_peft_model(model, VeraConfig(r=256, target_modules=["proj"])).base_model.model.proj
        d, b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
        g = torch.Generator(w_deq.device).manual_seed(5)
        with torch.no_grad():
            d.copy_(torch.randn(d.shape, device=w_deq.device, generator=g))
            b.copy_(torch.randn(b.shape, device=w_deq.device, generator=g) * 0.1)
        A = layer.vera_A["default"][:, :w_deq.shape[1]].float()
        B = layer.vera_B["default"][:w_deq.shape[0]].float()
        return layer, [d, b], lambda x, w, d, b: reference.vera_linear(x, w, A, B, d, b)
    except Exception as exc:
        log(f"{PEFT_VERA} skipped: cannot build it here: {type(exc).__name__}: {exc}")
        return None


def _step_check(spec, w_deq, x, dy, params):
    """check(result) against autograd through the fp32 spec: result = (y, dx, grads of params...)."""
    leaves = [x.detach().float().requires_grad_()] + [p.detach().float().requires_grad_() for p in params]
    y = spec(leaves[0], w_deq.float(), *leaves[1:])
    y.backward(dy.float())
    refs = [y.detach()] + [t.grad for t in leaves]
    names = ["y", "dx"] + [f"grad {i}" for i in range(len(params))]

    def check(result):
        for name, got, ref in zip(names, result, refs):
            if got is None:
                return f"{name} was not computed"
            problem = mismatch(got.float().reshape(ref.shape), ref, name)
            if problem:
                return problem
        return ""

    return check


def _steps(rows, log, device, quick, backend) -> list[dict]:
    from .problems import RANK, make_problem, step_fn

    (out_f, in_f), M = QUICK_CASE if quick else STEP_CASES[device.type]
    shape = f"{out_f}x{in_f}"
    case = f"{SUITE} step {shape} M={M}"
    expect(log, 1)
    w, w_deq, lora_A, lora_B = make_problem(device, out_f, in_f, RANK)
    g = torch.Generator(device).manual_seed(4)
    x = torch.randn(M, in_f, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, out_f, device=device, generator=g).to(torch.bfloat16)
    budget = (0.3 if quick else 1.0) if device.type == "cpu" else 0.5
    steps, peaks, ia3_vectors = {}, {}, {}
    impls = []
    for kind, layer, params, spec in _ours(w, lora_A, lora_B, RANK, g):
        impls.append((f"ours:{backend} {kind}", layer, params, spec, True))
        if kind.startswith("IA3"):
            ia3_vectors[kind] = params[0]
    for kind, vector in ia3_vectors.items():
        feedforward = kind.endswith("feed-forward")
        built = _peft_ia3(w, vector, feedforward, log)
        if built is not None:
            impls.append((f"{PEFT_IA3} {kind.split()[1]}", built[0], built[1],
                          lambda x, w_deq, l, ff=feedforward: reference_ia3(x, w_deq, l, ff), False))
    dense = DenseIA3(w_deq, ia3_vectors["IA3 output"])
    impls.append((DENSE_IA3, dense, [dense.ia3_l], lambda x, w, l: reference_ia3(x, w, l, False), False))
    built = _peft_vera(w_deq, log)
    if built is not None:
        impls.append((PEFT_VERA, *built, False))
    for impl, layer, params, spec, ours in impls:
        step = step_fn(layer, x, dy, *params)
        with using_backend(backend if ours else None):
            row = measure(rows, log, device, budget, case, impl, step, _step_check(spec, w_deq, x, dy, params),
                          suite=SUITE, ours=ours, note="fwd + bwd (dx and the adapter's grads)",
                          extra=dict(shape=shape, M=M), **_costs(impl, M, out_f, in_f))
            if row is not None and row.correct:
                steps[impl] = step
                peaks[impl] = peak_bytes(step, device)
                held = _held_bytes(layer)
                row.extra.update(peak_bytes=peaks[impl], held_bytes=held, adapter_params=sum(p.numel() for p in params))
                row.note += f"; holds {held / 2**20:.1f} MiB, step peak {peaks[impl] / 2**20:.1f} MiB"
    log(f"{case}: peak memory of a step: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items()))
    if device.type == "cpu" and steps:
        # interleaved: on this noisy shared VM separate timing windows see different noise
        with using_backend(backend):
            timed = {k: statistics.median(v) for k, v in time_paired(steps, 2 * budget, cold=True).items()}
        for row in rows:
            if row.case == case and row.impl in timed:
                row.extra["paired_ms"] = timed[row.impl]
    else:
        timed = {row.impl: row.ms for row in rows if row.case == case and row.correct and row.ms}
    advance(log, case)
    return _step_goals(device, case, backend, timed)


def _costs(impl, M, out_f, in_f) -> dict:
    """A step's roofline costs (nbytes, flops), counted as the train suite counts them: the weight read
    twice (NF4, or bf16 for the dense ones), x, y, dy and dx in bf16; the FLOPs of the forward and dx
    matmuls, and of a rank-r branch forward and backward (LoRA, VeRA: 3 products of M x r x (in + out));
    vectors' and factors' bytes are left out (rank-sized)."""
    n = out_f * in_f
    dense = "dense" in impl or "no quantization" in impl
    nbytes = 2 * (2 * n if dense else nf4_nbytes(n)) + 2 * 2 * M * (in_f + out_f)
    rank = next((int(part[2:].rstrip(",")) for part in impl.split() if part.startswith("r=")), 0)
    return dict(nbytes=nbytes, flops=2 * 2 * M * n + 3 * 2 * M * rank * (in_f + out_f))


def _held_bytes(layer) -> int:
    """Bytes of the layer's parameters and buffers (each storage once): the weight in its format, the
    adapter, a VeRA projection."""
    seen, total = set(), 0
    for t in list(layer.parameters()) + list(layer.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def reference_ia3(x, w_deq, l, feedforward):
    from lora_kernels import reference

    return reference.ia3_linear(x, w_deq, l.reshape(-1), feedforward=feedforward)


def _step_goals(device, case, backend, timed) -> list[dict]:
    where = "GPU" if device.type == "cuda" else "CPU"
    lora = timed.get(f"ours:{backend} {LORA}")
    goals = []
    for kind in [f"VeRA r={r}" for r in VERA_RANKS] + [f"VeRA r={VERA_RANKS[0]}, bf16 vectors", "IA3 output",
                                                       "IA3 feed-forward"]:
        mine = timed.get(f"ours:{backend} {kind}")
        if lora and mine:
            goals.append(dict(goal=f"{where} {case}: our {kind} step within 1.15x of our {LORA} step "
                                   "(interleaved timing)", met=mine <= 1.15 * lora,
                              figure=f"{mine / lora:.2f}x ({mine:.1f} ms vs {lora:.1f} ms)"))
    for kind in ("output", "feed-forward"):
        mine, peer = timed.get(f"ours:{backend} IA3 {kind}"), timed.get(f"{PEFT_IA3} {kind}")
        if mine and peer:
            floor = timed.get(DENSE_IA3)
            goals.append(dict(goal=f"{where} {case}: our IA3 ({kind}) step >= 1.5x faster than {PEFT_IA3}",
                              met=peer >= 1.5 * mine,
                              figure=f"{peer / mine:.2f}x ({mine:.1f} ms vs {peer:.1f} ms"
                                     + (f"; the unquantized bf16 layer's step {floor:.1f} ms)" if floor else ")")))
    return goals
