// Fused NF4 matmul with AMX tiles, for bf16 x: out [M, N] = x [M, K] . deq(W)^T + epilogue. No
// dequantized copy of W is ever written to memory: each thread decodes 16 weight rows at a time from
// the packed bytes into A tiles (a slice of K in L1 for M <= 64, the whole row panel in L2 above),
// multiplies them with every row of x in AMX tiles (tdpbf16ps: a 16 x 32 bf16 tile times a 32 x 16
// one into 16 x 16 fp32 accumulators), and writes its 16 output columns through the epilogue.
//
// The product is computed transposed, out^T [N, M] = deq(W) [N, K] . x^T [K, M], so that the decoded
// weights are the A operand, rows as they come out of the packed bytes, and x, which is small, is the
// operand rearranged: staged once a call as pairs of bf16 (the B operand's "VNNI" layout), in the
// order of K the decode produces, padded with zero rows to a multiple of 16. Each accumulator tile is
// then out^T for 16 weight rows and 16 rows of x; the epilogue reads it a row of x at a time.
//
// Accumulation: tdpbf16ps adds exact bf16 products in fp32 (Intel SDM, TDPBF16PS), as the AVX-512
// BF16 kernel does, in another order; the output is rounded to bf16 once. The epilogue is the
// AVX-512 kernel's, vectorized over 16 outputs with the same operations in the same order.
// Needs K % 64 == 0 and blocksize >= 64 (a 32-byte load within one block).
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
#include "elements.h"
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

// The order of K inside the tiles. A 64-element chunk c of a weight row is 32 packed bytes; its 32
// high nibbles (elements 64c + 2q) fill tile step 2c and its 32 low nibbles (elements 64c + 2q + 1)
// step 2c + 1, slot q, which is what two table lookups of the zero-extended bytes give (below). The
// product sums over K, so any order does as long as x's B tiles follow it: step 2c + e, pair p holds
// x[64c + 4p + e] and x[64c + 4p + 2 + e].
//
// x [M, K] bf16 -> the B tiles: tile (step s, block b) holds pairs p of rows m = 16 b .. 16 b + 15,
// at xt + (s * blocks + b) * 256, row p, column m - 16 b; rows of x past M are zeros.
void stage_x_pairs(const c10::BFloat16* x, int64_t M, int64_t K, int64_t blocks, uint32_t* xt) {
  const int64_t chunks = K / 64;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  at::parallel_for(0, chunks, 8, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      uint32_t* steps = xt + 2 * c * blocks * kTile * kTile;  // steps 2c and 2c + 1
      std::memset(steps, 0, sizeof(uint32_t) * 2 * blocks * kTile * kTile);
      for (int64_t m = 0; m < M; ++m) {
        const uint16_t* xm = bits + m * K + 64 * c;
        for (int e = 0; e < 2; ++e) {
          uint32_t* dst = steps + (e * blocks + m / kTile) * kTile * kTile + m % kTile;
          for (int p = 0; p < kTile; ++p)
            dst[p * kTile] = uint32_t{xm[4 * p + e]} | (uint32_t{xm[4 * p + 2 + e]} << 16);
        }
      }
    }
  });
}

// Weight rows n0 .. n0 + rows - 1, elements k0 .. k0 + width - 1 (whole 64-element chunks), decoded
// to bf16 into width / 32 A tiles of 16 rows x 32 (1 KB each, contiguous: a row-major [16, K] panel
// would put a tile's rows 2K bytes apart, all in one L1 set); rows past `rows` are zeros. Each chunk
// of 64 gives its even elements to one tile step and its odd ones to the next (decode64_bf16).
// `scales`: the panel's block scales [16 rows][K / blocksize], `normal`: whether each row's are all
// in bf16_table_normal's range (panel_scales).
LK_TARGET_AMX void decode_tiles(const Nf4Matrix& w, int64_t n0, int64_t rows, int64_t k0, int64_t width,
                                c10::BFloat16* tiles, const float* scales, const bool* normal) {
  const int64_t K = w.cols, bs = w.blocksize, blocks_per_row = K / bs;
  const int64_t b0 = k0 / bs, b1 = (k0 + width - 1) / bs;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = w.packed + (n0 + r) * K / 2;
    const float* row_scales = scales + r * blocks_per_row;
    for (int64_t b = b0; b <= b1; ++b) {
      const __m512i table = decode_table(row_scales[b], normal[r]);
      const int64_t begin = std::max(k0, b * bs), end = std::min(k0 + width, (b + 1) * bs);
      for (int64_t k = begin; k < end; k += 64) {
        __m512i even, odd;
        decode64_bf16(bytes + k / 2, table, &even, &odd);
        c10::BFloat16* step = tiles + ((k - k0) / kTileK * kTile + r) * kTileK;
        _mm512_storeu_si512(step, even);
        _mm512_storeu_si512(step + kTile * kTileK, odd);
      }
    }
  }
  for (int64_t r = rows; r < kTile; ++r)
    for (int64_t k = 0; k < width; k += kTileK)
      std::memset(tiles + (k / kTileK * kTile + r) * kTileK, 0, sizeof(c10::BFloat16) * kTileK);
}

// The block scales of weight rows n0 .. n0 + rows - 1 into scales [16][K / blocksize], and per row
// whether all lie where bf16_table_normal is exact.
LK_TARGET_AMX void panel_scales(const Nf4Matrix& w, int64_t n0, int64_t rows, float* scales, bool* normal) {
  const int64_t blocks_per_row = w.cols / w.blocksize;
  for (int64_t r = 0; r < rows; ++r)
    normal[r] = block_scales(w.scales, (n0 + r) * blocks_per_row, blocks_per_row, scales + r * blocks_per_row);
}

// The accumulator tiles 0 .. C-1 (x's row blocks first_block .. first_block + C - 1): zeroed,
// advanced by `steps` A tiles (from `tiles`) times the B tiles of those steps (from `xt_steps`, the
// first of them), and stored to acc [C][16 outputs][16 rows of x].
template <int C>
LK_TARGET_AMX void zero_accumulators() {
  static_assert(C >= 1 && C <= kMaxCTiles, "accumulator tiles 0..3");
  _tile_zero(0);
  if (C > 1) _tile_zero(1);
  if (C > 2) _tile_zero(2);
  if (C > 3) _tile_zero(3);
}

template <int C>
LK_TARGET_AMX void accumulate(const c10::BFloat16* tiles, int64_t steps, const uint32_t* xt_steps, int64_t blocks,
                              int64_t first_block) {
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, tiles + s * kTile * kTileK, 64);
    const uint32_t* b = xt_steps + (s * blocks + first_block) * kTile * kTile;
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

struct TileOps {
  void (*zero)();
  void (*accumulate)(const c10::BFloat16*, int64_t, const uint32_t*, int64_t, int64_t);
  void (*store)(float*);
};

template <int C>
constexpr TileOps tile_ops_of() {
  return {&zero_accumulators<C>, &accumulate<C>, &store_accumulators<C>};
}

TileOps tile_ops(int tiles) {
  switch (tiles) {
    case 1: return tile_ops_of<1>();
    case 2: return tile_ops_of<2>();
    case 3: return tile_ops_of<3>();
    default: return tile_ops_of<4>();
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
    lora = _mm512_add_ps(lora, _mm512_mul_ps(_mm512_set1_ps(load_as_float(term.left, lora_dtype, j)),
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

// The epilogue's right factor for one panel, transposed to [rank, 16] fp32 when the row's adapter
// is not the one already there (one adapter: once a panel).
struct RightCache {
  float* values;
  const void* right = nullptr;
  int64_t rank = 0;

  void load(const RowLora& term, const Epilogue& epi, int64_t n0, int64_t cols) {
    if (term.rank == 0 || (term.right == right && term.rank <= rank)) return;
    for (int64_t j = 0; j < term.rank; ++j)
      for (int64_t c = 0; c < kTile; ++c)
        values[j * kTile + c] = c < cols ? load_as_float(term.right, epi.lora_dtype, (n0 + c) * epi.rank + j) : 0.f;
    right = term.right;
    rank = term.rank;
  }
};

// Rows of x in blocks first_block .. first_block + tiles - 1 (those below M) for one panel's outputs.
LK_TARGET_AMX void epilogue_rows(const float* acc, int64_t first_block, int tiles, int64_t M, const Epilogue& epi,
                                 RightCache& right, int64_t n0, int64_t cols, int64_t N, c10::BFloat16* out) {
  for (int64_t m = first_block * kTile; m < std::min<int64_t>(M, (first_block + tiles) * kTile); ++m) {
    const RowLora term = row_lora(epi, m, N);
    right.load(term, epi, n0, cols);
    const int64_t local = m - first_block * kTile;
    epilogue_row(acc + (local / kTile) * kTile * kTile + local % kTile, term, epi.lora_dtype, right.values, epi, m,
                 n0, cols, N, out);
  }
}

// Scratch a thread keeps between calls (allocating and faulting in fresh pages each call cost more
// than the decode); every element read is written first.
template <typename T>
T* thread_scratch(int slot, int64_t count) {
  thread_local std::unique_ptr<char[]> buffers[3];
  thread_local int64_t capacity[3] = {};
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  if (capacity[slot] < bytes) {
    buffers[slot].reset(new char[bytes + 64]);
    capacity[slot] = bytes;
  }
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffers[slot].get()) + 63) & ~uintptr_t{63});
}

// M <= 64: a panel's K is decoded kSliceK at a time (16 KB of A tiles, in L1) just before the
// tiles multiply it, the accumulators staying in tiles across the row. (Panels taking turns on a
// slice of K, so that x's B tiles stay in L1 too, measured slower: 16 panels x 16 rows read 256
// streams of W, which the prefetchers do not follow.)
constexpr int64_t kSliceK = 512;

// Panels first .. last - 1 of out (16 output columns each), on this thread's tiles.
//   M <= 64 (at most 4 accumulator tiles a panel): sliced, above.
//   M > 64: a group of panels (about 1 MB, in L2) is decoded whole, then each group of 64 rows of x
//     (its B tiles, K / 2 x 64 x 4 bytes) multiplies every panel of it, so neither is read again
//     from beyond L2.
LK_TARGET_AMX void panels_amx(int64_t first, int64_t last, int64_t M, const uint32_t* xt, int64_t x_blocks,
                              const Nf4Matrix& w, const Epilogue& epi, c10::BFloat16* out) {
  const int64_t N = w.rows, K = w.cols, blocks_per_row = K / w.blocksize;
  const TileConfig cfg = full_tiles();
  _tile_loadconfig(&cfg);
  const int64_t rank_stride = std::max<int64_t>(epi.rank, 1) * kTile;
  const bool sliced = x_blocks <= kMaxCTiles;
  const int64_t group = sliced ? 1 : std::clamp<int64_t>((int64_t{1} << 20) / (kTile * K * 2), 1, 16);
  float acc[kMaxCTiles * kTile * kTile];
  float* scales = thread_scratch<float>(2, group * kTile * blocks_per_row);
  bool normal[16 * kTile];
  float* right_t = thread_scratch<float>(1, group * rank_stride);
  std::vector<RightCache> rights;
  for (int64_t i = 0; i < group; ++i) rights.push_back(RightCache{right_t + i * rank_stride});
  c10::BFloat16* a_tiles = thread_scratch<c10::BFloat16>(0, sliced ? kTile * kSliceK : group * kTile * K);
  for (int64_t g0 = first; g0 < last; g0 += group) {
    const int64_t count = std::min<int64_t>(group, last - g0);
    const auto n0_of = [&](int64_t i) { return (g0 + i) * kTile; };
    const auto cols_of = [&](int64_t i) { return std::min<int64_t>(kTile, N - (g0 + i) * kTile); };
    for (int64_t i = 0; i < count; ++i) {
      panel_scales(w, n0_of(i), cols_of(i), scales + i * kTile * blocks_per_row, normal + i * kTile);
      rights[i].right = nullptr;
    }
    if (sliced) {  // group == 1
      const TileOps ops = tile_ops(static_cast<int>(x_blocks));
      ops.zero();
      for (int64_t k0 = 0; k0 < K; k0 += kSliceK) {
        const int64_t width = std::min<int64_t>(kSliceK, K - k0);
        decode_tiles(w, n0_of(0), cols_of(0), k0, width, a_tiles, scales, normal);
        ops.accumulate(a_tiles, width / kTileK, xt + k0 / kTileK * x_blocks * kTile * kTile, x_blocks, 0);
      }
      ops.store(acc);
      epilogue_rows(acc, 0, static_cast<int>(x_blocks), M, epi, rights[0], n0_of(0), cols_of(0), N, out);
      continue;
    }
    for (int64_t i = 0; i < count; ++i)
      decode_tiles(w, n0_of(i), cols_of(i), 0, K, a_tiles + i * kTile * K, scales + i * kTile * blocks_per_row,
                   normal + i * kTile);
    for (int64_t b0 = 0; b0 < x_blocks; b0 += kMaxCTiles) {
      const int tiles = static_cast<int>(std::min<int64_t>(kMaxCTiles, x_blocks - b0));
      const TileOps ops = tile_ops(tiles);
      for (int64_t i = 0; i < count; ++i) {
        ops.zero();
        ops.accumulate(a_tiles + i * kTile * K, K / kTileK, xt, x_blocks, b0);
        ops.store(acc);
        epilogue_rows(acc, b0, tiles, M, epi, rights[i], n0_of(i), cols_of(i), N, out);
      }
    }
  }
  _tile_release();
}

void matmul_amx(const c10::BFloat16* x, int64_t M, const Nf4Matrix& w, const Epilogue& epi, c10::BFloat16* out) {
  const int64_t x_blocks = (M + kTile - 1) / kTile;
  // 64-byte aligned: a B tile's rows are whole cache lines (a vector's 16-byte alignment made every
  // tile row straddle two lines: the multiply ran 3x slower).
  const size_t words = static_cast<size_t>(w.cols / 2 * x_blocks * kTile);
  std::unique_ptr<uint32_t[]> xt_storage(new uint32_t[words + 16]);
  uint32_t* xt = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(xt_storage.get()) + 63) & ~uintptr_t{63});
  stage_x_pairs(x, M, w.cols, x_blocks, xt);
  const int64_t panels = (w.rows + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, panels / (4 * at::get_num_threads())));
  at::parallel_for(0, panels, grain, [&](int64_t first, int64_t last) {
    panels_amx(first, last, M, xt, x_blocks, w, epi, out);
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
