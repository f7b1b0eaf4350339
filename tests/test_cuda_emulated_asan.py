"""The CUDA kernels (csrc/cuda/*.cu) on the CPU emulator (csrc/cuda/emulate.h) under
AddressSanitizer and UndefinedBehaviorSanitizer: compute-sanitizer's stand-in where no GPU is.

tests/emulate/check_kernels.cpp calls the plain-pointer launchers without torch, every buffer a
heap allocation of exactly the size the contract names, so a read or write one byte past a tail
stops the program with a report. The shapes are those of the CPU-backend tests (test_quant.py,
test_qlora_linear.py) and the outputs are compared with lora_kernels/reference.py, called directly
(never through the dispatcher): quantize and dequantize byte for byte, the fused matmul within the
tolerance of test_routes.py. Many adapters (multi_lora.cu's shrink and expand, the fused matmul with
per-row adapters): mixed ranks, a slot of rank 0, rows with slot -1, and every factor's entries past
a slot's rank left out of the oracle, so reading them shows as a wrong result as well as reading past
a buffer's tail shows as a sanitizer report. The scheduling shuffle draws a fresh seed each run (reported with any
failure); LK_EMULATE_SEED=... reruns one order.

The emulator's own checks (a missing barrier reads fresh shared memory, a shuffle outside its
mask, a barrier some threads never reach, too much shared memory) run first: --selftest."""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import subprocess

import pytest
import torch

from cuda_compile import setup_constant
from lora_kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "include")
REQUIRED = os.environ.get("LORA_KERNELS_CUDA_EMULATE") == "1"  # make test: a skip here would hide the check

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SHAPES = [(1,), (63,), (64,), (65,), (4095,), (3, 1000), (257, 129)]  # test_quant.py's
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# |out - reference| allowed, as a fraction of the largest term entering an output (test_routes.py):
# one rounding of the 16-bit output, and fp32 weights against the reference's 16-bit-rounded ones.
RELATIVE_TOLERANCE = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}
# The shrink and the expand: fp32 sums over K <= 256 or the rank (at most K * 2^-24 of the largest
# term), rounded once to the output dtype (half an ulp: 2^-9 bf16, 2^-12 fp16).
ROUNDED_ONCE = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 4e-5}

UNITS = ["tests/emulate/check_kernels.cpp", "tests/emulate/selftest.cu"] + sorted(
    os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))
FLAGS = ["-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-fno-omit-frame-pointer", "-ffp-contract=off", "-Wall", *setup_constant("EMULATE_FLAGS"),
         "-I" + os.path.join(ROOT, "csrc"), "-I" + CUDA_INCLUDE]


def _unavailable() -> str | None:
    if shutil.which("g++") is None:
        return "no g++"
    if not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")):
        return f"no CUDA headers in {CUDA_INCLUDE}"
    return None


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    why = _unavailable()
    if why:
        if REQUIRED:
            pytest.fail(f"LORA_KERNELS_CUDA_EMULATE=1 but the sanitizer build cannot run: {why}")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("asan")

    def compile_unit(unit):
        # a .cu file is C++ here, after the emulator (as setup.py's emulated build compiles it)
        cuda = unit.endswith(".cu")
        args = ["g++", *FLAGS, "-c"] + (["-x", "c++", "-include", os.path.join(ROOT, "csrc/cuda/emulate.h")] if cuda else [])
        obj = os.path.join(out, unit.replace("/", "_") + ".o")
        run = subprocess.run(args + [os.path.join(ROOT, unit), "-o", obj], capture_output=True, text=True)
        assert run.returncode == 0 and "warning" not in run.stderr, run.stderr
        return obj

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_unit, UNITS))
    binary = os.path.join(out, "check_kernels")
    run = subprocess.run(["g++", "-fsanitize=address,undefined", *objects, "-o", binary, "-lpthread"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return binary


def _run(binary, args, seed):
    env = dict(os.environ, LK_EMULATE_SEED=str(seed), ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=1200)


def test_emulator_selftest(program):
    run = _run(program, ["--selftest"], random.randrange(2**63))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and "selftest: 0 failed" in run.stdout, run.stdout


# ---- the cases -----------------------------------------------------------------------------------
def _write(directory, spec: dict, tensors: dict):
    os.makedirs(directory)
    with open(os.path.join(directory, "spec"), "w") as f:
        f.writelines(f"{k} {v}\n" for k, v in spec.items())
    for name, t in tensors.items():
        t.detach().contiguous().view(torch.uint8).view(-1).numpy().tofile(os.path.join(directory, name + ".bin"))


def _read(directory, name, dtype, count):
    data = torch.from_file(os.path.join(directory, name + ".bin"), size=count * dtype.itemsize, dtype=torch.uint8)
    return data.view(dtype)


def _scales(q: dict) -> dict:
    if "nested_absmax" in q:
        return {"codes": q["absmax"], "nested_absmax": q["nested_absmax"], "nested_code": reference.dynamic_map(),
                "offset": q["offset"].reshape(1)}
    return {"absmax": q["absmax"]}


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: max(1, w.numel() // 7)] *= 25  # outliers, as test_quant.py
    return w.to(dtype)


def _quant_cases(root):
    """(dir, check) for every shape x blocksize x dtype, x aligned or not, of quantize and dequantize."""
    cases = []
    for shape in SHAPES:
        for blocksize in BLOCKSIZES:
            for dtype in DTYPES:
                w = _weight(shape, dtype, hash((shape, blocksize)) % 1000).reshape(-1)
                n = w.numel()
                for offset in (0, 1):  # elements before w: 1 runs the kernel for unaligned input
                    d = os.path.join(root, f"q-{n}-{blocksize}-{DTYPES[dtype]}-{offset}")
                    _write(d, dict(op="quantize", dtype=DTYPES[dtype], n=n, blocksize=blocksize, offset=offset),
                           {"w": w})
                    packed, absmax = reference.quantize_nf4_blocks(w, blocksize)
                    cases.append((d, ("quantize", packed, absmax)))
                for double_quant in (True, False):
                    q = reference.quantize_nf4(w, blocksize, double_quant)
                    out_dtype = dtype
                    d = os.path.join(root, f"d-{n}-{blocksize}-{DTYPES[dtype]}-{int(double_quant)}")
                    _write(d, dict(op="dequantize", dtype=DTYPES[out_dtype], n=n, blocksize=blocksize,
                                   double_quant=int(double_quant)), {"packed": q["packed"], **_scales(q)})
                    want = reference.dequantize_nf4(q["packed"], q["absmax"], (n,), out_dtype, blocksize,
                                                    q.get("nested_absmax"), reference.dynamic_map(), q.get("offset"))
                    cases.append((d, ("dequantize", want)))
    return cases


def _matmul_cases(root):
    """The decode kernel over every padded M (1, 2, 4, 8, 16 and the rows between), rows that leave
    the last CTA partial, 1 to 8 warps, every blocksize class, ranks that split over the lanes, LoRA in
    each dtype, bias or not, an out_scale or not (every other case), plain or double-quantized scales."""
    rng = random.Random(7)
    shapes = [(40, 128), (33, 256), (7, 64), (5, 16384), (130, 4096)]  # (rows, cols)
    cases = []
    index = 0
    for M in (1, 2, 3, 4, 5, 8, 9, 16):
        for rows, cols in shapes:
            if rows * cols > 100_000 and M not in (1, 16):
                continue
            dtype = rng.choice([torch.bfloat16, torch.float16])
            blocksize = rng.choice([b for b in (32, 64, 256, 4096) if cols % b == 0])
            rank = rng.choice([0, 1, 8, 33])
            lora_dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
            bias = rng.random() < 0.5
            double_quant = rng.random() < 0.7
            g = torch.Generator().manual_seed(index)
            w = torch.randn(rows, cols, generator=g) / cols**0.5
            q = reference.quantize_nf4(w.reshape(-1), blocksize, double_quant)
            x = torch.randn(M, cols, generator=g).to(dtype)
            tensors = {"x": x, "packed": q["packed"], **_scales(q)}
            wd = reference.dequantize_nf4(q["packed"], q["absmax"], (rows, cols), dtype, blocksize,
                                          q.get("nested_absmax"), reference.dynamic_map(), q.get("offset")).double()
            terms = [x.double() @ wd.t()]
            if rank:
                left = torch.randn(M, rank, generator=g).to(lora_dtype)
                right = (torch.randn(rows, rank, generator=g) * 0.1).to(lora_dtype)
                tensors.update(lora_left=left, lora_right=right)
                terms.append(0.5 * (left.double() @ right.double().t()))
            b = torch.randn(rows, generator=g).to(dtype) if bias else None
            # on every other case (by the index, and drawn last: the other cases stay as they were);
            # fp32, both signs
            out_scale = torch.rand(rows, generator=g) * 4 - 2 if index % 2 else None
            # errors made before the scale grow with it; the bias is added after it
            column_scale = 1.0 if out_scale is None else float(out_scale.abs().amax())
            scale = column_scale * max([float((x.double().abs() @ wd.abs().t()).amax())]
                                       + [float(t.abs().amax()) for t in terms[1:]])
            if out_scale is not None:
                tensors["out_scale"] = out_scale
                terms = [sum(terms) * out_scale.double()]
            if b is not None:
                tensors["bias"] = b
                terms.append(b.double().expand(M, rows))
                scale = max(scale, float(b.double().abs().amax()))
            d = os.path.join(root, f"m-{index}-M{M}-{rows}x{cols}")
            _write(d, dict(op="matmul", dtype=DTYPES[dtype], M=M, rows=rows, cols=cols, blocksize=blocksize, rank=rank,
                           lora_dtype=DTYPES[lora_dtype], lora_scaling=0.5, double_quant=int(double_quant)), tensors)
            cases.append((d, ("matmul", sum(terms), scale, dtype)))
            index += 1
    return cases


def _slot_map(rng: random.Random, g: torch.Generator, M: int, slots: int, rank: int) -> dict:
    """token_slots [M]: rows on slot 2 (below the full rank), 0 (the full rank), -1 and 1 (rank 0), as
    far as M allows, the rest drawn; slot_ranks [slots >= 3] (rank, 0, then 1..rank-1);
    slot_scalings [slots]."""
    assert slots >= 3
    ranks = [rank, 0] + [rng.randint(1, max(1, rank - 1)) for _ in range(slots - 2)]
    rows = ([2, 0, -1, 1] + [rng.randint(-1, slots - 1) for _ in range(M)])[:M]
    rng.shuffle(rows)
    return {"token_slots": torch.tensor(rows, dtype=torch.int32), "slot_ranks": torch.tensor(ranks, dtype=torch.int32),
            "slot_scalings": torch.rand(slots, generator=g) * 4 - 2}


def _row_terms(left, right, slots: dict):
    """[M, N] float64: slot_scalings[t] * left[m, :r_t] . right[t, :, :r_t]^T (0 where t = -1), and
    the same with absolute values (the largest term, for the tolerance)."""
    M, N = left.shape[0], right.shape[1]
    term, size = torch.zeros(M, N, dtype=torch.float64), torch.zeros(M, N, dtype=torch.float64)
    for m, t in enumerate(slots["token_slots"].tolist()):
        if t >= 0:
            r, s = int(slots["slot_ranks"][t]), float(slots["slot_scalings"][t])
            a, b = left[m, :r].double(), right[t, :, :r].double()
            term[m], size[m] = s * (b @ a), abs(s) * (b.abs() @ a.abs())
    return term, size


def _multi_lora_cases(root):
    """Many adapters: the shrink and the expand (multi_lora.cu) in each dtype, a stride rank that
    fills the shrink's warps or not and the expand's 16-byte rows or not (3, 8, 33), 3 or 4 slots;
    the decode kernel with per-row adapters over the padded M. Entries past a slot's rank hold 997."""
    rng = random.Random(11)
    cases = []
    for index in range(12):
        g = torch.Generator().manual_seed(100 + index)
        dtype = [torch.bfloat16, torch.float16, torch.float32][index % 3]
        lora_dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
        M, rank, slots = rng.choice([1, 3, 17]), [3, 8, 33][index // 4], rng.randint(3, 4)
        slot = _slot_map(rng, g, M, slots, rank)
        ranks = slot["slot_ranks"].tolist()
        K, N = rng.choice([1, 40, 256]), rng.choice([1, 37, 300])  # 300: two column blocks of the expand
        # the shrink: x [M, K], A [slots, rank, K]
        x = torch.randn(M, K, generator=g).to(dtype)
        A = torch.randn(slots, rank, K, generator=g)
        for t, r in enumerate(ranks):
            A[t, r:] = 997.0
        A = A.to(lora_dtype)
        want, size = torch.zeros(M, rank, dtype=torch.float64), torch.zeros(M, 1, dtype=torch.float64)
        for m, t in enumerate(slot["token_slots"].tolist()):
            if t >= 0 and ranks[t]:
                want[m, :ranks[t]] = A[t, :ranks[t]].double() @ x[m].double()
                size[m] = (A[t, :ranks[t]].double().abs() @ x[m].double().abs()).amax()
        d = os.path.join(root, f"s-{index}-M{M}-K{K}-r{rank}")
        _write(d, dict(op="shrink", dtype=DTYPES[dtype], lora_dtype=DTYPES[lora_dtype], M=M, cols=K, rank=rank,
                       blocksize=0), {"x": x, "A": A, **slot})
        cases.append((d, ("shrink", want, size, lora_dtype)))
        # the expand: out [M, N] += the row's term
        left = torch.randn(M, rank, generator=g)
        right = torch.randn(slots, N, rank, generator=g)
        for m, t in enumerate(slot["token_slots"].tolist()):
            left[m, ranks[t] if t >= 0 else 0:] = 997.0
        for t, r in enumerate(ranks):
            right[t, :, r:] = 997.0
        left, right = left.to(lora_dtype), right.to(lora_dtype)
        out_in = torch.randn(M, N, generator=g).to(dtype)
        term, size = _row_terms(left, right, slot)
        d = os.path.join(root, f"e-{index}-M{M}-N{N}-r{rank}")
        _write(d, dict(op="expand", dtype=DTYPES[dtype], lora_dtype=DTYPES[lora_dtype], M=M, rows=N, rank=rank,
                       blocksize=0), {"out_in": out_in, "lora_left": left, "lora_right": right, **slot})
        cases.append((d, ("expand", out_in, term, size, dtype)))
    for index, M in enumerate((1, 2, 3, 5, 9, 16)):
        g = torch.Generator().manual_seed(200 + index)
        rows, cols = rng.choice([(40, 128), (33, 256), (7, 64)])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        lora_dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        rank, slots = rng.choice([3, 8, 33]), rng.randint(3, 4)
        slot = _slot_map(rng, g, M, slots, rank)
        ranks = slot["slot_ranks"].tolist()
        q = reference.quantize_nf4(torch.randn(rows * cols, generator=g) / cols**0.5, 64, True)
        x = torch.randn(M, cols, generator=g).to(dtype)
        left = torch.randn(M, rank, generator=g)
        right = torch.randn(slots, rows, rank, generator=g) * 0.1
        for m, t in enumerate(slot["token_slots"].tolist()):
            left[m, ranks[t] if t >= 0 else 0:] = 997.0
        for t, r in enumerate(ranks):
            right[t, :, r:] = 997.0
        left, right = left.to(lora_dtype), right.to(lora_dtype)
        b = torch.randn(rows, generator=g).to(dtype)
        wd = reference.dequantize_nf4(q["packed"], q["absmax"], (rows, cols), dtype, 64, q.get("nested_absmax"),
                                      reference.dynamic_map(), q.get("offset")).double()
        term, size = _row_terms(left, right, slot)
        expected = x.double() @ wd.t() + term + b.double()
        scale = max(float((x.double().abs() @ wd.abs().t()).amax()), float(size.amax()), float(b.double().abs().amax()))
        d = os.path.join(root, f"ms-{index}-M{M}-{rows}x{cols}-r{rank}")
        _write(d, dict(op="matmul", dtype=DTYPES[dtype], M=M, rows=rows, cols=cols, blocksize=64, rank=rank,
                       lora_dtype=DTYPES[lora_dtype], lora_scaling=0, double_quant=1),
               {"x": x, "packed": q["packed"], **_scales(q), "lora_left": left, "lora_right": right, "bias": b, **slot})
        cases.append((d, ("matmul", expected, scale, dtype)))
    return cases


def test_kernels_under_sanitizers_match_reference(program, tmp_path):
    cases = _quant_cases(str(tmp_path)) + _matmul_cases(str(tmp_path)) + _multi_lora_cases(str(tmp_path))
    seed = random.randrange(2**63)
    run = _run(program, [d for d, _ in cases], seed)
    assert run.returncode == 0 and "ERROR" not in run.stderr, f"LK_EMULATE_SEED={seed}\n{run.stdout}\n{run.stderr}"
    for d, check in cases:
        what = f"{os.path.basename(d)} (LK_EMULATE_SEED={seed})"
        if check[0] == "quantize":
            _, packed, absmax = check
            assert torch.equal(_read(d, "out_packed", torch.uint8, packed.numel()), packed), what
            assert torch.equal(_read(d, "out_absmax", torch.float32, absmax.numel()), absmax), what
        elif check[0] == "dequantize":
            want = check[1]
            assert torch.equal(_read(d, "out", want.dtype, want.numel()), want), what
        elif check[0] == "shrink":
            _, want, size, dtype = check
            got = _read(d, "out", dtype, want.numel()).view(want.shape).double()
            zero = want == 0  # past the row's rank, and rows without an adapter: zeros, exactly
            assert torch.equal(got[zero], want[zero]), what
            err = ((got - want).abs() / size.clamp_min(1e-30)).amax().item()
            assert err <= ROUNDED_ONCE[dtype], f"{what}: relative error {err:.3g}"
        elif check[0] == "expand":
            _, out_in, term, size, dtype = check
            got = _read(d, "out", dtype, out_in.numel()).view(out_in.shape)
            untouched = (term == 0).all(dim=1)  # rows without a term stay as they were, bit for bit
            assert torch.equal(got[untouched], out_in[untouched]), what
            want = out_in.double() + term
            err = ((got.double() - want).abs() / (out_in.double().abs() + size)).amax().item()
            assert err <= ROUNDED_ONCE[dtype], f"{what}: relative error {err:.3g}"
        else:
            _, expected, scale, dtype = check
            got = _read(d, "out", dtype, expected.numel()).view(expected.shape).double()
            err = (got - expected).abs().amax().item()
            assert err <= RELATIVE_TOLERANCE[dtype] * scale, f"{what}: error {err:.3g}, scale {scale:.3g}"
