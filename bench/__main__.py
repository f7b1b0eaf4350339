"""python -m bench [--suite quant|forward|train|all] [--quick] [--backend cpu,torch] [--device cpu|cuda]
[--shapes 4096x4096,11008x4096] [--rank 16] [--out DIR]"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import forward, harness, quant, train

SUITES = {"quant": quant.run, "forward": forward.run, "train": train.run}
# Suites that take a layer shape and a LoRA rank (--shapes, --rank).
LAYER_SUITES = ("forward", "train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--suite", default="all", help=f"one of {sorted(SUITES)} or all")
    parser.add_argument("--quick", action="store_true", help="one shape, short timing budget")
    parser.add_argument("--backend", default="", help="comma-separated subset of our backends to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="", help="forward/train: OUTxIN layer shapes, comma-separated "
                        "(default: the suite's own)")
    parser.add_argument("--rank", type=int, default=forward.RANK, help="forward/train: LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    wanted = [b for b in args.backend.split(",") if b] or None
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose one of {sorted(SUITES)} or all")
    try:
        shapes = forward.parse_shapes(args.shapes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rank < 1:
        parser.error(f"--rank must be positive, got {args.rank}")
    env = harness.environment(device)
    print(f"lora-kernels bench on {env['device']} ({env['cpu_threads']} CPU threads), torch {env['torch']}, "
          f"bitsandbytes {env['bitsandbytes']}, commit {env['commit']}", flush=True)
    rows, goals = [], []
    for suite in suites:
        print(f"\n== {suite} ==", flush=True)
        log = lambda line: print("  " + line, flush=True)  # noqa: E731
        if suite in LAYER_SUITES:
            r, g = SUITES[suite](device, args.quick, wanted, log, shapes=shapes or None, rank=args.rank)
        else:
            r, g = SUITES[suite](device, args.quick, wanted, log)
        rows += r
        goals += g
    verdicts = [f"{'met' if g['met'] else 'MISSED'}: {g['goal']}: {g['figure']}" for g in goals]
    print("\n" + harness.markdown_table(rows))
    print("\nGoals:")
    for v in verdicts:
        print("  " + v)
    json_path, md_path = harness.write_results(rows, env, verdicts, args.out)
    print(f"\nwrote {json_path} and {md_path}")
    wrong = [r for r in rows if r.correct is False and r.impl.startswith("ours")]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
