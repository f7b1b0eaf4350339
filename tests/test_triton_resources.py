"""Every Triton kernel, with every autotune config, compiled for sm_80, sm_86, sm_89 and sm_90
without a GPU: within that architecture's shared-memory limit per block, and no local-memory
spills (ptxas -v, as Triton runs it: TRITON_DUMP_PTXAS_LOG). A config that does not fit an
architecture is never offered there (triton_ops.nf4_matmul.configs_for, which the autotuner's
prune uses), and the shared memory the prune reads per config is what the compiler allocates.

Variants, to keep the compile count down (2 cores in CI): the fused matmul in bf16 x with plain
and with double-quantized scales, and fp32 x with double-quantized scales (the dot on CUDA cores,
the most registers; plain fp32 decodes a subset of it), all with LoRA and bias, forward (the only
direction the fused kernel takes), in_features a multiple of the blocksize; the same with per-row
adapters (multi-LoRA, HAS_SLOTS: the slot loop before the K loop, no out_scale) in bf16 plain and
fp32 double-quantized, in the configs offered to them (_SLOT_CONFIGS); quantize and dequantize as
their launchers launch them (4 warps, Triton's default stages): quantize bf16 at blocksize 64 and
fp32 at 4096, dequantize bf16 double-quantized and fp32 plain; multi-LoRA's shrink and expand
(triton_ops/multi_lora.py) in bf16 and fp32 (the expand at its smallest and largest rank chunk),
with the launchers' warps and stages.
Pointers and sizes are compiled 16-aligned/divisible, as Triton specializes a launch on a real
model (that is what turns the W loads into 16-byte cp.async, the staging that costs shared memory).
"""

import pytest
from conftest import compile_triton_for_gpu

pytest.importorskip("triton")

ARCHS = [80, 86, 89, 90]
MATMUL_VARIANTS = ["bf16-plain", "bf16-dq", "fp32-dq", "bf16-plain-slots", "fp32-dq-slots"]

_SCRIPT = r"""
import os, tempfile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's log on stdout
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # a cached kernel would skip ptxas, and its log
import contextlib, io, json, multiprocessing, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_ops.nf4_matmul as matmul_module
from triton_ops import multi_lora, quant
from triton_ops._nf4 import compile_options

def compile_kernel(fn, signature, constexprs, arch, options, divisible):
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
             if t.startswith("*") or a in divisible}
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    assert spills and regs, log.getvalue()
    return {"shared": k.metadata.shared, "spill_stores": int(spills[0][0]), "spill_loads": int(spills[0][1]),
            "registers": int(regs[0])}

def matmul(arch, variant, bn, bk, warps, stages):
    dt, scales, *slots = variant.split("-")
    dq = scales == "dq"
    signature, constexprs = matmul_module.compile_args(dt, dq, True, bn, bk, slots=bool(slots))
    options = {"num_warps": warps, "num_stages": stages, **compile_options(dq)}
    return compile_kernel(matmul_module._nf4_matmul_kernel.fn, signature, constexprs, arch, options,
                          {"N", "K", "row_bytes"})

def quantize(arch, dt, bs):
    return compile_kernel(quant._quantize_kernel,
        {"w_ptr": f"*{dt}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "n": "i64"},
        {"BS": bs, "BLOCKS": max(1, 4096 // bs)}, arch, {"num_warps": 4}, {"n"})

def dequantize(arch, dt, dq):
    return compile_kernel(quant._dequantize_kernel,
        {"packed_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "nested_absmax_ptr": "*fp32",
         "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{dt}", "n": "i64"},
        {"BS": 64, "BYTES": 1024, "DOUBLE_QUANT": dq, "INTERPRET": False}, arch,
        {"num_warps": 4, **compile_options(dq)}, {"n"})

def multi(arch, kind, dt, block_r):
    if kind == "expand":
        signature, constexprs = multi_lora.expand_compile_args(dt, block_r)
    else:
        signature, constexprs = multi_lora.shrink_compile_args(dt)
    fn = multi_lora._expand_kernel if kind == "expand" else multi_lora._shrink_kernel
    return compile_kernel(fn, signature, constexprs, arch,
                          {"num_warps": multi_lora.NUM_WARPS, "num_stages": multi_lora.NUM_STAGES}, {"N", "K"})

def run(job):
    kind, arch, *rest = job
    if kind == "matmul":
        return matmul(arch, *rest)
    if kind == "quantize":
        return quantize(arch, *rest)
    if kind in ("expand", "shrink"):
        return multi(arch, kind, *rest)
    return dequantize(arch, *rest)

jobs = []
for arch in ARCHS:
    for key in matmul_module._CONFIG_SHARED_BYTES:
        # with per-row adapters only the configs offered to them (_SLOT_CONFIGS)
        jobs += [("matmul", arch, variant, *key) for variant in MATMUL_VARIANTS
                 if not variant.endswith("-slots") or key in matmul_module._SLOT_CONFIGS]
    jobs += [("quantize", arch, "bf16", 64), ("quantize", arch, "fp32", 4096)]
    jobs += [("dequantize", arch, "bf16", True), ("dequantize", arch, "fp32", False)]
    jobs += [("expand", arch, dt, block_r) for dt in ("bf16", "fp32") for block_r in sorted({16, multi_lora.MAX_BLOCK_R})]
    jobs += [("shrink", arch, dt, multi_lora.SHRINK_BLOCK_R) for dt in ("bf16", "fp32")]
with multiprocessing.get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
    results = pool.map(run, jobs, chunksize=1)
print(json.dumps([[list(job), result] for job, result in zip(jobs, results)]))
"""


@pytest.fixture(scope="module")
def compiled():
    """[(job, {"shared", "spill_stores", "spill_loads", "registers"})] for every compile."""
    rows = compile_triton_for_gpu(f"ARCHS = {ARCHS!r}\nMATMUL_VARIANTS = {MATMUL_VARIANTS!r}\n" + _SCRIPT)
    return [(tuple(job), result) for job, result in rows]


def _capability(arch: int) -> tuple[int, int]:
    return divmod(arch, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_spills(compiled, arch):
    spilled = [(job, r) for job, r in compiled if job[1] == arch and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, spilled


@pytest.mark.parametrize("arch", ARCHS)
def test_offered_matmul_configs_fit_shared_memory(compiled, arch):
    """Every config the autotuner may try on this architecture fits it, in every variant; and at
    least one config is offered."""
    from triton_ops import nf4_matmul as matmul_module

    limit = matmul_module.shared_memory_limit(_capability(arch))
    offered = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
               for c in _gpu_configs_for(matmul_module, _capability(arch))}
    assert offered
    too_big = [(job, r["shared"]) for job, r in compiled
               if job[0] == "matmul" and job[1] == arch and tuple(job[3:]) in offered and r["shared"] > limit]
    assert not too_big, (limit, too_big)


def test_recorded_shared_memory_bounds_the_compiled(compiled):
    """The figures the prune reads are upper bounds of what the compiler allocates, on every
    architecture and variant; a stale table fails here with the figures to record."""
    from triton_ops import nf4_matmul as matmul_module

    most: dict = {}
    for job, r in compiled:
        if job[0] == "matmul":
            most[tuple(job[3:])] = max(most.get(tuple(job[3:]), 0), r["shared"])
    recorded = matmul_module._CONFIG_SHARED_BYTES
    assert set(most) == set(recorded)
    assert all(most[key] <= recorded[key] for key in recorded), {k: (most[k], recorded[k]) for k in recorded}


@pytest.mark.parametrize("arch", ARCHS)
def test_other_kernels_fit_every_architecture(compiled, arch):
    """quantize, dequantize and multi-LoRA's shrink and expand: one config each, which must fit."""
    from triton_ops import nf4_matmul as matmul_module

    limit = matmul_module.shared_memory_limit(_capability(arch))
    for job, r in compiled:
        if job[0] != "matmul" and job[1] == arch:
            assert r["shared"] <= limit, (job, r)


def _gpu_configs_for(matmul_module, capability):
    """configs_for as it answers on a GPU (this process runs the interpreter, which has one config)."""
    limit = matmul_module.shared_memory_limit(capability)
    configs = [matmul_module._config(*key) for key in matmul_module._CONFIG_SHARED_BYTES]
    return [c for c in configs if matmul_module.config_shared_bytes(c) <= limit]


def test_prune_drops_what_does_not_fit(monkeypatch):
    """The autotuner's prune reads the device's capability: a config recorded above a limit is
    offered where it fits (sm_80, sm_90) and never where it does not (sm_86, sm_89)."""
    import torch

    from triton_ops import nf4_matmul as matmul_module

    big = (64, 256, 4, 4)
    monkeypatch.setitem(matmul_module._CONFIG_SHARED_BYTES, big, 120 * 1024)
    monkeypatch.setattr(matmul_module, "_interpreting", lambda: False)
    configs = matmul_module._configs()
    assert any(matmul_module.config_shared_bytes(c) == 120 * 1024 for c in configs)
    for arch, offered in ((80, True), (86, False), (89, False), (90, True), (120, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, a=arch: _capability(a))
        kept = matmul_module._prune(configs, {"x_ptr": torch.empty(0)})
        assert kept == [c for c in configs if c in matmul_module.configs_for(_capability(arch))]
        assert any(matmul_module.config_shared_bytes(c) == 120 * 1024 for c in kept) == offered, arch


def test_prune_offers_slot_configs_only_with_slots(monkeypatch):
    """With per-row adapters the autotuner tries only _SLOT_CONFIGS (the configs compiled above in
    the slot variants), where they fit; without them every config that fits."""
    import torch

    from triton_ops import nf4_matmul as matmul_module

    monkeypatch.setattr(matmul_module, "_interpreting", lambda: False)
    configs = matmul_module._configs()
    assert set(matmul_module._SLOT_CONFIGS) <= set(matmul_module._CONFIG_SHARED_BYTES)
    for arch in ARCHS:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, a=arch: _capability(a))
        with_slots = matmul_module._prune(configs, {"x_ptr": torch.empty(0)}, HAS_SLOTS=True)
        without = matmul_module._prune(configs, {"x_ptr": torch.empty(0)}, HAS_SLOTS=False)
        assert with_slots and {matmul_module.config_key(c) for c in with_slots} <= set(matmul_module._SLOT_CONFIGS)
        assert with_slots == matmul_module.configs_for(_capability(arch), slots=True)
        assert without == matmul_module.configs_for(_capability(arch))
