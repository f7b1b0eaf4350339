// Torch glue: op schemas in the private namespace lora_kernels_C, input checks, and the CPU and
// CUDA registrations. The public ops (torch.ops.lora_kernels.*) are defined in lora_kernels/ops.py
// and call these. Loaded as `lora_kernels._C`, a Python module with no Python functions.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef LK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels.h"
#include "cpu/isa.h"

#include <cstdlib>
#include <string>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lora_kernels {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kFP16;
    case at::kFloat: return DType::kFP32;
    default: TORCH_CHECK(false, "lora_kernels: dtype must be bfloat16, float16 or float32, got ", t);
  }
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "lora_kernels: blocksize must be a power of two from 32 to 4096, got ", blocksize);
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                  const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, "lora_kernels: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "lora_kernels: ", name, " must have ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.device() == device, "lora_kernels: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), "lora_kernels: ", name, " must be contiguous");
}

// A large CPU output in memory the kernel of the OS may back with 2 MiB pages. A fresh tensor of
// tens of MB costs more in 4 KiB page faults on first touch than the kernel itself (measured here:
// about 15 ms to fault in 32 MB, against 2.5 ms to fill it once mapped). torch does the same
// behind THP_MEM_ALLOC_ENABLE=1; we do it for our own large outputs only. The result is an
// ordinary CPU tensor whose memory is freed with free().
at::Tensor empty_cpu(int64_t numel, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  constexpr size_t kHugePage = size_t(2) << 20;
#ifdef __linux__
  if (nbytes >= 2 * kHugePage) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // a hint: without transparent huge pages it does nothing
      return at::from_blob(ptr, {numel}, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty({numel}, options);
}

std::tuple<at::Tensor, at::Tensor> quantize_outputs(const at::Tensor& w, int64_t blocksize) {
  check_blocksize(blocksize);
  to_dtype(w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous(), "lora_kernels: quantize_nf4 takes a flat contiguous tensor");
  TORCH_CHECK(w.numel() > 0, "lora_kernels: cannot quantize an empty tensor");
  const int64_t n = w.numel();
  auto packed = w.is_cpu() ? empty_cpu((n + 1) / 2, at::kByte) : at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, w.options().dtype(at::kFloat));
  return {packed, absmax};
}

// Checks the dequantize inputs and gathers the scale pointers.
BlockScales scales_of(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                      const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                      int64_t blocksize, int64_t numel) {
  check_blocksize(blocksize);
  TORCH_CHECK(numel > 0, "lora_kernels: numel must be positive, got ", numel);
  const auto device = packed.device();
  check_tensor(packed, "packed", at::kByte, (numel + 1) / 2, device);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  BlockScales s;
  if (!nested_absmax.has_value()) {
    check_tensor(absmax, "absmax", at::kFloat, nblocks, device);
    s.absmax = absmax.data_ptr<float>();
    return s;
  }
  TORCH_CHECK(nested_code.has_value() && offset.has_value(),
              "lora_kernels: nested_absmax, nested_code and offset come together");
  check_tensor(absmax, "absmax (double-quantized codes)", at::kByte, nblocks, device);
  check_tensor(*nested_absmax, "nested_absmax", at::kFloat, (nblocks + 255) / 256, device);
  check_tensor(*nested_code, "nested_code", at::kFloat, 256, device);
  check_tensor(*offset, "offset", at::kFloat, 1, device);
  s.codes = absmax.data_ptr<uint8_t>();
  s.nested_absmax = nested_absmax->data_ptr<float>();
  s.nested_code = nested_code->data_ptr<float>();
  s.offset = offset->data_ptr<float>();
  return s;
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& w, int64_t blocksize) {
  auto [packed, absmax] = quantize_outputs(w, blocksize);
  cpu::quantize_nf4(w.data_ptr(), to_dtype(w.scalar_type()), w.numel(), blocksize, packed.data_ptr<uint8_t>(),
                    absmax.data_ptr<float>());
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax, const at::Tensor& lut) {
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() > 0, "lora_kernels: absmax must be a non-empty flat tensor");
  check_tensor(absmax, "absmax", at::kFloat, absmax.numel(), absmax.device());
  check_tensor(lut, "lut", at::kByte, 65536, absmax.device());
  const int64_t n = absmax.numel();
  // torch's own mean, so the offset is the bits bitsandbytes stores
  const at::Tensor offset = absmax.mean();
  auto codes = at::empty({n}, absmax.options().dtype(at::kByte));
  auto nested = at::empty({(n + 255) / 256}, absmax.options());
  cpu::quantize_scales_8bit(absmax.data_ptr<float>(), n, offset.item<float>(), lut.data_ptr<uint8_t>(),
                            codes.data_ptr<uint8_t>(), nested.data_ptr<float>());
  return {codes, nested, offset};
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const BlockScales s = scales_of(packed, absmax, nested_absmax, nested_code, offset, blocksize, numel);
  auto out = empty_cpu(numel, dtype);
  cpu::dequantize_nf4(packed.data_ptr<uint8_t>(), s, blocksize, numel, out.data_ptr(), to_dtype(dtype));
  return out;
}

// ---- nf4_matmul: out = x . deq(W)^T (or x . deq(W) when transposed) + lora_scaling * left . right^T + bias ----

// Routes of nf4_matmul; the Python dispatcher picks one from its table, 0 lets the C++ side choose.
enum Route : int64_t { kAuto = 0, kFused = 1, kDequantGemm = 2 };

struct MatmulArgs {
  Nf4Matrix w;
  Epilogue epi;
  int64_t M = 0, N = 0, K = 0;
  bool fusable = false;  // the shape and layout the fused kernels need
};

MatmulArgs check_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                        const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t rows, int64_t cols,
                        bool transpose, const c10::optional<at::Tensor>& lora_left,
                        const c10::optional<at::Tensor>& lora_right, double lora_scaling,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(rows > 0 && cols > 0, "lora_kernels: weight shape must be positive, got [", rows, ", ", cols, "]");
  MatmulArgs a;
  a.w.scales = scales_of(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows * cols);
  a.w.packed = packed.data_ptr<uint8_t>();
  a.w.rows = rows;
  a.w.cols = cols;
  a.w.blocksize = blocksize;
  to_dtype(x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lora_kernels: nf4_matmul takes a contiguous 2-D x, got ", x.sizes());
  TORCH_CHECK(x.device() == packed.device(), "lora_kernels: x is on ", x.device(), ", the weight on ", packed.device());
  a.M = x.size(0);
  a.K = transpose ? rows : cols;
  a.N = transpose ? cols : rows;
  TORCH_CHECK(x.size(1) == a.K, "lora_kernels: x has ", x.size(1), " features, the weight expects ", a.K);
  if (lora_left.has_value()) {
    TORCH_CHECK(lora_right.has_value(), "lora_kernels: lora_left and lora_right come together");
    const auto& l = *lora_left;
    const auto& r = *lora_right;
    TORCH_CHECK(l.dim() == 2 && r.dim() == 2 && l.size(0) == a.M && r.size(0) == a.N && l.size(1) == r.size(1),
                "lora_kernels: lora_left must be [", a.M, ", r] and lora_right [", a.N, ", r], got ", l.sizes(),
                " and ", r.sizes());
    TORCH_CHECK(l.scalar_type() == r.scalar_type() && l.is_contiguous() && r.is_contiguous(),
                "lora_kernels: lora_left and lora_right must be contiguous and of one dtype");
    TORCH_CHECK(l.device() == x.device() && r.device() == x.device(), "lora_kernels: LoRA factors on another device");
    a.epi.lora_left = l.data_ptr();
    a.epi.lora_right = r.data_ptr();
    a.epi.lora_dtype = to_dtype(l.scalar_type());
    a.epi.rank = l.size(1);
    a.epi.lora_scaling = static_cast<float>(lora_scaling);
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x.scalar_type(), a.N, x.device());
    a.epi.bias = bias->data_ptr();
  }
  a.fusable = !transpose && cols % blocksize == 0 && a.M > 0;
  return a;
}

// The unfused epilogue, in the output dtype: out += lora_scaling * left . right^T; out += bias.
void add_epilogue(at::Tensor& out, const c10::optional<at::Tensor>& lora_left,
                  const c10::optional<at::Tensor>& lora_right, double lora_scaling,
                  const c10::optional<at::Tensor>& bias) {
  if (lora_left.has_value() && lora_left->size(1) > 0)
    out.addmm_(lora_left->to(out.scalar_type()), lora_right->to(out.scalar_type()).t(), 1.0, lora_scaling);
  if (bias.has_value()) out.add_(*bias);
}

// CPU rows of x up to which the fused kernel beats dequantize + GEMM (see FUSED_MAX_ROWS in
// lora_kernels/ops.py, which keeps the same table and says how it was measured). Used for route 0.
constexpr int64_t kCpuFusedMaxRows = 4;

// The per-thread scratch buffer of the CPU dequant + GEMM route: it grows to the largest weight
// this thread has multiplied (one copy in the compute dtype) and is kept for the next call.
at::Tensor cpu_scratch(int64_t numel, at::ScalarType dtype) {
  thread_local at::Tensor scratch;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (!scratch.defined() || scratch.numel() < nbytes) scratch = empty_cpu(nbytes, at::kByte);
  return scratch.narrow(0, 0, nbytes).view(dtype);
}

at::Tensor nf4_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax,
                          const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                          int64_t blocksize, int64_t rows, int64_t cols, bool transpose,
                          const c10::optional<at::Tensor>& lora_left, const c10::optional<at::Tensor>& lora_right,
                          double lora_scaling, const c10::optional<at::Tensor>& bias, int64_t route) {
  MatmulArgs a = check_matmul(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols,
                              transpose, lora_left, lora_right, lora_scaling, bias);
  if (route == kAuto) route = a.fusable && a.M <= kCpuFusedMaxRows ? kFused : kDequantGemm;
  TORCH_CHECK(route == kDequantGemm || (route == kFused && a.fusable),
              "lora_kernels: the fused CPU route needs a forward matmul with in_features a multiple of the "
              "blocksize; got route ", route, ", transpose=", transpose, ", in_features=", cols);
  const auto dtype = x.scalar_type();
  if (a.M == 0) return at::empty({a.M, a.N}, x.options());
  if (route == kFused) {
    auto out = at::empty({a.M, a.N}, x.options());
    cpu::nf4_linear_fused(x.data_ptr(), to_dtype(dtype), a.M, a.w, a.epi, out.data_ptr());
    return out;
  }
  // One dequantized copy of W in a scratch buffer that this thread keeps for its next call, then
  // one GEMM (oneDNN: AMX / AVX-512 where the CPU has them). Reusing the buffer matters: faulting
  // in fresh pages cost more than the dequantization itself. Measured here (Xeon, 2 threads),
  // this beat dequantizing tiles into an L2-sized buffer with one GEMM per tile: small GEMMs lose
  // more to oneDNN's per-call packing than the cache saves.
  at::Tensor wt = cpu_scratch(rows * cols, dtype).view({rows, cols});
  cpu::dequantize_nf4(a.w.packed, a.w.scales, blocksize, rows * cols, wt.data_ptr(), to_dtype(dtype));
  at::Tensor out = transpose ? at::mm(x, wt) : at::mm(x, wt.t());
  add_epilogue(out, lora_left, lora_right, lora_scaling, bias);
  return out;
}

// What the CPU kernels use here: the instruction set detected, capped by LORA_KERNELS_CPU_ISA.
std::string cpu_isa_name() {
  switch (cpu::cpu_isa()) {
    case cpu::Isa::kAvx512Bf16: return "avx512bf16";
    case cpu::Isa::kAvx512: return "avx512";
    case cpu::Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

#ifdef LK_WITH_CUDA
void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "lora_kernels: CUDA ", what, " launch failed with cudaError ", err);
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& w, int64_t blocksize) {
  c10::cuda::CUDAGuard guard(w.device());
  auto [packed, absmax] = quantize_outputs(w, blocksize);
  check_launch(cuda::quantize_nf4(w.data_ptr(), to_dtype(w.scalar_type()), w.numel(), blocksize,
                                  packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "quantize_nf4");
  return {packed, absmax};
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(packed.device());
  const BlockScales s = scales_of(packed, absmax, nested_absmax, nested_code, offset, blocksize, numel);
  // The kernel reads the packed bytes four at a time; a view at an odd offset is copied first.
  const at::Tensor bytes = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 ? packed.clone() : packed;
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  check_launch(cuda::dequantize_nf4(bytes.data_ptr<uint8_t>(), s, blocksize, numel, out.data_ptr(), to_dtype(dtype),
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "dequantize_nf4");
  return out;
}

// Forward at M <= kDecodeMaxRows: the decode kernel (reads the packed bytes and scales directly).
// Otherwise, and for the backward's dx: dequantize into a buffer from the caching allocator (so it
// is reused from call to call), cuBLAS, then the epilogue in place.
at::Tensor nf4_matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const c10::optional<at::Tensor>& nested_absmax,
                           const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t rows, int64_t cols, bool transpose,
                           const c10::optional<at::Tensor>& lora_left, const c10::optional<at::Tensor>& lora_right,
                           double lora_scaling, const c10::optional<at::Tensor>& bias, int64_t route) {
  c10::cuda::CUDAGuard guard(x.device());
  MatmulArgs a = check_matmul(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols,
                              transpose, lora_left, lora_right, lora_scaling, bias);
  const bool aligned = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  const bool decodable = a.fusable && aligned && x.scalar_type() != at::kFloat && a.M <= cuda::kDecodeMaxRows;
  if (route == kAuto) route = decodable ? kFused : kDequantGemm;
  TORCH_CHECK(route == kDequantGemm || (route == kFused && decodable),
              "lora_kernels: the CUDA decode kernel needs a forward matmul of at most ", cuda::kDecodeMaxRows,
              " bf16/fp16 rows, in_features a multiple of the blocksize and 16-byte aligned inputs; got M=", a.M,
              ", transpose=", transpose, ", in_features=", cols, ", dtype=", x.scalar_type());
  auto out = at::empty({a.M, a.N}, x.options());
  if (a.M == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  if (route == kFused) {
    check_launch(cuda::nf4_linear_decode(x.data_ptr(), to_dtype(x.scalar_type()), a.M, a.w, a.epi, out.data_ptr(),
                                         stream),
                 "nf4_linear_decode");
    return out;
  }
  const at::Tensor bytes = reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 ? packed.clone() : packed;
  at::Tensor wt = at::empty({rows, cols}, x.options());
  check_launch(cuda::dequantize_nf4(bytes.data_ptr<uint8_t>(), a.w.scales, blocksize, rows * cols, wt.data_ptr(),
                                    to_dtype(x.scalar_type()), stream),
               "dequantize_nf4");
  out = transpose ? at::mm(x, wt) : at::mm(x, wt.t());
  add_epilogue(out, lora_left, lora_right, lora_scaling, bias);
  return out;
}
#endif

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels_C, m) {
  m.def("quantize_nf4(Tensor w, int blocksize) -> (Tensor, Tensor)");
  m.def("double_quantize(Tensor absmax, Tensor lut) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def("cpu_isa() -> str", &lora_kernels::cpu_isa_name);
  m.def(
      "nf4_matmul(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int rows, int cols, bool transpose, Tensor? lora_left, Tensor? lora_right, "
      "float lora_scaling, Tensor? bias, int route) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CPU, m) {
  m.impl("quantize_nf4", &lora_kernels::quantize_nf4_cpu);
  m.impl("double_quantize", &lora_kernels::double_quantize_cpu);
  m.impl("dequantize_nf4", &lora_kernels::dequantize_nf4_cpu);
  m.impl("nf4_matmul", &lora_kernels::nf4_matmul_cpu);
}

#ifdef LK_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("quantize_nf4", &lora_kernels::quantize_nf4_cuda);
  m.impl("dequantize_nf4", &lora_kernels::dequantize_nf4_cuda);
  m.impl("nf4_matmul", &lora_kernels::nf4_matmul_cuda);
}
#endif

// `import lora_kernels._C` only needs a module to exist; the ops register when the library loads.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
