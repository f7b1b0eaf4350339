// Fused NF4 matmul with AMX tiles, for bf16 x: out [M, N] = x [M, K] . deq(W)^T + epilogue. No
// dequantized copy of W is ever written to memory: each thread decodes a panel of 16 weight rows
// (16 x K bf16, at most 16 x 32768 x 2 bytes; 128 KB for K = 4096, in L2) from the packed bytes,
// multiplies it with every row of x in AMX tiles (tdpbf16ps: a 16 x 32 bf16 tile times a 32 x 16 one
// into 16 x 16 fp32 accumulators), and writes its 16 output columns through the epilogue.
//
// The product is computed transposed, out^T [N, M] = deq(W) [N, K] . x^T [K, M], so that the decoded
// panel is the A operand in its natural row-major order (one vpermw gives 32 weights of a row), and x,
// which is small, is the operand rearranged: staged once a call as pairs of bf16 (the B operand's
// "VNNI" layout: row p of a B tile holds, for each of 16 rows m of x, x[m, 2p] and x[m, 2p + 1]),
// padded with zero rows to a multiple of 16. Each accumulator tile is then out^T for 16 weight rows
// and 16 rows of x; the epilogue reads it a row of x at a time (16 outputs).
//
// Accumulation: tdpbf16ps adds exact bf16 products in fp32 (Intel SDM, TDPBF16PS), as the AVX-512
// BF16 kernel does, in another order; the output is rounded to bf16 once. The epilogue is the
// AVX-512 kernel's, vectorized over 16 outputs with the same operations in the same order.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../kernels.h"
#include "../nf4.h"
#include "isa.h"
#include "scales.h"

namespace lora_kernels {
namespace cpu {

#if defined(__x86_64__)
namespace {

constexpr int kTile = 16;       // rows of every tile; also the columns (fp32 or bf16 pairs) of B and C
constexpr int kTileK = 32;      // bf16 elements of K per tile step
constexpr int kMaxCTiles = 4;   // accumulator tiles: rows of x multiplied per pass over the panel = 64
// Tile registers: 0..3 the accumulators, 4 the panel's A tile, 5 and 6 x's B tiles (the intrinsics
// take the register number as a literal).
constexpr int kUsedTiles = 7;

// The tile configuration (Intel SDM, LDTILECFG): palette 1, every tile used 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < kUsedTiles; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTile;
  }
  return cfg;
}

float element(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case DType::kFP16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// x [M, K] bf16 -> the B tiles: tile (step s, block b) holds pairs p = 16 s .. 16 s + 15 of rows
// m = 16 b .. 16 b + 15, at xt + (s * blocks + b) * 256, row p - 16 s, column m - 16 b; rows of x
// past M are zeros.
void stage_x_pairs(const c10::BFloat16* x, int64_t M, int64_t K, int64_t blocks, uint32_t* xt) {
  const int64_t steps = K / kTileK;
  at::parallel_for(0, steps, 16, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      uint32_t* step = xt + s * blocks * kTile * kTile;
      std::memset(step, 0, sizeof(uint32_t) * blocks * kTile * kTile);
      for (int64_t m = 0; m < M; ++m) {
        uint32_t pairs[kTile];
        std::memcpy(pairs, x + m * K + s * kTileK, sizeof(pairs));
        uint32_t* dst = step + (m / kTile) * kTile * kTile + m % kTile;
        for (int p = 0; p < kTile; ++p) dst[p * kTile] = pairs[p];
      }
    }
  });
}

// Weight rows n0 .. n0 + rows - 1 decoded to bf16 into a panel of K / 32 A tiles, each 16 rows x 32
// contiguous (1 KB; a panel row-major [16, K] would put a tile's rows 2K bytes apart, all in one L1
// set); rows past `rows` are zeros.
LK_TARGET_AMX void decode_panel(const Nf4Matrix& w, int64_t n0, int64_t rows, c10::BFloat16* panel) {
  const int64_t K = w.cols, blocks_per_row = K / w.blocksize;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = w.packed + (n0 + r) * K / 2;
    const int64_t first_block = (n0 + r) * blocks_per_row;
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const __m512i table = bf16_table(block_scale(w.scales, first_block + b));
      for (int64_t c = b * w.blocksize; c < (b + 1) * w.blocksize; c += kTileK) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes + c / 2 + 1024), _MM_HINT_T0);
        _mm512_storeu_si512(panel + (c / kTileK * kTile + r) * kTileK, decode32_bf16(bytes + c / 2, table));
      }
    }
  }
  for (int64_t r = rows; r < kTile; ++r)
    for (int64_t c = 0; c < K; c += kTileK)
      std::memset(panel + (c / kTileK * kTile + r) * kTileK, 0, sizeof(c10::BFloat16) * kTileK);
}

// acc tiles 0 .. C-1 = panel . x^T for x's row blocks first_block .. first_block + C - 1.
template <int C>
LK_TARGET_AMX void multiply_panel(const c10::BFloat16* panel, int64_t K, const uint32_t* xt, int64_t blocks,
                                  int64_t first_block) {
  static_assert(C >= 1 && C <= kMaxCTiles, "accumulator tiles 0..3");
  _tile_zero(0);
  if (C > 1) _tile_zero(1);
  if (C > 2) _tile_zero(2);
  if (C > 3) _tile_zero(3);
  const int64_t steps = K / kTileK;
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, panel + s * kTile * kTileK, 64);
    const uint32_t* b = xt + (s * blocks + first_block) * kTile * kTile;
    _tile_loadd(5, b, 64);
    if (C > 1) _tile_loadd(6, b + kTile * kTile, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (C > 1) _tile_dpbf16ps(1, 4, 6);
    if (C > 2) {
      _tile_loadd(5, b + 2 * kTile * kTile, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (C > 3) {
      _tile_loadd(6, b + 3 * kTile * kTile, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
}

template <int C>
LK_TARGET_AMX void store_accumulators(float* acc) {
  _tile_stored(0, acc, 64);
  if (C > 1) _tile_stored(1, acc + kTile * kTile, 64);
  if (C > 2) _tile_stored(2, acc + 2 * kTile * kTile, 64);
  if (C > 3) _tile_stored(3, acc + 3 * kTile * kTile, 64);
}

using PanelStep = void (*)(const c10::BFloat16*, int64_t, const uint32_t*, int64_t, int64_t, float*);

template <int C>
LK_TARGET_AMX void panel_step(const c10::BFloat16* panel, int64_t K, const uint32_t* xt, int64_t blocks,
                              int64_t first_block, float* acc) {
  multiply_panel<C>(panel, K, xt, blocks, first_block);
  store_accumulators<C>(acc);
}

PanelStep panel_step_for(int tiles) {
  switch (tiles) {
    case 1: return &panel_step<1>;
    case 2: return &panel_step<2>;
    case 3: return &panel_step<3>;
    default: return &panel_step<4>;
  }
}

// The epilogue of one row m of x for the panel's `cols` outputs n0 .. n0 + cols - 1, 16 at a time:
//   out[m, n] = out_scale[n] * (acc + scaling * sum_j left[m, j] * right[n, j]) + bias[n]
// with the fused AVX-512 kernel's operations in its order (multiply, then add: no FMA).
// `acc`: the row's accumulators, 16 apart; `right_t`: the row's right factor for these outputs,
// transposed to [rank, 16] fp32.
LK_TARGET_AMX void epilogue_row(const float* acc, const RowLora& term, DType lora_dtype, const float* right_t,
                                const Epilogue& epi, int64_t m, int64_t n0, int64_t cols, int64_t N,
                                c10::BFloat16* out) {
  const __mmask16 valid = static_cast<__mmask16>((1u << cols) - 1);
  __m512 v = _mm512_i32gather_ps(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                                                     2, 1, 0),
                                                    _mm512_set1_epi32(kTile)),
                                 acc, 4);
  __m512 lora = _mm512_setzero_ps();
  for (int64_t j = 0; j < term.rank; ++j)
    lora = _mm512_add_ps(lora, _mm512_mul_ps(_mm512_set1_ps(element(term.left, lora_dtype, j)),
                                             _mm512_loadu_ps(right_t + j * kTile)));
  v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(term.scaling), lora));
  if (epi.out_scale != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(valid, epi.out_scale + n0));
  __m512 bias = _mm512_setzero_ps();
  if (epi.bias != nullptr) {
    const __m256i b16 = _mm256_maskz_loadu_epi16(valid, static_cast<const c10::BFloat16*>(epi.bias) + n0);
    bias = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16));
  }
  _mm256_mask_storeu_epi16(out + m * N + n0, valid, round_to_bf16_16(_mm512_add_ps(v, bias)));
}

// Panels first .. last - 1 of out (16 output columns each), on this thread's tiles. A group of
// panels is decoded at once (about 1 MB, in L2) and each group of 64 rows of x (its B tiles, K / 2 x
// 64 x 4 bytes) multiplies every panel of it, so that neither is read again from beyond L2.
LK_TARGET_AMX void panels_amx(int64_t first, int64_t last, int64_t M, const uint32_t* xt, int64_t x_blocks,
                              const Nf4Matrix& w, const Epilogue& epi, c10::BFloat16* out) {
  const int64_t N = w.rows, K = w.cols;
  const int64_t group = std::clamp<int64_t>((int64_t{1} << 20) / (kTile * K * 2), 1, 16);
  const TileConfig cfg = full_tiles();
  _tile_loadconfig(&cfg);
  // Scratch kept by the thread between calls (allocating and zeroing 1 MB a call cost more than the
  // decode); every element read is written first.
  thread_local std::unique_ptr<c10::BFloat16[]> panel_scratch;
  thread_local int64_t panel_capacity = 0;
  if (panel_capacity < group * kTile * K) {
    panel_scratch.reset(new c10::BFloat16[group * kTile * K]);
    panel_capacity = group * kTile * K;
  }
  c10::BFloat16* panels = panel_scratch.get();
  float acc[kMaxCTiles * kTile * kTile];
  const int64_t rank_stride = std::max<int64_t>(epi.rank, 1) * kTile;
  std::vector<float> right_t(static_cast<size_t>(group * rank_stride));
  std::vector<const void*> transposed(static_cast<size_t>(group));  // the right factor in right_t, a panel
  std::vector<int64_t> transposed_rank(static_cast<size_t>(group));
  for (int64_t g0 = first; g0 < last; g0 += group) {
    const int64_t count = std::min<int64_t>(group, last - g0);
    for (int64_t i = 0; i < count; ++i) {
      decode_panel(w, (g0 + i) * kTile, std::min<int64_t>(kTile, N - (g0 + i) * kTile), panels + i * kTile * K);
      transposed[i] = nullptr;
    }
    for (int64_t b0 = 0; b0 < x_blocks; b0 += kMaxCTiles) {
      const int tiles = static_cast<int>(std::min<int64_t>(kMaxCTiles, x_blocks - b0));
      for (int64_t i = 0; i < count; ++i) {
        const int64_t n0 = (g0 + i) * kTile, cols = std::min<int64_t>(kTile, N - n0);
        float* rt = right_t.data() + i * rank_stride;
        panel_step_for(tiles)(panels + i * kTile * K, K, xt, x_blocks, b0, acc);
        for (int64_t m = b0 * kTile; m < std::min<int64_t>(M, (b0 + tiles) * kTile); ++m) {
          const RowLora term = row_lora(epi, m, N);
          if (term.rank > 0 && (term.right != transposed[i] || term.rank > transposed_rank[i])) {
            for (int64_t j = 0; j < term.rank; ++j)
              for (int64_t c = 0; c < kTile; ++c)
                rt[j * kTile + c] = c < cols ? element(term.right, epi.lora_dtype, (n0 + c) * epi.rank + j) : 0.f;
            transposed[i] = term.right;
            transposed_rank[i] = term.rank;
          }
          const int64_t local = m - b0 * kTile;
          epilogue_row(acc + (local / kTile) * kTile * kTile + local % kTile, term, epi.lora_dtype, rt, epi,
                       m, n0, cols, N, out);
        }
      }
    }
  }
  _tile_release();
}

void matmul_amx(const c10::BFloat16* x, int64_t M, const Nf4Matrix& w, const Epilogue& epi, c10::BFloat16* out) {
  const int64_t x_blocks = (M + kTile - 1) / kTile;
  std::vector<uint32_t> xt(static_cast<size_t>(w.cols / 2 * x_blocks * kTile));
  stage_x_pairs(x, M, w.cols, x_blocks, xt.data());
  const int64_t panels = (w.rows + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, panels / (4 * at::get_num_threads())));
  at::parallel_for(0, panels, grain, [&](int64_t first, int64_t last) {
    panels_amx(first, last, M, xt.data(), x_blocks, w, epi, out);
  });
}

}  // namespace
#endif

void nf4_matmul_amx(const void* x, int64_t M, const Nf4Matrix& w, const Epilogue& epi, void* out) {
#if defined(__x86_64__)
  matmul_amx(static_cast<const c10::BFloat16*>(x), M, w, epi, static_cast<c10::BFloat16*>(out));
#endif
}

}  // namespace cpu
}  // namespace lora_kernels
