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
