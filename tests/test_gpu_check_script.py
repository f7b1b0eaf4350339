"""scripts/gpu_check.sh, checked here so that the rare minutes on a GPU never meet a broken script.

- Every pytest selection (-k / -m expression) in the script selects at least one test, for each
  value its variables take (GPU and dry run). GPU tests are collected here and only skipped at run
  time, so `pytest --collect-only` sees them. An invalid -k (a comma) once made a memcheck step run
  nothing.
- `gpu_check.sh --dry-run OUT` runs the whole flow on this machine and leaves what a GPU machine
  would send back: summary.txt, logs.tar.gz and the bench's JSON, at most 8 files, at most 2
  folders down.
- A host whose compute-sanitizer refuses the device ("Device not supported") is named in the
  summary, and the later sanitizer step says it did not run.
- The summary's GPU goals: the bench's verdicts and the 80%-of-HBM decode goal read off its rows.
"""

import glob
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _logical_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined and comment lines dropped."""
    lines, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def _assignments(text: str, name: str) -> list[str]:
    """Every literal value the script assigns to `name` on a line of its own."""
    return sorted(set(re.findall(rf"^\s*{name}=([\w.,-]+)\s*$", text, flags=re.M)))


def selections() -> list[tuple[str, list[str]]]:
    """(the script's line, pytest arguments) for every -k / -m selection, once per combination of
    the values its variables take."""
    text = open(SCRIPT).read()
    found = []
    for line in _logical_lines(text):
        # A pytest call (direct, or through run_pytest) with a -k or -m of pytest's (not python's
        # `-m pytest`); `timeout -k` lines call no pytest.
        if not (re.search(r"pytest", line) and re.search(r"\s-k\s|\s-m\s+(?!pytest\b)", line)):
            continue
        args = shlex.split(line, comments=False)
        # The pytest arguments: test paths and the selection options; the script's own words
        # (run_pytest NAME CAP TOOL) before them are dropped.
        start = next((i for i, a in enumerate(args) if a == "tests" or a.startswith("tests/")), None)
        assert start is not None, f"a pytest selection without a tests path: {line}"
        args = args[start:]
        names = sorted(set(re.findall(r"\$\{?(\w+)\}?", " ".join(args))))
        values = [_assignments(text, n) for n in names]
        for name, vals in zip(names, values):
            assert vals, f"{name} is used in a selection but never assigned a literal value: {line}"
        for combo in itertools.product(*values):
            expanded = []
            for a in args:
                for name, val in zip(names, combo):
                    a = a.replace("${" + name + "}", val).replace("$" + name, val)
                expanded.append(a)
            found.append((line.strip(), expanded))
    return found


# Collects each argument list with pytest.main in one process (imports paid once): prints, per list,
# [exit code, number of tests selected, the -k error if any] as one JSON line.
_COLLECT = """
import json, sys
import pytest

class Count:
    n = 0
    def pytest_collection_finish(self, session):
        Count.n = len(session.items)

results = []
for args in json.loads(sys.stdin.read()):
    Count.n = 0
    rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[Count()])
    results.append([int(rc), Count.n])
print(json.dumps(results))
"""


def collect_counts(arg_lists: list[list[str]]) -> list[tuple[int, int]]:
    """(pytest's exit code, tests selected) for each argument list, as `pytest --collect-only` here."""
    run = subprocess.run([sys.executable, "-c", _COLLECT], input=json.dumps(arg_lists), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [tuple(r) for r in json.loads(run.stdout.strip().splitlines()[-1])]


SELECTIONS = selections()
# The expression that once made the memcheck step run nothing: the check must report it.
COMMA = ["tests/test_quant.py", "-k", "cuda-cuda and (4095 or 3, 1000 or 65)"]


@pytest.fixture(scope="module")
def counts():
    return collect_counts([args for _, args in SELECTIONS] + [COMMA])


def test_the_script_has_the_selections_we_expect():
    found = SELECTIONS
    # gpu tests, triton tests, memcheck, racecheck; the two -k with $CUDA_ID twice each.
    assert len(found) >= 6, found
    values = _assignments(open(SCRIPT).read(), "CUDA_ID")
    assert values == ["cpu-cpu", "cuda-cuda"], values


@pytest.mark.parametrize("index", range(len(SELECTIONS)), ids=[" ".join(args) for _, args in SELECTIONS])
def test_every_selection_selects_tests(counts, index):
    line, args = SELECTIONS[index]
    rc, n = counts[index]
    assert rc == 0 and n >= 1, f"gpu_check.sh: `pytest {' '.join(args)}` selects {n} tests (exit {rc}): {line}"


def test_a_comma_in_k_is_caught(counts):
    """The check itself: the expression that once ran zero tests under memcheck is reported
    (pytest exits 4, usage error)."""
    assert counts[-1][0] != 0


def _run_script(out_dir, extra_env=None, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, **(extra_env or {}))
    return subprocess.run(["bash", SCRIPT, "--dry-run", str(out_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run(tmp_path):
    """The whole flow on the CPU (about 2 minutes here): what comes back from a GPU machine."""
    out = tmp_path / "out"
    run = _run_script(out)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "dry run" in summary and "status 0" in summary, summary
    for step in ("build", "gpu_tests", "triton_tests", "dora_tests", "memcheck", "racecheck", "bench_quant_dora",
                 "bench_layers"):
        assert re.search(rf"^{step} .* (ok|up to date)", summary, flags=re.M), f"{step}:\n{summary}"
    assert summary in run.stdout  # the digest is printed at the end
    runs = sorted(glob.glob(str(out / "bench" / "*.json")))
    assert len(runs) == 2 and any(p.endswith("-quant-dora.json") for p in runs), runs
    for path in runs:
        result = json.load(open(path))
        assert result["rows"] and "verdicts" in result
        if path.endswith("-quant-dora.json"):  # one run of three suites, dora and multi at its --shapes
            assert {r["suite"] for r in result["rows"]} == {"quant", "dora", "multi"}, path
            multi = [r for r in result["rows"] if r["suite"] == "multi"]
            assert {r["extra"]["shape"] for r in multi} == {"256x512"}
            assert all(r["correct"] for r in multi if r["impl"].startswith("ours"))
            dora = [r for r in result["rows"] if r["suite"] == "dora"]
            assert {r["extra"]["shape"] for r in dora} == {"256x512"}
            assert all(r["correct"] for r in dora if r["impl"].startswith("ours"))
            assert any("QDoRA" in v for v in result["verdicts"]), result["verdicts"]
    assert (out / "logs.tar.gz").stat().st_size > 0
    # What a GPU machine sends back: at most 8 files, no deeper than OUT/a/b/file, plain names.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel


def test_a_refused_sanitizer_is_said(tmp_path):
    """compute-sanitizer present but refusing the device (some hosts): the summary says so plainly."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "compute-sanitizer"
    fake.write_text("#!/bin/sh\necho '========= Device not supported'\necho 'error 999' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    run = _run_script(out, {"PATH": f"{fake_bin}:{os.environ['PATH']}", "GPU_CHECK_STEPS": "sanitizer"}, timeout=180)
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary
    assert re.search(r"^memcheck .*REFUSED.*Device not supported", summary, flags=re.M), summary
    assert re.search(r"^racecheck .*NOT RUN: compute-sanitizer REFUSED", summary, flags=re.M), summary
    assert "compute-sanitizer: REFUSED" in summary


def _summary_program() -> str:
    text = open(SCRIPT).read()
    return text.split("<<'SUMMARY'\n", 1)[1].split("\nSUMMARY\n", 1)[0]


def test_summary_lists_gpu_goals(tmp_path):
    """On a GPU: the bench's GPU verdicts, and the decode goal of 80% of HBM read off the M=1 rows
    (eager and CUDA graph); CPU verdicts stay out."""
    (tmp_path / "bench").mkdir()
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "commit": "abc1234"}
    row = lambda impl, frac: {"suite": "forward", "case": "forward 4096x4096 M=1", "impl": impl,  # noqa: E731
                              "extra": {"M": 1, "bw_frac": frac}}
    rows = [row("ours:cuda", 0.62), row("ours:cuda graph", 0.83), row("ours:triton", 0.3), row("bf16 F.linear", 0.9)]
    verdicts = ["met: GPU forward 4096x4096 M=1: ours:cuda >= 3x faster than bf16 F.linear + LoRA: 3.40x",
                "MISSED: GPU train 4096x4096 M=8192: ours:cuda fwd+bwd <= 1.10x bf16 nn.Linear + LoRA: 1.30x"]
    (tmp_path / "bench" / "run.json").write_text(json.dumps({"environment": env, "rows": rows, "verdicts": verdicts}))
    steps = tmp_path / "steps.txt"
    steps.write_text("build              40 s  ok\n")
    run = subprocess.run([sys.executable, "-", str(tmp_path), str(steps), "GPU", "400", "540", "0", "ok", "peers"],
                         input=_summary_program(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "NVIDIA H200" in text and "400 s of the 540 s budget" in text
    assert "met: GPU forward 4096x4096 M=1: ours:cuda >= 3x" in text and "MISSED: GPU train" in text
    assert re.search(r"met: GPU forward 4096x4096 M=1: ours:cuda >= 80% .*62% eager, 83% in a CUDA graph", text), text
    assert re.search(r"MISSED: GPU forward 4096x4096 M=1: ours:triton >= 80% .*30% eager", text), text
    assert "2 of 4 GPU goals met" in text
    assert len(text.splitlines()) <= 40
