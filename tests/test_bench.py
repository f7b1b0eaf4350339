"""The benchmark harness, run quickly on the CPU: it writes valid results (JSON, Markdown, PNG
plots), refuses to time a kernel that returns wrong results, and compares two runs. No timing is
asserted."""

import contextlib
import dataclasses
import io
import json

import pytest
import torch

import lora_kernels
from bench import __main__ as bench_main
from bench import harness, report
from bench.shapes import SHAPE_SETS, parse_shapes

ROW_FIELDS = {f.name for f in dataclasses.fields(harness.Row)}


def _ours_usable():
    return ["torch"] + (["cpu"] if lora_kernels.backends()["cpu"].usable else [])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `python -m bench --quick` of every suite: (exit code, the JSON, the output folder, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = bench_main.main(["--quick", "--suite", "all", "--device", "cpu", "--out", str(out)])
    (path,) = out.glob("*.json")
    return rc, json.loads(path.read_text()), out, stdout.getvalue()


def test_quick_run_writes_every_field(quick_run):
    rc, result, out, _ = quick_run
    assert rc == 0
    env = result["environment"]
    for key in ("date", "commit", "torch", "cpu", "device", "bitsandbytes", "peft", "torchao", "lora_kernels",
                "peak_matmul"):
        assert env[key], key
    assert env["peak_copy_gbps"] > 0 and env["peak_matmul_tflops"] > 0
    rows = result["rows"]
    assert {r["suite"] for r in rows} == {"quant", "forward", "train", "dora", "multi", "family"}  # memory: CUDA only
    for r in rows:
        assert set(r) == ROW_FIELDS, r["impl"]
        if r["ms"] is None:
            continue
        assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["gbps"] > 0, (r["case"], r["impl"])
        assert r["extra"]["bw_frac"] > 0
        if r["suite"] in ("forward", "train", "dora", "multi", "family"):
            assert r["tflops"] > 0 and r["extra"]["flop_frac"] > 0, (r["case"], r["impl"])
            assert r["extra"]["M"] > 0 and r["extra"]["shape"]
    impls = {r["impl"] for r in rows}
    assert "ours:torch" in impls
    if lora_kernels.backends()["cpu"].usable:
        assert "ours:cpu" in impls
    assert any("bitsandbytes" in v for v in result["verdicts"]) or "bitsandbytes" not in impls


def test_quick_run_writes_markdown_and_plots(quick_run):
    _, result, out, stdout = quick_run
    (md,) = out.glob("*.md")
    text = md.read_text()
    pngs = sorted(out.glob("*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in pngs] == ["roofline.png", "speedup.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"![{png.name}]({png.name})" in text
        assert png.name.startswith(md.stem)
    assert "TFLOP/s" in text and "## Goals" in text
    for v in result["verdicts"]:
        assert v in text and v in stdout


def test_quick_run_prints_the_memory_skip(quick_run):
    _, _, _, stdout = quick_run
    assert "memory suite skipped" in stdout and "CUDA only" in stdout


def test_peers_are_rows_or_printed_skips(quick_run):
    _, result, _, stdout = quick_run
    impls = {r["impl"] for r in result["rows"] if r["suite"] == "forward"}
    for peer in ("torchao linear_nf4 + LoRA", "torchao linear_nf4 + LoRA, torch.compile",
                 "PEFT LoRA on bnb Linear4bit"):
        skipped = [ln for ln in stdout.splitlines() if "skipped" in ln and peer.split(",")[0] in ln]
        assert peer in impls or skipped, peer


def test_wrong_kernel_is_reported_not_timed(monkeypatch):
    from bench import quant

    real = lora_kernels._ops.quantize_nf4

    def broken(w, blocksize):
        packed, absmax = real(w, blocksize)
        return packed ^ 1, absmax  # flip one bit of every byte

    monkeypatch.setattr(lora_kernels._ops, "quantize_nf4", broken)
    monkeypatch.setattr(quant, "CPU_SHAPES", [(256, 256)])
    rows, _ = quant.run(torch.device("cpu"), True, ["torch"], lambda line: None)
    ours = [r for r in rows if r.impl == "ours:torch"]
    assert ours and all(r.correct is False and r.ms is None and "WRONG" in r.note for r in ours)


def test_markdown_table_marks_untimed_rows():
    table = report.markdown_table([harness.Row("quant", "case", "ours:x", note="WRONG: packed differs")])
    assert "| case | ours:x | - | - | - | - | - | - | WRONG: packed differs |" in table


# ---- the forward and train suites ---------------------------------------------------------------
def test_forward_quick_run_checks_and_times_ours(quick_run):
    rc, result, _, _ = quick_run
    rows = [r for r in result["rows"] if r["suite"] == "forward"]
    for M in (1, 64):
        case = [r for r in rows if r["case"] == f"forward 4096x4096 M={M}"]
        impls = {r["impl"]: r for r in case}
        for name in [f"ours:{b}" for b in _ours_usable()] + ["bf16 F.linear + LoRA", "bf16 F.linear"]:
            assert impls[name]["correct"] is True and impls[name]["ms"] > 0, name
        if "ours:cpu" in impls:
            assert impls["ours:cpu"]["note"].startswith("route ")
            assert impls["ours:cpu"]["extra"]["speedup_vs_bf16_lora"] > 0
            for route in ("fused", "dequant_gemm"):
                assert impls[f"ours:cpu/{route}"]["correct"] is True and impls[f"ours:cpu/{route}"]["ms"] > 0
    assert rc == 0
    if lora_kernels.backends()["cpu"].usable:
        # issue 13's goals at M = 1 (against bitsandbytes and bf16 + LoRA) and M = 64
        assert any("M=1" in v and "2x faster than bf16 F.linear + LoRA" in v for v in result["verdicts"])
        assert any("M=64" in v and "no slower than bf16 F.linear + LoRA" in v for v in result["verdicts"])


@pytest.fixture
def broken_matmul(monkeypatch):
    """Every QLoRA forward of ours returns its result plus one: plainly wrong."""
    real = lora_kernels._ops.nf4_matmul

    def broken(*args, **kwargs):
        return real(*args, **kwargs) + 1

    monkeypatch.setattr(lora_kernels._ops, "nf4_matmul", broken)


def test_forward_wrong_kernel_is_reported_not_timed(broken_matmul, monkeypatch):
    from bench import forward

    def no_torchao():  # the peers are not under test here; torch.compile would cost seconds
        raise ImportError("left out by the test")

    monkeypatch.setattr(forward, "torchao_nf4", no_torchao)
    lines = []
    rows, goals = forward.run(torch.device("cpu"), True, _ours_usable(), lines.append, shapes=[(256, 256)])
    ours = [r for r in rows if r.impl.startswith("ours")]
    assert ours and all(r.correct is False and r.ms is None and "WRONG" in r.note for r in ours)
    dense = [r for r in rows if r.impl.startswith("bf16")]
    assert dense and all(r.correct is True and r.ms > 0 for r in dense)  # the peers are unaffected
    assert not goals  # no verdict from an untimed kernel
    assert any("torchao" in line and "skipped" in line and "left out by the test" in line for line in lines)


def test_train_quick_run_checks_gradients_and_times(quick_run):
    _, result, _, _ = quick_run
    impls = {r["impl"]: r for r in result["rows"] if r["case"] == "train 1024x1024 M=64"}
    for name in ("ours:torch", "bf16 nn.Linear + LoRA"):
        assert impls[name]["correct"] is True and impls[name]["ms"] > 0, name
    # CPU verdicts (issue 13): ours against the frozen bf16 layer + LoRA, and against PEFT
    train_goals = [v for v in result["verdicts"] if "train 1024x1024 M=64" in v]
    assert any("<= 1.10x bf16 nn.Linear + LoRA" in v for v in train_goals), result["verdicts"]


def test_train_quick_run_ours_cpu_is_correct(quick_run):
    if not lora_kernels.backends()["cpu"].usable:
        pytest.skip("the C++ extension is not built")
    rc, result, _, _ = quick_run
    (row,) = [r for r in result["rows"] if r["impl"] == "ours:cpu" and r["suite"] == "train"]
    assert row["correct"] is True and row["ms"] > 0, row["note"]
    assert rc == 0


def test_dora_quick_run_checks_ours_and_peft(quick_run):
    """The quick CPU dora cases: a step at 1024x1024, M=64, and M=1 in eval mode; ours QDoRA and
    QLoRA in both and, where peft and bitsandbytes import, PEFT's DoRA in the step, each checked
    against the fp32 spec before it is timed; and a verdict on QDoRA."""
    rc, result, _, stdout = quick_run
    rows = [r for r in result["rows"] if r["suite"] == "dora"]
    backend = "cpu" if lora_kernels.backends()["cpu"].usable else "torch"
    step = {r["impl"]: r for r in rows if r["case"] == "dora 1024x1024 M=64"}
    evals = {r["impl"]: r for r in rows if r["case"] == "dora 1024x1024 M=1 eval"}
    wanted = [f"ours:{backend} QDoRA", f"ours:{backend} QLoRA"]
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

        peers = ["PEFT DoRA on bnb Linear4bit"]
    except Exception:
        peers = []
    for name in wanted + peers:
        assert name in step, (name, sorted(step), [ln for ln in stdout.splitlines() if "skipped" in ln])
        row = step[name]
        assert row["correct"] is True and row["ms"] > 0 and row["extra"]["peak_bytes"] >= 0, (name, row["note"])
    for name in wanted:
        assert evals[name]["correct"] is True and evals[name]["ms"] > 0 and evals[name]["extra"]["M"] == 1, name
    # DoRA costs more than LoRA: its magnitude and the W . A^T of its norm.
    assert step[wanted[0]]["extra"]["flops"] > step[wanted[1]]["extra"]["flops"]
    assert any("QDoRA" in v for v in result["verdicts"]), result["verdicts"]
    assert rc == 0


def test_multi_quick_run_checks_every_implementation(quick_run):
    """The quick CPU multi cases (1024x1024, M = 1 and 16 over 4 adapters): ours multi, ours on one
    adapter, ours one call a row and, where peft and bitsandbytes import, PEFT's adapter_names, each
    checked against the fp32 spec before it is timed; the roofline counts each distinct adapter."""
    rc, result, _, stdout = quick_run
    rows = [r for r in result["rows"] if r["suite"] == "multi"]
    backend = "cpu" if lora_kernels.backends()["cpu"].usable else "torch"
    case = {r["impl"]: r for r in rows if r["case"] == "multi 1024x1024 M=16 over 4 adapters"}
    wanted = [f"ours:{backend} multi", f"ours:{backend} one adapter", f"ours:{backend} one call a row"]
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

        wanted.append("PEFT adapter_names on bnb Linear4bit")
    except Exception:
        pass
    for name in wanted:
        assert name in case, (name, sorted(case), [ln for ln in stdout.splitlines() if "skipped" in ln])
        assert case[name]["correct"] is True and case[name]["ms"] > 0, (name, case[name]["note"])
    # 4 distinct fp32 adapters of rank 16 on 1024 + 1024 features, against one
    per_adapter = 4 * 16 * (1024 + 1024)
    assert case[wanted[0]]["extra"]["bytes"] - case[wanted[1]]["extra"]["bytes"] == 3 * per_adapter
    assert case[wanted[0]]["extra"]["paired_ms"] > 0 or backend == "torch"
    assert any("multi at M=1" in v for v in result["verdicts"]) or backend == "torch", result["verdicts"]
    assert rc == 0


def test_multi_gpu_verdicts_start_with_gpu(monkeypatch):
    from bench import multi

    cuda = torch.device("cuda")  # only its type is read, and the peaks given here: no GPU needed
    monkeypatch.setattr(multi, "device_peaks", lambda device: {"peak_copy_gbps": 4000.0})
    case = "multi Llama-3-8B 4096x14336 M=64 over 64 adapters"
    row = harness.Row("multi", case, "ours:cuda multi", correct=True, ms=1.0, gbps=3000.0)
    goals = multi._goals(cuda, case, 64, 64, "cuda", {"ours:cuda multi": 1.0, multi.PEFT_NAMES: 5.0}, None, [row])
    assert len(goals) == 2 and all(g["goal"].startswith(f"GPU {case}: ") for g in goals), goals
    assert goals[0]["met"] is False and goals[1]["met"] is True  # 75% of the copy bandwidth; 5x PEFT


def test_dora_gpu_verdicts_start_with_gpu():
    """As the other suites' do: gpu_check.sh's summary lists the verdicts that start with "GPU"."""
    from bench import dora

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    times = {"ours:cuda QDoRA": 1.1, "ours:cuda QLoRA": 1.0, dora.PEFT_DORA: 5.0}
    peaks = {"ours:cuda QDoRA": 2**20, dora.PEFT_DORA: 2**26}
    goals = dora._step_goals(cuda, "dora 4096x4096 M=512", "cuda", True, times, peaks, 2**25, None)
    assert len(goals) == 3 and all(g["goal"].startswith("GPU dora 4096x4096 M=512: ") for g in goals), goals


def test_train_wrong_kernel_is_reported_not_timed(broken_matmul):
    from bench import train

    rows, _ = train.run(torch.device("cpu"), True, _ours_usable(), lambda line: None, shapes=[(256, 256)])
    ours = [r for r in rows if r.impl.startswith("ours")]
    assert ours and all(r.correct is False and r.ms is None and "WRONG" in r.note for r in ours)


def test_family_suite_times_every_method_checked(quick_run):
    """--quick: the training steps of our LoRA, VeRA and IA3 (and the peers present), each checked against
    the fp32 spec before it was timed; the SmolLM2 initialisations are left out of --quick, and say so."""
    _, result, _, stdout = quick_run
    rows = [r for r in result["rows"] if r["suite"] == "family"]
    ours = {r["impl"].split(" ", 1)[1] for r in rows if r["impl"].startswith("ours:")}
    assert {"LoRA r=16", "LoRA r=256", "VeRA r=256", "VeRA r=16", "VeRA r=256, bf16 vectors", "IA3 output",
            "IA3 feed-forward"} <= ours
    assert all(r["correct"] for r in rows), [r["note"] for r in rows if not r["correct"]]
    assert all(r["extra"]["peak_bytes"] >= 0 and r["extra"]["held_bytes"] > 0 for r in rows)
    assert "family init SmolLM2-135M r=16 left out of --quick" in stdout
    goals = [v for v in result["verdicts"] if "family step" in v]
    # within 1.15x of our LoRA: VeRA r=256, r=16, r=256 with bf16 vectors, IA3 output, feed-forward; and
    # against PEFT's IA3 (output, feed-forward) where it ran
    assert len(goals) == 5 + 2 * any(r["impl"].startswith("PEFT IA3") for r in rows), goals


def test_memory_suite_has_no_rows_on_cpu():
    from bench import memory

    lines = []
    assert memory.run(torch.device("cpu"), True, None, lines.append) == ([], [])
    assert lines and "CUDA only" in lines[0]


def test_shapes_flag_parses_sets_and_out_x_in():
    assert parse_shapes("4096x4096,11008x4096") == [("", (4096, 4096)), ("", (11008, 4096))]
    assert parse_shapes("llama3-8b") == SHAPE_SETS["llama3-8b"]
    assert parse_shapes("cpu,1024x512") == SHAPE_SETS["cpu"] + [("", (1024, 512))]
    assert parse_shapes("") == []
    with pytest.raises(ValueError, match="OUTxIN"):
        parse_shapes("4096")
    with pytest.raises(ValueError, match="OUTxIN"):
        parse_shapes("llama4")


# ---- --compare ----------------------------------------------------------------------------------
def _synthetic_run(path, commit, ms, extra_row=None):
    env = {"date": "2026-01-01T00:00:00+00:00", "commit": commit, "torch": "2.14.1", "device": f"GPU {commit}",
           "peak_copy_gbps": 100.0}
    timed = harness.Row("forward", "forward 4096x4096 M=1", "ours:cpu", ms=ms, p20_ms=ms, p80_ms=ms)
    rows = [dataclasses.asdict(timed),
            dataclasses.asdict(harness.Row("memory", "memory 4096x4096 M=8192", "ours:cuda",
                                           extra={"peak_bytes": 64 * 2**20}))]
    if extra_row:
        rows.append(dataclasses.asdict(harness.Row("forward", "forward 4096x4096 M=1", extra_row, ms=1.0)))
    path.write_text(json.dumps({"environment": env, "rows": rows, "verdicts": []}))
    return str(path)


def test_compare_prints_matched_rows_and_environment(tmp_path, capsys):
    a = _synthetic_run(tmp_path / "a.json", "aaaaaaa", 2.0)
    b = _synthetic_run(tmp_path / "b.json", "bbbbbbb", 1.0, extra_row="torchao linear_nf4 + LoRA")
    assert bench_main.main(["--compare", a, b]) == 0
    text = capsys.readouterr().out
    assert "commit" in text and "aaaaaaa" in text and "bbbbbbb" in text and "device" in text
    assert "same: 2.14.1" in text  # torch
    assert "2 rows in both runs" in text
    line = next(ln for ln in text.splitlines() if "ours:cpu" in ln)
    assert "2.0000 ms" in line and "1.0000 ms" in line and line.rstrip().endswith("0.50")
    assert any("ours:cuda" in ln and "64 MiB" in ln for ln in text.splitlines())
    assert "1 rows only in B" in text and "torchao linear_nf4 + LoRA" in text


def test_compare_on_a_real_run(quick_run, capsys):
    _, result, out, _ = quick_run
    (path,) = out.glob("*.json")
    assert bench_main.main(["--compare", str(path), str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{len(result['rows'])} rows in both runs" in text
    assert "forward 4096x4096 M=64" in text
