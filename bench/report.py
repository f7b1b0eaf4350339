"""What a run leaves behind and how runs are read: the JSON, the Markdown report, the PNG plots
(matplotlib, Agg), the compact terminal table, and `--compare` of two JSON files."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict

from .harness import Row

# Our implementations in the order the plots pick their main one: the first with forward rows.
MAIN_OURS = ("ours:cuda", "ours:triton", "ours:cpu", "ours:torch")
BF16_LORA = "bf16 F.linear + LoRA"  # the forward suite's unquantized baseline


# ---- the files ----------------------------------------------------------------------------------
def stem_for(env: dict, out_dir: str) -> str:
    # 'CPU: Intel(R) Xeon(R) Processor' -> 'cpu-intel-xeon-processor': letters, digits and '-' only
    # (a parenthesis would break the Markdown image links).
    tag = re.sub(r"\((r|tm)\)", "", env["device"].lower().replace("cpu: ", "cpu-"))
    tag = re.sub(r"[^a-z0-9]+", "-", tag).strip("-")[:40]
    return os.path.join(out_dir, f"{env['date'][:10]}-{tag}-{env['commit']}")


def write_results(rows: list[Row], env: dict, verdicts: list[str], out_dir: str, log=print) -> list[str]:
    """<stem>.json, <stem>.md and the plots <stem>-speedup.png, <stem>-roofline.png (when there are
    forward rows and matplotlib). Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stem = stem_for(env, out_dir)
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows], "verdicts": verdicts}, f, indent=1)
    plots = write_plots([asdict(r) for r in rows], env, stem, log)
    with open(stem + ".md", "w") as f:
        f.write(markdown_report(rows, env, verdicts, [os.path.basename(p) for p in plots]))
    return [stem + ".json", stem + ".md", *plots]


def markdown_report(rows: list[Row], env: dict, verdicts: list[str], plot_names: list[str]) -> str:
    parts = [f"# Benchmark: {env['device']}\n",
             f"{env['date']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}, torch {env['torch']}, "
             f"bitsandbytes {env['bitsandbytes']}, peft {env.get('peft', '?')}, torchao {env.get('torchao', '?')}, "
             f"{env['cpu_threads']} CPU threads.",
             f"Measured peaks: copy {env.get('peak_copy_gbps', 0):.1f} GB/s (read + write), "
             f"{env.get('peak_matmul', 'bf16 mm')} {env.get('peak_matmul_tflops', 0):.3f} TFLOP/s.\n"]
    if env.get("stopped"):
        parts.append(f"**Partial run, {env['stopped']}.**\n")
    for name in plot_names:
        parts.append(f"![{name}]({name})\n")
    timed = [r for r in rows if r.suite != "memory"]
    memory = [r for r in rows if r.suite == "memory"]
    if timed:
        parts.append(markdown_table(timed) + "\n")
    if memory:
        parts.append("## Peak memory of forward + backward\n\n" + memory_table(memory) + "\n")
    parts.append("## Goals\n\n" + ("\n".join(f"- {v}" for v in verdicts) or "(no goal applies to this device)") + "\n")
    return "\n".join(parts)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| case | implementation | median ms | p20-p80 ms | GB/s | TFLOP/s | % copy BW | % bf16 mm | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.ms is None:
            lines.append(f"| {r.case} | {r.impl} | - | - | - | - | - | - | {r.note} |")
            continue
        lines.append(f"| {r.case} | {r.impl} | {r.ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | {_num(r.gbps, 1)} | "
                     f"{_num(r.tflops, 3)} | {_pct(r.extra.get('bw_frac'))} | {_pct(r.extra.get('flop_frac'))} | "
                     f"{r.note} |")
    return "\n".join(lines)


def memory_table(rows: list[Row]) -> str:
    lines = ["| case | implementation | peak above inputs, MiB | x one bf16 weight | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        peak = r.extra.get("peak_bytes")
        mib = f"{peak / 2**20:.0f}" if peak is not None else "-"
        lines.append(f"| {r.case} | {r.impl} | {mib} | {_num(r.extra.get('peak_vs_bf16_weight'), 2)} | {r.note} |")
    return "\n".join(lines)


def terminal_table(rows: list[Row]) -> str:
    """One line a row, fixed width: what a terminal shows at the end of a run."""
    head = f"{'case':34s} {'implementation':40s} {'ms':>10s} {'GB/s':>8s} {'TFLOP/s':>8s} {'%BW':>5s} {'%mm':>5s}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        impl = r.impl if len(r.impl) <= 40 else r.impl[:39] + "~"
        if r.suite == "memory":
            peak = r.extra.get("peak_bytes")
            fig = f"peak +{peak / 2**20:.0f} MiB" if peak is not None else "-"
            lines.append(f"{r.case:34s} {impl:40s} {fig:>34s}  {r.note}")
        elif r.ms is None:
            lines.append(f"{r.case:34s} {impl:40s} {'-':>10s} {'':8s} {'':8s} {'':5s} {'':5s}  {r.note}")
        else:
            lines.append(f"{r.case:34s} {impl:40s} {r.ms:10.4f} {_num(r.gbps, 1):>8s} {_num(r.tflops, 3):>8s} "
                         f"{_pct(r.extra.get('bw_frac')):>5s} {_pct(r.extra.get('flop_frac')):>5s}  {_short(r.note)}")
    return "\n".join(lines)


def _num(v, digits):
    return f"{v:.{digits}f}" if v else "-"


def _pct(frac):
    return f"{100 * frac:.0f}%" if frac else "-"


def _short(note: str) -> str:
    """The terminal keeps the speedups and route of a note, not its prose."""
    return note if len(note) <= 60 else note[:59] + "~"


# ---- plots --------------------------------------------------------------------------------------
def _forward_series(rows: list[dict]):
    """(main impl of ours, {shape label: {impl: [(M, row), ...]}}) from the forward rows."""
    fwd = [r for r in rows if r["suite"] == "forward" and r.get("ms") and "M" in r.get("extra", {})]
    main = next((i for i in MAIN_OURS if any(r["impl"] == i for r in fwd)), None)
    series: dict = {}
    for r in fwd:
        label = f"{r['extra'].get('model', '')} {r['extra']['shape']}".strip()
        series.setdefault(label, {}).setdefault(r["impl"], []).append((r["extra"]["M"], r))
    for by_impl in series.values():
        for points in by_impl.values():
            points.sort(key=lambda p: p[0])
    return main, series


def write_plots(rows: list[dict], env: dict, stem: str, log=print) -> list[str]:
    """The speedup and roofline plots of the forward suite beside the JSON; [] (with a printed
    line) when there is nothing to plot or no matplotlib."""
    main, series = _forward_series(rows)
    if main is None:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # a missing tool is a printed line
        log(f"plots skipped: matplotlib: {type(exc).__name__}: {exc}")
        return []
    title = f"{env['device']}, commit {env['commit']}, {env['date'][:10]}"
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_impl in series.items():
        pts = [(M, r["extra"]["speedup_vs_bf16_lora"]) for M, r in by_impl.get(main, [])
               if "speedup_vs_bf16_lora" in r["extra"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens M")
    ax.set_ylabel(f"speedup of {main} over {BF16_LORA}")
    ax.set_title(f"QLoRA forward, {main} vs bf16 + LoRA\n{title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(stem + "-speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax_bw, ax_mm) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, by_impl) in enumerate(series.items()):
        color = colors[i % len(colors)]
        for impl, style in ((main, "-"), (BF16_LORA, ":")):
            pts = by_impl.get(impl, [])
            for ax, key in ((ax_bw, "bw_frac"), (ax_mm, "flop_frac")):
                xy = [(M, r["extra"][key]) for M, r in pts if key in r["extra"]]
                if xy:
                    ax.plot(*zip(*xy), style, marker="o" if style == "-" else None, color=color,
                            label=f"{label} {impl}")
    ax_bw.set_title(f"GB/s / measured copy bandwidth ({env.get('peak_copy_gbps', 0):.1f} GB/s)", fontsize=9)
    ax_mm.set_title(f"TFLOP/s / measured {env.get('peak_matmul', 'bf16 mm')} "
                    f"({env.get('peak_matmul_tflops', 0):.3g} TFLOP/s)", fontsize=9)
    for ax in (ax_bw, ax_mm):
        ax.set_ylabel("fraction of the measured peak")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.grid(True, which="both", alpha=0.3)
    ax_mm.legend(fontsize=7)
    fig.suptitle(f"QLoRA forward roofline: {main} (solid), {BF16_LORA} (dotted)\n{title}", fontsize=9)
    fig.tight_layout()
    paths.append(stem + "-roofline.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---- --compare ----------------------------------------------------------------------------------
def compare(path_a: str, path_b: str, out=print) -> int:
    """Print two runs side by side: the environments' differences, then the rows both have
    (matched by suite, case and implementation) with ms A, ms B and B / A, then what only one has."""
    runs = []
    for path in (path_a, path_b):
        with open(path) as f:
            runs.append(json.load(f))
    env_a, env_b = runs[0]["environment"], runs[1]["environment"]
    out(f"A: {path_a}\nB: {path_b}\n")
    out("environment:")
    for key in ("device", "commit", "torch"):
        a, b = env_a.get(key), env_b.get(key)
        out(f"  {key:20s} {'same: ' + str(a) if a == b else f'A {a}  |  B {b}'}")
    for key in sorted(set(env_a) | set(env_b)):
        if key in ("device", "commit", "torch", "date"):
            continue
        a, b = env_a.get(key), env_b.get(key)
        if a != b:
            out(f"  {key:20s} A {_fmt(a)}  |  B {_fmt(b)}")
    key = lambda r: (r["suite"], r["case"], r["impl"])  # noqa: E731
    rows_a = {key(r): r for r in runs[0]["rows"]}
    rows_b = {key(r): r for r in runs[1]["rows"]}
    matched = [k for k in rows_a if k in rows_b]
    out(f"\n{len(matched)} rows in both runs (ratio = B / A; below 1: B is faster or smaller)")
    out(f"{'suite':8s} {'case':34s} {'implementation':40s} {'A':>13s} {'B':>13s} {'B/A':>6s}")
    for k in matched:
        a, b = _figure(rows_a[k]), _figure(rows_b[k])
        ratio = f"{b[0] / a[0]:.2f}" if a[0] and b[0] else "-"
        out(f"{k[0]:8s} {k[1]:34s} {k[2][:40]:40s} {a[1]:>13s} {b[1]:>13s} {ratio:>6s}")
    for name, mine, other in (("A", rows_a, rows_b), ("B", rows_b, rows_a)):
        only = [k for k in mine if k not in other]
        if only:
            out(f"\n{len(only)} rows only in {name}:")
            for k in only:
                out(f"  {k[0]:8s} {k[1]:34s} {k[2]}")
    return 0


def _figure(row: dict) -> tuple[float | None, str]:
    """(value, text): ms for a timed row, peak MiB for a memory row, '-' (with why) otherwise."""
    if row.get("ms"):
        return row["ms"], f"{row['ms']:.4f} ms"
    peak = row.get("extra", {}).get("peak_bytes")
    if peak is not None:
        return peak, f"{peak / 2**20:.0f} MiB"
    return None, "WRONG" if row.get("correct") is False else "-"


def _fmt(v):
    return "(absent)" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- README -------------------------------------------------------------------------------------
README_START, README_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
# The rows the README keeps of a run's Markdown: ours (automatic route) and each peer's headline row.
README_IMPLS = ("ours:cpu", "ours:cuda", "ours:triton", "bf16 F.linear + LoRA", "bf16 nn.Linear + LoRA",
                "bitsandbytes", "bitsandbytes gemv_4bit + LoRA", "bitsandbytes dequantize_4bit + F.linear + LoRA",
                "PEFT LoRA on bnb Linear4bit", "torchao linear_nf4 + LoRA", "torchao linear_nf4 + LoRA, torch.compile",
                "bf16 model", "bitsandbytes NF4 model")


def readme_excerpt(md_path: str) -> str:
    """The README's benchmark table, cut from a run's Markdown report: its header lines, the table
    rows of README_IMPLS, and the goals; nothing typed by hand."""
    with open(md_path) as f:
        lines = f.read().splitlines()
    title = lines[0].removeprefix("# Benchmark: ")
    conditions = lines[2]
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| case | implementation | median ms"))
    table = lines[header:header + 2] + [
        ln for ln in lines[header + 2:] if ln.startswith("| ") and ln.split(" | ")[1] in README_IMPLS]
    goals = lines[lines.index("## Goals") + 2:]
    name = os.path.basename(md_path)
    return "\n".join([
        f"Latest CPU figures: {title}, {conditions} Cut by `bench.report.update_readme` from "
        f"[`bench/results/{name}`](bench/results/{name}) (every row and the plots are there).", "",
        *table, "", "Goals on this machine:", "", *[g for g in goals if g.strip()]])


def update_readme(md_path: str, readme: str = "README.md") -> None:
    """Replace the text between README_START and README_END in `readme` with readme_excerpt(md_path)."""
    with open(readme) as f:
        text = f.read()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    with open(readme, "w") as f:
        f.write(text[:start] + "\n" + readme_excerpt(md_path) + "\n" + text[end:])
