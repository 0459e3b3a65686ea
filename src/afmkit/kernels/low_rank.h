// A low-rank update (one LoRA adapter shared by every row) that a weight's kernel adds to its own
// product in the same call: y += scale * (x @ a) @ b, a [K, r], b [r, N], fp32 or fp16 (read as
// stored: an fp16 adapter is half the bytes a decode step reads for it, and fp16 -> fp32 is exact).
// Applied apart it is two small XLA matmuls and an add per weight, 630 operations per decode step
// of a 30-layer model, which took nearly as long as the weights' own products. Shared by the
// packed and the palettized kernels (kernels/__init__.py hashes this header with each source).
//
// Arithmetic, the same for every number of rows (a row's bits do not depend on its batch): x @ a
// in blocks of 256 inputs (each block in four chains, see low_rank_inputs, then the blocks' sums in
// order), then per output its r products in order, times scale, added to the weight's own result
// (LoRA's order: ((x @ a) @ b) * scale, then the sum). The blocks of x @ a are work items before
// or beside the weight's tiles; the columns' items come after both.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "half.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLowRankInputs = 256, kLowRankColumns = 512;

inline float factor_value(float v) { return v; }
inline float factor_value(uint16_t v) { return half_to_float(v); }

#if defined(__AVX512F__)
inline __m512 load_factors(const float* in) { return _mm512_loadu_ps(in); }
inline __m512 load_factors(const uint16_t* in) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in)));
}
#endif

// low[0, r) = x[0, count) @ a[0, count) (rows of r), 16 ranks at a time: four chains over the
// inputs (input i in chain i mod 4, each in order), then (c0 + c1) + (c2 + c3). One running sum
// waited on its own last add at every input.
template <typename T>
void low_rank_inputs(const float* x, const T* a, int64_t count, int64_t rank, float* low) {
  for (int64_t r0 = 0; r0 < rank; r0 += 16) {
    const int64_t width = std::min<int64_t>(16, rank - r0);
#if defined(__AVX512F__)
    if (width == 16) {
      __m512 chain[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t i = 0;
      for (; i + 4 <= count; i += 4)
        for (int j = 0; j < 4; ++j)
          chain[j] = _mm512_add_ps(chain[j], _mm512_mul_ps(_mm512_set1_ps(x[i + j]), load_factors(a + (i + j) * rank + r0)));
      for (; i < count; ++i)
        chain[i % 4] = _mm512_add_ps(chain[i % 4], _mm512_mul_ps(_mm512_set1_ps(x[i]), load_factors(a + i * rank + r0)));
      _mm512_storeu_ps(low + r0, _mm512_add_ps(_mm512_add_ps(chain[0], chain[1]), _mm512_add_ps(chain[2], chain[3])));
      continue;
    }
#endif
    float chain[4][16] = {};
    for (int64_t i = 0; i < count; ++i)
      for (int64_t c = 0; c < width; ++c) chain[i % 4][c] += x[i] * factor_value(a[i * rank + r0 + c]);
    for (int64_t c = 0; c < width; ++c) low[r0 + c] = (chain[0][c] + chain[1][c]) + (chain[2][c] + chain[3][c]);
  }
}

// out[0, cols) += scale * low @ b[:, col0 : col0 + cols]: per output its r products in order, 64
// outputs at a time (four independent sums in flight) where AVX-512 is, then 16, then one.
template <typename T>
void add_low_rank(const float* low, const T* b, int64_t rank, int64_t n, float scale, int64_t col0, int64_t cols,
                  float* out) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(scale);
  for (; c + 16 <= cols;) {
    const int lanes = c + 64 <= cols ? 4 : 1;
    __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t r = 0; r < rank; ++r) {
      const __m512 l = _mm512_set1_ps(low[r]);
      const T* br = b + r * n + col0 + c;
      for (int j = 0; j < lanes; ++j) sums[j] = _mm512_add_ps(sums[j], _mm512_mul_ps(l, load_factors(br + 16 * j)));
    }
    for (int j = 0; j < lanes; ++j, c += 16)
      _mm512_storeu_ps(out + c, _mm512_add_ps(_mm512_loadu_ps(out + c), _mm512_mul_ps(sums[j], s)));
  }
#endif
  for (; c < cols; ++c) {
    float sum = 0.0f;
    for (int64_t r = 0; r < rank; ++r) sum += low[r] * factor_value(b[r * n + col0 + c]);
    out[c] += sum * scale;
  }
}

// One call's update: `input_item`s (the blocks of x @ a, run beside the weight's tiles), then
// `column_item`s (after the weight's product is in y). Rank 0: no update, no items.
class LowRankUpdate {
 public:
  // a [K, r] and b [r, N] of one dtype, fp32 or fp16, both empty for none; `name` prefixes the error.
  xla::ffi::Error read(const char* name, xla::ffi::AnyBuffer& a, xla::ffi::AnyBuffer& b, int64_t m, int64_t k, int64_t n,
                  float scale) {
    rank_ = a.element_count() / std::max<int64_t>(k, 1);
    const auto type = a.element_type();
    if (a.element_count() != static_cast<size_t>(k * rank_) || b.element_count() != static_cast<size_t>(rank_ * n) ||
        b.element_type() != type || (type != xla::ffi::DataType::F32 && type != xla::ffi::DataType::F16))
      return xla::ffi::Error::InvalidArgument(std::string(name) +
                                         ": the low-rank update must be a [K, r] and b [r, N], both fp32 or both fp16");
    a_ = a.untyped_data(), b_ = b.untyped_data(), half_ = type == xla::ffi::DataType::F16;
    m_ = m, k_ = k, n_ = n, scale_ = scale;
    input_blocks_ = (k + kLowRankInputs - 1) / kLowRankInputs;
    column_blocks_ = (n + kLowRankColumns - 1) / kLowRankColumns;
    partial_.assign(input_items() * rank_, 0.0f);
    return xla::ffi::Error::Success();
  }

  int64_t input_items() const { return rank_ > 0 ? m_ * input_blocks_ : 0; }
  // Decoding's few rows run their few input items beside the weight's tiles (one wake-up of the
  // pool instead of two); more rows run them first, on their own: beside the tiles, a thousand
  // small items made the pool's chunks so large that one thread got every tile (prefill 30% slower).
  int64_t inputs_beside_tiles() const { return m_ <= 4 ? input_items() : 0; }
  int64_t inputs_before_tiles() const { return m_ <= 4 ? 0 : input_items(); }
  int64_t column_items() const { return rank_ > 0 ? m_ * column_blocks_ : 0; }
  // Decoding's few rows: waking a helper thread costs more than the columns do.
  bool columns_inline() const { return m_ * n_ * rank_ <= (int64_t{1} << 16); }

  void input_item(const float* x, int64_t item) {
    const int64_t row = item / input_blocks_, k0 = item % input_blocks_ * kLowRankInputs;
    const int64_t count = std::min(kLowRankInputs, k_ - k0);
    float* out = partial_.data() + item * rank_;
    if (half_)
      low_rank_inputs(x + row * k_ + k0, static_cast<const uint16_t*>(a_) + k0 * rank_, count, rank_, out);
    else
      low_rank_inputs(x + row * k_ + k0, static_cast<const float*>(a_) + k0 * rank_, count, rank_, out);
  }

  void column_item(float* y, int64_t item) const {
    const int64_t row = item / column_blocks_, col0 = item % column_blocks_ * kLowRankColumns;
    const int64_t cols = std::min(kLowRankColumns, n_ - col0);
    thread_local std::vector<float> low;
    const float* blocks = partial_.data() + row * input_blocks_ * rank_;
    low.assign(blocks, blocks + rank_);
    for (int64_t block = 1; block < input_blocks_; ++block)
      for (int64_t r = 0; r < rank_; ++r) low[r] += blocks[block * rank_ + r];
    float* out = y + row * n_ + col0;
    if (half_)
      add_low_rank(low.data(), static_cast<const uint16_t*>(b_), rank_, n_, scale_, col0, cols, out);
    else
      add_low_rank(low.data(), static_cast<const float*>(b_), rank_, n_, scale_, col0, cols, out);
  }

 private:
  const void* a_ = nullptr;
  const void* b_ = nullptr;
  bool half_ = false;
  int64_t m_ = 0, k_ = 0, n_ = 0, rank_ = 0, input_blocks_ = 1, column_blocks_ = 1;
  float scale_ = 0.0f;
  std::vector<float> partial_;  // [M, input blocks, r]
};

}  // namespace
