"""The route owner's promise: over random NF4 matmuls (x in bf16 / fp16 / fp32, M from 0 to 70,
in_features a multiple of the blocksize or not, x and the packed bytes aligned or offset by a few
elements, forward or transposed, with or without LoRA, bias and a per-output out_scale), the route
that explain() names runs on every backend present, and so does the automatic choice, and both
match the reference.

The reference: W dequantized by the spec in x's dtype (as every kernel rounds it), the matmul,
LoRA term, out_scale and bias in float64."""

import os
import random
import re

import pytest
import torch
from conftest import present_backends

import lora_kernels as lk
from lora_kernels import _ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = 40
BLOCKSIZE = 64
# Allowed |out - reference|, as a fraction of the largest term that enters an output (|x|.|W|^T and
# the LoRA term, each times the largest |out_scale|; the bias), with the reason: a 16-bit output is
# rounded once by a fused kernel and up to three times by dequant_gemm (GEMM output, LoRA addmm,
# bias add, or with out_scale the scaled sum plus bias in fp32), half an ulp each, at most
# 2^-8 (bf16) / 2^-11 (fp16) of the largest term; fp16 x on the CPU's fused route multiplies fp32
# weights instead of fp16-rounded ones (2^-11 each, summed over K at random signs). fp32: only the
# summation order differs.
RELATIVE_TOLERANCE = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11, torch.float32: 1e-5}


def _draw(index: int, device: str) -> dict:
    rng = random.Random(1000 + index)
    return dict(
        dtype=rng.choice([torch.bfloat16, torch.float16, torch.float32]),
        M=rng.choice([0, 1, 2, 3, 4, 5, 8, 16, 17, 33, 64, 70]) if index % 4 else rng.randint(0, 70),
        out_features=rng.choice([48, 80, 96]),
        in_features=rng.choice([128, 192]) if rng.random() < 0.6 else rng.choice([70, 100, 130]),
        x_offset=rng.choice([0, 0, 1, 3]),  # elements: 1 and 3 leave x off a 16-byte boundary
        packed_offset=rng.choice([0, 0, 1, 5]),  # bytes
        transpose=rng.random() < 0.3,
        rank=rng.choice([None, 1, 8]),
        bias=rng.random() < 0.5,
        out_scale=rng.random() < 0.5,  # drawn last: the earlier draws, and so the cases, stay as they were
        seed=index,
        device=device,
    )


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """The same values, contiguous, starting `offset` elements into a larger buffer."""
    flat = t.reshape(-1)
    buffer = torch.empty(flat.numel() + offset, dtype=t.dtype, device=t.device)
    buffer[offset:] = flat
    return buffer[offset:].view(t.shape)


def _problem(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype, device = case["dtype"], case["device"]
    rows, cols = case["out_features"], case["in_features"]
    q = lk.quantize_nf4(torch.randn(rows, cols, generator=g), blocksize=BLOCKSIZE).to(device)
    packed = _offset_view(q.packed, case["packed_offset"])
    q = lk.NF4Weight(packed=packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=BLOCKSIZE,
                     nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset)
    K, N = (rows, cols) if case["transpose"] else (cols, rows)
    x = _offset_view(torch.randn(case["M"], K, generator=g).to(dtype).to(device), case["x_offset"])
    left = right = None
    if case["rank"]:
        left = torch.randn(case["M"], case["rank"], generator=g).to(device)
        right = (torch.randn(N, case["rank"], generator=g) * 0.1).to(device)
    bias = torch.randn(N, generator=g).to(dtype).to(device) if case["bias"] else None
    # DoRA's column scale, fp32 whatever x's dtype; of both signs, so a scale applied to the bias or
    # as its absolute value is caught
    out_scale = (torch.rand(N, generator=g) * 4 - 2).to(device) if case["out_scale"] else None
    return q, x, left, right, bias, out_scale


def _reference(q, x, left, right, bias, out_scale, transpose):
    scales = reference.dequantize_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset)
    w = reference.dequantize_nf4_blocks(q.packed, scales, q.blocksize, q.numel, x.dtype).view(q.shape).double()
    w = w if transpose else w.t()
    terms = [x.double() @ w]
    if left is not None:
        terms.append(0.5 * (left.double() @ right.double().t()))
    # rounding errors made before the scale (a 16-bit GEMM output, the LoRA addmm) grow with it
    column_scale = 1.0 if out_scale is None else float(out_scale.abs().amax())
    scale = (x.double().abs() @ w.abs()).amax() if x.numel() else torch.tensor(0.0, dtype=torch.float64)
    scale = max([float(scale)] + [float(t.abs().amax()) for t in terms[1:] if t.numel()] + [1e-30]) * column_scale
    expected = sum(terms)
    if out_scale is not None:
        expected = expected * out_scale.double()
    if bias is not None:
        expected = expected + bias.double()
        scale = max(scale, float(bias.double().abs().amax()))
    return expected, scale


def _params():
    params = [pytest.param("cpu", name, id=f"cpu-{name}") for name in present_backends("cpu") + ["torch"]]
    params += [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu) for name in ("cuda", "triton")]
    return params


def _skipped(backend_name: str, device: str, index: int) -> bool:
    return backend_name == "triton" and device == "cpu" and index % 4 != 0  # the interpreter is slow


@pytest.mark.parametrize("device,backend_name", [p for p in _params() if p.values[0] == "cpu"])
def test_cases_cover_every_route(device, backend_name, backend):
    """The cases that run below take every route the backend offers, so each is checked."""
    backend(backend_name)
    taken = set()
    for index in range(CASES):
        if not _skipped(backend_name, device, index):
            case = _draw(index, device)
            q, x, *_ = _problem(case)
            taken.add(lk.explain(x, q, transpose=case["transpose"])["route"])
    assert taken == set(lk.routes.ROUTES[backend_name]), taken


@pytest.mark.parametrize("index", range(CASES))
@pytest.mark.parametrize("device,backend_name", _params())
def test_named_route_runs_and_matches_reference(device, backend_name, index, backend):
    if _skipped(backend_name, device, index):
        pytest.skip("the Triton interpreter is slow: every fourth case")
    backend(backend_name)
    case = _draw(index, device)
    q, x, left, right, bias, out_scale = _problem(case)
    rows, cols = q.shape
    info = lk.explain(x, q, transpose=case["transpose"])
    assert info["backend"] == backend_name and info["route"] in lk.routes.ROUTES[backend_name] and info["why"]
    expected, scale = _reference(q, x, left, right, bias, out_scale, case["transpose"])
    args = (x, q.tensors, q.blocksize, rows, cols, case["transpose"], left, right, 0.5, bias, out_scale)
    named = torch.ops.lora_kernels.nf4_matmul(*args, None, None, None, info["route"])
    automatic = _ops.nf4_matmul(*args)
    for got in (named, automatic):
        assert got.shape == expected.shape and got.dtype == x.dtype, (case, info)
        err = (got.double() - expected).abs().amax().item() if got.numel() else 0.0
        assert err <= RELATIVE_TOLERANCE[x.dtype] * scale, (case, info, err, scale)
    assert torch.equal(named, automatic), (case, info)  # the dispatcher took the route explain() named


@pytest.mark.parametrize("device,backend_name", [p for p in _params() if p.values[0] == "cpu"])
def test_out_scale_on_every_route(device, backend_name, backend):
    """Every route of every backend with an out_scale, LoRA and bias together (the random cases above
    seldom draw the CUDA fused route): the fused one forward, dequant_gemm transposed."""
    backend(backend_name)
    for route in lk.routes.ROUTES[backend_name]:
        transpose = route == "dequant_gemm"
        case = dict(dtype=torch.bfloat16, M=3, out_features=48, in_features=128, x_offset=0, packed_offset=0,
                    transpose=transpose, rank=8, bias=True, out_scale=True, seed=7, device=device)
        q, x, left, right, bias, out_scale = _problem(case)
        expected, scale = _reference(q, x, left, right, bias, out_scale, transpose)
        got = torch.ops.lora_kernels.nf4_matmul(x, q.tensors, q.blocksize, *q.shape, transpose, left, right, 0.5, bias,
                                                out_scale, None, None, None, route)
        err = (got.double() - expected).abs().amax().item()
        assert err <= RELATIVE_TOLERANCE[x.dtype] * scale, (route, err, scale)


def test_empty_batch_through_the_layer():
    """An MoE expert that gets no tokens: x [0, in] through the layer, forward and backward."""
    layer = lk.QLoRALinear(128, 96, r=4, compute_dtype=torch.bfloat16)
    x = torch.randn(0, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 96)
    y.sum().backward()
    assert x.grad.shape == (0, 128) and layer.lora_A.grad.abs().sum() == 0


def test_explain_names_the_rule_the_kernel_would_break():
    q = lk.quantize_nf4(torch.randn(48, 128))
    x = _offset_view(torch.randn(2, 128, dtype=torch.bfloat16), 1)
    forced = lk.get_backend()
    try:
        lk.set_backend("torch")
        assert lk.explain(x, q)["route"] == "dequant_gemm"
    finally:
        lk.set_backend(forced)
    # the CUDA rules, by their facts (no GPU needed to ask)
    rules = lk.routes.BACKENDS["cuda"]
    p = lk.routes.MatmulProblem("cuda", "sm_90", torch.bfloat16, 4, 48, 128, 64, False, True, False)
    assert "16-byte" in rules.fused_problem(p)
    assert "bf16 or fp16" in rules.fused_problem(p._replace(dtype=torch.float32, packed_aligned=True))
    assert "rows" in rules.fused_problem(p._replace(M=17, packed_aligned=True))
    assert rules.fused_problem(p._replace(packed_aligned=True)) is None


def test_compiled_backward_chooses_its_route_when_it_runs(backend):
    """A compiled training step traced on one backend and run on another: the backward's dx takes
    the route of the backend that runs it (a route fixed when traced would be refused: Triton has
    only "fused", the CPU kernels take a transposed matmul only on "dequant_gemm")."""
    if not lk.backends()["triton"].usable:
        pytest.skip("triton not usable here")
    torch.manual_seed(0)
    layer = lk.QLoRALinear(64, 48, r=4, compute_dtype=torch.float32)
    x = torch.randn(2, 64, requires_grad=True)

    def step(x):
        return layer(x).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    grads = {}
    for name in ("triton", "torch", None):
        backend(name)
        x.grad = None
        compiled(x).backward()
        grads[name] = x.grad.clone()
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-5)  # fp32: summation order
    torch.testing.assert_close(grads[None], grads["torch"], rtol=1e-5, atol=1e-5)


# ---- the route boundaries: one value, told the same everywhere ------------------------------------
def _readme_fused_max_rows() -> dict[str, int]:
    """{backend: N} from the README's route table ("M ≤ N" in each backend's fused column)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*)\|", readme, flags=re.M)
    return {name: int(m.group(1)) for name, fused in rows if (m := re.search(r"M ≤ (\d+)", fused))}


def _cpp_constant(name: str) -> int:
    header = open(os.path.join(ROOT, "csrc", "kernels.h")).read()
    return int(re.search(rf"constexpr int64_t {name} = (\d+);", header).group(1))


def test_route_boundaries_agree_everywhere():
    """The README's table, routes.FUSED_MAX_ROWS and the kernels' own limits say the same M."""
    table = {name: rows["default"] for name, rows in lk.routes.FUSED_MAX_ROWS.items()}
    readme = _readme_fused_max_rows()
    assert readme == {k: table[k] for k in ("cpu", "cuda", "triton")}, (readme, table)
    assert table["cuda"] == lk.routes.BACKENDS["cuda"].DECODE_MAX_ROWS == _cpp_constant("kDecodeMaxRows")
    assert table["cuda_emulated"] == table["cuda"]


def test_cpu_route_boundary_is_pinned(backend):
    """The measured CPU boundaries (routes.py): the GEMV-style kernel to M = 4 (fused 1.15x bf16
    F.linear at M = 4, 2.1x at M = 8; dequant+GEMM 1.6x), and for bf16 x on AMX the AMX kernel to
    M = 256 (still ahead of dequant+GEMM there, mixed at 512). A change must be re-measured, and
    this pin, the README and the table moved together."""
    if not lk.backends()["cpu"].usable:
        pytest.skip("C++ CPU backend not built")
    backend("cpu")
    amx = torch.ops.lora_kernels.cpu_isa() == "amx"
    for dtype in (torch.float32, torch.float16):
        assert lk.explain("cpu", 4, 4096, dtype=dtype)["route"] == "fused"
        assert lk.explain("cpu", 5, 4096, dtype=dtype)["route"] == "dequant_gemm"
    bf16_limit = 256 if amx else 4
    assert lk.explain("cpu", bf16_limit, 4096)["route"] == "fused"
    assert lk.explain("cpu", bf16_limit + 1, 4096)["route"] == "dequant_gemm"
    assert ("cpu/amx" in lk.explain("cpu", 64, 4096)["why"]) == amx


def test_cuda_route_boundary_is_pinned(backend):
    """The decode kernel's limit, asked of the CUDA rules by their facts (no GPU needed), and of the
    same kernels under the emulator."""
    p = lk.routes.MatmulProblem("cuda", "sm_90", torch.bfloat16, 16, 4096, 4096, 64, False, True, True)
    assert lk.routes.choose_route("cuda", p)[0] == "fused"
    assert lk.routes.choose_route("cuda", p._replace(M=17))[0] == "dequant_gemm"
    if lk.backends()["cuda_emulated"].usable:
        backend("cuda_emulated")
        assert lk.explain("cpu", 16, 4096)["route"] == "fused"
        assert lk.explain("cpu", 17, 4096)["route"] == "dequant_gemm"
