"""The benchmark harness, run quickly on the CPU: it writes valid results, and refuses to time a
kernel that returns wrong results. No timing is asserted."""

import json

import pytest
import torch

import lora_kernels
from bench import __main__ as bench_main
from bench import harness


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench_main.main(["--quick", "--suite", "quant", "--device", "cpu", "--out", str(out)])
    (path,) = out.glob("*.json")
    return rc, json.loads(path.read_text()), out


def test_quick_run_writes_every_field(quick_run):
    rc, result, out = quick_run
    assert rc == 0
    env = result["environment"]
    for key in ("date", "commit", "torch", "cpu", "device", "bitsandbytes", "lora_kernels"):
        assert env[key], key
    rows = result["rows"]
    impls = {r["impl"] for r in rows}
    assert "ours:torch" in impls
    if lora_kernels.backends()["cpu"].usable:
        assert "ours:cpu" in impls
    for r in rows:
        assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["gbps"] > 0
    assert any("bitsandbytes" in v for v in result["verdicts"]) or "bitsandbytes" not in impls
    assert list(out.glob("*.md"))


def test_wrong_kernel_is_reported_not_timed(monkeypatch):
    from bench import quant

    real = lora_kernels.ops.quantize_nf4_op

    def broken(w, blocksize):
        packed, absmax = real(w, blocksize)
        return packed ^ 1, absmax  # flip one bit of every byte

    monkeypatch.setattr(lora_kernels.ops, "quantize_nf4_op", broken)
    monkeypatch.setattr(quant, "CPU_SHAPES", [(256, 256)])
    rows, _ = quant.run(torch.device("cpu"), True, ["torch"], lambda line: None)
    ours = [r for r in rows if r.impl == "ours:torch"]
    assert ours and all(r.correct is False and r.ms is None and "WRONG" in r.note for r in ours)


def test_markdown_table_marks_untimed_rows():
    table = harness.markdown_table([harness.Row("quant", "case", "ours:x", note="WRONG: packed differs")])
    assert "| case | ours:x | - | - | - | WRONG: packed differs |" in table


# ---- the forward and train suites ---------------------------------------------------------------
def _ours_usable():
    return ["torch"] + (["cpu"] if lora_kernels.backends()["cpu"].usable else [])


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_forward")
    rc = bench_main.main(["--quick", "--suite", "forward", "--device", "cpu", "--out", str(out)])
    (path,) = out.glob("*.json")
    return rc, json.loads(path.read_text())


def test_forward_quick_run_checks_and_times_ours(forward_run):
    rc, result = forward_run
    rows = result["rows"]
    assert {r["suite"] for r in rows} == {"forward"}
    for M in (1, 64):
        case = [r for r in rows if r["case"] == f"forward 4096x4096 M={M}"]
        impls = {r["impl"]: r for r in case}
        for name in [f"ours:{b}" for b in _ours_usable()] + ["bf16 F.linear + LoRA", "bf16 F.linear"]:
            assert impls[name]["correct"] is True and impls[name]["ms"] > 0, name
        if "ours:cpu" in impls:
            assert impls["ours:cpu"]["note"].startswith("route ")
            for route in ("fused", "dequant_gemm"):
                assert impls[f"ours:cpu/{route}"]["correct"] is True and impls[f"ours:cpu/{route}"]["ms"] > 0
    assert rc == 0
    if lora_kernels.backends()["cpu"].usable:
        assert any("no slower than bf16 F.linear" in v for v in result["verdicts"])
        assert any("within 1.3x of bf16 F.linear" in v for v in result["verdicts"])


@pytest.fixture
def broken_matmul(monkeypatch):
    """Every QLoRA forward of ours returns its result plus one: plainly wrong."""
    real = lora_kernels.ops.nf4_matmul

    def broken(*args, **kwargs):
        return real(*args, **kwargs) + 1

    monkeypatch.setattr(lora_kernels.ops, "nf4_matmul", broken)


def test_forward_wrong_kernel_is_reported_not_timed(broken_matmul):
    from bench import forward

    rows, goals = forward.run(torch.device("cpu"), True, _ours_usable(), lambda line: None, shapes=[(256, 256)])
    ours = [r for r in rows if r.impl.startswith("ours")]
    assert ours and all(r.correct is False and r.ms is None and "WRONG" in r.note for r in ours)
    dense = [r for r in rows if r.impl.startswith("bf16")]
    assert dense and all(r.correct is True and r.ms > 0 for r in dense)  # the peers are unaffected
    assert not goals  # no verdict from an untimed kernel


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    rc = bench_main.main(["--quick", "--suite", "train", "--device", "cpu", "--out", str(out)])
    (path,) = out.glob("*.json")
    return rc, json.loads(path.read_text())


def test_train_quick_run_checks_gradients_and_times(train_run):
    _, result = train_run
    impls = {r["impl"]: r for r in result["rows"] if r["case"] == "train 1024x1024 M=64"}
    for name in ("ours:torch", "bf16 nn.Linear + LoRA"):
        assert impls[name]["correct"] is True and impls[name]["ms"] > 0, name
    assert not result["verdicts"]  # the train goals are GPU goals


def test_train_quick_run_ours_cpu_is_correct(train_run):
    if not lora_kernels.backends()["cpu"].usable:
        pytest.skip("the C++ extension is not built")
    rc, result = train_run
    (row,) = [r for r in result["rows"] if r["impl"] == "ours:cpu"]
    assert row["correct"] is True and row["ms"] > 0, row["note"]
    assert rc == 0


def test_train_wrong_kernel_is_reported_not_timed(broken_matmul):
    from bench import train

    rows, _ = train.run(torch.device("cpu"), True, _ours_usable(), lambda line: None, shapes=[(256, 256)])
    ours = [r for r in rows if r.impl.startswith("ours")]
    assert ours and all(r.correct is False and r.ms is None and "WRONG" in r.note for r in ours)


def test_shapes_flag_parses_out_x_in():
    from bench import forward

    assert forward.parse_shapes("4096x4096,11008x4096") == [(4096, 4096), (11008, 4096)]
    with pytest.raises(ValueError, match="OUTxIN"):
        forward.parse_shapes("4096")
