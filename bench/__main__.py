"""python -m bench [--suite quant|forward|train|memory|dora|multi|e2e|family|all] [--quick] [--backend cpu,torch]
[--device cpu|cuda] [--shapes llama3-8b|llama3-70b|cpu|4096x4096,...] [--rank 16] [--out DIR] [--verbose]

python -m bench --compare A.json B.json"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from . import dora, e2e, family, forward, harness, memory, multi, quant, report, train
from .problems import RANK
from .shapes import SHAPE_SETS, parse_shapes

SUITES = {"quant": quant.run, "forward": forward.run, "train": train.run, "memory": memory.run, "dora": dora.run,
          "multi": multi.run, "e2e": e2e.run, "family": family.run}
# Suites that take a layer shape and a LoRA rank (--shapes, --rank).
LAYER_SUITES = ("forward", "train", "memory", "dora", "multi")


class _Stopped(BaseException):
    """SIGTERM (e.g. from `timeout`): stop timing, still write what was measured. A BaseException, so
    that the suites' `except Exception` (a peer that fails is a skip) does not swallow it."""


def _stop(signum, frame):
    raise _Stopped()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", help=f"comma-separated subset of {list(SUITES)}, or all")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and token counts, short timing budget")
    parser.add_argument("--backend", default="", help="comma-separated subset of our backends to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="", help=f"forward/train/memory: comma-separated set names "
                        f"({', '.join(SHAPE_SETS)}) or OUTxIN layer shapes (default: the device's own)")
    parser.add_argument("--rank", type=int, default=RANK,
                        help="forward/train/memory: LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--verbose", action="store_true", help="print each row as it is timed")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="print two runs side by side (no benchmark is run)")
    args = parser.parse_args(argv)
    if args.compare:
        for path in args.compare:
            if not os.path.isfile(path):
                parser.error(f"--compare: no file {path}")
        return report.compare(*args.compare)
    device = torch.device(args.device)
    wanted = [b for b in args.backend.split(",") if b] or None
    suites = list(SUITES) if args.suite == "all" else [s for s in args.suite.split(",") if s]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        parser.error(f"unknown suite {unknown[0] if unknown else args.suite!r}; choose from {list(SUITES)} or all")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rank < 1:
        parser.error(f"--rank must be positive, got {args.rank}")
    env = harness.environment(device)
    print(f"lora-kernels bench on {env['device']} ({env['cpu_threads']} CPU threads), torch {env['torch']}, "
          f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, torchao {env['torchao']}, commit {env['commit']}",
          flush=True)
    env.update(harness.device_peaks(device))
    print(f"measured peaks: copy {env['peak_copy_gbps']:.1f} GB/s (read + write), "
          f"{env['peak_matmul']} {env['peak_matmul_tflops']:.3f} TFLOP/s", flush=True)
    rows, goals = [], []
    log = harness.Log(verbose=args.verbose)
    try:
        previous = signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread: no handler, SIGTERM ends the run as usual
        previous = None
    try:
        for suite in suites:
            log(f"== {suite} ==")
            kwargs = dict(shapes=shapes or None, rank=args.rank) if suite in LAYER_SUITES else {}
            _, g = SUITES[suite](device, args.quick, wanted, log, rows=rows, **kwargs)
            goals += g
    except (_Stopped, KeyboardInterrupt):
        # The rows measured so far are kept; the stopped suite's goals and the later suites are missing.
        env["stopped"] = f"stopped during suite {suite}: its later rows, its goals and the later suites are missing"
        log(f"STOPPED during {suite}: writing the {len(rows)} rows measured so far")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        log.close()
    harness.add_roofline(rows, env)
    verdicts = [f"{'met' if g['met'] else 'MISSED'}: {g['goal']}: {g['figure']}" for g in goals]
    print("\n" + report.terminal_table(rows))
    print("\nGoals:")
    for v in verdicts or ["(no goal applies to this device)"]:
        print("  " + v)
    paths = report.write_results(rows, env, verdicts, args.out, log=lambda line: print("  " + line))
    print("\nwrote " + ", ".join(paths))
    wrong = [r for r in rows if r.correct is False and r.impl.startswith("ours")]
    return 1 if wrong or env.get("stopped") else 0


if __name__ == "__main__":
    sys.exit(main())
