// The torch binding of the C++ kernels: registers the CPU and CUDA kernels to the `lora_kernels::`
// ops, whose schemas are defined in lora_kernels/_ops.py (so they exist without this library too),
// and checks at this boundary what no caller should send. The route of nf4_matmul is chosen by
// lora_kernels/routes.py; a kernel here refuses a route that cannot take its inputs and says which
// rule broke. Loaded as `lora_kernels._C`, a Python module with no Python functions.
//
// Built a second time, test-only, as `lora_kernels._C_emulated` (LK_EMULATED_EXTENSION, setup.py
// with LORA_KERNELS_CUDA_EMULATE=1): the CUDA glue below on CPU tensors, calling the csrc/cuda/
// kernels compiled for the CPU emulator (csrc/cuda/emulate.h), registered to the same schemas in the
// namespace `lora_kernels_emulated::` (lora_kernels/backends/cuda_emulated.py).
#if defined(LK_EMULATED_EXTENSION)
#define LK_CUDA_GLUE 1
#define LK_OPS lora_kernels_emulated
#define LK_CUDA_KEY CPU
#define LK_MODULE_INIT PyInit__C_emulated
#define LK_MODULE_NAME "_C_emulated"
#else
#define LK_OPS lora_kernels
#define LK_CUDA_KEY CUDA
#define LK_MODULE_INIT PyInit__C
#define LK_MODULE_NAME "_C"
#if defined(LK_WITH_CUDA)
#define LK_CUDA_GLUE 1
#endif
#endif

#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef LK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// the device of the tensor current, and the stream the kernels go on
#define LK_DEVICE_GUARD(device) c10::cuda::CUDAGuard guard(device)
#define LK_CURRENT_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#else
#define LK_DEVICE_GUARD(device) (void)(device)
#define LK_CURRENT_STREAM() nullptr  // the emulator runs a launch synchronously
#endif

#include "kernels.h"
#include "nf4.h"
#include "cpu/isa.h"

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>
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
  TORCH_CHECK(is_supported_blocksize(blocksize), "lora_kernels: blocksize must be a power of two from ",
              kMinBlocksize, " to ", kMaxBlocksize, ", got ", blocksize);
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

// The NF4 weight as the ops pass it: [packed, absmax, nested_absmax, nested_code, offset], the
// last three None for plain fp32 scales (NF4Weight.tensors in lora_kernels/nf4.py).
using WeightList = c10::List<std::optional<at::Tensor>>;

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

// Checks the weight bundle of a [rows, cols] NF4 matrix (dequantize passes [1, numel]) and turns it
// into the kernels' struct. The pointers live as long as the caller's tensors.
Nf4Matrix nf4_matrix(const WeightList& weight, int64_t blocksize, int64_t rows, int64_t cols) {
  check_blocksize(blocksize);
  TORCH_CHECK(rows > 0 && cols > 0, "lora_kernels: the weight's shape must be positive, got [", rows, ", ", cols, "]");
  TORCH_CHECK(weight.size() == 5, "lora_kernels: the NF4 weight is [packed, absmax, nested_absmax, nested_code, ",
              "offset], got ", weight.size(), " tensors");
  const std::optional<at::Tensor> packed = weight.get(0), absmax = weight.get(1), nested_absmax = weight.get(2),
                                  nested_code = weight.get(3), offset = weight.get(4);
  TORCH_CHECK(packed.has_value() && absmax.has_value(), "lora_kernels: the NF4 weight needs packed and absmax");
  const int64_t numel = rows * cols, nblocks = (numel + blocksize - 1) / blocksize;
  const auto device = packed->device();
  check_tensor(*packed, "packed", at::kByte, (numel + 1) / 2, device);
  Nf4Matrix w;
  w.packed = packed->data_ptr<uint8_t>();
  w.rows = rows;
  w.cols = cols;
  w.blocksize = blocksize;
  if (!nested_absmax.has_value()) {
    check_tensor(*absmax, "absmax", at::kFloat, nblocks, device);
    w.scales.absmax = absmax->data_ptr<float>();
    return w;
  }
  TORCH_CHECK(nested_code.has_value() && offset.has_value(),
              "lora_kernels: nested_absmax, nested_code and offset come together");
  check_tensor(*absmax, "absmax (double-quantized codes)", at::kByte, nblocks, device);
  check_tensor(*nested_absmax, "nested_absmax", at::kFloat, (nblocks + kNestedBlocksize - 1) / kNestedBlocksize,
               device);
  check_tensor(*nested_code, "nested_code", at::kFloat, 256, device);
  check_tensor(*offset, "offset", at::kFloat, 1, device);
  w.scales.codes = absmax->data_ptr<uint8_t>();
  w.scales.nested_absmax = nested_absmax->data_ptr<float>();
  w.scales.nested_code = nested_code->data_ptr<float>();
  w.scales.offset = offset->data_ptr<float>();
  return w;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// ---- nf4_matmul: out = out_scale * (x . deq(W)^T + lora_scaling * left . right^T) + bias (x . deq(W) transposed) ----

enum class Route { kFused, kDequantGemm };

struct MatmulCall {
  Nf4Matrix w;
  Epilogue epi;
  int64_t M = 0, N = 0, K = 0;
  bool transpose = false;
  Route route = Route::kDequantGemm;
};

// Per-row adapters (Epilogue::token_slots): lora_left [M, R], lora_right [slots, N, R] of one dtype,
// token_slots int32 [M], slot_ranks int32 [slots], slot_scalings fp32 [slots]; forward only, no
// out_scale. The slot values themselves (-1 <= t < slots, 0 <= rank <= R) are the caller's promise
// (api.py and the pool check them): reading them here would stop a CUDA stream.
void check_slots(const at::Tensor& x, MatmulCall& c, const std::optional<at::Tensor>& lora_left,
                 const std::optional<at::Tensor>& lora_right, const std::optional<at::Tensor>& token_slots,
                 const std::optional<at::Tensor>& slot_ranks, const std::optional<at::Tensor>& slot_scalings,
                 const std::optional<at::Tensor>& out_scale) {
  TORCH_CHECK(lora_left.has_value() && lora_right.has_value() && slot_ranks.has_value() && slot_scalings.has_value(),
              "lora_kernels: token_slots comes with lora_left, lora_right, slot_ranks and slot_scalings");
  TORCH_CHECK(!c.transpose && !out_scale.has_value(), "lora_kernels: per-row adapters are forward-only, without ",
              "out_scale");
  const auto& l = *lora_left;
  const auto& r = *lora_right;
  TORCH_CHECK(l.dim() == 2 && r.dim() == 3 && l.size(0) == c.M && r.size(1) == c.N && l.size(1) == r.size(2) &&
                  l.size(1) > 0 && r.size(0) > 0,
              "lora_kernels: with token_slots, lora_left must be [", c.M, ", R] and lora_right [slots, ", c.N,
              ", R], got ", l.sizes(), " and ", r.sizes());
  TORCH_CHECK(l.scalar_type() == r.scalar_type() && l.is_contiguous() && r.is_contiguous(),
              "lora_kernels: lora_left and lora_right must be contiguous and of one dtype");
  TORCH_CHECK(l.device() == x.device() && r.device() == x.device(), "lora_kernels: LoRA factors on another device");
  const int64_t slots = r.size(0);
  check_tensor(*token_slots, "token_slots", at::kInt, c.M, x.device());
  check_tensor(*slot_ranks, "slot_ranks", at::kInt, slots, x.device());
  check_tensor(*slot_scalings, "slot_scalings", at::kFloat, slots, x.device());
  c.epi.lora_left = l.data_ptr();
  c.epi.lora_right = r.data_ptr();
  c.epi.lora_dtype = to_dtype(l.scalar_type());
  c.epi.rank = l.size(1);
  c.epi.token_slots = token_slots->data_ptr<int32_t>();
  c.epi.slot_ranks = slot_ranks->data_ptr<int32_t>();
  c.epi.slot_scalings = slot_scalings->data_ptr<float>();
}

// The checks every backend's nf4_matmul shares, and the rules of the fused route common to the CPU
// and CUDA kernels (each adds its own).
MatmulCall check_matmul(const at::Tensor& x, const WeightList& weight, int64_t blocksize, int64_t rows, int64_t cols,
                        bool transpose, const std::optional<at::Tensor>& lora_left,
                        const std::optional<at::Tensor>& lora_right, double lora_scaling,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale,
                        const std::optional<at::Tensor>& token_slots, const std::optional<at::Tensor>& slot_ranks,
                        const std::optional<at::Tensor>& slot_scalings, c10::string_view route) {
  MatmulCall c;
  c.w = nf4_matrix(weight, blocksize, rows, cols);
  c.transpose = transpose;
  to_dtype(x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lora_kernels: nf4_matmul takes a contiguous 2-D x, got ", x.sizes());
  TORCH_CHECK(x.device() == weight.get(0)->device(), "lora_kernels: x is on ", x.device(), ", the weight on ",
              weight.get(0)->device());
  c.M = x.size(0);
  c.K = transpose ? rows : cols;
  c.N = transpose ? cols : rows;
  TORCH_CHECK(x.size(1) == c.K, "lora_kernels: x has ", x.size(1), " features, the weight expects ", c.K);
  if (token_slots.has_value()) {
    check_slots(x, c, lora_left, lora_right, token_slots, slot_ranks, slot_scalings, out_scale);
  } else if (lora_left.has_value()) {
    TORCH_CHECK(lora_right.has_value(), "lora_kernels: lora_left and lora_right come together");
    const auto& l = *lora_left;
    const auto& r = *lora_right;
    TORCH_CHECK(l.dim() == 2 && r.dim() == 2 && l.size(0) == c.M && r.size(0) == c.N && l.size(1) == r.size(1),
                "lora_kernels: lora_left must be [", c.M, ", r] and lora_right [", c.N, ", r], got ", l.sizes(),
                " and ", r.sizes());
    TORCH_CHECK(l.scalar_type() == r.scalar_type() && l.is_contiguous() && r.is_contiguous(),
                "lora_kernels: lora_left and lora_right must be contiguous and of one dtype");
    TORCH_CHECK(l.device() == x.device() && r.device() == x.device(), "lora_kernels: LoRA factors on another device");
    c.epi.lora_left = l.data_ptr();
    c.epi.lora_right = r.data_ptr();
    c.epi.lora_dtype = to_dtype(l.scalar_type());
    c.epi.rank = l.size(1);
    c.epi.lora_scaling = static_cast<float>(lora_scaling);
  }
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x.scalar_type(), c.N, x.device());
    c.epi.bias = bias->data_ptr();
  }
  if (out_scale.has_value()) {
    // fp32 whatever the output dtype: the scale is applied to the fp32 accumulator
    check_tensor(*out_scale, "out_scale", at::kFloat, c.N, x.device());
    c.epi.out_scale = out_scale->data_ptr<float>();
  }
  if (route == "fused") {
    c.route = Route::kFused;
    TORCH_CHECK(!transpose, "lora_kernels: the fused route is forward-only; route a transposed nf4_matmul to "
                "dequant_gemm");
    TORCH_CHECK(cols % blocksize == 0, "lora_kernels: the fused route needs in_features (", cols,
                ") to be a multiple of the blocksize (", blocksize, "); route it to dequant_gemm");
  } else {
    TORCH_CHECK(route == "dequant_gemm", "lora_kernels: nf4_matmul's route is \"fused\" or \"dequant_gemm\", got \"",
                route, "\"");
  }
  return c;
}

// dst = scale * src + bias per column (src, dst [M, N] contiguous, of one dtype; scale fp32 [N];
// bias [N] of that dtype or none), in fp32 with one rounding, in one pass: torch's own ops would
// make an fp32 copy of src first, which on the CPU costs more than the arithmetic (a fresh buffer
// page-faults; mixed-dtype elementwise kernels are not vectorized). dst may be src.
void scale_columns_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  const int64_t M = src.size(0), N = src.size(1);
  const float* factor = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scale_columns_cpu", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    const scalar_t* add = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
    at::parallel_for(0, M, grain, [&](int64_t first, int64_t last) {
      for (int64_t m = first; m < last; ++m) {
        for (int64_t n = 0; n < N; ++n) {
          float v = static_cast<float>(in[m * N + n]) * factor[n];
          if (add != nullptr) v += static_cast<float>(add[n]);
          out[m * N + n] = static_cast<scalar_t>(v);
        }
      }
    });
  });
}

// The unfused epilogue. Without out_scale, in the output dtype: out += lora_scaling * left . right^T;
// out += bias. With it, out = out_scale * (out + lora term) + bias, the scale and the bias in fp32
// and rounded once to the output dtype, as the fused kernels do (the LoRA addmm stays in the output
// dtype, as without the scale).
void add_epilogue(at::Tensor& out, const std::optional<at::Tensor>& lora_left,
                  const std::optional<at::Tensor>& lora_right, double lora_scaling,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale) {
  if (lora_left.has_value() && lora_left->size(1) > 0)
    out.addmm_(lora_left->to(out.scalar_type()), lora_right->to(out.scalar_type()).t(), 1.0, lora_scaling);
  if (out_scale.has_value()) {
    if (out.is_cpu()) {
      scale_columns_cpu(out, out, *out_scale, bias);
      return;
    }
    at::Tensor scaled = out.to(at::kFloat).mul_(*out_scale);
    if (bias.has_value()) scaled.add_(*bias);
    out.copy_(scaled);
    return;
  }
  if (bias.has_value()) out.add_(*bias);
}

// The dequant_gemm route of the CPU and CUDA kernels: `multiply()` returns x . deq(W)^T (or x . deq(W)
// when transposed) [M, N] in x's dtype, made by dequantizing W and one vendor GEMM (oneDNN, cuBLAS),
// then the epilogue in place. With per-row adapters, `expand(out)` adds each row's own LoRA term (in
// fp32, rounded once), then the bias is added.
template <typename Multiply, typename Expand>
at::Tensor dequant_gemm(const MatmulCall& c, Multiply&& multiply, Expand&& expand,
                        const std::optional<at::Tensor>& lora_left, const std::optional<at::Tensor>& lora_right,
                        double lora_scaling, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& out_scale) {
  at::Tensor out = multiply();
  if (c.epi.token_slots != nullptr) {
    expand(out);
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  add_epilogue(out, lora_left, lora_right, lora_scaling, bias, out_scale);
  return out;
}

#if !defined(LK_EMULATED_EXTENSION)  // the CPU kernels group rows by slot on host memory
// The rows of each slot ([slot] -> rows), from host tensors, every value checked on the way: each
// token_slots entry is -1 or a slot, each slot's rank within 0..max_rank (the kernels trust them).
std::vector<std::vector<int64_t>> checked_rows_by_slot(const at::Tensor& token_slots, const at::Tensor& slot_ranks,
                                                       int64_t slots, int64_t max_rank) {
  const int32_t* ranks = slot_ranks.data_ptr<int32_t>();
  for (int64_t t = 0; t < slots; ++t)
    TORCH_CHECK(ranks[t] >= 0 && ranks[t] <= max_rank, "lora_kernels: slot ", t, " has rank ", ranks[t],
                ", outside 0..", max_rank);
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(slots));
  const int32_t* slot_of = token_slots.data_ptr<int32_t>();
  for (int64_t m = 0; m < token_slots.numel(); ++m) {
    TORCH_CHECK(slot_of[m] >= -1 && slot_of[m] < slots, "lora_kernels: token_slots[", m, "] = ", slot_of[m],
                " is not a slot (-1 to ", slots - 1, ")");
    if (slot_of[m] >= 0) rows[slot_of[m]].push_back(m);
  }
  return rows;
}
#endif

// Per-row adapter checks the CPU and CUDA lora_shrink share; returns the stride rank R.
int64_t check_shrink(const at::Tensor& x, const at::Tensor& lora_A_slots, const at::Tensor& token_slots,
                     const at::Tensor& slot_ranks) {
  to_dtype(x.scalar_type());
  to_dtype(lora_A_slots.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lora_kernels: lora_shrink takes a contiguous 2-D x, got ", x.sizes());
  TORCH_CHECK(lora_A_slots.dim() == 3 && lora_A_slots.is_contiguous() && lora_A_slots.size(0) > 0 &&
                  lora_A_slots.size(1) > 0 && lora_A_slots.size(2) == x.size(1),
              "lora_kernels: lora_A_slots must be contiguous [slots, R, ", x.size(1), "], got ", lora_A_slots.sizes());
  TORCH_CHECK(lora_A_slots.device() == x.device(), "lora_kernels: lora_A_slots is on ", lora_A_slots.device(),
              ", x on ", x.device());
  check_tensor(token_slots, "token_slots", at::kInt, x.size(0), x.device());
  check_tensor(slot_ranks, "slot_ranks", at::kInt, lora_A_slots.size(0), x.device());
  return lora_A_slots.size(1);
}

// ---- the CPU kernels ----
#if !defined(LK_EMULATED_EXTENSION)
std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& w, int64_t blocksize) {
  auto [packed, absmax] = quantize_outputs(w, blocksize);
  cpu::quantize_nf4(w.data_ptr(), to_dtype(w.scalar_type()), w.numel(), blocksize, packed.data_ptr<uint8_t>(),
                    absmax.data_ptr<float>());
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax, const at::Tensor& code) {
  TORCH_CHECK(absmax.dim() == 1 && absmax.numel() > 0, "lora_kernels: absmax must be a non-empty flat tensor");
  check_tensor(absmax, "absmax", at::kFloat, absmax.numel(), absmax.device());
  check_tensor(code, "code", at::kFloat, 256, absmax.device());
  const int64_t n = absmax.numel();
  // torch's own mean, so the offset is the bits bitsandbytes stores
  const at::Tensor offset = absmax.mean();
  auto codes = at::empty({n}, absmax.options().dtype(at::kByte));
  auto nested = at::empty({(n + kNestedBlocksize - 1) / kNestedBlocksize}, absmax.options());
  cpu::quantize_scales_8bit(absmax.data_ptr<float>(), n, offset.item<float>(), code.data_ptr<float>(),
                            codes.data_ptr<uint8_t>(), nested.data_ptr<float>());
  return {codes, nested, offset};
}

at::Tensor dequantize_nf4_cpu(const WeightList& weight, int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const Nf4Matrix w = nf4_matrix(weight, blocksize, 1, numel);
  auto out = empty_cpu(numel, dtype);
  cpu::dequantize_nf4(w.packed, w.scales, blocksize, numel, out.data_ptr(), to_dtype(dtype));
  return out;
}

// The CPU's dequant + GEMM route multiplies W a tile at a time: the tile dequantized into this
// thread's scratch buffer (kept from call to call: faulting in fresh pages cost more than the
// dequantization itself), then one oneDNN GEMM on it, multi-threaded. Forward (x [M, cols]), tiles
// of rows of W give columns of out; transposed (dx = dy . deq(W)), tiles of columns of W give
// columns of dx, so each output element is still one GEMM's sum over the whole reduction. A tile
// holds kTileBytes, or kMinTile rows or columns where those are larger (never the whole bf16 W of a
// large layer; dx of a 128256 x 4096 head takes 256 columns, 64 MB, a sixteenth of it). Measured
// here (Xeon, 2 threads, bf16, M = 512 / 2048, 4096x4096, 11008x4096 and 4096x11008, 2026-12-01):
// tiles of 512 rows or columns ran up to 1.9x slower than one whole GEMM at M = 512, while tiles of
// 2048 ran as fast (within this machine's run-to-run spread).
constexpr int64_t kTileBytes = int64_t{16} << 20;
constexpr int64_t kMinTile = 256;

// How many rows (or columns) of W a tile takes, each of `width` elements: a multiple of 64 unless it
// is all `total`.
int64_t tile_extent(int64_t total, int64_t width, int64_t element_size) {
  const int64_t fits = kTileBytes / (std::max<int64_t>(width, 1) * element_size) / 64 * 64;
  const int64_t extent = std::max(kMinTile, fits);
  return extent >= total ? total : extent;
}

at::Tensor cpu_scratch(int64_t rows, int64_t cols, at::ScalarType dtype) {
  thread_local at::Tensor scratch;
  const int64_t nbytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
  if (!scratch.defined() || scratch.numel() < nbytes) scratch = empty_cpu(nbytes, at::kByte);
  return scratch.narrow(0, 0, nbytes).view(dtype).view({rows, cols});
}

// x . deq(W)^T [M, rows] (or x . deq(W) [M, cols] when transposed), a tile of W at a time.
at::Tensor tiled_gemm_cpu(const at::Tensor& x, const MatmulCall& c) {
  const int64_t rows = c.w.rows, cols = c.w.cols;
  const auto dtype = x.scalar_type();
  const DType kernel_dtype = to_dtype(dtype);
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor out = at::empty({c.M, c.N}, x.options());
  if (!c.transpose) {
    const int64_t extent = tile_extent(rows, cols, element_size);
    for (int64_t n0 = 0; n0 < rows; n0 += extent) {
      const int64_t n1 = std::min(rows, n0 + extent);
      at::Tensor tile = cpu_scratch(n1 - n0, cols, dtype);
      cpu::dequantize_nf4_tile(c.w, n0, n1, 0, cols, tile.data_ptr(), cols, kernel_dtype);
      if (n1 - n0 == rows) return at::mm_out(out, x, tile.t());
      at::Tensor columns = out.narrow(1, n0, n1 - n0);
      at::mm_out(columns, x, tile.t());
    }
    return out;
  }
  const int64_t extent = tile_extent(cols, rows, element_size);
  for (int64_t k0 = 0; k0 < cols; k0 += extent) {
    const int64_t k1 = std::min(cols, k0 + extent);
    at::Tensor tile = cpu_scratch(rows, k1 - k0, dtype);
    cpu::dequantize_nf4_tile(c.w, 0, rows, k0, k1, tile.data_ptr(), k1 - k0, kernel_dtype);
    if (k1 - k0 == cols) return at::mm_out(out, x, tile);
    at::Tensor columns = out.narrow(1, k0, k1 - k0);
    at::mm_out(columns, x, tile);
  }
  return out;
}

at::Tensor nf4_matmul_cpu(const at::Tensor& x, const WeightList& weight, int64_t blocksize, int64_t rows, int64_t cols,
                          bool transpose, const std::optional<at::Tensor>& lora_left,
                          const std::optional<at::Tensor>& lora_right, double lora_scaling,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale,
                          const std::optional<at::Tensor>& token_slots, const std::optional<at::Tensor>& slot_ranks,
                          const std::optional<at::Tensor>& slot_scalings, c10::string_view route) {
  const MatmulCall c = check_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling,
                                    bias, out_scale, token_slots, slot_ranks, slot_scalings, route);
  const auto dtype = x.scalar_type();
  if (c.M == 0) return at::empty({0, c.N}, x.options());
  if (token_slots.has_value()) {  // the kernels trust the slot values: checked here, on host memory
    checked_rows_by_slot(*token_slots, *slot_ranks, lora_right->size(0), lora_left->size(1));
  }
  if (c.route == Route::kFused) {
    auto out = at::empty({c.M, c.N}, x.options());
    cpu::nf4_matmul_fused(x.data_ptr(), to_dtype(dtype), c.M, c.w, c.epi, out.data_ptr());
    return out;
  }
  const auto multiply = [&] { return tiled_gemm_cpu(x, c); };
  const auto expand = [&](at::Tensor& out) { cpu::lora_expand(out.data_ptr(), to_dtype(dtype), c.M, c.N, c.epi); };
  return dequant_gemm(c, multiply, expand, lora_left, lora_right, lora_scaling, bias, out_scale);
}


// The op lora_shrink on the CPU. A batch on one adapter (every decode step of a single user) takes
// the very product the single-adapter layer makes, x.to(A.dtype) . A^T in one vendor GEMM, so its
// rows are bit for bit what that layer computes; a mixed batch takes the kernel (cpu/multi_lora.cpp),
// one parallel region for every row and slot.
at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_A_slots, const at::Tensor& token_slots,
                           const at::Tensor& slot_ranks) {
  const int64_t max_rank = check_shrink(x, lora_A_slots, token_slots, slot_ranks);
  const int64_t M = x.size(0), slots = lora_A_slots.size(0);
  const auto rows = checked_rows_by_slot(token_slots, slot_ranks, slots, max_rank);
  for (int64_t t = 0; t < slots && M > 0; ++t) {
    if (static_cast<int64_t>(rows[t].size()) != M) continue;
    at::Tensor xa = at::zeros({M, max_rank}, lora_A_slots.options());
    const int64_t rank = slot_ranks.data_ptr<int32_t>()[t];
    if (rank > 0) xa.narrow(1, 0, rank).copy_(at::mm(x.to(lora_A_slots.scalar_type()), lora_A_slots[t].narrow(0, 0, rank).t()));
    return xa;
  }
  at::Tensor xa = at::empty({M, max_rank}, lora_A_slots.options());
  const at::Tensor x32 = x.to(at::kFloat);  // ATen's vectorized cast, once; the kernel reads fp32 rows
  cpu::lora_shrink(x32.data_ptr(), DType::kFP32, M, x.size(1), lora_A_slots.data_ptr(),
                   to_dtype(lora_A_slots.scalar_type()), max_rank, token_slots.data_ptr<int32_t>(),
                   slot_ranks.data_ptr<int32_t>(), xa.data_ptr());
  return xa;
}

// The op scale_columns (lora_kernels/_ops.py): t * scale + bias per column, into a new tensor.
at::Tensor scale_columns_op_cpu(const at::Tensor& t, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "lora_kernels: scale_columns takes a contiguous 2-D t, got ",
              t.sizes());
  to_dtype(t.scalar_type());
  check_tensor(scale, "scale", at::kFloat, t.size(1), t.device());
  if (bias.has_value()) check_tensor(*bias, "bias", t.scalar_type(), t.size(1), t.device());
  at::Tensor out = empty_cpu(t.numel(), t.scalar_type()).view(t.sizes());
  if (t.numel() > 0) scale_columns_cpu(t, out, scale, bias);
  return out;
}

std::string isa_name(cpu::Isa isa) {
  switch (isa) {
    case cpu::Isa::kAmx: return "amx";
    case cpu::Isa::kAvx512Bf16: return "avx512bf16";
    case cpu::Isa::kAvx512: return "avx512";
    case cpu::Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// What the CPU kernels use here: the instruction set detected, capped by LORA_KERNELS_CPU_ISA.
std::string cpu_isa_name() { return isa_name(cpu::cpu_isa()); }
// What this machine could run, whatever the cap: the paths above it go untested here.
std::string cpu_isa_hardware_name() { return isa_name(cpu::hardware_isa()); }
#endif  // !LK_EMULATED_EXTENSION

#ifdef LK_CUDA_GLUE
void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "lora_kernels: CUDA ", what, " launch failed with cudaError ", err, " (",
              cuda::error_string(err), ")");
}

// The CUDA dequantize kernel reads the packed bytes four at a time: a view at an odd offset is
// copied first, and the scale pointers stay those of the caller's tensors.
at::Tensor packed_for_dequantize(const WeightList& weight) {
  const at::Tensor packed = *weight.get(0);
  return reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 ? packed.clone() : packed;
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& w, int64_t blocksize) {
  LK_DEVICE_GUARD(w.device());
  auto [packed, absmax] = quantize_outputs(w, blocksize);
  check_launch(cuda::quantize_nf4(w.data_ptr(), to_dtype(w.scalar_type()), w.numel(), blocksize,
                                  packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                  LK_CURRENT_STREAM()),
               "quantize_nf4");
  return {packed, absmax};
}

at::Tensor dequantize_nf4_cuda(const WeightList& weight, int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const Nf4Matrix w = nf4_matrix(weight, blocksize, 1, numel);
  const at::Tensor bytes = packed_for_dequantize(weight);
  LK_DEVICE_GUARD(bytes.device());
  auto out = at::empty({numel}, bytes.options().dtype(dtype));
  check_launch(cuda::dequantize_nf4(bytes.data_ptr<uint8_t>(), w.scales, blocksize, numel, out.data_ptr(),
                                    to_dtype(dtype), LK_CURRENT_STREAM()),
               "dequantize_nf4");
  return out;
}

at::Tensor nf4_matmul_cuda(const at::Tensor& x, const WeightList& weight, int64_t blocksize, int64_t rows,
                           int64_t cols, bool transpose, const std::optional<at::Tensor>& lora_left,
                           const std::optional<at::Tensor>& lora_right, double lora_scaling,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale,
                           const std::optional<at::Tensor>& token_slots, const std::optional<at::Tensor>& slot_ranks,
                           const std::optional<at::Tensor>& slot_scalings, c10::string_view route) {
  LK_DEVICE_GUARD(x.device());
  const MatmulCall c = check_matmul(x, weight, blocksize, rows, cols, transpose, lora_left, lora_right, lora_scaling,
                                    bias, out_scale, token_slots, slot_ranks, slot_scalings, route);
  if (c.M == 0) return at::empty({0, c.N}, x.options());
  const auto dtype = x.scalar_type();
  const auto stream = LK_CURRENT_STREAM();
  if (c.route == Route::kFused) {
    TORCH_CHECK(dtype != at::kFloat, "lora_kernels: the CUDA fused route takes bf16 or fp16 x, got float32; route ",
                "it to dequant_gemm");
    TORCH_CHECK(c.M <= cuda::kDecodeMaxRows, "lora_kernels: the CUDA fused route takes at most ",
                cuda::kDecodeMaxRows, " rows, got M=", c.M, "; route it to dequant_gemm");
    TORCH_CHECK(aligned16(x) && aligned16(*weight.get(0)), "lora_kernels: the CUDA fused route needs x and the ",
                "packed bytes on 16-byte boundaries; route it to dequant_gemm");
    auto out = at::empty({c.M, c.N}, x.options());
    check_launch(cuda::nf4_matmul_fused(x.data_ptr(), to_dtype(dtype), c.M, c.w, c.epi, out.data_ptr(), stream),
                 "nf4_matmul_fused");
    return out;
  }
  const at::Tensor bytes = packed_for_dequantize(weight);
  const auto multiply = [&] {
    // The whole deq(W), from the caching allocator, so it is reused from call to call.
    at::Tensor buffer = at::empty({rows, cols}, x.options());
    check_launch(cuda::dequantize_nf4(bytes.data_ptr<uint8_t>(), c.w.scales, blocksize, rows * cols, buffer.data_ptr(),
                                      to_dtype(dtype), stream),
                 "dequantize_nf4");
    return c.transpose ? at::mm(x, buffer) : at::mm(x, buffer.t());
  };
  const auto expand = [&](at::Tensor& out) {
    check_launch(cuda::lora_expand(out.data_ptr(), to_dtype(dtype), c.M, c.N, c.epi, stream), "lora_expand");
  };
  return dequant_gemm(c, multiply, expand, lora_left, lora_right, lora_scaling, bias, out_scale);
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_A_slots, const at::Tensor& token_slots,
                            const at::Tensor& slot_ranks) {
  LK_DEVICE_GUARD(x.device());
  const int64_t max_rank = check_shrink(x, lora_A_slots, token_slots, slot_ranks);
  at::Tensor xa = at::empty({x.size(0), max_rank}, lora_A_slots.options());
  if (x.size(0) == 0) return xa;  // an empty batch: nothing to launch (its slot map has no data pointer)
  check_launch(cuda::lora_shrink(x.data_ptr(), to_dtype(x.scalar_type()), x.size(0), x.size(1), lora_A_slots.data_ptr(),
                                 to_dtype(lora_A_slots.scalar_type()), max_rank, token_slots.data_ptr<int32_t>(),
                                 slot_ranks.data_ptr<int32_t>(), xa.data_ptr(), LK_CURRENT_STREAM()),
               "lora_shrink");
  return xa;
}
#endif  // LK_CUDA_GLUE

}  // namespace
}  // namespace lora_kernels

#if !defined(LK_EMULATED_EXTENSION)
TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def("cpu_isa() -> str", &lora_kernels::cpu_isa_name);
  m.def("cpu_isa_hardware() -> str", &lora_kernels::cpu_isa_hardware_name);
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("quantize_nf4", &lora_kernels::quantize_nf4_cpu);
  m.impl("double_quantize", &lora_kernels::double_quantize_cpu);
  m.impl("dequantize_nf4", &lora_kernels::dequantize_nf4_cpu);
  m.impl("nf4_matmul", &lora_kernels::nf4_matmul_cpu);
  m.impl("scale_columns", &lora_kernels::scale_columns_op_cpu);
  m.impl("lora_shrink", &lora_kernels::lora_shrink_cpu);
}
#endif

#ifdef LK_CUDA_GLUE
TORCH_LIBRARY_IMPL(LK_OPS, LK_CUDA_KEY, m) {
  m.impl("quantize_nf4", &lora_kernels::quantize_nf4_cuda);
  m.impl("dequantize_nf4", &lora_kernels::dequantize_nf4_cuda);
  m.impl("nf4_matmul", &lora_kernels::nf4_matmul_cuda);
  m.impl("lora_shrink", &lora_kernels::lora_shrink_cuda);
}
#endif

// `import lora_kernels._C` only needs a module to exist; the kernels register when the library loads.
extern "C" PyObject* LK_MODULE_INIT(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, LK_MODULE_NAME, nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
