// Torch glue: op schemas in the private namespace lora_kernels_C, input checks, and the CPU and
// CUDA registrations. The public ops (torch.ops.lora_kernels.*) are defined in lora_kernels/ops.py
// and call these. Loaded as `lora_kernels._C`, a Python module with no Python functions.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef LK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels.h"

#include <cstdlib>
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
#endif

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels_C, m) {
  m.def("quantize_nf4(Tensor w, int blocksize) -> (Tensor, Tensor)");
  m.def("double_quantize(Tensor absmax, Tensor lut) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int blocksize, int numel, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CPU, m) {
  m.impl("quantize_nf4", &lora_kernels::quantize_nf4_cpu);
  m.impl("double_quantize", &lora_kernels::double_quantize_cpu);
  m.impl("dequantize_nf4", &lora_kernels::dequantize_nf4_cpu);
}

#ifdef LK_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("quantize_nf4", &lora_kernels::quantize_nf4_cuda);
  m.impl("dequantize_nf4", &lora_kernels::dequantize_nf4_cuda);
}
#endif

// `import lora_kernels._C` only needs a module to exist; the ops register when the library loads.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
