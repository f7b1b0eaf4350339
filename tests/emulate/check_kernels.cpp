// The CUDA launchers (csrc/kernels.h, namespace cuda) on the CPU emulator, without torch, so that
// the kernels can run under AddressSanitizer: every buffer is a heap allocation of exactly the size
// the contract names, so a read or write one byte past a tail is reported. Built and driven by
// tests/test_cuda_emulated_asan.py, which writes the inputs, runs this program once over all cases
// and compares the outputs with lora_kernels/reference.py.
//
//   check_kernels CASE_DIR...   each CASE_DIR holds `spec` (one "key value" a line) and the inputs
//                               as raw files; the outputs are written beside them
//   check_kernels --selftest    the emulator's own checks (tests/emulate/selftest.cu)
//
// spec keys: op (quantize | dequantize | matmul | shrink | expand), dtype (bf16 | fp16 | fp32), n,
// blocksize, offset (quantize: elements of padding before w, to run the unaligned kernel), M, rows,
// cols, rank, lora_dtype, lora_scaling, double_quant (0 | 1). A matmul's optional inputs are there
// when their files are: lora_left.bin + lora_right.bin, bias.bin (the output dtype), out_scale.bin
// (fp32 [rows]); with token_slots.bin (int32 [M]) + slot_ranks.bin (int32 [slots]) + slot_scalings.bin
// (fp32 [slots]) the LoRA factors are per-row adapters (lora_right [slots, rows, rank]).
// Many adapters (multi_lora.cu), the same slot files: shrink reads x.bin ([M, cols] of dtype) and
// A.bin ([slots, rank, cols] of lora_dtype) and writes xa to out.bin ([M, rank] of lora_dtype);
// expand adds the per-row term of lora_left.bin [M, rank] and lora_right.bin [slots, rows, rank] to
// out_in.bin ([M, rows] of dtype) and writes the sum to out.bin.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"

int run_selftest();  // tests/emulate/selftest.cu

namespace {

using lora_kernels::DType;

// A heap buffer of exactly `size` bytes, 16-byte aligned (the kernels' vector loads need that; the
// sanitizer still watches the byte after the end).
struct Buffer {
  unsigned char* base = nullptr;
  unsigned char* data = nullptr;
  size_t size = 0;
  Buffer() = default;
  Buffer(size_t bytes, size_t offset = 0) : size(bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 16, offset + bytes + (offset + bytes == 0 ? 1 : 0)) != 0) std::abort();
    base = static_cast<unsigned char*>(p);
    data = base + offset;
    std::memset(base, 0xA5, offset + bytes);  // garbage, not zeros, where nothing was written
  }
  Buffer(Buffer&& other) noexcept : base(other.base), data(other.data), size(other.size) { other.base = nullptr; }
  Buffer& operator=(Buffer&& other) noexcept {
    std::swap(base, other.base);
    std::swap(data, other.data);
    std::swap(size, other.size);
    return *this;
  }
  ~Buffer() { std::free(base); }
};

std::string join(const std::string& dir, const std::string& name) { return dir + "/" + name; }

bool exists(const std::string& path) { return std::ifstream(path).good(); }

Buffer load(const std::string& path, size_t offset = 0) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    std::fprintf(stderr, "check_kernels: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  const size_t bytes = static_cast<size_t>(in.tellg());
  in.seekg(0);
  Buffer b(bytes, offset);
  in.read(reinterpret_cast<char*>(b.data), static_cast<std::streamsize>(bytes));
  return b;
}

void store(const std::string& path, const Buffer& b) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(b.data), static_cast<std::streamsize>(b.size));
}

std::map<std::string, std::string> read_spec(const std::string& dir) {
  std::map<std::string, std::string> spec;
  std::ifstream in(join(dir, "spec"));
  std::string key, value;
  while (in >> key >> value) spec[key] = value;
  return spec;
}

DType dtype_of(const std::string& name) {
  if (name == "bf16") return DType::kBF16;
  if (name == "fp16") return DType::kFP16;
  return DType::kFP32;
}
size_t element_size(DType d) { return d == DType::kFP32 ? 4 : 2; }

// The weight's scales as the launchers read them, from the files the case holds.
struct Scales {
  Buffer absmax, codes, nested_absmax, nested_code, offset;
  lora_kernels::BlockScales view;
  explicit Scales(const std::string& dir, bool double_quant) {
    if (double_quant) {
      codes = load(join(dir, "codes.bin"));
      nested_absmax = load(join(dir, "nested_absmax.bin"));
      nested_code = load(join(dir, "nested_code.bin"));
      offset = load(join(dir, "offset.bin"));
      view.codes = codes.data;
      view.nested_absmax = reinterpret_cast<const float*>(nested_absmax.data);
      view.nested_code = reinterpret_cast<const float*>(nested_code.data);
      view.offset = reinterpret_cast<const float*>(offset.data);
    } else {
      absmax = load(join(dir, "absmax.bin"));
      view.absmax = reinterpret_cast<const float*>(absmax.data);
    }
  }
};

// Per-row adapters: the slot map, ranks and scalings a case holds, set on `epi` (none: left as is).
struct Slots {
  Buffer token_slots, slot_ranks, slot_scalings;
  Slots(const std::string& dir, lora_kernels::Epilogue& epi) {
    if (!exists(join(dir, "token_slots.bin"))) return;
    token_slots = load(join(dir, "token_slots.bin"));
    slot_ranks = load(join(dir, "slot_ranks.bin"));
    slot_scalings = load(join(dir, "slot_scalings.bin"));
    epi.token_slots = reinterpret_cast<const int32_t*>(token_slots.data);
    epi.slot_ranks = reinterpret_cast<const int32_t*>(slot_ranks.data);
    epi.slot_scalings = reinterpret_cast<const float*>(slot_scalings.data);
  }
};

int run_case(const std::string& dir) {
  auto spec = read_spec(dir);
  const std::string op = spec["op"];
  const DType dtype = dtype_of(spec["dtype"]);
  const int64_t blocksize = std::atoll(spec["blocksize"].c_str());
  int err = 0;
  if (op == "quantize") {
    const int64_t n = std::atoll(spec["n"].c_str());
    const size_t offset = std::atoll(spec["offset"].c_str()) * element_size(dtype);
    Buffer w = load(join(dir, "w.bin"), offset);
    Buffer packed((n + 1) / 2), absmax(((n + blocksize - 1) / blocksize) * 4);
    err = lora_kernels::cuda::quantize_nf4(w.data, dtype, n, blocksize, packed.data,
                                           reinterpret_cast<float*>(absmax.data), nullptr);
    store(join(dir, "out_packed.bin"), packed);
    store(join(dir, "out_absmax.bin"), absmax);
  } else if (op == "dequantize") {
    const int64_t n = std::atoll(spec["n"].c_str());
    Buffer packed = load(join(dir, "packed.bin"));
    Scales scales(dir, spec["double_quant"] == "1");
    Buffer out(n * element_size(dtype));
    err = lora_kernels::cuda::dequantize_nf4(packed.data, scales.view, blocksize, n, out.data, dtype, nullptr);
    store(join(dir, "out.bin"), out);
  } else if (op == "matmul") {
    const int64_t M = std::atoll(spec["M"].c_str());
    lora_kernels::Nf4Matrix w;
    Buffer packed = load(join(dir, "packed.bin"));
    Scales scales(dir, spec["double_quant"] == "1");
    w.packed = packed.data;
    w.scales = scales.view;
    w.rows = std::atoll(spec["rows"].c_str());
    w.cols = std::atoll(spec["cols"].c_str());
    w.blocksize = blocksize;
    Buffer x = load(join(dir, "x.bin"));
    Buffer left, right, bias, out_scale;
    lora_kernels::Epilogue epi;
    if (exists(join(dir, "lora_left.bin"))) {
      left = load(join(dir, "lora_left.bin"));
      right = load(join(dir, "lora_right.bin"));
      epi.lora_left = left.data;
      epi.lora_right = right.data;
      epi.lora_dtype = dtype_of(spec["lora_dtype"]);
      epi.rank = std::atoll(spec["rank"].c_str());
      epi.lora_scaling = std::strtof(spec["lora_scaling"].c_str(), nullptr);
    }
    Slots slots(dir, epi);
    if (exists(join(dir, "bias.bin"))) {
      bias = load(join(dir, "bias.bin"));
      epi.bias = bias.data;
    }
    if (exists(join(dir, "out_scale.bin"))) {
      out_scale = load(join(dir, "out_scale.bin"));
      epi.out_scale = reinterpret_cast<const float*>(out_scale.data);
    }
    Buffer out(M * w.rows * element_size(dtype));
    err = lora_kernels::cuda::nf4_matmul_fused(x.data, dtype, M, w, epi, out.data, nullptr);
    store(join(dir, "out.bin"), out);
  } else if (op == "shrink") {
    const int64_t M = std::atoll(spec["M"].c_str()), K = std::atoll(spec["cols"].c_str());
    const int64_t rank = std::atoll(spec["rank"].c_str());
    const DType a_dtype = dtype_of(spec["lora_dtype"]);
    Buffer x = load(join(dir, "x.bin")), A = load(join(dir, "A.bin"));
    lora_kernels::Epilogue epi;
    Slots slots(dir, epi);
    Buffer xa(M * rank * element_size(a_dtype));
    err = lora_kernels::cuda::lora_shrink(x.data, dtype, M, K, A.data, a_dtype, rank, epi.token_slots, epi.slot_ranks,
                                          xa.data, nullptr);
    store(join(dir, "out.bin"), xa);
  } else if (op == "expand") {
    const int64_t M = std::atoll(spec["M"].c_str()), N = std::atoll(spec["rows"].c_str());
    Buffer out = load(join(dir, "out_in.bin")), left = load(join(dir, "lora_left.bin"));
    Buffer right = load(join(dir, "lora_right.bin"));
    lora_kernels::Epilogue epi;
    epi.lora_left = left.data;
    epi.lora_right = right.data;
    epi.lora_dtype = dtype_of(spec["lora_dtype"]);
    epi.rank = std::atoll(spec["rank"].c_str());
    Slots slots(dir, epi);
    err = lora_kernels::cuda::lora_expand(out.data, dtype, M, N, epi, nullptr);
    store(join(dir, "out.bin"), out);
  } else {
    std::fprintf(stderr, "check_kernels: %s: unknown op '%s'\n", dir.c_str(), op.c_str());
    return 2;
  }
  if (err != 0) {
    std::fprintf(stderr, "check_kernels: %s: %s failed: %s\n", dir.c_str(), op.c_str(),
                 lora_kernels::cuda::error_string(err));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // what ran is printed even if the sanitizer stops us
  if (argc == 2 && std::string(argv[1]) == "--selftest") return run_selftest();
  int failures = 0;
  for (int i = 1; i < argc; ++i) failures += run_case(argv[i]) != 0;
  std::printf("%d cases, %d failed\n", argc - 1, failures);
  return failures == 0 ? 0 : 1;
}
