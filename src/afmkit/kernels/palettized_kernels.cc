// afmkit's native CPU kernel for palettized (look-up-table) weights, called from jitted code through
// XLA's FFI (afmkit/kernels/__init__.py compiles this file on first use, beside cpu_kernels.cc).
//
// palettized_matmul: y[M, N] = x[M, K] @ W[K, N] where W[k, n] = table[n / group_rows][code[k, n]] *
// scale[n] (afmkit/model/palettized.py). The codes are 2, 3, 4 or 8 bits; XLA would first write W out
// in fp32, which makes decoding (a few rows) as slow as reading fp32 weights. Here every table entry
// is expanded in registers: for <= 16 entries the table lives in one vector and a code picks its
// entry with one permute (`vpermps` on AVX-512; on AVX2 one or two 8-lane permutes and a blend); for
// 256 entries (8-bit) a gather from the table in L1.
//
// Index layout (palettized.py writes it): outputs in tiles of 16, K in blocks of 8. For a block of 8
// inputs and output lane j of a tile, the 8 codes form one 8 * bits-bit word (code p at bit bits * p),
// stored as `bits` bytes, byte q at [q][j]: indices are uint8 [N / 16, K / 8, bits, 16]. For <= 4 bits
// a lane's word fits 32 bits; code p is (word >> bits * p) masked to `bits` bits. The mask is never
// applied: a table of 2^bits < 16 entries is repeated to fill 16 lanes (entry i at lanes i, i + 2^bits,
// ...), so the higher bits a 4-bit permute index also reads do not change the entry it picks.
//
// Arithmetic, the same for every number of rows (so a row's result does not depend on its batch):
// with the caller's `bf16` on CPUs with AVX512-BF16, bf16 dot products (see the bf16 path below);
// else fp32, per output two accumulators, one for the even codes of each block of 8 and one for the
// odd ones, each summed over K in order; y = (even + odd) * scale (scale 1 without scales;
// multiplying by 1 is exact). Scaling once per output instead of once per weight is one rounding
// instead of K.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "amx.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 16;  // outputs per tile
constexpr int kCodes = 8;  // inputs per word of codes

struct Problem {
  const float* x;           // [M, K]
  const uint8_t* indices;   // [N / 16, K / 8, bits, 16]
  const float* tables;      // fp32 [groups, entries], entries repeated to 16 when fewer (see above)
  const float* scales;      // fp32 [N] (ones without scales)
  float* y;                 // [M, N]
  int64_t m, k, n, bits;
  int64_t tiles_per_group;  // group_rows / 16
  int64_t table_stride;     // floats per table row in `tables`: max(16, 2^bits)
  const uint16_t* x_bf16;   // x rounded to bf16, [M, K] (set for the bf16 path only)
  int64_t x_stride;         // elements from one row of x_bf16 to the next (>= K: see prepare_bf16)
  bool amx;                 // the bf16 GEMM runs on AMX tiles (AMX builds, where the OS grants them)
};

inline const float* tile_table(const Problem& p, int64_t tile) {
  return p.tables + (tile / p.tiles_per_group) * p.table_stride;
}

inline const uint8_t* block_codes(const Problem& p, int64_t tile, int64_t block) {
  return p.indices + (tile * (p.k / kCodes) + block) * p.bits * kTile;
}

// Decoding reads each weight once, from memory: a tile's codes are a run of a few KB (K / 8 blocks
// of bits * 16 bytes), read as one of several interleaved runs, too short for the hardware
// prefetcher to get ahead of. Asking for the line 1 KB ahead of each block as it is read took the
// 210 one-row matmuls of a SmolLM2 decode step from 6.6 to 5.2 ms on a 2-core AMD EPYC (one A/B
// pair on a noisy machine; 0.5 and 2 KB ahead measured within its noise).
inline void prefetch_ahead(const uint8_t* codes) { __builtin_prefetch(codes + 1024); }

// Portable version (no AVX-512 or AVX2, e.g. ARM): loops over a tile's 16 outputs that the compiler
// vectorizes for whatever -march=native offers; the same chains and order as the vector paths.
template <int R>
void tile_portable(const Problem& p, int64_t tile, int64_t row0) {
  const int64_t blocks = p.k / kCodes;
  const int bits = static_cast<int>(p.bits);
  const uint32_t mask = (1u << bits) - 1;
  const float* table = tile_table(p, tile);
  float acc[R][2][kTile] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* planes = block_codes(p, tile, b);
    prefetch_ahead(planes);
    uint32_t words[kTile] = {};
    if (bits < 8)
      for (int q = 0; q < bits; ++q)
        for (int j = 0; j < kTile; ++j) words[j] |= static_cast<uint32_t>(planes[q * kTile + j]) << (8 * q);
    for (int c = 0; c < kCodes; ++c) {
      float w[kTile];
      for (int j = 0; j < kTile; ++j) {
        const uint32_t code = bits == 8 ? planes[c * kTile + j] : (words[j] >> (bits * c)) & mask;
        w[j] = table[code];
      }
      for (int r = 0; r < R; ++r) {
        const float xr = p.x[(row0 + r) * p.k + b * kCodes + c];
        for (int j = 0; j < kTile; ++j) acc[r][c & 1][j] += w[j] * xr;
      }
    }
  }
  const float* scale = p.scales + tile * kTile;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTile; ++j)
      p.y[(row0 + r) * p.n + tile * kTile + j] = (acc[r][0][j] + acc[r][1][j]) * scale[j];
}

[[maybe_unused]] void tiles_portable(const Problem& p, int64_t tile0, int64_t tiles) {
  for (int64_t t = tile0; t < tile0 + tiles; ++t) {
    int64_t r = 0;
    for (; r + 4 <= p.m; r += 4) tile_portable<4>(p, t, r);
    for (; r < p.m; ++r) tile_portable<1>(p, t, r);
  }
}

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// AVX2 (8 lanes): each tile in two halves, outputs 0-7 and 8-15, the same chains and order.
template <int Bits>
struct TableAvx2 {
  __m256 lo, hi;  // entries 0-7 and 8-15 (<= 8 entries: the repeated table in both)
  const float* all;
};

// The 8 weights of one half for codes `codes` (a lane's code in its low bits, higher bits ignored).
template <int Bits>
inline __m256 lookup_avx2(const TableAvx2<Bits>& t, __m256i codes) {
  if constexpr (Bits == 8) {
    return _mm256_i32gather_ps(t.all, codes, 4);
  } else if constexpr (Bits == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, codes), hi = _mm256_permutevar8x32_ps(t.hi, codes);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));  // by bit 3
  } else {
    return _mm256_permutevar8x32_ps(t.lo, codes);
  }
}

template <int R, int Bits>
void tile_avx2(const Problem& p, int64_t tile, int64_t row0) {
  const int64_t blocks = p.k / kCodes;
  const float* table = tile_table(p, tile);
  TableAvx2<Bits> t{_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8), table};
  __m256 acc[R][2][2];  // [row][half][chain]
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) acc[r][h][0] = acc[r][h][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* planes = block_codes(p, tile, b);
    prefetch_ahead(planes);
    __m256i words[2];
    if constexpr (Bits < 8) {
      for (int h = 0; h < 2; ++h) {
        words[h] = _mm256_setzero_si256();
        for (int q = 0; q < Bits; ++q) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(planes + q * kTile + h * 8));
          words[h] = _mm256_or_si256(words[h], _mm256_slli_epi32(_mm256_cvtepu8_epi32(bytes), 8 * q));
        }
      }
    }
    for (int c = 0; c < kCodes; ++c) {
      for (int h = 0; h < 2; ++h) {
        __m256i codes;
        if constexpr (Bits == 8) {
          codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(planes + c * kTile + h * 8)));
        } else {
          codes = _mm256_srli_epi32(words[h], Bits * c);
        }
        const __m256 w = lookup_avx2<Bits>(t, codes);
        for (int r = 0; r < R; ++r) {
          const __m256 xr = _mm256_set1_ps(p.x[(row0 + r) * p.k + b * kCodes + c]);
          acc[r][h][c & 1] = _mm256_fmadd_ps(w, xr, acc[r][h][c & 1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(p.scales + tile * kTile + h * 8);
      _mm256_storeu_ps(p.y + (row0 + r) * p.n + tile * kTile + h * 8,
                       _mm256_mul_ps(_mm256_add_ps(acc[r][h][0], acc[r][h][1]), s));
    }
}

template <int Bits>
void tiles_avx2(const Problem& p, int64_t tile0, int64_t tiles) {
  for (int64_t t = tile0; t < tile0 + tiles; ++t) {
    int64_t r = 0;
    for (; r + 2 <= p.m; r += 2) tile_avx2<2, Bits>(p, t, r);
    if (r < p.m) tile_avx2<1, Bits>(p, t, r);
  }
}
#endif

#if defined(__AVX512F__)
template <typename V>
inline V in_register(V v) {
  asm("" : "+v"(v));  // keep a loaded vector in a register instead of one load per use
  return v;
}

// A block's words of the 16 lanes (<= 4 bits): byte q of lane j is planes[q * 16 + j].
template <int Bits>
inline __m512i words_avx512(const uint8_t* planes) {
#if defined(__AVX512VBMI__)
  // one masked load of the bits * 16 bytes and one byte permute: byte 4 j + q <- byte 16 q + j
  static const __m512i interleave = [] {
    alignas(64) uint8_t order[64];
    for (int j = 0; j < 16; ++j)
      for (int q = 0; q < 4; ++q) order[4 * j + q] = static_cast<uint8_t>(16 * q + j);
    return _mm512_load_si512(order);
  }();
  const __mmask64 loaded = Bits == 4 ? ~__mmask64{0} : (__mmask64{1} << (Bits * 16)) - 1;
  const __mmask64 kept = Bits == 2 ? 0x3333333333333333ull : Bits == 3 ? 0x7777777777777777ull : ~__mmask64{0};
  return _mm512_maskz_permutexvar_epi8(kept, interleave, _mm512_maskz_loadu_epi8(loaded, planes));
#else
  __m512i words = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(planes)));
  for (int q = 1; q < Bits; ++q) {
    const __m512i byte = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(planes + q * kTile)));
    words = _mm512_or_si512(words, _mm512_slli_epi32(byte, 8 * q));
  }
  return words;
#endif
}

// R rows by T tiles: each code is expanded once (one permute, or a gather at 8 bits) and used by the
// R rows; 2 R T independent accumulators (T = 2 tiles at once give decode, R = 1, four chains: enough
// to hide the FMA latency).
template <int R, int T, int Bits>
void tiles_avx512(const Problem& p, int64_t tile0, int64_t row0) {
  const int64_t blocks = p.k / kCodes;
  __m512 table[T];
  const float* tables[T];
  for (int t = 0; t < T; ++t) {
    tables[t] = tile_table(p, tile0 + t);
    if constexpr (Bits < 8) table[t] = _mm512_loadu_ps(tables[t]);
  }
  __m512 acc[R][T][2];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (row0 + r) * p.k;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* planes[T];
    __m512i words[T];
    for (int t = 0; t < T; ++t) {
      planes[t] = block_codes(p, tile0 + t, b);
      prefetch_ahead(planes[t]);
      if constexpr (Bits < 8) words[t] = words_avx512<Bits>(planes[t]);
    }
    for (int c = 0; c < kCodes; ++c) {
      __m512 w[T];
      for (int t = 0; t < T; ++t) {
        if constexpr (Bits == 8) {
          const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(planes[t] + c * kTile)));
          w[t] = _mm512_i32gather_ps(codes, tables[t], 4);
        } else {
          w[t] = _mm512_permutexvar_ps(_mm512_srli_epi32(words[t], Bits * c), table[t]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(xr[r][b * kCodes + c]);
        for (int t = 0; t < T; ++t) acc[r][t][c & 1] = _mm512_fmadd_ps(w[t], x, acc[r][t][c & 1]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 s = _mm512_loadu_ps(p.scales + (tile0 + t) * kTile);
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(p.y + (row0 + r) * p.n + (tile0 + t) * kTile,
                       _mm512_mul_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]), s));
  }
}

// Rows of every tile in [tile0, tile0 + tiles) (2 tiles, or 1 at the end): blocks of 6 rows by 2
// tiles (24 accumulators of 32 registers; per code 12 FMAs for 2 expansions and 6 broadcasts), then
// the few rows left 2 or 1 at a time.
template <int Bits>
void tiles_rows_avx512(const Problem& p, int64_t tile0, int64_t tiles) {
  int64_t t = tile0;
  const int64_t end = tile0 + tiles;
  int64_t r0 = 0;
  for (; r0 + 6 <= p.m; r0 += 6) {
    int64_t u = tile0;
    for (; u + 2 <= end; u += 2) tiles_avx512<6, 2, Bits>(p, u, r0);
    if (u < end) tiles_avx512<6, 1, Bits>(p, u, r0);
  }
  for (; t + 2 <= end; t += 2) {
    int64_t r = r0;
    for (; r + 2 <= p.m; r += 2) tiles_avx512<2, 2, Bits>(p, t, r);
    if (r < p.m) tiles_avx512<1, 2, Bits>(p, t, r);
  }
  for (; t < end; ++t) {
    int64_t r = r0;
    for (; r + 2 <= p.m; r += 2) tiles_avx512<2, 1, Bits>(p, t, r);
    if (r < p.m) tiles_avx512<1, 1, Bits>(p, t, r);
  }
}

#if defined(__AVX512BF16__)
// With AVX512-BF16 and the caller's `bf16`: the table entries and x rounded to bf16 (8 bits of
// precision: each rounding relative 2^-8 at most, so a product under 2^-7 + 2^-16; the tables' own
// k-means error is orders larger; the int4 kernel rounds x the same way) for dot products of pairs
// of k, twice the multiply-adds of fp32 FMAs per instruction, fp32 accumulation, the scale in fp32 at
// the end. From 5 rows (3 where AMX's tiles run; kDirectRows) a group of tiles is expanded once into
// a buffer of bf16 pairs (lane j holds the weights of k and k + 1 of output j), [K / 2][tiles][32],
// then read by every row; fewer rows read the codes directly (direct_bf16). One chain per output over
// the pairs of K in order, whatever the rows, so at every batch size (decode and prefill alike) a row
// gets the same bits. Measured against the fp32 path before the direct path existed (CPU time,
// SmolLM2's mixed 3.5-bit layer): as fast at 1 row, 3.3x faster at 16.

// On CPUs with AMX (AMX builds, amx.h) batches of 3 rows or more run on the tiles, and every other
// path takes AMX's own sums (amx.h) so that a row still gets the same bits at every batch size: the
// direct path with its swizzled pairs, the buffered GEMM (when the tiles are refused) by splitting x
// into (x_k, 0) for the even sum and (0, x_k+1) for the odd one (the zero products change nothing).
// Without AMX one vdpbf16ps chain per output, as before.
constexpr bool kAmxOrder = afmkit_amx::kOrder;
constexpr int64_t kAmxInputs = afmkit_amx::kInputs;

inline int64_t round_up(int64_t value, int64_t to) { return (value + to - 1) / to * to; }

// The bf16 pairs of K that the buffer and x hold: in AMX builds padded with zeros to whole blocks of
// 32 inputs (zero products leave AMX's sums as a shorter last block would).
inline int64_t padded_k(int64_t k) { return kAmxOrder ? round_up(k, kAmxInputs) : k; }

template <int Bits>
void expand_bf16(const Problem& p, int64_t tile0, int tiles, uint16_t* out) {
  // 16-bit element 2 j + e of a pair <- element 16 e + j of [16 entries at k, 16 at k + 1]
  static const __m512i interleave = [] {
    alignas(64) uint16_t order[32];
    for (int j = 0; j < 16; ++j) order[2 * j] = j, order[2 * j + 1] = 16 + j;
    return _mm512_load_si512(order);
  }();
  const int64_t blocks = p.k / kCodes;
  for (int t = 0; t < tiles; ++t) {
    const float* tables = tile_table(p, tile0 + t);
    const __m512 table = _mm512_loadu_ps(tables);
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* planes = block_codes(p, tile0 + t, b);
      __m512i words = _mm512_setzero_si512();
      if constexpr (Bits < 8) words = words_avx512<Bits>(planes);
      for (int c = 0; c < kCodes; c += 2) {
        __m512 w[2];
        for (int e = 0; e < 2; ++e) {
          if constexpr (Bits == 8) {
            const __m512i codes =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(planes + (c + e) * kTile)));
            w[e] = _mm512_i32gather_ps(codes, tables, 4);
          } else {
            w[e] = _mm512_permutexvar_ps(_mm512_srli_epi32(words, Bits * (c + e)), table);
          }
        }
        const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(w[1], w[0]));  // [k: 0-15, k + 1: 16-31]
        _mm512_store_si512(out + ((b * kCodes / 2 + c / 2) * tiles + t) * 32, _mm512_permutexvar_epi16(interleave, both));
      }
    }
  }
  const int64_t pairs = p.k / 2, padded = padded_k(p.k) / 2;
  std::memset(out + pairs * tiles * 32, 0, (padded - pairs) * tiles * 32 * sizeof(uint16_t));
}

// The x pair of k and k + 1 of a row, broadcast, and (AMX order) its even and odd halves.
struct XPair {
  __m512bh both, even, odd;
};

inline XPair x_pair(const Problem& p, int64_t row, int64_t k) {
  uint32_t both;
  std::memcpy(&both, p.x_bf16 + row * p.x_stride + k, 4);
  const auto broadcast = [](uint32_t v) { return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(v))); };
  if constexpr (kAmxOrder) return {broadcast(both), broadcast(both & 0xffffu), broadcast(both & 0xffff0000u)};
  return {broadcast(both), broadcast(both), broadcast(both)};
}

// R rows by T tiles of one chain per output (acc), or in AMX order two per block (even, odd) folded
// into acc at the end of each block of 32 inputs.
template <int R, int T>
struct Sums {
  __m512 acc[R][T], even[R][T], odd[R][T];
  // In AMX order the totals change once per 32 inputs: they wait in memory, leaving the registers to
  // the sums that change on every step (R = 2 by T = 4 would not fit otherwise).
  alignas(64) float total[kAmxOrder ? R : 1][T][kTile];  // (one unused row without AMX: no empty arrays)
  Sums() {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) {
        acc[r][t] = even[r][t] = odd[r][t] = _mm512_setzero_ps();
        if constexpr (kAmxOrder) _mm512_store_ps(total[r][t], acc[r][t]);
      }
  }
  inline void add(int r, int t, __m512bh w, const XPair& x) {
    if constexpr (kAmxOrder) {
      even[r][t] = _mm512_dpbf16_ps(even[r][t], w, x.even);
      odd[r][t] = _mm512_dpbf16_ps(odd[r][t], w, x.odd);
    } else {
      acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w, x.both);
    }
  }
  inline void fold() {
    if constexpr (kAmxOrder)
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) {
          _mm512_store_ps(total[r][t], _mm512_add_ps(_mm512_load_ps(total[r][t]), _mm512_add_ps(even[r][t], odd[r][t])));
          even[r][t] = odd[r][t] = _mm512_setzero_ps();
        }
  }
  void store(const Problem& p, int64_t tile0, int64_t row0) {
    fold();
    for (int t = 0; t < T; ++t) {
      const __m512 s = _mm512_loadu_ps(p.scales + (tile0 + t) * kTile);
      for (int r = 0; r < R; ++r) {
        const __m512 sum = kAmxOrder ? _mm512_load_ps(total[r][t]) : acc[r][t];
        _mm512_storeu_ps(p.y + (row0 + r) * p.n + (tile0 + t) * kTile, _mm512_mul_ps(sum, s));
      }
    }
  }
};

template <int R, int T>
void gemm_bf16(const Problem& p, const uint16_t* expanded, int64_t tile0, int64_t row0) {
  Sums<R, T> sums;
  const int64_t pairs = p.k / 2;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    __m512bh w[T];
    for (int t = 0; t < T; ++t)
      w[t] = reinterpret_cast<__m512bh>(in_register(_mm512_load_si512(expanded + (pair * T + t) * 32)));
    for (int r = 0; r < R; ++r) {
      const XPair x = x_pair(p, row0 + r, 2 * pair);
      for (int t = 0; t < T; ++t) sums.add(r, t, w[t], x);
    }
    if ((pair + 1) % (kAmxInputs / 2) == 0) sums.fold();
  }
  sums.store(p, tile0, row0);
}

// R = 6 rows by T = 4 tiles: 24 accumulators, 4 weight vectors and a broadcast in 32 registers; per
// pair of k 24 dot products for 4 loads and 6 broadcasts. The 1-5 rows left go in one block too,
// not one at a time (a decode step's 210 matmuls of the 3.5-bit model, 2-core Xeon, two runs: 8
// rows 15.6 and 14.8 ms -> 13.6 and 13.1; 10 rows 17.3 -> 15.7 and 15.9; 16 rows unchanged;
// benchmarks/results/gemm-remainder/).
template <int T>
void gemm_rows_bf16(const Problem& p, const uint16_t* expanded, int64_t tile0) {
  int64_t r = 0;
  if constexpr (kAmxOrder) {  // three sums per output: 2 rows by T tiles (AMX builds without the tiles only)
    for (; r + 2 <= p.m; r += 2) gemm_bf16<2, T>(p, expanded, tile0, r);
    if (r < p.m) gemm_bf16<1, T>(p, expanded, tile0, r);
    return;
  }
  for (; r + 6 <= p.m; r += 6) gemm_bf16<6, T>(p, expanded, tile0, r);
  switch (p.m - r) {
    case 5: return gemm_bf16<5, T>(p, expanded, tile0, r);
    case 4: return gemm_bf16<4, T>(p, expanded, tile0, r);
    case 3: return gemm_bf16<3, T>(p, expanded, tile0, r);
    case 2: return gemm_bf16<2, T>(p, expanded, tile0, r);
    case 1: return gemm_bf16<1, T>(p, expanded, tile0, r);
    default: return;
  }
}

// Few rows (decode): no buffer. Two codes per output are cut out of the block's words straight into
// 16-bit lanes (lane 2 j: the code added second, lane 2 j + 1: the one added first, output j) and
// looked up with one `vpermw` in the tile's table rounded to bf16 (its 16 repeated entries twice over
// 32 lanes, so the bits a 5-bit index reads above a code pick the same entry). These are expand_bf16's
// values and the GEMM's sums, so a row's bits do not depend on which path its batch took; per pair of
// codes and tile 3 instructions instead of expand_bf16's 7 and a store and a load. Without AMX the
// pair is k + 1 and k (one chain). In AMX order it is k + 2 and k, then k + 3 and k + 1: vdpbf16ps adds
// its upper then its lower product, so one instruction takes two steps of the even sum (or the odd),
// as many instructions as one chain needs; x is laid out to match (prepare_bf16). With AVX512-VBMI one
// `vpmultishiftqb` places both codes; else two shifts and a blend.
#if defined(__AVX512VBMI__)
// vpmultishiftqb's control: in each 64-bit lane (outputs j and j + 1, one 32-bit word each) bytes
// 0, 1 take 8 bits from bit Bits * low (code `low` of output j), bytes 2, 3 from Bits * high, and
// bytes 4-7 the same from bit 32 on (output j + 1).
template <int Bits>
__m512i multishift_control(int low, int high) {
  alignas(64) uint8_t bytes[64];
  for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>(32 * (i % 8 / 4) + Bits * (i % 4 < 2 ? low : high));
  return _mm512_load_si512(bytes);
}
#endif

// The indices of codes `low` (bits 0-15 of each output's 32-bit lane) and `high` (bits 16-31).
template <int Bits>
inline __m512i code_pair(__m512i words, int low, int high, [[maybe_unused]] __m512i control) {
#if defined(__AVX512VBMI__)
  return _mm512_multishift_epi64_epi8(control, words);
#else
  const __m512i lower = _mm512_srli_epi32(words, Bits * low);
  const int high_at = Bits * high;
  const __m512i upper = high_at <= 16 ? _mm512_slli_epi32(words, 16 - high_at) : _mm512_srli_epi32(words, high_at - 16);
  return _mm512_mask_blend_epi16(0xaaaaaaaau, lower, upper);
#endif
}

// The (low, high) codes of each dot-product step of a block of 8, in order: see above.
constexpr int kStepCodes[2][4][2] = {{{0, 1}, {2, 3}, {4, 5}, {6, 7}},   // one chain
                                     {{2, 0}, {3, 1}, {6, 4}, {7, 5}}};  // AMX order: even, odd, even, odd

template <int Bits>
struct PairIndices {
#if defined(__AVX512VBMI__)
  __m512i control[4];
  PairIndices() {
    for (int step = 0; step < 4; ++step)
      control[step] = multishift_control<Bits>(kStepCodes[kAmxOrder][step][0], kStepCodes[kAmxOrder][step][1]);
  }
#endif
  inline __m512i operator()(__m512i words, int step) const {
#if defined(__AVX512VBMI__)
    const __m512i ctl = control[step];
#else
    const __m512i ctl = words;  // unused
#endif
    return code_pair<Bits>(words, kStepCodes[kAmxOrder][step][0], kStepCodes[kAmxOrder][step][1], ctl);
  }
};

template <int R, int T, int Bits>
void direct_bf16(const Problem& p, int64_t tile0, int64_t row0) {
  const int64_t blocks = p.k / kCodes;
  static const PairIndices<Bits> indices;  // its controls made once, not on every call
  __m512i table[T];
  for (int t = 0; t < T; ++t)
    table[t] = _mm512_broadcast_i64x4(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(tile_table(p, tile0 + t)))));
  Sums<R, T> sums;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i words[T];
    for (int t = 0; t < T; ++t) {
      const uint8_t* codes = block_codes(p, tile0 + t, b);
      prefetch_ahead(codes);
      words[t] = words_avx512<Bits>(codes);
    }
    // One dot-product step into `sum` (the chain, or in AMX order the even or odd sums: chosen at
    // compile time, so every sum stays in a register); x's words in the same order (prepare_bf16).
    const auto step = [&](int step, __m512(&sum)[R][T]) {
      __m512bh x[R];
      for (int r = 0; r < R; ++r) {
        uint32_t both;
        std::memcpy(&both, p.x_bf16 + (row0 + r) * p.x_stride + b * kCodes + 2 * step, 4);
        x[r] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(both)));
      }
      for (int t = 0; t < T; ++t) {
        const __m512bh w = reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(indices(words[t], step), table[t]));
        for (int r = 0; r < R; ++r) sum[r][t] = _mm512_dpbf16_ps(sum[r][t], w, x[r]);
      }
    };
    for (int even = 0; even < 4; even += 2) {
      step(even, kAmxOrder ? sums.even : sums.acc);
      step(even + 1, kAmxOrder ? sums.odd : sums.acc);
    }
    if ((b + 1) % (kAmxInputs / kCodes) == 0) sums.fold();
  }
  sums.store(p, tile0, row0);
}

template <int T, int Bits>
void direct_rows_bf16(const Problem& p, int64_t tile0) {
  int64_t r = 0;
  for (; r + 2 <= p.m; r += 2) direct_bf16<2, T, Bits>(p, tile0, r);
  if (r < p.m) direct_bf16<1, T, Bits>(p, tile0, r);
}

template <int Bits>
void direct_group_bf16(const Problem& p, int64_t tile0, int tiles) {
  switch (tiles) {
    case 4: return direct_rows_bf16<4, Bits>(p, tile0);
    case 3: return direct_rows_bf16<3, Bits>(p, tile0);
    case 2: return direct_rows_bf16<2, Bits>(p, tile0);
    default: return direct_rows_bf16<1, Bits>(p, tile0);
  }
}

#if defined(AFMKIT_AMX)
// ---- AMX (prefill and batches of 3 rows or more) ----------------------------------------------------
// The expanded buffer is already AMX's weight-tile layout: a tile of 16 outputs over 32 inputs is 16
// rows of 64 bytes (pairs of k, output j at bytes 4 j), `tiles` * 64 bytes apart. x (rows padded to
// 16 and K to 32 with zeros, prepare_bf16) gives the 16-row input tiles. Per 32 rows by 2 tiles: four
// sum tiles (0-3), two input tiles (4, 5), two weight tiles (6, 7).

// RB blocks of 16 rows by TB tiles from row0 and tile t (of the group's `tiles`), scaled into y.
template <int RB, int TB>
void amx_block(const Problem& p, const uint16_t* expanded, int64_t tile0, int tiles, int t, int64_t row0) {
  _tile_zero(0);
  if constexpr (TB > 1) _tile_zero(1);
  if constexpr (RB > 1) _tile_zero(2);
  if constexpr (RB > 1 && TB > 1) _tile_zero(3);
  const int64_t x_bytes = p.x_stride * 2, w_bytes = int64_t{tiles} * 64;
  for (int64_t k0 = 0; k0 < padded_k(p.k); k0 += kAmxInputs) {
    const uint16_t* x = p.x_bf16 + row0 * p.x_stride + k0;
    const uint16_t* w = expanded + (k0 / 2 * tiles + t) * 32;
    _tile_loadd(4, x, x_bytes);
    if constexpr (RB > 1) _tile_loadd(5, x + 16 * p.x_stride, x_bytes);
    _tile_loadd(6, w, w_bytes);
    if constexpr (TB > 1) _tile_loadd(7, w + 32, w_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RB > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RB > 1 && TB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float sums[2][2][kTile * kTile];
  _tile_stored(0, sums[0][0], 64);
  if constexpr (TB > 1) _tile_stored(1, sums[0][1], 64);
  if constexpr (RB > 1) _tile_stored(2, sums[1][0], 64);
  if constexpr (RB > 1 && TB > 1) _tile_stored(3, sums[1][1], 64);
  for (int tb = 0; tb < TB; ++tb) {
    const int64_t n0 = (tile0 + t + tb) * kTile;
    const __m512 s = _mm512_loadu_ps(p.scales + n0);
    for (int rb = 0; rb < RB; ++rb)
      for (int64_t r = 0; r < kTile && row0 + rb * kTile + r < p.m; ++r)
        _mm512_storeu_ps(p.y + (row0 + rb * kTile + r) * p.n + n0, _mm512_mul_ps(_mm512_load_ps(sums[rb][tb] + r * kTile), s));
  }
}

void amx_gemm(const Problem& p, const uint16_t* expanded, int64_t tile0, int tiles) {
  afmkit_amx::configure();
  for (int t = 0; t < tiles; t += 2) {
    const bool two_tiles = t + 1 < tiles;
    for (int64_t row0 = 0; row0 < p.m; row0 += 2 * kTile) {
      const bool two_blocks = row0 + kTile < p.m;
      if (two_blocks && two_tiles) amx_block<2, 2>(p, expanded, tile0, tiles, t, row0);
      else if (two_blocks) amx_block<2, 1>(p, expanded, tile0, tiles, t, row0);
      else if (two_tiles) amx_block<1, 2>(p, expanded, tile0, tiles, t, row0);
      else amx_block<1, 1>(p, expanded, tile0, tiles, t, row0);
    }
  }
  _tile_release();  // the tile state is large: a thread that keeps it makes every switch to it dearer
}
#endif

// Up to this many rows the direct path above, which expands every code again for each pair of rows;
// from there on the buffer, expanded once and read by every row: on AMX's tiles from 3 rows (one
// layer's seven matmuls, 2-core Xeon, two rounds: 3 rows 0.29-0.31 ms on the tiles against 0.35-0.38
// direct, 4 rows 0.31-0.37 against 0.38-0.46, 2 rows 0.40-0.47 against 0.25-0.35;
// benchmarks/results/amx-thresholds/), else from 5 (a choice, not a measured crossover).
constexpr int64_t kDirectRows = 4;
constexpr int64_t kDirectRowsBesideTiles = 2;

inline bool takes_direct_path(int64_t m, int64_t bits, bool tiles) {
  return m <= (tiles ? kDirectRowsBesideTiles : kDirectRows) && bits < 8;
}

void run_group_bf16(const Problem& p, int64_t tile0, int tiles) {
  if (takes_direct_path(p.m, p.bits, p.amx)) {
    switch (p.bits) {
      case 2: return direct_group_bf16<2>(p, tile0, tiles);
      case 3: return direct_group_bf16<3>(p, tile0, tiles);
      default: return direct_group_bf16<4>(p, tile0, tiles);
    }
  }
  thread_local std::vector<uint16_t> buffer;
  const size_t elements = padded_k(p.k) / 2 * tiles * 32;
  if (buffer.size() < elements + 32) buffer.resize(elements + 32);
  uint16_t* expanded = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
  switch (p.bits) {
    case 2: expand_bf16<2>(p, tile0, tiles, expanded); break;
    case 3: expand_bf16<3>(p, tile0, tiles, expanded); break;
    case 4: expand_bf16<4>(p, tile0, tiles, expanded); break;
    default: expand_bf16<8>(p, tile0, tiles, expanded);
  }
#if defined(AFMKIT_AMX)
  if (p.amx) return amx_gemm(p, expanded, tile0, tiles);
#endif
  switch (tiles) {
    case 4: return gemm_rows_bf16<4>(p, expanded, tile0);
    case 3: return gemm_rows_bf16<3>(p, expanded, tile0);
    case 2: return gemm_rows_bf16<2>(p, expanded, tile0);
    default: return gemm_rows_bf16<1>(p, expanded, tile0);
  }
}

// x rounded to bf16 (to nearest even), [M, K] with rows padded_k(K) apart; K is a multiple of 8. In AMX
// builds K is padded to 32 and the rows to 16 with zeros (whole tiles; see padded_k). Into the calling
// thread's buffer: a fresh vector per call is megabytes at prefill, which malloc may map and unmap.
const uint16_t* prepare_bf16(const float* x, int64_t m, int64_t k, bool direct) {
  thread_local std::vector<uint16_t> out;
  const int64_t stride = padded_k(k), rows = kAmxOrder ? round_up(m, kTile) : m;
  if (out.size() < static_cast<size_t>(rows * stride)) out.resize(rows * stride);
  for (int64_t r = 0; r < m; ++r) {
    const float* in = x + r * k;
    uint16_t* row = out.data() + r * stride;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(in + i))));
    if (i < k) {  // the last 8
      const __m256i half = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(0xff, in + i)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + i), _mm256_castsi256_si128(half));
    }
    std::fill(row + k, row + stride, uint16_t{0});
    if (kAmxOrder && direct)  // direct_bf16's order in each 4: k + 2, k, k + 3, k + 1 (k a multiple of 8)
      for (int64_t q = 0; q < k; q += 8) {
        constexpr int order = 2 | 0 << 2 | 3 << 4 | 1 << 6;
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + q));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + q), _mm_shufflehi_epi16(_mm_shufflelo_epi16(v, order), order));
      }
  }
  std::fill(out.data() + m * stride, out.data() + rows * stride, uint16_t{0});
  return out.data();
}
#endif
#endif

// Tiles per work item: 4 for the bf16 GEMM (its register block), else 2: enough chains in flight for
// one row, and small items that share a decode's few tiles (12 for N = 192) evenly between threads.
inline int64_t group_tiles(const Problem& p) { return p.x_bf16 != nullptr ? 4 : 2; }

void run_group(const Problem& p, int64_t group) {
  const int64_t size = group_tiles(p), tile0 = group * size;
  const int64_t tiles = std::min<int64_t>(size, p.n / kTile - tile0);
#if defined(__AVX512BF16__)
  if (p.x_bf16 != nullptr) return run_group_bf16(p, tile0, static_cast<int>(tiles));
#endif
#if defined(__AVX512F__)
  switch (p.bits) {
    case 2: return tiles_rows_avx512<2>(p, tile0, tiles);
    case 3: return tiles_rows_avx512<3>(p, tile0, tiles);
    case 4: return tiles_rows_avx512<4>(p, tile0, tiles);
    default: return tiles_rows_avx512<8>(p, tile0, tiles);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  switch (p.bits) {
    case 2: return tiles_avx2<2>(p, tile0, tiles);
    case 3: return tiles_avx2<3>(p, tile0, tiles);
    case 4: return tiles_avx2<4>(p, tile0, tiles);
    default: return tiles_avx2<8>(p, tile0, tiles);
  }
#else
  tiles_portable(p, tile0, tiles);
#endif
}

// ---- int8 activations ----------------------------------------------------------------------------
// palettized_matmul_int8: y[m, n] = float(sum_k x[m, k] * t[n / group_rows][code[k, n]]) * x_scale[m]
// * col_scale[n], with x int8 (each row quantized by its own scale: dynamic per-token quantization)
// and the table entries t int8 (each group by its own scale, which col_scale carries with the row
// scale); both quantized here, once per call (PalettizedMatmulInt8, below). The sum
// is exact in int32 (|x|, |t| <= 127: K up to 133,000), so every path, every batch and every thread
// count gives the same integers; the two scalings follow in that order, in fp32.
struct Int8Problem {
  const int8_t* x;          // [M, K]
  const int32_t* row_sums;  // [M]: sum_k x[m, k] (the VNNI path's offset, below)
  const float* x_scales;    // [M]
  const uint8_t* indices;   // [N / 16, K / 8, bits, 16], as Problem's
  const int8_t* tables;     // [groups, stride]: entries repeated to 16 when fewer, as Problem's
  const uint8_t* tables_u8; // the same + 128 (VNNI multiplies unsigned by signed bytes)
  const float* col_scales;  // [N]
  float* y;                 // [M, N]
  int64_t m, k, n, bits, tiles_per_group, table_stride;
};

inline void int8_store(const Int8Problem& p, int64_t row, int64_t tile, const int32_t* sums) {
  for (int j = 0; j < kTile; ++j)
    p.y[row * p.n + tile * kTile + j] = static_cast<float>(sums[j]) * p.x_scales[row] * p.col_scales[tile * kTile + j];
}

// Portable: 16-lane int32 loops the compiler vectorizes (AVX2, NEON, ...).
template <int R>
void int8_tile_portable(const Int8Problem& p, int64_t tile, int64_t row0) {
  const int64_t blocks = p.k / kCodes;
  const int bits = static_cast<int>(p.bits);
  const uint32_t mask = (1u << bits) - 1;
  const int8_t* table = p.tables + (tile / p.tiles_per_group) * p.table_stride;
  int32_t acc[R][kTile] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* planes = p.indices + (tile * blocks + b) * p.bits * kTile;
    uint32_t words[kTile] = {};
    if (bits < 8)
      for (int q = 0; q < bits; ++q)
        for (int j = 0; j < kTile; ++j) words[j] |= static_cast<uint32_t>(planes[q * kTile + j]) << (8 * q);
    for (int c = 0; c < kCodes; ++c) {
      int32_t w[kTile];
      for (int j = 0; j < kTile; ++j)
        w[j] = table[bits == 8 ? planes[c * kTile + j] : (words[j] >> (bits * c)) & mask];
      for (int r = 0; r < R; ++r) {
        const int32_t xr = p.x[(row0 + r) * p.k + b * kCodes + c];
        for (int j = 0; j < kTile; ++j) acc[r][j] += w[j] * xr;
      }
    }
  }
  for (int r = 0; r < R; ++r) int8_store(p, row0 + r, tile, acc[r]);
}

[[maybe_unused]] void int8_tiles_portable(const Int8Problem& p, int64_t tile0, int64_t tiles) {
  for (int64_t t = tile0; t < tile0 + tiles; ++t) {
    int64_t r = 0;
    for (; r + 4 <= p.m; r += 4) int8_tile_portable<4>(p, t, r);
    for (; r < p.m; ++r) int8_tile_portable<1>(p, t, r);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
// AVX512-VNNI with VBMI: 64 weights (16 outputs x 4 consecutive inputs) per vector. For <= 4 bits one
// multishift pulls the 4 codes of each lane out of its word into 4 bytes (byte 4 j + i: code 4 h + i
// of lane j, garbage above the code's bits) and one byte permute looks them up in the table repeated
// to 64 bytes (so the garbage bits pick the same entry); 8-bit codes are interleaved by a byte permute
// and looked up in 256 entries with two 128-entry permutes and a blend on bit 7. vpdpbusd multiplies
// unsigned by signed bytes, so the table holds t + 128 and 128 sum_k x[m, k] is subtracted at the end.
template <int Bits>
inline __m512i int8_shift_control(int h) {
  alignas(64) uint8_t control[64];
  for (int byte = 0; byte < 64; ++byte) {
    const int lane = (byte / 4) % 2, i = byte % 4;
    control[byte] = static_cast<uint8_t>(32 * lane + Bits * (4 * h + i));
  }
  return _mm512_load_si512(control);
}

inline __m512i int8_interleave() {  // byte 4 j + i <- byte 16 i + j
  alignas(64) uint8_t order[64];
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 4; ++i) order[4 * j + i] = static_cast<uint8_t>(16 * i + j);
  return _mm512_load_si512(order);
}

// A tile's table (t + 128), in one vector repeated to 64 bytes, or 4 vectors of 64 entries at 8 bits,
// with the byte permutes that pick a quad's codes.
template <int Bits>
struct Int8Table {
  __m512i v[Bits == 8 ? 4 : 1];
  __m512i pick[2];  // <= 4 bits: the multishift controls of quads 0 and 1; 8 bits: the interleave
  Int8Table(const Int8Problem& p, int64_t tile) {
    static const __m512i controls[2] = {int8_shift_control<Bits>(0), int8_shift_control<Bits>(1)};
    static const __m512i interleave = int8_interleave();
    const uint8_t* entries = p.tables_u8 + (tile / p.tiles_per_group) * p.table_stride;
    if constexpr (Bits == 8) {
      for (int q = 0; q < 4; ++q) v[q] = _mm512_loadu_si512(entries + 64 * q);
      pick[0] = pick[1] = interleave;
    } else {
      v[0] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(entries)));
      pick[0] = controls[0], pick[1] = controls[1];
    }
  }
  Int8Table() = default;
};

// The 64 weights (t + 128) of inputs 4 h .. 4 h + 3 of a block by a tile's 16 outputs: byte 4 j + i
// is input 4 h + i of output j. `words`: the block's words (<= 4 bits); `planes`: its codes.
template <int Bits>
inline __m512i int8_quad(const Int8Table<Bits>& table, const uint8_t* planes, __m512i words, int h) {
  if constexpr (Bits == 8) {
    const __m512i codes = _mm512_permutexvar_epi8(table.pick[0], _mm512_loadu_si512(planes + 64 * h));
    const __m512i low = _mm512_permutex2var_epi8(table.v[0], codes, table.v[1]);
    const __m512i high = _mm512_permutex2var_epi8(table.v[2], codes, table.v[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), low, high);
  } else {
    return _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(table.pick[h], words), table.v[0]);
  }
}

// A block's words (<= 4 bits; at 8 bits int8_quad reads the codes themselves).
template <int Bits>
inline __m512i int8_words(const uint8_t* planes) {
  if constexpr (Bits < 8) return words_avx512<Bits>(planes);
  return _mm512_setzero_si512();
}

inline __m512i int8_broadcast(const int8_t* four) {
  int32_t bytes;
  std::memcpy(&bytes, four, 4);
  return _mm512_set1_epi32(bytes);
}

template <int R, int T>
inline void int8_finish(const Int8Problem& p, __m512i (&acc)[R][T], int64_t tile0, int64_t row0) {
  for (int r = 0; r < R; ++r) {
    const __m512i offset = _mm512_set1_epi32(128 * p.row_sums[row0 + r]);
    for (int t = 0; t < T; ++t) {
      alignas(64) int32_t sums[kTile];
      _mm512_store_si512(sums, _mm512_sub_epi32(acc[r][t], offset));
      int8_store(p, row0 + r, tile0 + t, sums);
    }
  }
}

// Few rows (decode): R rows by T tiles, each quad of weights expanded in registers and used at once.
template <int R, int T, int Bits>
void int8_tiles_vnni(const Int8Problem& p, int64_t tile0, int64_t row0) {
  const int64_t blocks = p.k / kCodes;
  Int8Table<Bits> table[T];
  for (int t = 0; t < T; ++t) table[t] = Int8Table<Bits>(p, tile0 + t);
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* planes[T];
    __m512i words[T];
    for (int t = 0; t < T; ++t) {
      planes[t] = p.indices + ((tile0 + t) * blocks + b) * Bits * kTile;
      words[t] = int8_words<Bits>(planes[t]);
    }
    for (int h = 0; h < 2; ++h) {
      __m512i w[T];
      for (int t = 0; t < T; ++t) w[t] = int8_quad<Bits>(table[t], planes[t], words[t], h);
      for (int r = 0; r < R; ++r) {
        const __m512i x = int8_broadcast(p.x + (row0 + r) * p.k + b * kCodes + 4 * h);
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[t], x);
      }
    }
  }
  int8_finish<R, T>(p, acc, tile0, row0);
}

template <int R, int Bits>
void int8_rows_vnni(const Int8Problem& p, int64_t tile0, int64_t tiles, int64_t row0) {
  if (tiles == 2) int8_tiles_vnni<R, 2, Bits>(p, tile0, row0);
  else int8_tiles_vnni<R, 1, Bits>(p, tile0, row0);
}

// Blocks of 6 rows by 2 tiles (12 accumulators), then the 1-5 rows left as one block.
template <int Bits>
void int8_tiles_rows_vnni(const Int8Problem& p, int64_t tile0, int64_t tiles) {
  int64_t r = 0;
  for (; r + 6 <= p.m; r += 6) int8_rows_vnni<6, Bits>(p, tile0, tiles, r);
  switch (p.m - r) {
    case 5: return int8_rows_vnni<5, Bits>(p, tile0, tiles, r);
    case 4: return int8_rows_vnni<4, Bits>(p, tile0, tiles, r);
    case 3: return int8_rows_vnni<3, Bits>(p, tile0, tiles, r);
    case 2: return int8_rows_vnni<2, Bits>(p, tile0, tiles, r);
    case 1: return int8_rows_vnni<1, Bits>(p, tile0, tiles, r);
    default: return;
  }
}

// Many rows (prefill): a group of up to 4 tiles expanded once into a buffer, [K / 4][tiles][64 bytes],
// then read by every block of 6 rows (24 accumulators, 4 weight vectors and a broadcast in 32
// registers: per quad 24 vpdpbusd for 4 loads and 6 broadcasts). The same integers as above.
constexpr int64_t kInt8ExpandRows = 64;

template <int Bits>
void int8_expand(const Int8Problem& p, int64_t tile0, int tiles, uint8_t* out) {
  const int64_t blocks = p.k / kCodes;
  for (int t = 0; t < tiles; ++t) {
    const Int8Table<Bits> table(p, tile0 + t);
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* planes = p.indices + ((tile0 + t) * blocks + b) * Bits * kTile;
      const __m512i words = int8_words<Bits>(planes);
      for (int h = 0; h < 2; ++h)
        _mm512_store_si512(out + ((2 * b + h) * tiles + t) * 64, int8_quad<Bits>(table, planes, words, h));
    }
  }
}

template <int R, int T>
void int8_gemm(const Int8Problem& p, const uint8_t* expanded, int64_t tile0, int64_t row0) {
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const int64_t quads = p.k / 4;
  for (int64_t q = 0; q < quads; ++q) {
    __m512i w[T];
    for (int t = 0; t < T; ++t) w[t] = in_register(_mm512_load_si512(expanded + (q * T + t) * 64));
    for (int r = 0; r < R; ++r) {
      const __m512i x = int8_broadcast(p.x + (row0 + r) * p.k + 4 * q);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[t], x);
    }
  }
  int8_finish<R, T>(p, acc, tile0, row0);
}

template <int T>
void int8_gemm_rows(const Int8Problem& p, const uint8_t* expanded, int64_t tile0) {
  int64_t r = 0;
  for (; r + 6 <= p.m; r += 6) int8_gemm<6, T>(p, expanded, tile0, r);
  switch (p.m - r) {
    case 5: return int8_gemm<5, T>(p, expanded, tile0, r);
    case 4: return int8_gemm<4, T>(p, expanded, tile0, r);
    case 3: return int8_gemm<3, T>(p, expanded, tile0, r);
    case 2: return int8_gemm<2, T>(p, expanded, tile0, r);
    case 1: return int8_gemm<1, T>(p, expanded, tile0, r);
    default: return;
  }
}

void int8_run_expanded(const Int8Problem& p, int64_t tile0, int tiles) {
  thread_local std::vector<uint8_t> buffer;
  const size_t bytes = p.k / 4 * tiles * 64;
  if (buffer.size() < bytes + 64) buffer.resize(bytes + 64);
  uint8_t* expanded = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
  switch (p.bits) {
    case 2: int8_expand<2>(p, tile0, tiles, expanded); break;
    case 3: int8_expand<3>(p, tile0, tiles, expanded); break;
    case 4: int8_expand<4>(p, tile0, tiles, expanded); break;
    default: int8_expand<8>(p, tile0, tiles, expanded);
  }
  switch (tiles) {
    case 4: return int8_gemm_rows<4>(p, expanded, tile0);
    case 3: return int8_gemm_rows<3>(p, expanded, tile0);
    case 2: return int8_gemm_rows<2>(p, expanded, tile0);
    default: return int8_gemm_rows<1>(p, expanded, tile0);
  }
}
#endif

// Tiles per work item: 4 where the VNNI code expands them into a buffer for many rows, else 2.
inline int64_t int8_group_tiles(const Int8Problem& p) {
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  if (p.m >= kInt8ExpandRows) return 4;
#endif
  return 2;
}

void run_int8_group(const Int8Problem& p, int64_t group) {
  const int64_t size = int8_group_tiles(p), tile0 = group * size;
  const int64_t tiles = std::min<int64_t>(size, p.n / kTile - tile0);
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  if (p.m >= kInt8ExpandRows) return int8_run_expanded(p, tile0, static_cast<int>(tiles));
  switch (p.bits) {
    case 2: return int8_tiles_rows_vnni<2>(p, tile0, tiles);
    case 3: return int8_tiles_rows_vnni<3>(p, tile0, tiles);
    case 4: return int8_tiles_rows_vnni<4>(p, tile0, tiles);
    default: return int8_tiles_rows_vnni<8>(p, tile0, tiles);
  }
#else
  int8_tiles_portable(p, tile0, tiles);
#endif
}

// Work items are handed out in chunks from one counter; the calling thread works too, so a call
// finishes even if the pool's threads are all busy elsewhere (as cpu_kernels.cc does).
struct Shared {
  std::function<void(int64_t)> run;  // one work item
  int64_t items, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Shared& s) {
  for (;;) {
    const int64_t start = s.next.fetch_add(s.chunk);
    if (start >= s.items) return;
    const int64_t end = std::min(start + s.chunk, s.items);
    for (int64_t i = start; i < end; ++i) s.run(i);
    s.done.fetch_add(end - start, std::memory_order_release);
  }
}

void parallel_items(ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t)> run) {
  auto shared = std::make_shared<Shared>();
  shared->run = std::move(run);
  shared->items = items;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  shared->chunk = std::max<int64_t>(1, items / (threads * 4));
  const int64_t helpers = std::min<int64_t>(threads - 1, (items + shared->chunk - 1) / shared->chunk - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { work(*shared); });
  work(*shared);
  // The problem lives on the caller's stack: wait until every item is done, spinning briefly, then
  // yielding the core (on a busy machine the helper may be waiting for this very core).
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

// The layout both palettized handlers take (indices [N / 16, K / 8, bits, 16], tables [groups of a
// multiple of 16 rows, 2^bits], scales [N] or none), checked once; `name` prefixes the error.
struct Layout {
  int64_t m, k, n, tiles, groups, entries;
  bool scaled;
};

ffi::Error check_layout(const char* name, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::U8>& indices,
                        ffi::Buffer<ffi::F32>& tables, ffi::Buffer<ffi::F32>& scales, int64_t bits, Layout& out) {
  const auto error = [name](const char* what) { return ffi::Error::InvalidArgument(std::string(name) + ": " + what); };
  const auto xd = x.dimensions(), id = indices.dimensions(), td = tables.dimensions();
  if (xd.size() != 2 || id.size() != 4 || td.size() != 2) return error("x must be 2-D, indices 4-D, tables 2-D");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return error("bits must be 2, 3, 4 or 8");
  out = {xd[0], xd[1], id[0] * kTile, id[0], td[0], int64_t{1} << bits, scales.element_count() != 0};
  if (id[1] * kCodes != out.k || id[2] != bits || id[3] != kTile)
    return error("indices do not match x's last dimension and bits");
  if (td[1] != out.entries || out.groups < 1 || out.n % out.groups || (out.n / out.groups) % kTile)
    return error("tables must be [groups of a multiple of 16 rows, 2^bits]");
  if (out.scaled && scales.element_count() != static_cast<size_t>(out.n))
    return error("scales must have one entry per output (or none)");
  return ffi::Error::Success();
}

ffi::Error PalettizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> indices,
                            ffi::Buffer<ffi::F32> tables, ffi::Buffer<ffi::F32> scales,
                            ffi::ResultBuffer<ffi::F32> y, int64_t bits, bool bf16) {
  Layout layout;
  if (ffi::Error error = check_layout("palettized_matmul", x, indices, tables, scales, bits, layout); error.failure())
    return error;
  const auto [m, k, n, tiles, groups, entries, scaled] = layout;
  // The tables, each repeated to 16 entries when it has fewer, and the scales, once per call (a few KB)
  const int64_t stride = std::max<int64_t>(kTile, entries);
  std::vector<float> table32(groups * stride + kTile), ones(scaled ? 0 : n, 1.0f);
  if (entries == stride) {
    std::copy(tables.typed_data(), tables.typed_data() + groups * entries, table32.begin());
  } else {  // entries is a power of two below 16 (a mask, not a division: this runs on every call)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < stride; ++i) table32[g * stride + i] = tables.typed_data()[g * entries + (i & (entries - 1))];
  }
  const uint16_t* x_bf16 = nullptr;
  int64_t x_stride = k;
  bool amx = false;
#if defined(__AVX512BF16__)
#if defined(AFMKIT_AMX)
  amx = bf16 && afmkit_amx::granted();
#endif
  if (bf16) x_bf16 = prepare_bf16(x.typed_data(), m, k, takes_direct_path(m, bits, amx)), x_stride = padded_k(k);
#else
  (void)bf16;  // no bf16 path in this build: fp32
#endif
  const Problem problem{x.typed_data(), indices.typed_data(), table32.data(), scaled ? scales.typed_data() : ones.data(),
                        y->typed_data(), m, k, n, bits, n / groups / kTile, stride, x_bf16, x_stride, amx};
  if (m > 0 && n > 0)
    parallel_items(pool, (tiles + group_tiles(problem) - 1) / group_tiles(problem),
                   [&problem](int64_t group) { run_group(problem, group); });
  return ffi::Error::Success();
}

// The scheme's quantization, as afmkit/model/palettized.py's quantize_rows and int8_tables write it
// (one correctly rounded fp32 operation at a time, so the XLA path gets the same codes): a vector's
// scale is max|v| * fp32(1/127) (1 when that is 0), its codes v / scale rounded half to even.
inline float int8_scale(const float* v, int64_t count) {
  float largest = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 most = _mm512_setzero_ps();
  for (; i + 16 <= count; i += 16) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
  largest = _mm512_reduce_max_ps(most);
#endif
  for (; i < count; ++i) largest = std::max(largest, std::fabs(v[i]));
  const float scale = largest * (1.0f / 127.0f);
  return scale > 0.0f ? scale : 1.0f;
}

inline int8_t int8_code(float v, float scale) {
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(v / scale))));
}

// A row's codes into `out` and their sum; 16 at a time on AVX-512 (the same division, rounding to
// nearest even and clamp as int8_code).
inline int32_t int8_codes(const float* v, int64_t count, float scale, int8_t* out) {
  int32_t sum = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(scale), low = _mm512_set1_ps(-127.0f), high = _mm512_set1_ps(127.0f);
  __m512i sums = _mm512_setzero_si512();
  for (; i + 16 <= count; i += 16) {
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(v + i), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i codes = _mm512_cvtps_epi32(_mm512_min_ps(high, _mm512_max_ps(low, q)));
    sums = _mm512_add_epi32(sums, codes);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(codes));
  }
  sum = _mm512_reduce_add_epi32(sums);
#endif
  for (; i < count; ++i) {
    out[i] = int8_code(v[i], scale);
    sum += out[i];
  }
  return sum;
}

ffi::Error PalettizedMatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> indices,
                                ffi::Buffer<ffi::F32> tables, ffi::Buffer<ffi::F32> scales,
                                ffi::ResultBuffer<ffi::F32> y, int64_t bits) {
  Layout layout;
  if (ffi::Error error = check_layout("palettized_matmul_int8", x, indices, tables, scales, bits, layout); error.failure())
    return error;
  const auto [m, k, n, tiles, groups, entries, scaled] = layout;
  if (k > (int64_t{1} << 31) / (128 * 128))
    return ffi::Error::InvalidArgument("palettized_matmul_int8: K too large for exact int32 sums");
  // the tables to int8 (each repeated to 16 entries when it has fewer), and each output's scale
  const int64_t stride = std::max<int64_t>(kTile, entries), group_rows = n / groups;
  std::vector<int8_t> table8(groups * stride);
  std::vector<uint8_t> table_u8(groups * stride);
  std::vector<float> col_scales(n);
  for (int64_t g = 0; g < groups; ++g) {
    const float* entry = tables.typed_data() + g * entries;
    const float t_scale = int8_scale(entry, entries);
    for (int64_t i = 0; i < stride; ++i) {
      table8[g * stride + i] = int8_code(entry[i & (entries - 1)], t_scale);  // entries: a power of two
      table_u8[g * stride + i] = static_cast<uint8_t>(table8[g * stride + i] + 128);
    }
    for (int64_t j = g * group_rows; j < (g + 1) * group_rows; ++j)
      col_scales[j] = scaled ? t_scale * scales.typed_data()[j] : t_scale;
  }
  // x to int8 row by row (rows shared between the threads), and each row's sum of codes
  // in the calling thread's buffers, as prepare_bf16's (the workers get plain pointers: a
  // thread_local named inside the lambda would be each worker's own)
  thread_local std::vector<int8_t> x8_buffer;
  thread_local std::vector<float> x_scales_buffer;
  thread_local std::vector<int32_t> row_sums_buffer;
  if (x8_buffer.size() < static_cast<size_t>(m * k)) x8_buffer.resize(m * k);
  if (x_scales_buffer.size() < static_cast<size_t>(m)) x_scales_buffer.resize(m);
  if (row_sums_buffer.size() < static_cast<size_t>(m)) row_sums_buffer.resize(m);
  int8_t* x8 = x8_buffer.data();
  float* x_scales = x_scales_buffer.data();
  int32_t* row_sums = row_sums_buffer.data();
  const float* xs = x.typed_data();
  parallel_items(pool, m, [&](int64_t r) {
    x_scales[r] = int8_scale(xs + r * k, k);
    row_sums[r] = int8_codes(xs + r * k, k, x_scales[r], x8 + r * k);
  });
  const Int8Problem problem{x8, row_sums, x_scales, indices.typed_data(), table8.data(),
                            table_u8.data(), col_scales.data(), y->typed_data(), m, k, n, bits,
                            group_rows / kTile, stride};
  if (m > 0 && n > 0)
    parallel_items(pool, (tiles + int8_group_tiles(problem) - 1) / int8_group_tiles(problem),
                   [&problem](int64_t group) { run_int8_group(problem, group); });
  return ffi::Error::Success();
}

}  // namespace

// Which code multiplies int8 activations in this build.
extern "C" const char* AfmkitPalettizedInt8Isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  return "avx512-vnni";
#else
  return "portable";
#endif
}

// Which code this build runs (for benchmarks and bug reports).
extern "C" const char* AfmkitPalettizedIsa() {
#if defined(__AVX512F__) && defined(__AVX512VBMI__)
  return "avx512-vbmi";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfmkitPalettizedMatmul, PalettizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfmkitPalettizedMatmulInt8, PalettizedMatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits"));
