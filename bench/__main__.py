"""python -m bench [--suite quant] [--quick] [--backend cpu,torch] [--device cpu|cuda] [--out DIR]"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import harness, quant

SUITES = {"quant": quant.run}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--suite", default="all", help=f"one of {sorted(SUITES)} or all")
    parser.add_argument("--quick", action="store_true", help="one shape, short timing budget")
    parser.add_argument("--backend", default="", help="comma-separated subset of our backends to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    wanted = [b for b in args.backend.split(",") if b] or None
    suites = sorted(SUITES) if args.suite == "all" else [args.suite]
    env = harness.environment(device)
    print(f"lora-kernels bench on {env['device']} ({env['cpu_threads']} CPU threads), torch {env['torch']}, "
          f"bitsandbytes {env['bitsandbytes']}, commit {env['commit']}", flush=True)
    rows, goals = [], []
    for suite in suites:
        print(f"\n== {suite} ==", flush=True)
        r, g = SUITES[suite](device, args.quick, wanted, lambda line: print("  " + line, flush=True))
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
