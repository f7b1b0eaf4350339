"""The public API: bad input gets a clear error, NF4Weight round-trips, ops pass opcheck and
trace under torch.compile, backends can be listed and forced."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight, reference
from conftest import spec_weight
from test_quant import random_weight


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.uint8, torch.int32])
def test_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match="bfloat16, float16 and float32"):
        lora_kernels.quantize_nf4(torch.ones(64, dtype=dtype))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        lora_kernels.quantize_nf4(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_nan_or_inf_is_refused(bad, name, backend):
    if not lora_kernels.backends()[name].usable:
        pytest.skip(lora_kernels.backends()[name].detail)
    w = torch.randn(1000)
    w[700] = bad
    backend(name)
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in block 10, elements 640\.\.703"):
        lora_kernels.quantize_nf4(w)


def test_empty_tensor_is_refused():
    with pytest.raises(ValueError, match="empty tensor"):
        lora_kernels.quantize_nf4(torch.empty(0, 64))


def test_non_contiguous_input_is_right():
    w = random_weight((96, 200), torch.bfloat16, "cpu")
    wt = w.t()  # a transposed view: quantized in its own row-major order
    assert not wt.is_contiguous()
    q = lora_kernels.quantize_nf4(wt)
    r = lora_kernels.quantize_nf4(wt.contiguous())
    assert q.shape == wt.shape
    assert torch.equal(q.packed, r.packed) and torch.equal(q.absmax, r.absmax)
    assert torch.equal(lora_kernels.dequantize_nf4(q), lora_kernels.dequantize_nf4(r))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        lora_kernels.quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="NF4Weight"):
        lora_kernels.dequantize_nf4(torch.zeros(4))


def test_dequantize_to_unsupported_dtype():
    q = lora_kernels.quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="can produce"):
        lora_kernels.dequantize_nf4(q, torch.int32)


def _fields(q):
    return dict(
        packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize,
        nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset,
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda f: f.update(absmax=f["absmax"][:-1]), "absmax .* must have 16 elements"),
        (lambda f: f.update(absmax=f["absmax"].float()), "absmax .* must be torch.uint8"),
        (lambda f: f.update(packed=f["packed"][:-1]), "packed must have 500 elements"),
        (lambda f: f.update(nested_absmax=f["nested_absmax"].double()), "nested_absmax must be torch.float32"),
        (lambda f: f.update(nested_code=f["nested_code"][:128]), "nested_code must have 256"),
        (lambda f: f.update(offset=None), "come|together"),
        (lambda f: f.update(blocksize=48), "blocksize must be one of"),
        (lambda f: f.update(dtype=torch.int8), "dtype must be"),
        (lambda f: f.update(absmax=f["absmax"].to("meta")), "absmax is on meta but packed is on cpu"),
    ],
    ids=["short-absmax", "absmax-dtype", "short-packed", "nested-dtype", "short-map", "no-offset",
         "blocksize", "dtype", "device"],
)
def test_nf4weight_refuses_inconsistent_fields(change, message):
    fields = _fields(lora_kernels.quantize_nf4(torch.randn(10, 100)))
    change(fields)
    with pytest.raises(ValueError, match=message):
        NF4Weight(**fields)


# ---- NF4Weight round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    w = random_weight((300, 70), torch.float16, "cpu")
    q = lora_kernels.quantize_nf4(w, blocksize=128, double_quant=double_quant)
    q2 = NF4Weight.from_state_dict(q.state_dict())
    assert (q2.shape, q2.dtype, q2.blocksize, q2.double_quant) == (q.shape, q.dtype, 128, double_quant)
    assert torch.equal(lora_kernels.dequantize_nf4(q2), lora_kernels.dequantize_nf4(q))


def test_state_dict_with_prefix_and_device():
    q = lora_kernels.quantize_nf4(torch.randn(64, 64))
    sd = q.state_dict(prefix="layers.0.q_proj.weight")
    assert "layers.0.q_proj.weight.nested_absmax" in sd
    q2 = NF4Weight.from_state_dict(sd, prefix="layers.0.q_proj.weight", device="cpu")
    assert torch.equal(q2.packed, q.packed)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda sd: sd.pop("weight.absmax"), "no key 'weight.absmax'"),
        (lambda sd: sd.pop("weight.nested_quant_map"), "no key 'weight.nested_quant_map'"),
        (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"][:3]}), "must have 64 elements"),
        (lambda sd: sd.update({"weight.nested_absmax": sd["weight.nested_absmax"].half()}), "float32"),
        (lambda sd: sd.update({"weight.quant_map": -sd["weight.quant_map"]}), "not the NF4 code book"),
        (lambda sd: sd.update({"weight.quant_state.bitsandbytes__fp4": sd.pop("weight.quant_state.bitsandbytes__nf4")}),
         "fp4"),
    ],
    ids=["missing-absmax", "missing-map", "short-absmax", "nested-dtype", "wrong-codebook", "fp4"],
)
def test_bad_state_dict_is_refused(change, message):
    sd = lora_kernels.quantize_nf4(torch.randn(64, 64)).state_dict()
    change(sd)
    with pytest.raises(ValueError, match=message):
        NF4Weight.from_state_dict(sd)


def test_to_device_and_repr():
    q = lora_kernels.quantize_nf4(torch.randn(64, 64))
    q2 = q.to("cpu")
    assert q2.device.type == "cpu" and "NF4Weight(shape=(64, 64)" in repr(q2)
    # 4096 weights: 2048 packed bytes + 64 codes + 1 nested scale + offset
    assert q.nbytes() == 2048 + 64 + 4 + 4


@pytest.mark.gpu
def test_cuda_round_trip_through_devices():
    w = random_weight((1000, 333), torch.bfloat16, "cuda")
    q = lora_kernels.quantize_nf4(w)
    assert torch.equal(lora_kernels.dequantize_nf4(q.cpu()), lora_kernels.dequantize_nf4(q).cpu())


# ---- ops: opcheck and torch.compile ---------------------------------------------------------------
def _op_samples():
    w = random_weight((3, 1000), torch.bfloat16, "cpu").reshape(-1)
    q = lora_kernels.quantize_nf4(w.view(3, 1000))
    p = lora_kernels.quantize_nf4(w.view(3, 1000), double_quant=False)
    return [
        (torch.ops.lora_kernels.quantize_nf4.default, (w, 64)),
        (torch.ops.lora_kernels.double_quantize.default, (p.absmax, reference.dynamic_map())),
        (torch.ops.lora_kernels.dequantize_nf4.default, (q.tensors, 64, q.numel, torch.bfloat16)),
        (torch.ops.lora_kernels.dequantize_nf4.default, (p.tensors, 64, p.numel, torch.float32)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def _matmul_samples():
    q = lora_kernels.quantize_nf4(random_weight((48, 128), torch.bfloat16, "cpu"))
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    A = torch.randn(4, 128, requires_grad=True)
    B = torch.randn(48, 4, requires_grad=True)
    bias = torch.randn(48, dtype=torch.bfloat16)
    weight = q.tensors
    samples = [
        (torch.ops.lora_kernels.qlora_linear.default,
         (x.clone().requires_grad_(), None, weight, 64, 48, A, B, 0.5, bias)),
        (torch.ops.lora_kernels.qlora_linear.default,
         (x, torch.randn(5, 128, dtype=torch.bfloat16), weight, 64, 48, A, B, 2.0, None)),
        (torch.ops.lora_kernels.qlora_linear_dx.default,
         (torch.randn(5, 48, dtype=torch.bfloat16), weight, 64, 48, 128, torch.randn(5, 4), A.detach())),
    ]
    if lora_kernels.backends()["cpu"].usable:
        xa = torch.randn(5, 4)
        # out_scale on the fused forward and the transposed matmul, None on the other
        for route, out_scale in (("fused", torch.randn(48)), ("dequant_gemm", None)):
            samples.append((torch.ops.lora_kernels.nf4_matmul.default,
                            (x, weight, 64, 48, 128, False, xa, B.detach(), 0.5, bias, out_scale, None, None, None,
                             route)))
        samples.append((torch.ops.lora_kernels.nf4_matmul.default,
                        (torch.randn(5, 48, dtype=torch.bfloat16), weight, 64, 48, 128, True, None, None, 0.0,
                         None, torch.randn(128), None, None, None, "dequant_gemm")))
        # per-row adapters: 3 slots of rank <= 4, row 2 on the base alone, on both routes
        slots, ranks = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32), torch.tensor([4, 1, 3], dtype=torch.int32)
        a_slots, b_slots, scalings = torch.randn(3, 4, 128), torch.randn(3, 48, 4), torch.tensor([0.5, 2.0, 1.0])
        for route in ("fused", "dequant_gemm"):
            samples.append((torch.ops.lora_kernels.nf4_matmul.default,
                            (x, weight, 64, 48, 128, False, xa, b_slots, 0.0, bias, None, slots, ranks, scalings,
                             route)))
        samples.append((torch.ops.lora_kernels.lora_shrink.default, (x, a_slots, slots, ranks)))
        samples.append((torch.ops.lora_kernels.multi_lora_linear.default,
                        (x, weight, 64, 48, a_slots, b_slots, scalings, ranks, slots, bias)))
    return samples


@pytest.mark.parametrize("index", range(10))
def test_opcheck_matmul(index):
    samples = _matmul_samples()
    if index >= len(samples):
        pytest.skip("C++ CPU backend not built")
    op, args = samples[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    w = random_weight((300, 70), torch.bfloat16, "cpu")

    def roundtrip(x):
        return lora_kernels.dequantize_nf4(lora_kernels.quantize_nf4(x), torch.float32)

    compiled = torch.compile(roundtrip, fullgraph=True)
    assert torch.equal(compiled(w), roundtrip(w))


# ---- backends ---------------------------------------------------------------------------------------
def test_backends_report_why():
    status = lora_kernels.backends()
    assert set(status) == {"cuda", "triton", "cpu", "torch", "cuda_emulated"}
    assert status["torch"].usable
    for name, s in status.items():
        assert s.detail, name
    if not torch.cuda.is_available():
        assert not status["cuda"].usable


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="unknown backend"):
        lora_kernels.set_backend("metal")


def test_forced_backend_on_wrong_device(backend):
    backend("cuda")
    with pytest.raises(RuntimeError, match="cannot run on a cpu tensor"):
        lora_kernels.quantize_nf4(torch.randn(64))


def test_environment_variable_forces_backend():
    code = "import lora_kernels; print(lora_kernels.get_backend())"
    env = dict(os.environ, LORA_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_reference_dynamic_map_is_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(reference.dynamic_map(), F.create_dynamic_map())
    assert torch.equal(reference.nf4_code(), F.get_4bit_type("nf4", device="cpu"))


# ---- hostile files: every field of the bitsandbytes layout is checked before anything is built ------
_META = "weight.quant_state.bitsandbytes__nf4"


def _with_meta(sd, **fields):
    """sd with its quant_state JSON changed: a field set to a value, or dropped when the value is ...; the
    JSON is written with allow_nan so a NaN or Inf offset reaches the reader as a file would carry it."""
    import json

    meta = json.loads(bytes(sd[_META].tolist()).decode())
    for key, value in fields.items():
        if value is ...:
            meta.pop(key)
        else:
            meta[key] = value
    sd[_META] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda sd: _with_meta(sd, nested_offset=float("nan")), "nested_offset must be a finite number"),
        (lambda sd: _with_meta(sd, nested_offset=float("inf")), "nested_offset must be a finite number"),
        (lambda sd: sd["weight.nested_absmax"].fill_(float("inf")), "weight.nested_absmax must hold finite"),
        (lambda sd: sd["weight.nested_absmax"].neg_(), "weight.nested_absmax must hold finite, non-negative"),
        (lambda sd: sd.update({"weight.nested_quant_map": torch.rand(256)}), "not bitsandbytes' 8-bit dynamic map"),
    ],
    ids=["offset-nan", "offset-inf", "nested-absmax-inf", "nested-absmax-negative", "random-nested-map"],
)
def test_non_finite_or_garbage_scales_are_refused(change, message):
    sd = {k: v.clone() for k, v in lora_kernels.quantize_nf4(torch.randn(64, 64)).state_dict().items()}
    change(sd)
    with pytest.raises(ValueError, match=message):
        NF4Weight.from_state_dict(sd)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "negative"])
def test_non_finite_fp32_absmax_is_refused(bad):
    sd = lora_kernels.quantize_nf4(torch.randn(64, 64), double_quant=False).state_dict()
    sd["weight.absmax"] = sd["weight.absmax"].clone()
    sd["weight.absmax"][3] = bad
    with pytest.raises(ValueError, match="weight.absmax must hold finite, non-negative"):
        NF4Weight.from_state_dict(sd)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(shape=...), "has no field 'shape'"),
        (dict(blocksize=...), "has no field 'blocksize'"),
        (dict(dtype=...), "has no field 'dtype'"),
        (dict(shape="64x64"), "shape must be a list of positive integers"),
        (dict(shape=[64, 0]), "shape must be a list of positive integers"),
        (dict(shape=[64.0, 64]), "shape must be a list of positive integers"),
        (dict(blocksize=64.9), "blocksize must be an integer, got 64.9"),
        (dict(blocksize="64"), "blocksize must be an integer"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(dtype=7), "dtype must be one of"),
        (dict(nested_offset="0.1"), "nested_offset must be a finite number"),
        (dict(nested_blocksize=256.0), "nested_blocksize must be 256, got 256.0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_quant_state_json_field_missing_or_of_wrong_type(fields, message):
    sd = lora_kernels.quantize_nf4(torch.randn(64, 64)).state_dict(prefix="layers.0.q.weight")
    sd = {k.replace("layers.0.q.", ""): v for k, v in sd.items()}
    _with_meta(sd, **fields)
    sd = {f"layers.0.q.{k}": v for k, v in sd.items()}
    with pytest.raises(ValueError, match=f"layers.0.q.weight.quant_state.bitsandbytes__nf4.*{message}"):
        NF4Weight.from_state_dict(sd, prefix="layers.0.q.weight")


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"[1, 2]", b"{nope"], ids=["not-utf8", "not-object", "not-json"])
def test_quant_state_not_json_is_a_value_error(payload):
    sd = lora_kernels.quantize_nf4(torch.randn(64, 64)).state_dict()
    sd[_META] = torch.tensor(list(payload), dtype=torch.uint8)
    with pytest.raises(ValueError, match=_META):
        NF4Weight.from_state_dict(sd)
    sd[_META] = sd[_META].float()
    with pytest.raises(ValueError, match="uint8 tensor of JSON bytes"):
        NF4Weight.from_state_dict(sd)


def test_strided_state_dict_tensors_load_as_copies():
    q = lora_kernels.quantize_nf4(torch.randn(256, 256))  # 1024 blocks, 4 nested scales
    sd = q.state_dict()
    for key in ("weight", "weight.absmax", "weight.nested_absmax"):
        wide = torch.stack([sd[key], torch.zeros_like(sd[key])], dim=-1)  # every other element: a strided view
        sd[key] = wide[..., 0]
        assert not sd[key].is_contiguous()
    q2 = NF4Weight.from_state_dict(sd)
    assert all(t.is_contiguous() for t in q2.tensors)
    assert torch.equal(lora_kernels.dequantize_nf4(q2), lora_kernels.dequantize_nf4(q))
    for t in sd.values():  # nothing shared with the state dict
        t.zero_()
    assert torch.equal(lora_kernels.dequantize_nf4(q2), lora_kernels.dequantize_nf4(q))


def test_strided_lora_factors_and_bias_are_copied_at_the_boundary():
    torch.manual_seed(0)
    q = lora_kernels.quantize_nf4(torch.randn(64, 128))
    x = torch.randn(3, 128)
    a, b = torch.randn(4, 128), torch.randn(64, 4)
    bias = torch.randn(64, 2)[:, 0]  # strided
    a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()  # transposed views holding the same values
    assert not (bias.is_contiguous() or a_t.is_contiguous() or b_t.is_contiguous())
    want = reference.qlora_linear(x, spec_weight(q), a, b, 2.0, bias.contiguous())
    got = lora_kernels.qlora_linear(x, q, a_t, b_t, 2.0, bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_float64_is_refused_saying_what_is_supported():
    q = lora_kernels.quantize_nf4(torch.randn(64, 128))
    a, b = torch.randn(4, 128, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lora_A is torch.float64; .*bfloat16, float16 or float32.*float64 is not supported"):
        lora_kernels.qlora_linear(torch.randn(2, 128), q, a, b, 1.0)
    with pytest.raises(ValueError, match="x must be bfloat16, float16 or float32, got torch.float64.*float64 is not"):
        lora_kernels.qlora_linear(torch.randn(2, 128, dtype=torch.float64), q, a.float(), b.float(), 1.0)


def test_emulated_cuda_backend_is_built_where_asked():
    """make test builds the CUDA kernels for the CPU emulator (LORA_KERNELS_CUDA_EMULATE=1): there
    they must load, or every cuda_emulated test would silently drop out of the suite."""
    status = lora_kernels.backends()["cuda_emulated"]
    if os.environ.get("LORA_KERNELS_CUDA_EMULATE") != "1":
        pytest.skip(f"not asked for: {status.detail}")
    assert status.usable, status.detail


def test_oracle_never_runs_the_kernel_under_test():
    """spec_weight (conftest), the matmul tests' oracle, dequantizes with reference.py itself: a
    planted wrong dequantize kernel on the CPU changes what the op returns, not the oracle."""
    torch.manual_seed(0)
    q = lora_kernels.quantize_nf4(torch.randn(48, 128))
    want = spec_weight(q)
    lib = torch.library.Library("lora_kernels", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
            lib.impl("dequantize_nf4", lambda weight, blocksize, numel, dtype: torch.zeros(numel, dtype=dtype), "CPU")
        assert lora_kernels.dequantize_nf4(q).abs().sum() == 0  # the plant took
        assert torch.equal(spec_weight(q), want) and want.abs().sum() > 0
    finally:
        lib._destroy()
    assert torch.equal(lora_kernels.dequantize_nf4(q, torch.float32), want)
