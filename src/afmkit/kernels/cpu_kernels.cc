// afmkit's native CPU kernels, called from jitted code through XLA's FFI (afmkit/kernels/__init__.py
// compiles this file on first use). Two kernels, both for decoding, where XLA:CPU is slow:
//
// * packed_matmul: y[M, N] = x[M, K] @ W[K, N] for a weight stored packed: 4-bit (unsigned,
//   w = q * d + m) or 8-bit (signed, w = q * d) codes in blocks of 32 along K, with an fp16 scale d
//   and offset m per (output, block). Decode-sized M is memory-bound: reading 4- or 8-bit codes
//   instead of fp32 weights is the point, so codes are dequantized in registers, never in memory.
// * decode_attention: one query per row against the row's cached keys and values, reading only
//   the positions the row can see, straight from the cache (XLA copies a sliced cache first);
//   paged_decode_attention does the same through a paged cache's block table, block by block.
//   Both prefetch the positions two spans ahead (see Span).
// * lazy_zeros: a zeroed buffer whose pages the OS commits only when written (the paged KV pool:
//   allocated once at its largest, its memory follows the blocks in use).
//
// Packed layout (afmkit/model/packed.py writes it): outputs in tiles of 16, K in blocks of 32,
// and inside a block 16 pairs of k. For one pair (k, k + 1) a tile's 32 codes are 16 bytes at
// 4 bits (byte j = code[k][j] | code[k + 1][j] << 4) or 32 bytes at 8 bits (code[k][0..15], then
// code[k + 1][0..15]), so one vector lane is one output.
// packed: uint8 [N / 16, K / 32, 16 pairs, bytes per pair]; scales: fp16 [N / 16, K / 32, 2, 16]
// (d of the 16 outputs, then m).
//
// Rows of x are taken up to 16 at a time so the accumulators stay in registers. Work is shared out
// over XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "amx.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;   // outputs per tile
constexpr int kBlock = 32;  // k per block (one scale and offset)
constexpr int kPairs = kBlock / 2;
// AMX builds: every bf16 path sums a block as AMX does (amx.h); a block of 32 is one AMX product.
constexpr bool kAmxOrder = afmkit_amx::kOrder;
static_assert(kBlock == afmkit_amx::kInputs);

[[maybe_unused]] inline float half_to_float(uint16_t h) {
  // IEEE binary16 to binary32, exact (subnormals included).
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Problem {
  const float* x;
  const uint8_t* packed;
  const uint16_t* scales;
  float* y;
  int64_t m, k, n, bits;
  const uint16_t* x_bf16;  // x rounded to bf16 (set for the bf16 path), [M, K] (see prepare_bf16)
  const float* x_block_sums;  // fp32 sum of x over each block of 32, [M, K / 32]
  bool amx;                   // the bf16 GEMM on AMX tiles (AMX builds, where the OS grants them)
};

// Each path below has a row kernel (tile_*: R rows against one tile, the weights expanded from
// the codes in registers, again for every R rows) and, for many rows (prefill), a GEMM (gemm_*):
// a group of tiles' weights expanded once into a thread-local buffer, a chunk of K at a time so
// the buffer stays in L1, then R rows by T tiles at a time over it (see run_group). The expanded
// values and the order of every sum are the row kernel's, so a row gives the same bits whichever
// way its batch went.

// Where the fp32 GEMMs are in K: blocks [b0, b1); their accumulators wait in `state`
// ([M][tiles][2 chains][16] fp32) between chunks; the first chunk starts them at zero and the
// last writes y.
struct Chunk {
  int64_t b0, b1;
  float* state;
  bool first, last;
};

// A loaded vector kept in a register: otherwise the compiler folds the load into every FMA that
// uses it (one load per FMA), and the GEMMs below become limited by loads instead of FMAs.
template <typename V>
[[maybe_unused]] inline V in_register(V v) {
#if defined(__AVX2__) || defined(__AVX512F__)
  asm("" : "+v"(v));
#endif
  return v;
}

// Portable version (CPUs without AVX-512 or AVX2, e.g. ARM): the same arithmetic and summation order as
// the AVX-512 fp32 path, written as loops over the 16 outputs of a tile that the compiler
// vectorizes for whatever -march=native offers (-ffp-contract=off: q * d + m rounds twice wherever
// it is written, so expanded and in-place weights are equal).
inline void weights_portable(const Problem& p, const uint8_t* pb, const float* d, const float* m, float* w_even,
                             float* w_odd) {
  for (int j = 0; j < kTile; ++j) {
    const int even = p.bits == 4 ? pb[j] & 15 : static_cast<int8_t>(pb[j]);
    const int odd = p.bits == 4 ? pb[j] >> 4 : static_cast<int8_t>(pb[kTile + j]);
    w_even[j] = static_cast<float>(even) * d[j] + m[j];
    w_odd[j] = static_cast<float>(odd) * d[j] + m[j];
  }
}

template <int R>
void tile_portable(const Problem& p, int64_t tile, int64_t row0) {
  const int64_t blocks = p.k / kBlock, pair_bytes = p.bits == 4 ? 16 : 32;
  float acc[R][2][kTile] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* sc = p.scales + (tile * blocks + b) * 2 * kTile;
    float d[kTile], m[kTile];
    for (int j = 0; j < kTile; ++j) {
      d[j] = half_to_float(sc[j]);
      m[j] = half_to_float(sc[kTile + j]);
    }
    // This block's x, copied: reading x in place, GCC 12 vectorizes the row loop below into
    // loads that run past the end of x (caught by valgrind); a padded local copy is safe.
    float xs[R][kBlock + 16];
    for (int r = 0; r < R; ++r) std::memcpy(xs[r], p.x + (row0 + r) * p.k + b * kBlock, sizeof(float) * kBlock);
    const uint8_t* codes = p.packed + (tile * blocks + b) * kPairs * pair_bytes;
    for (int pair = 0; pair < kPairs; ++pair) {
      float w_even[kTile], w_odd[kTile];
      weights_portable(p, codes + pair * pair_bytes, d, m, w_even, w_odd);
      for (int r = 0; r < R; ++r) {
        const float* xr = xs[r] + 2 * pair;
        for (int j = 0; j < kTile; ++j) {
          acc[r][0][j] += w_even[j] * xr[0];
          acc[r][1][j] += w_odd[j] * xr[1];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTile; ++j) p.y[(row0 + r) * p.n + tile * kTile + j] = acc[r][0][j] + acc[r][1][j];
}

[[maybe_unused]] void tile_rows_portable(const Problem& p, int64_t tile) {
  int64_t r = 0;
  for (; r + 4 <= p.m; r += 4) tile_portable<4>(p, tile, r);
  for (; r < p.m; ++r) tile_portable<1>(p, tile, r);
}

// Prefill: one tile's weights of blocks [b0, b1), [pairs][even, odd][16] fp32.
[[maybe_unused]] void expand_portable(const Problem& p, int64_t tile, const Chunk& c, float* out) {
  const int64_t blocks = p.k / kBlock, pair_bytes = p.bits == 4 ? 16 : 32;
  for (int64_t b = c.b0; b < c.b1; ++b) {
    const uint16_t* sc = p.scales + (tile * blocks + b) * 2 * kTile;
    float d[kTile], m[kTile];
    for (int j = 0; j < kTile; ++j) {
      d[j] = half_to_float(sc[j]);
      m[j] = half_to_float(sc[kTile + j]);
    }
    const uint8_t* codes = p.packed + (tile * blocks + b) * kPairs * pair_bytes;
    for (int pair = 0; pair < kPairs; ++pair) {
      float* w = out + ((b - c.b0) * kPairs + pair) * 2 * kTile;
      weights_portable(p, codes + pair * pair_bytes, d, m, w, w + kTile);
    }
  }
}

template <int R>
void gemm_portable(const Problem& p, const float* expanded, int64_t tile, int64_t row0, const Chunk& c) {
  float acc[R][2][kTile] = {};
  float* state = c.state + row0 * 2 * kTile;
  if (!c.first) std::memcpy(acc, state, sizeof(acc));
  for (int64_t b = c.b0; b < c.b1; ++b) {
    float xs[R][kBlock + 16];  // as in tile_portable
    for (int r = 0; r < R; ++r) std::memcpy(xs[r], p.x + (row0 + r) * p.k + b * kBlock, sizeof(float) * kBlock);
    for (int pair = 0; pair < kPairs; ++pair) {
      const float* w_even = expanded + ((b - c.b0) * kPairs + pair) * 2 * kTile;
      const float* w_odd = w_even + kTile;
      for (int r = 0; r < R; ++r) {
        const float* xr = xs[r] + 2 * pair;
        for (int j = 0; j < kTile; ++j) {
          acc[r][0][j] += w_even[j] * xr[0];
          acc[r][1][j] += w_odd[j] * xr[1];
        }
      }
    }
  }
  if (!c.last) {
    std::memcpy(state, acc, sizeof(acc));
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTile; ++j) p.y[(row0 + r) * p.n + tile * kTile + j] = acc[r][0][j] + acc[r][1][j];
}

[[maybe_unused]] void gemm_rows_portable(const Problem& p, const float* expanded, int64_t tile, const Chunk& c) {
  int64_t r = 0;
  for (; r + 4 <= p.m; r += 4) gemm_portable<4>(p, expanded, tile, r, c);
  for (; r < p.m; ++r) gemm_portable<1>(p, expanded, tile, r, c);
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// AVX2 (8 lanes): the AVX-512 fp32 path with each tile in two halves, outputs 0-7 and 8-15. Same
// summation order per row (even and odd k apart, added at the end) whatever R.
// One pair's weights: [even k, outputs 0-7], [even, 8-15], [odd, 0-7], [odd, 8-15].
template <int Bits>
inline void weights_avx2(const uint8_t* pb, __m256 d0, __m256 d1, __m256 m0, __m256 m1, __m256* w) {
  const __m256i nibble = _mm256_set1_epi32(15);
  __m256i q[4];
  if constexpr (Bits == 4) {
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb)));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb + 8)));
    q[0] = _mm256_and_si256(v0, nibble);
    q[1] = _mm256_and_si256(v1, nibble);
    q[2] = _mm256_srli_epi32(v0, 4);
    q[3] = _mm256_srli_epi32(v1, 4);
  } else {
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pb + 8 * i)));
  }
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[0]), d0, m0);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[1]), d1, m1);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[2]), d0, m0);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[3]), d1, m1);
}

inline void scales_avx2(const uint16_t* sc, __m256& d0, __m256& d1, __m256& m0, __m256& m1) {
  d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
  d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 8)));
  m0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + kTile)));
  m1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + kTile + 8)));
}

template <int R, int Bits>
void tile_avx2(const Problem& p, int64_t tile, int64_t row0) {
  constexpr int pair_bytes = Bits == 4 ? 16 : 32;
  const int64_t blocks = p.k / kBlock;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 d0, d1, m0, m1;
    scales_avx2(p.scales + (tile * blocks + b) * 2 * kTile, d0, d1, m0, m1);
    const uint8_t* codes = p.packed + (tile * blocks + b) * kPairs * pair_bytes;
    const float* xb = p.x + row0 * p.k + b * kBlock;
    for (int pair = 0; pair < kPairs; ++pair) {
      __m256 w[4];
      weights_avx2<Bits>(codes + pair * pair_bytes, d0, d1, m0, m1, w);
      for (int r = 0; r < R; ++r) {
        const __m256 x_even = _mm256_broadcast_ss(xb + r * p.k + 2 * pair);
        const __m256 x_odd = _mm256_broadcast_ss(xb + r * p.k + 2 * pair + 1);
        acc[r][0] = _mm256_fmadd_ps(w[0], x_even, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w[1], x_even, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(w[2], x_odd, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(w[3], x_odd, acc[r][3]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* y = p.y + (row0 + r) * p.n + tile * kTile;
    _mm256_storeu_ps(y, _mm256_add_ps(acc[r][0], acc[r][2]));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(acc[r][1], acc[r][3]));
  }
}

template <int Bits>
void tile_rows_avx2(const Problem& p, int64_t tile) {
  int64_t r = 0;
  for (; r + 2 <= p.m; r += 2) tile_avx2<2, Bits>(p, tile, r);
  if (r < p.m) tile_avx2<1, Bits>(p, tile, r);
}

// Prefill: one tile's weights of blocks [b0, b1), [pairs][4][8] fp32 (w[0..3] of weights_avx2).
template <int Bits>
void expand_avx2(const Problem& p, int64_t tile, const Chunk& c, float* out) {
  constexpr int pair_bytes = Bits == 4 ? 16 : 32;
  const int64_t blocks = p.k / kBlock;
  for (int64_t b = c.b0; b < c.b1; ++b) {
    __m256 d0, d1, m0, m1;
    scales_avx2(p.scales + (tile * blocks + b) * 2 * kTile, d0, d1, m0, m1);
    const uint8_t* codes = p.packed + (tile * blocks + b) * kPairs * pair_bytes;
    for (int pair = 0; pair < kPairs; ++pair) {
      __m256 w[4];
      weights_avx2<Bits>(codes + pair * pair_bytes, d0, d1, m0, m1, w);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + (((b - c.b0) * kPairs + pair) * 4 + i) * 8, w[i]);
    }
  }
}

// R rows over an expanded tile. Of the 16 ymm registers, 4 R = 12 hold accumulators, 2 the weights
// of one k (loaded once, used by all R rows) and 1 a broadcast of x: 12 FMAs per 10 loads.
template <int R>
void gemm_avx2(const Problem& p, const float* expanded, int64_t tile, int64_t row0, const Chunk& c) {
  __m256 acc[R][4];
  float* state = c.state + row0 * 2 * kTile;
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
  if (!c.first) {  // a separate branch: a select per accumulator went through the stack (GCC 12)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_load_ps(state + (r * 4 + i) * 8);
  }
  const int64_t pairs = (c.b1 - c.b0) * kPairs;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (row0 + r) * p.k + c.b0 * kBlock;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    for (int parity = 0; parity < 2; ++parity) {  // even k (acc 0, 1), then odd k (acc 2, 3)
      __m256 w[2];
      for (int h = 0; h < 2; ++h) w[h] = in_register(_mm256_load_ps(expanded + (pair * 4 + 2 * parity + h) * 8));
      for (int r = 0; r < R; ++r) {
        const __m256 x = _mm256_broadcast_ss(xr[r] + 2 * pair + parity);
        acc[r][2 * parity] = _mm256_fmadd_ps(w[0], x, acc[r][2 * parity]);
        acc[r][2 * parity + 1] = _mm256_fmadd_ps(w[1], x, acc[r][2 * parity + 1]);
      }
    }
  }
  if (!c.last) {
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) _mm256_store_ps(state + (r * 4 + i) * 8, acc[r][i]);
    return;
  }
  for (int r = 0; r < R; ++r) {
    float* y = p.y + (row0 + r) * p.n + tile * kTile;
    _mm256_storeu_ps(y, _mm256_add_ps(acc[r][0], acc[r][2]));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(acc[r][1], acc[r][3]));
  }
}

void gemm_rows_avx2(const Problem& p, const float* expanded, int64_t tile, const Chunk& c) {
  int64_t r = 0;
  for (; r + 3 <= p.m; r += 3) gemm_avx2<3>(p, expanded, tile, r, c);
  if (p.m - r == 2) gemm_avx2<2>(p, expanded, tile, r, c);
  if (p.m - r == 1) gemm_avx2<1>(p, expanded, tile, r, c);
}
#endif

#if defined(__AVX512F__)
// One pair's weights of a tile's 16 outputs, at k and k + 1.
template <int Bits>
inline void weights_avx512(const uint8_t* pair_codes, __m512 d, __m512 m, __m512& w_even, __m512& w_odd) {
  __m512i even, odd;
  if constexpr (Bits == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes)));
    even = _mm512_and_si512(v, _mm512_set1_epi32(15));
    odd = _mm512_srli_epi32(v, 4);
  } else {
    even = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes)));
    odd = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes + 16)));
  }
  w_even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(even), d, m);
  w_odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(odd), d, m);
}

// R rows of x against one tile: each pair of k is dequantized once, into two vectors of the 16
// outputs' weights (at k and k + 1), and used by every row. Even and odd k accumulate separately
// (two FMA chains hide the FMA latency when there are few rows); every row is summed in the same
// order whatever R, so a row's result does not depend on the batch it came in.
template <int R, int Bits>
void tile_avx512(const Problem& p, int64_t tile, int64_t row0) {
  constexpr int kChains = 2;
  constexpr int pair_bytes = Bits == 4 ? 16 : 32;
  const int64_t blocks = p.k / kBlock;
  __m512 acc[R][kChains];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* sc = p.scales + (tile * blocks + b) * 2 * kTile;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kTile)));
    const uint8_t* codes = p.packed + (tile * blocks + b) * kPairs * pair_bytes;
    const float* xb = p.x + row0 * p.k + b * kBlock;
    for (int pair = 0; pair < kPairs; ++pair) {
      __m512 w_even, w_odd;
      weights_avx512<Bits>(codes + pair * pair_bytes, d, m, w_even, w_odd);
      for (int r = 0; r < R; ++r) {
        const float* xr = xb + r * p.k + 2 * pair;
        acc[r][0] = _mm512_fmadd_ps(w_even, _mm512_set1_ps(xr[0]), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w_odd, _mm512_set1_ps(xr[1]), acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(p.y + (row0 + r) * p.n + tile * kTile, _mm512_add_ps(acc[r][0], acc[r][1]));
  }
}

template <int Bits>
void tile_rows_avx512(const Problem& p, int64_t tile) {
  int64_t r = 0;
  for (; r + 8 <= p.m; r += 8) tile_avx512<8, Bits>(p, tile, r);
  if (p.m - r >= 4) { tile_avx512<4, Bits>(p, tile, r); r += 4; }
  if (p.m - r >= 2) { tile_avx512<2, Bits>(p, tile, r); r += 2; }
  if (p.m - r >= 1) tile_avx512<1, Bits>(p, tile, r);
}

// Prefill, fp32: a group of T tiles' weights of blocks [b0, b1), [pairs][T][even, odd][16] fp32,
// then R rows by T tiles at a time: 2 R T accumulators in registers, and for each k the T tiles'
// weights (loaded once, used by R rows) and one broadcast of x (used by T tiles). The same chains
// and order as tile_avx512.
template <int Bits>
void expand_avx512(const Problem& p, int64_t tile0, int tiles, const Chunk& c, float* out) {
  constexpr int pair_bytes = Bits == 4 ? 16 : 32;
  const int64_t blocks = p.k / kBlock;
  for (int t = 0; t < tiles; ++t) {
    for (int64_t b = c.b0; b < c.b1; ++b) {
      const int64_t tb = (tile0 + t) * blocks + b;
      const uint16_t* sc = p.scales + tb * 2 * kTile;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kTile)));
      const uint8_t* codes = p.packed + tb * kPairs * pair_bytes;
      for (int pair = 0; pair < kPairs; ++pair) {
        __m512 w_even, w_odd;
        weights_avx512<Bits>(codes + pair * pair_bytes, d, m, w_even, w_odd);
        float* w = out + (((b - c.b0) * kPairs + pair) * tiles + t) * 2 * kTile;
        _mm512_storeu_ps(w, w_even);
        _mm512_storeu_ps(w + kTile, w_odd);
      }
    }
  }
}

template <int R, int T>
void gemm_avx512(const Problem& p, const float* expanded, int64_t tile0, int64_t row0, const Chunk& c) {
  __m512 acc[R][T][2];
  float* state = c.state + row0 * T * 2 * kTile;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < 2; ++i) acc[r][t][i] = _mm512_setzero_ps();
  if (!c.first) {  // a separate branch: a select per accumulator went through the stack (GCC 12)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int i = 0; i < 2; ++i) acc[r][t][i] = _mm512_load_ps(state + ((r * T + t) * 2 + i) * kTile);
  }
  const int64_t pairs = (c.b1 - c.b0) * kPairs;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (row0 + r) * p.k + c.b0 * kBlock;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    for (int parity = 0; parity < 2; ++parity) {  // even k, then odd k: one chain each
      __m512 w[T];
      for (int t = 0; t < T; ++t) w[t] = in_register(_mm512_load_ps(expanded + ((pair * T + t) * 2 + parity) * kTile));
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(xr[r][2 * pair + parity]);
        for (int t = 0; t < T; ++t) acc[r][t][parity] = _mm512_fmadd_ps(w[t], x, acc[r][t][parity]);
      }
    }
  }
  if (!c.last) {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int i = 0; i < 2; ++i) _mm512_store_ps(state + ((r * T + t) * 2 + i) * kTile, acc[r][t][i]);
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      _mm512_storeu_ps(p.y + (row0 + r) * p.n + (tile0 + t) * kTile, _mm512_add_ps(acc[r][t][0], acc[r][t][1]));
}

template <int T>
void gemm_rows_avx512(const Problem& p, const float* expanded, int64_t tile0, const Chunk& c) {
  // 2 R T = 24 accumulators, T = 3 weights and a broadcast: 28 of 32 registers, and per k 12 FMAs
  // for 3 weight loads and 4 broadcasts (3 rows reading the weights in every FMA were load-bound)
  constexpr int R = 4;
  int64_t r = 0;
  for (; r + R <= p.m; r += R) gemm_avx512<R, T>(p, expanded, tile0, r, c);
  if (p.m - r == 3) gemm_avx512<3, T>(p, expanded, tile0, r, c);
  if (p.m - r == 2) gemm_avx512<2, T>(p, expanded, tile0, r, c);
  if (p.m - r == 1) gemm_avx512<1, T>(p, expanded, tile0, r, c);
}

#if defined(__AVX512BF16__)
// Many rows (prefill): bf16 dot products, twice the multiply-adds of fp32 FMAs per instruction.
// The codes are small integers, exact in bf16, and the scale and offset are applied in fp32 per
// block, so only x is rounded (to bf16, 8 bits of mantissa): y = sum_b d_b (q_b . x_b) + m_b sum(x_b)
// (4-bit codes centred: q - 8, with m + 8 d).
struct Bf16Codes {
  __m512i table, interleave, low_nibble, high_nibble, low_pair;
  Bf16Codes() {
    // bf16 bit patterns of the 4-bit codes minus 8, looked up by vpermw
    alignas(64) uint16_t small[32] = {};
    for (int i = 0; i < 16; ++i) {
      const float f = static_cast<float>(i - 8);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      small[i] = static_cast<uint16_t>(bits >> 16);
    }
    table = _mm512_load_si512(small);
    interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                                   0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001a000a, 0x001b000b,
                                   0x001c000c, 0x001d000d, 0x001e000e, 0x001f000f);
    low_nibble = _mm512_set1_epi32(0x0f);
    high_nibble = _mm512_set1_epi32(0xf0);
    low_pair = _mm512_set1_epi32(0x000f000f);
  }
  // AMX order (amx.h): the codes of pairs p and p + 1 (`first`, `second`) as one step of the even sum
  // (lanes 2 j, 2 j + 1: codes k + 2 and k of output j) and one of the odd sum (k + 3 and k + 1).
  template <int Bits>
  void steps(const uint8_t* first, const uint8_t* second, __m512i& even, __m512i& odd) const {
    if constexpr (Bits == 4) {
      const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(first)));
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(second)));
      // even: b's low nibble, a's low nibble at bit 16; odd: b's high nibble, a's at bit 20 (>> 4)
      const __m512i both = _mm512_or_si512(b, _mm512_slli_epi32(a, 16));
      even = _mm512_permutexvar_epi16(_mm512_and_si512(both, low_pair), table);
      odd = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi32(both, 4), low_pair), table);
    } else {
      const auto codes = [](const uint8_t* at) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
      };
      even = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(codes(first), codes(second))));
      odd = _mm512_permutexvar_epi16(
          interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(codes(first + 16), codes(second + 16))));
    }
  }
  // The code vector of one pair of k (its pair_bytes bytes of one tile).
  template <int Bits>
  __m512i operator()(const uint8_t* pair_codes) const {
    if constexpr (Bits == 4) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes)));
      const __m512i index =
          _mm512_or_si512(_mm512_and_si512(v, low_nibble), _mm512_slli_epi32(_mm512_and_si512(v, high_nibble), 12));
      return _mm512_permutexvar_epi16(index, table);
    } else {
      const __m512 even =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes))));
      const __m512 odd = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes + 16))));
      return _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even)));
    }
  }
};

// A block's scale d and offset m of one tile's 16 outputs, fp32 (4-bit: m + 8d, for centred codes).
template <int Bits>
inline void block_scales_bf16(const uint16_t* sc, __m512& d, __m512& m) {
  d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
  m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + kTile)));
  if constexpr (Bits == 4) m = _mm512_fmadd_ps(d, _mm512_set1_ps(8.0f), m);
}

template <int R, int Bits>
void tile_bf16(const Problem& p, int64_t tile, int64_t row0) {
  constexpr int pair_bytes = Bits == 4 ? 16 : 32;
  const int64_t blocks = p.k / kBlock;
  const Bf16Codes expand;
  alignas(64) float total[R][kTile] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* codes = p.packed + (tile * blocks + b) * kPairs * pair_bytes;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint16_t* xb = p.x_bf16 + row0 * p.k + b * kBlock;
    const auto x_word = [&](int r, int at) {
      uint32_t word;
      std::memcpy(&word, xb + r * p.k + at, 4);
      return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(word)));
    };
    if constexpr (kAmxOrder) {  // x swizzled to match (prepare_bf16)
      __m512 odd[R];
      for (int r = 0; r < R; ++r) odd[r] = _mm512_setzero_ps();
      for (int pair = 0; pair < kPairs; pair += 2) {
        const uint8_t* first = codes + pair * pair_bytes;
        __m512i even_w, odd_w;
        expand.template steps<Bits>(first, first + pair_bytes, even_w, odd_w);
        for (int r = 0; r < R; ++r) {
          acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(even_w), x_word(r, 2 * pair));
          odd[r] = _mm512_dpbf16_ps(odd[r], reinterpret_cast<__m512bh>(odd_w), x_word(r, 2 * pair + 2));
        }
      }
      for (int r = 0; r < R; ++r) acc[r] = _mm512_add_ps(acc[r], odd[r]);
    } else {
      for (int pair = 0; pair < kPairs; ++pair) {
        const __m512i w = expand.template operator()<Bits>(codes + pair * pair_bytes);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(w), x_word(r, 2 * pair));
      }
    }
    __m512 d, m;
    block_scales_bf16<Bits>(p.scales + (tile * blocks + b) * 2 * kTile, d, m);
    for (int r = 0; r < R; ++r) {
      __m512 t = _mm512_fmadd_ps(acc[r], d, _mm512_load_ps(total[r]));
      t = _mm512_fmadd_ps(m, _mm512_set1_ps(p.x_block_sums[(row0 + r) * blocks + b]), t);
      _mm512_store_ps(total[r], t);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(p.y + (row0 + r) * p.n + tile * kTile, _mm512_load_ps(total[r]));
}

template <int Bits>
void tile_rows_bf16(const Problem& p, int64_t tile) {
  int64_t r = 0;
  if constexpr (!kAmxOrder)  // (AMX order keeps two sums per row: 8 rows at most)
    for (; r + 16 <= p.m; r += 16) tile_bf16<16, Bits>(p, tile, r);
  for (; r + 8 <= p.m; r += 8) tile_bf16<8, Bits>(p, tile, r);
  if (p.m - r >= 4) { tile_bf16<4, Bits>(p, tile, r); r += 4; }
  if (p.m - r >= 2) { tile_bf16<2, Bits>(p, tile, r); r += 2; }
  if (p.m - r >= 1) tile_bf16<1, Bits>(p, tile, r);
}

// Prefill, bf16: a group of T tiles expanded to code vectors [K / 32 blocks][16 pairs][T][32 bf16]
// and fp32 scales [K / 32][T][d, m][16], then R rows by T tiles at a time (R T block sums and R T
// totals in registers). The same products and order as tile_bf16.
template <int Bits>
void expand_bf16(const Problem& p, int64_t tile0, int tiles, uint16_t* codes_out, float* scales_out) {
  constexpr int pair_bytes = Bits == 4 ? 16 : 32;
  const int64_t blocks = p.k / kBlock;
  const Bf16Codes expand;
  for (int t = 0; t < tiles; ++t) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t tb = (tile0 + t) * blocks + b;
      __m512 d, m;
      block_scales_bf16<Bits>(p.scales + tb * 2 * kTile, d, m);
      _mm512_storeu_ps(scales_out + (b * tiles + t) * 2 * kTile, d);
      _mm512_storeu_ps(scales_out + (b * tiles + t) * 2 * kTile + kTile, m);
      const uint8_t* codes = p.packed + tb * kPairs * pair_bytes;
      for (int pair = 0; pair < kPairs; ++pair)
        _mm512_storeu_si512(codes_out + ((b * kPairs + pair) * tiles + t) * 2 * kTile,
                            expand.template operator()<Bits>(codes + pair * pair_bytes));
    }
  }
}

template <int R, int T>
void gemm_bf16(const Problem& p, const uint16_t* codes, const float* scales, int64_t tile0, int64_t row0) {
  const int64_t blocks = p.k / kBlock;
  __m512 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    const uint16_t* cb = codes + b * kPairs * T * 2 * kTile;
    const uint16_t* xb = p.x_bf16 + row0 * p.k + b * kBlock;
    for (int pair = 0; pair < kPairs; ++pair) {
      __m512i w[T];
      for (int t = 0; t < T; ++t) w[t] = _mm512_loadu_si512(cb + (pair * T + t) * 2 * kTile);
      for (int r = 0; r < R; ++r) {
        uint32_t x_pair;
        std::memcpy(&x_pair, xb + r * p.k + 2 * pair, 4);
        const __m512i x = _mm512_set1_epi32(static_cast<int>(x_pair));
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], reinterpret_cast<__m512bh>(w[t]), reinterpret_cast<__m512bh>(x));
      }
    }
    const float* sb = scales + b * T * 2 * kTile;
    for (int t = 0; t < T; ++t) {
      const __m512 d = _mm512_loadu_ps(sb + t * 2 * kTile), m = _mm512_loadu_ps(sb + t * 2 * kTile + kTile);
      for (int r = 0; r < R; ++r) {
        total[r][t] = _mm512_fmadd_ps(acc[r][t], d, total[r][t]);
        total[r][t] = _mm512_fmadd_ps(m, _mm512_set1_ps(p.x_block_sums[(row0 + r) * blocks + b]), total[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(p.y + (row0 + r) * p.n + (tile0 + t) * kTile, total[r][t]);
}

#if defined(AFMKIT_AMX)
// AMX (batches of kAmxRows or more, where the OS grants the tiles): expand_bf16's code vectors are
// AMX's weight-tile layout (a block's 16 pairs of one tile: 16 rows of 64 bytes, tiles * 64 apart)
// and x's rows (padded to 16 with zeros, prepare_bf16) its input tiles. Each block's sums leave the
// tile for its scale and offset in fp32, in tile_bf16's order.
void amx_gemm(const Problem& p, const uint16_t* codes, const float* scales, int64_t tile0, int tiles) {
  const int64_t blocks = p.k / kBlock;
  afmkit_amx::configure();
  alignas(64) float sums[kTile * kTile];
  for (int64_t row0 = 0; row0 < p.m; row0 += kTile) {
    for (int t = 0; t < tiles; ++t) {
      __m512 total[kTile];
      for (int r = 0; r < kTile; ++r) total[r] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        _tile_zero(0);
        _tile_loadd(1, p.x_bf16 + row0 * p.k + b * kBlock, p.k * 2);
        _tile_loadd(2, codes + (b * kPairs * tiles + t) * 2 * kTile, int64_t{tiles} * 64);
        _tile_dpbf16ps(0, 1, 2);
        _tile_stored(0, sums, 64);
        const float* sb = scales + (b * tiles + t) * 2 * kTile;
        const __m512 d = _mm512_loadu_ps(sb), m = _mm512_loadu_ps(sb + kTile);
        for (int r = 0; r < kTile; ++r) {  // the padding rows' sums are zeros (prepare_bf16)
          total[r] = _mm512_fmadd_ps(_mm512_load_ps(sums + r * kTile), d, total[r]);
          total[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(p.x_block_sums[(row0 + r) * blocks + b]), total[r]);
        }
      }
      for (int r = 0; r < kTile && row0 + r < p.m; ++r)
        _mm512_storeu_ps(p.y + (row0 + r) * p.n + (tile0 + t) * kTile, total[r]);
    }
  }
  _tile_release();  // the tile state is large: a thread that keeps it makes every switch to it dearer
}
#endif

template <int T>
void gemm_rows_bf16(const Problem& p, const uint16_t* codes, const float* scales, int64_t tile0) {
  constexpr int R = 4;  // 2 R T = 24 accumulators, T code vectors and a broadcast: 28 of 32 registers
  int64_t r = 0;
  for (; r + R <= p.m; r += R) gemm_bf16<R, T>(p, codes, scales, tile0, r);
  if (p.m - r == 3) gemm_bf16<3, T>(p, codes, scales, tile0, r);
  if (p.m - r == 2) gemm_bf16<2, T>(p, codes, scales, tile0, r);
  if (p.m - r == 1) gemm_bf16<1, T>(p, codes, scales, tile0, r);
}
#endif
#endif

// Tiles per work item: T above (the AVX-512 paths block over tiles; AVX2 and portable do one).
#if defined(__AVX512F__)
constexpr int64_t kGroup = 3;
#else
constexpr int64_t kGroup = 1;
#endif
// From this many rows on, a tile's weights are expanded once into a buffer (run_group) instead of
// in registers for every few rows (run_tile): both give the same bits, this is only speed
// (benchmarks/packed_matmul.py). On AVX-512 the row kernels amortize their expansion over 8-16
// rows and were still ~10% faster at 64 rows, the GEMMs 25% faster (bf16) at 512; the AVX2 and
// portable row kernels expand for every 2 or 4 rows, and their GEMMs win from 16.
#if defined(__AVX512F__)
constexpr int64_t kExpandRows = 128;
#else
constexpr int64_t kExpandRows = 16;
#endif

// From this many rows on, AMX builds run the bf16 path on the tiles where granted (one SmolLM2
// layer's seven matmuls, 2-core Xeon, two rounds: 5-6 rows 0.30-0.44 ms on the tiles against
// 0.46-0.58 in the row kernels, 10-14 rows 0.30-0.46 against 0.61-0.98; 2 rows slower, 3-4 level;
// benchmarks/results/amx-thresholds/).
constexpr int64_t kAmxRows = 5;

// K per chunk of the fp32 GEMMs: 128, so 3 tiles' expanded weights (24 KB) stay in L1.
constexpr int64_t kChunkBlocks = 4;

// Buffers the kernels work in, one of each per thread (kind tells them apart), 64-byte aligned:
// a vector load that straddles two cache lines costs two.
template <typename T, int kind>
T* scratch(size_t elements) {
  thread_local std::vector<T> buffer;
  const size_t pad = 64 / sizeof(T);
  if (buffer.size() < elements + pad) buffer.resize(elements + pad);
  const uintptr_t address = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((address + 63) & ~uintptr_t{63});
}

void run_tile(const Problem& p, int64_t tile) {
#if defined(__AVX512BF16__)
  if (p.x_bf16 != nullptr) {
    if (p.bits == 4) return tile_rows_bf16<4>(p, tile);
    return tile_rows_bf16<8>(p, tile);
  }
#endif
#if defined(__AVX512F__)
  if (p.bits == 4) return tile_rows_avx512<4>(p, tile);
  return tile_rows_avx512<8>(p, tile);
#elif defined(__AVX2__) && defined(__FMA__)
  if (p.bits == 4) return tile_rows_avx2<4>(p, tile);
  return tile_rows_avx2<8>(p, tile);
#else
  tile_rows_portable(p, tile);
#endif
}

// Work item `group`: tiles [group * kGroup, + kGroup) of the output, for every row of x.
void run_group(const Problem& p, int64_t group) {
  const int64_t tile0 = group * kGroup;
  const int tiles = static_cast<int>(std::min<int64_t>(kGroup, p.n / kTile - tile0));
#if defined(__AVX512BF16__)
  if (p.x_bf16 != nullptr) {
    uint16_t* codes = scratch<uint16_t, 0>(p.k / 2 * tiles * 2 * kTile);
    float* scales = scratch<float, 0>(p.k / kBlock * tiles * 2 * kTile);
    p.bits == 4 ? expand_bf16<4>(p, tile0, tiles, codes, scales) : expand_bf16<8>(p, tile0, tiles, codes, scales);
#if defined(AFMKIT_AMX)
    if (p.amx) return amx_gemm(p, codes, scales, tile0, tiles);
#endif
    if (tiles == 3) return gemm_rows_bf16<3>(p, codes, scales, tile0);
    if (tiles == 2) return gemm_rows_bf16<2>(p, codes, scales, tile0);
    return gemm_rows_bf16<1>(p, codes, scales, tile0);
  }
#endif
  const int64_t blocks = p.k / kBlock;
  float* expanded = scratch<float, 1>(kChunkBlocks * kBlock * tiles * kTile);
  float* state = scratch<float, 2>(p.m * tiles * 2 * kTile);
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t b1 = std::min(blocks, b0 + kChunkBlocks);
    const Chunk c{b0, b1, state, b0 == 0, b1 == blocks};
#if defined(__AVX512F__)
    p.bits == 4 ? expand_avx512<4>(p, tile0, tiles, c, expanded) : expand_avx512<8>(p, tile0, tiles, c, expanded);
    if (tiles == 3) gemm_rows_avx512<3>(p, expanded, tile0, c);
    if (tiles == 2) gemm_rows_avx512<2>(p, expanded, tile0, c);
    if (tiles == 1) gemm_rows_avx512<1>(p, expanded, tile0, c);
#elif defined(__AVX2__) && defined(__FMA__)
    p.bits == 4 ? expand_avx2<4>(p, tile0, c, expanded) : expand_avx2<8>(p, tile0, c, expanded);
    gemm_rows_avx2(p, expanded, tile0, c);
#else
    expand_portable(p, tile0, c, expanded);
    gemm_rows_portable(p, expanded, tile0, c);
#endif
  }
}

// Work items are handed out in chunks from one counter; the calling thread works too, so a call
// finishes even if the pool's threads are all busy elsewhere.
struct Shared {
  void (*run)(const void* context, int64_t item);
  const void* context;
  int64_t items, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Shared& s) {
  for (;;) {
    const int64_t start = s.next.fetch_add(s.chunk);
    if (start >= s.items) return;
    const int64_t end = std::min(start + s.chunk, s.items);
    for (int64_t i = start; i < end; ++i) s.run(s.context, i);
    s.done.fetch_add(end - start, std::memory_order_release);
  }
}

void parallel_for(ffi::ThreadPool& pool, int64_t items, void (*run)(const void*, int64_t), const void* context) {
  auto shared = std::make_shared<Shared>();
  shared->run = run;
  shared->context = context;
  shared->items = items;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Enough chunks to balance the threads, few enough that a chunk amortises its atomics.
  shared->chunk = std::max<int64_t>(1, items / (threads * 4));
  const int64_t helpers = std::min<int64_t>(threads - 1, (items + shared->chunk - 1) / shared->chunk - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { work(*shared); });
  work(*shared);
  // The context lives on the caller's stack: wait until every item is done, not just handed out.
  // Spin briefly (a helper usually finishes within microseconds), then yield the core: on a busy
  // machine the helper may be waiting for this very core.
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < items; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// bf16 inputs for the dot products (rounded to nearest even), and fp32 block sums, of every row
// of x (the bf16 path; only built with AVX512-BF16).
// In AMX builds the row kernels read each 4 inputs in the order k + 2, k, k + 3, k + 1 (`swizzle`,
// amx.h), and the tiles read whole tiles of 16 rows: `padded_rows` rows, those after m zero.
void prepare_bf16(const float* x, int64_t m, int64_t k, uint16_t* x_bf16, float* sums, bool swizzle,
                  int64_t padded_rows) {
#if defined(__AVX512BF16__)
  for (int64_t i = 0; i < m * k; i += kBlock) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
    if (swizzle) {
      constexpr int order = 2 | 0 << 2 | 3 << 4 | 1 << 6;
      both = _mm512_shufflehi_epi16(_mm512_shufflelo_epi16(both, order), order);
    }
    _mm512_storeu_si512(x_bf16 + i, both);
    sums[i / kBlock] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
  std::fill(x_bf16 + m * k, x_bf16 + padded_rows * k, uint16_t{0});
  std::fill(sums + m * (k / kBlock), sums + padded_rows * (k / kBlock), 0.0f);
#endif
}

bool have_bf16_path() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

// Whether this build has the bf16 path (asked by afmkit/kernels/__init__.py through ctypes).
extern "C" int AfmkitHasBf16() { return have_bf16_path() ? 1 : 0; }

// How this build's bf16 paths sum (both kernel libraries are built alike): see amx.h.
extern "C" const char* AfmkitBf16Arithmetic() { return afmkit_amx::arithmetic(); }

// Which code this build runs (for benchmarks and bug reports).
extern "C" const char* AfmkitIsa() {
#if defined(__AVX512BF16__)
  return "avx512-bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

namespace {

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                        ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y, int64_t bits, bool bf16) {
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  if (xd.size() != 2 || pd.size() != 4) return ffi::Error::InvalidArgument("packed_matmul: x must be 2-D, packed 4-D");
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("packed_matmul: bits must be 4 or 8");
  const int64_t m = xd[0], k = xd[1], tiles = pd[0];
  if (pd[1] * kBlock != k || pd[2] != kPairs || pd[3] != (bits == 4 ? 16 : 32))
    return ffi::Error::InvalidArgument("packed_matmul: packed weight does not match x's last dimension");
  // The bf16 copy of x lives in the calling thread's scratch (kind 3; run_group uses 0 to 2):
  // a fresh vector per call is megabytes at prefill, which malloc may map and unmap every call.
  uint16_t* x_bf16 = nullptr;
  float* sums = nullptr;
  const bool bf16_path = bf16 && have_bf16_path();
  // AMX builds: the tiles from kAmxRows rows where granted, else the row kernels at every size (the
  // GEMM below sums as vdpbf16ps does, not as AMX).
  const bool amx = bf16_path && m >= kAmxRows && afmkit_amx::granted();
  if (bf16_path) {
    const int64_t rows = amx ? (m + kTile - 1) / kTile * kTile : m;
    x_bf16 = scratch<uint16_t, 3>(rows * k);
    sums = scratch<float, 3>(rows * (k / kBlock));
    prepare_bf16(x.typed_data(), m, k, x_bf16, sums, kAmxOrder && !amx, rows);
  }
  const Problem problem{x.typed_data(), packed.typed_data(), reinterpret_cast<const uint16_t*>(scales.typed_data()),
                        y->typed_data(), m, k, tiles * kTile, bits, x_bf16, sums, amx};
  if (amx || (m >= kExpandRows && !(kAmxOrder && bf16_path))) {
    parallel_for(
        pool, (tiles + kGroup - 1) / kGroup,
        [](const void* c, int64_t group) { run_group(*static_cast<const Problem*>(c), group); }, &problem);
  } else {
    parallel_for(
        pool, tiles, [](const void* c, int64_t tile) { run_tile(*static_cast<const Problem*>(c), tile); }, &problem);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Decode attention: one new query per row (grouped heads) against that row's cached keys and
// values, reading only the positions it can see. q [B, KV, G, D]; keys [B', KV, D, C]; values
// [B', KV, C, D] (B' >= B: the cache may hold more rows); lengths [B]: keys each row sees.
// One work item per (row, kv head); the G query heads of a group share every key and value read.

struct Attention {
  const float* q;
  const float* keys;
  const float* values;
  const int32_t* lengths;
  float* out;
  int64_t kv_heads, groups, dim, capacity;
  float scale;
};

#if defined(__AVX512F__)
// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), |error| ~ 2 ulp.
inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// probs[0:n] = exp(probs[0:n] - max); returns their sum.
float exp_shifted(float* probs, int64_t n, float max) {
  float sum = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 total = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(max);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(probs + i), shift));
    _mm512_storeu_ps(probs + i, e);
    total = _mm512_add_ps(total, e);
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, probs + i), shift));
    _mm512_mask_storeu_ps(probs + i, tail, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    i = n;
  }
  sum = _mm512_reduce_add_ps(total);
#endif
  for (; i < n; ++i) {
    probs[i] = std::exp(probs[i] - max);
    sum += probs[i];
  }
  return sum;
}

// The positions a (row, kv head) attends to, as spans of consecutive positions: 16 at a time for
// the contiguous cache, one block at a time for the paged one. Span i holds positions [s0, s0 +
// count); its keys are [D][stride] from `keys` (key s0 + j of dimension d at keys[d * stride + j])
// and its values [count][D] from `values`; a span without a block (nullptr) is all zeros, as the
// XLA path reads an unallocated block. Every sum runs over positions in order, so a row gives the
// same bits through either cache. While a span is read, the span kSpansAhead later is prefetched
// line by line: a paged row's blocks are a few KB each, scattered over the pool, and a contiguous
// row's D key runs are `capacity` apart, both beyond what the hardware prefetcher follows (paged
// kernel time at 32 rows 0.61-0.65x, benchmarks/results/attention_prefetch_ab.json).
constexpr int64_t kSpansAhead = 2;
constexpr int64_t kSpanPositions = 16;  // a contiguous row's positions per span

struct Span {
  const float* keys;
  const float* values;
  int64_t s0, count, stride;
};

#if defined(__AVX512F__)
// scores[g, s] = scale * q[g] . keys[:, s] for all G heads of a group at once, 16 positions a step.
// `ahead`: a later span (or nullptr), whose line of keys at the same (d, j) is prefetched.
template <int G>
void scores_avx512(const Attention& a, const float* q, const Span& span, const Span* ahead, float* probs, int64_t n) {
  const float* next = ahead != nullptr ? ahead->keys : nullptr;
  for (int64_t j = 0; j < span.count; j += 16) {
    const int64_t left = span.count - j, s = span.s0 + j;
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    if (span.keys != nullptr) {
      for (int64_t d = 0; d < a.dim; ++d) {
        if (next != nullptr) __builtin_prefetch(next + d * ahead->stride + j);
        const __m512 k = _mm512_maskz_loadu_ps(mask, span.keys + d * span.stride + j);
        for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * a.dim + d]), k, acc[g]);
      }
    }
    const __m512 scale = _mm512_set1_ps(a.scale);
    for (int g = 0; g < G; ++g) _mm512_mask_storeu_ps(probs + g * n + s, mask, _mm512_mul_ps(acc[g], scale));
  }
}

// out[g, :] += sum_s probs[g, s] * values[s, :] over one span, 16 dimensions a step (dim is a
// multiple of 16); the first span starts the sums at zero. A span of zeros adds nothing.
// `ahead` as for the scores: its line of values at the same (j, d) is prefetched.
template <int G>
void mix_avx512(const Attention& a, const float* probs, const Span& span, const Span* ahead, float* out, int64_t n,
                bool first) {
  if (span.values == nullptr && !first) return;
  const float* next = ahead != nullptr ? ahead->values : nullptr;
  for (int64_t d = 0; d < a.dim; d += 16) {
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + g * a.dim + d);
    for (int64_t j = 0; span.values != nullptr && j < span.count; ++j) {
      if (next != nullptr) __builtin_prefetch(next + j * a.dim + d);
      const __m512 v = _mm512_loadu_ps(span.values + j * a.dim + d);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(probs[g * n + span.s0 + j]), v, acc[g]);
    }
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(out + g * a.dim + d, acc[g]);
  }
}

template <int G>
void attend_avx512(const Attention& a, const float* q, const Span* spans, int64_t n_spans, float* probs, float* out,
                   int64_t n) {
  const auto ahead = [&](int64_t i) { return i + kSpansAhead < n_spans ? &spans[i + kSpansAhead] : nullptr; };
  for (int64_t i = 0; i < n_spans; ++i) scores_avx512<G>(a, q, spans[i], ahead(i), probs, n);
  for (int g = 0; g < G; ++g) {
    float* pg = probs + g * n;
    const float inv = 1.0f / exp_shifted(pg, n, *std::max_element(pg, pg + n));
    for (int64_t s = 0; s < n; ++s) pg[s] *= inv;
  }
  for (int64_t i = 0; i < n_spans; ++i) mix_avx512<G>(a, probs, spans[i], ahead(i), out, n, i == 0);
}
#endif

void attend_scalar(const Attention& a, const float* q, const Span* spans, int64_t n_spans, float* probs, float* out,
                   int64_t n) {
  const int64_t G = a.groups, D = a.dim;
  std::fill(probs, probs + G * n, 0.0f);
  for (int64_t i = 0; i < n_spans; ++i) {
    const Span& span = spans[i];
    if (span.keys == nullptr) continue;
    for (int64_t d = 0; d < D; ++d) {  // scores[g, s] += q[g, d] * keys[d, s]
      for (int64_t g = 0; g < G; ++g) {
        const float qd = q[g * D + d] * a.scale;
        float* pg = probs + g * n + span.s0;
        for (int64_t j = 0; j < span.count; ++j) pg[j] += qd * span.keys[d * span.stride + j];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = probs + g * n;
    const float inv = 1.0f / exp_shifted(pg, n, *std::max_element(pg, pg + n));
    for (int64_t s = 0; s < n; ++s) pg[s] *= inv;
  }
  std::fill(out, out + G * D, 0.0f);
  for (int64_t i = 0; i < n_spans; ++i) {
    const Span& span = spans[i];
    if (span.values == nullptr) continue;
    for (int64_t j = 0; j < span.count; ++j) {  // out[g, :] += probs[g, s] * values[s, :]
      for (int64_t g = 0; g < G; ++g) {
        const float p = probs[g * n + span.s0 + j];
        for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * span.values[j * D + d];
      }
    }
  }
}

// Attention of one (row, kv head) work item over its spans; n: the positions they cover.
void attend_spans(const Attention& a, int64_t item, const Span* spans, int64_t n_spans, int64_t n) {
  const float* q = a.q + item * a.groups * a.dim;
  float* out = a.out + item * a.groups * a.dim;
  thread_local std::vector<float> scratch;
  scratch.resize(a.groups * n);
  float* probs = scratch.data();
#if defined(__AVX512F__)
  if (a.dim % 16 == 0) {
    switch (a.groups) {
      case 1: attend_avx512<1>(a, q, spans, n_spans, probs, out, n); return;
      case 2: attend_avx512<2>(a, q, spans, n_spans, probs, out, n); return;
      case 3: attend_avx512<3>(a, q, spans, n_spans, probs, out, n); return;
      case 4: attend_avx512<4>(a, q, spans, n_spans, probs, out, n); return;
      case 6: attend_avx512<6>(a, q, spans, n_spans, probs, out, n); return;
      case 8: attend_avx512<8>(a, q, spans, n_spans, probs, out, n); return;
      default: break;
    }
  }
#endif
  attend_scalar(a, q, spans, n_spans, probs, out, n);
}

void attend(const void* context, int64_t item) {
  const Attention& a = *static_cast<const Attention*>(context);
  const int64_t row = item / a.kv_heads, head = item % a.kv_heads;
  const int64_t n = std::min<int64_t>(std::max<int32_t>(a.lengths[row], 1), a.capacity);
  const float* keys = a.keys + (row * a.kv_heads + head) * a.dim * a.capacity;
  const float* values = a.values + (row * a.kv_heads + head) * a.capacity * a.dim;
  // The row in spans of 16 positions, so that it is prefetched as the paged cache's blocks are.
  const int64_t n_spans = (n + kSpanPositions - 1) / kSpanPositions;
  thread_local std::vector<Span> spans;
  spans.resize(n_spans);
  for (int64_t i = 0; i < n_spans; ++i) {
    const int64_t s0 = i * kSpanPositions;
    spans[i] = Span{keys + s0, values + s0 * a.dim, s0, std::min(kSpanPositions, n - s0), a.capacity};
  }
  attend_spans(a, item, spans.data(), n_spans, n);
}

// The paged cache: keys [blocks, KV, D, page], values [blocks, KV, page, D], tables [B', width]
// (position p of row b in block tables[b, p / page] at offset p % page; an entry outside the
// pool is no block). `capacity` is width * page.
struct PagedAttention {
  Attention a;
  const int32_t* tables;
  int64_t blocks, page, width;
};

void attend_paged(const void* context, int64_t item) {
  const PagedAttention& p = *static_cast<const PagedAttention*>(context);
  const Attention& a = p.a;
  const int64_t row = item / a.kv_heads, head = item % a.kv_heads;
  const int64_t n = std::min<int64_t>(std::max<int32_t>(a.lengths[row], 1), a.capacity);
  const int64_t n_spans = (n + p.page - 1) / p.page;
  thread_local std::vector<Span> spans;
  spans.resize(n_spans);
  for (int64_t i = 0; i < n_spans; ++i) {
    const int64_t block = p.tables[row * p.width + i];
    const bool present = block >= 0 && block < p.blocks;
    const int64_t base = (block * a.kv_heads + head) * a.dim * p.page;  // same size for keys and values
    spans[i] = Span{present ? a.keys + base : nullptr, present ? a.values + base : nullptr, i * p.page,
                    std::min(p.page, n - i * p.page), p.page};
  }
  attend_spans(a, item, spans.data(), n_spans, n);
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                           ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q, keys and values must be 4-D");
  const int64_t batch = qd[0], kv = qd[1], groups = qd[2], dim = qd[3], capacity = kd[3];
  if (kd[0] < batch || kd[1] != kv || kd[2] != dim || vd[0] != kd[0] || vd[1] != kv || vd[2] != capacity ||
      vd[3] != dim || lengths.element_count() != static_cast<size_t>(batch))
    return ffi::Error::InvalidArgument("decode_attention: cache shapes do not match the queries");
  const Attention attention{q.typed_data(), keys.typed_data(), values.typed_data(), lengths.typed_data(),
                            out->typed_data(), kv, groups, dim, capacity, scale};
  parallel_for(pool, batch * kv, attend, &attention);
  return ffi::Error::Success();
}

// q [B, KV, G, D]; keys [blocks, KV, D, page]; values [blocks, KV, page, D]; tables [B', width]
// int32 (B' >= B); lengths [B]: keys each row sees (at most width * page).
ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                                ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> tables,
                                ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_decode_attention: q, keys and values must be 4-D, tables 2-D");
  const int64_t batch = qd[0], kv = qd[1], groups = qd[2], dim = qd[3], blocks = kd[0], page = kd[3];
  if (kd[1] != kv || kd[2] != dim || vd[0] != blocks || vd[1] != kv || vd[2] != page || vd[3] != dim ||
      td[0] < batch || lengths.element_count() != static_cast<size_t>(batch))
    return ffi::Error::InvalidArgument("paged_decode_attention: pool or table shapes do not match the queries");
  const PagedAttention attention{{q.typed_data(), keys.typed_data(), values.typed_data(), lengths.typed_data(),
                                  out->typed_data(), kv, groups, dim, td[1] * page, scale},
                                 tables.typed_data(), blocks, page, td[1]};
  parallel_for(pool, batch * kv, attend_paged, &attention);
  return ffi::Error::Success();
}

// Zeroes `out` without touching its whole pages: MADV_DONTNEED hands them back to the kernel,
// and a private anonymous page (what a large malloc gets) reads as zeros until written, when the
// kernel commits it. Only the partial pages at either end are written. Where the pages are not
// private anonymous memory (then they would not read as zeros), it falls back to memset.
ffi::Error LazyZeros(ffi::Result<ffi::AnyBuffer> out) {
  char* data = static_cast<char*>(out->untyped_data());
  const size_t size = out->size_bytes();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(data), end = start + size;
  const uintptr_t inner0 = (start + page - 1) & ~(page - 1), inner1 = end & ~(page - 1);
  bool lazy = inner1 > inner0 && madvise(reinterpret_cast<void*>(inner0), inner1 - inner0, MADV_DONTNEED) == 0;
  if (lazy) {
    std::memset(data, 0, inner0 - start);
    std::memset(reinterpret_cast<char*>(inner1), 0, end - inner1);
    lazy = *reinterpret_cast<const volatile char*>(inner0) == 0;  // reads as zero: private anonymous
  }
  if (!lazy) std::memset(data, 0, size);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfmkitLazyZeros, LazyZeros, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfmkitPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfmkitDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfmkitPagedDecodeAttention, PagedDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
