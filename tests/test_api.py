"""The public API: bad input gets a clear error, NF4Weight round-trips, ops pass opcheck and
trace under torch.compile, backends can be listed and forced."""

import os
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels import NF4Weight, reference
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
        for route in ("fused", "dequant_gemm"):
            samples.append((torch.ops.lora_kernels.nf4_matmul.default,
                            (x, weight, 64, 48, 128, False, xa, B.detach(), 0.5, bias, route)))
        samples.append((torch.ops.lora_kernels.nf4_matmul.default,
                        (torch.randn(5, 48, dtype=torch.bfloat16), weight, 64, 48, 128, True, None, None, 0.0,
                         None, "dequant_gemm")))
    return samples


@pytest.mark.parametrize("index", range(6))
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
    assert set(status) == {"cuda", "triton", "cpu", "torch"}
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
