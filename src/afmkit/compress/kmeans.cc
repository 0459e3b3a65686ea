// Exact weighted 1-D k-means of many groups of values, for palettization (afmkit/compress/kmeans.py
// compiles this file on first use and calls it through ctypes; it is not an XLA kernel).
//
// In one dimension the clusters of an optimal k-means are contiguous runs of the sorted values, so
// the optimum is a dynamic programme over split points:
//   D[j][i] = min over m < i of D[j-1][m] + cost(m, i),
// where D[j][i] is the least weighted squared error of the first i sorted values in j clusters and
// cost(m, i) is the weighted squared error of values m..i-1 around their weighted mean, read off
// prefix sums of w, w*x and w*x^2 in O(1). cost satisfies the quadrangle inequality, so the best
// split point is nondecreasing in i and each layer j is computed by divide and conquer: the middle
// row's best split bounds the split points of the rows above and below it. That is O(n log n) per
// layer, O(k n log n) per group.
//
// Values are centred on their weighted mean so that the prefix sums of x^2 do not swamp the
// differences taken from them.
//
// Bit-identical everywhere: every sum runs in one fixed order (a plain loop, no reassociation:
// afmkit.kernels.build compiles with -ffp-contract=off and no -ffast-math, so a * b + c rounds
// twice on every CPU, FMA or not), only + - * / are used (no libm), and groups are independent,
// so threads change nothing. kmeans.py's numpy fallback does the same operations in the same
// order (equal values are deliberately not merged: merging sums weights in another order), so
// both paths give the same bits (tests/compress/test_kmeans.py); the named compressed model's
// build relies on it (afmkit.compress.named).
//
// Groups are independent and are shared out over threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

namespace {

struct Prefix {
  std::vector<double> w, wx, wxx;  // sums over the first i values, i = 0..n

  double cost(int64_t m, int64_t i) const {
    const double weight = w[i] - w[m], sum = wx[i] - wx[m];
    return (wxx[i] - wxx[m]) - sum * sum / weight;
  }
};

// cur[i] for rows i in [lo, hi], given the best split of every row lies in [opt_lo, opt_hi].
void Solve(const Prefix& p, const double* prev, double* cur, int32_t* arg, int64_t lo, int64_t hi,
           int64_t opt_lo, int64_t opt_hi) {
  while (lo <= hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t last = std::min(opt_hi, mid - 1);
    double best = std::numeric_limits<double>::infinity();
    int64_t best_m = opt_lo;
    for (int64_t m = opt_lo; m <= last; ++m) {
      const double value = prev[m] + p.cost(m, mid);
      if (value < best) {
        best = value;
        best_m = m;
      }
    }
    cur[mid] = best;
    arg[mid] = static_cast<int32_t>(best_m);
    // Rows below mid recurse, rows above it loop: the stack stays O(log n) deep.
    Solve(p, prev, cur, arg, lo, mid - 1, opt_lo, best_m);
    lo = mid + 1;
    opt_lo = best_m;
  }
}

// One group: `values` sorted ascending with their `weights` (> 0). Writes k centroids (ascending)
// and k + 1 boundaries: cluster c holds sorted positions [bounds[c], bounds[c + 1]).
void Group(const double* values, const double* weights, int64_t n, int64_t k, double* centroids,
           int32_t* bounds) {
  if (n <= k) {  // every value its own cluster; the clusters left over are empty
    for (int64_t c = 0; c < k; ++c) {
      centroids[c] = values[std::min(c, n - 1)];
      bounds[c] = static_cast<int32_t>(std::min(c, n));
    }
    bounds[k] = static_cast<int32_t>(n);
    return;
  }
  double total_w = 0, total_wx = 0;
  for (int64_t i = 0; i < n; ++i) total_w += weights[i], total_wx += weights[i] * values[i];
  const double mean = total_wx / total_w;
  Prefix p;
  p.w.assign(n + 1, 0), p.wx.assign(n + 1, 0), p.wxx.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const double x = values[i] - mean;
    p.w[i + 1] = p.w[i] + weights[i];
    p.wx[i + 1] = p.wx[i] + weights[i] * x;
    p.wxx[i + 1] = p.wxx[i] + weights[i] * x * x;
  }
  // arg[j][i]: where the last of j + 1 clusters of the first i values begins.
  std::vector<int32_t> arg(static_cast<size_t>(k) * (n + 1), 0);
  std::vector<double> prev(n + 1), cur(n + 1, std::numeric_limits<double>::infinity());
  for (int64_t i = 1; i <= n; ++i) prev[i] = p.cost(0, i);
  for (int64_t j = 1; j < k; ++j) {
    // j + 1 clusters of the first i values, each nonempty, leaving k - j - 1 values for the rest.
    const int64_t lo = j + 1, hi = (j == k - 1) ? n : n - (k - j - 1);
    const int64_t rows_lo = (j == k - 1) ? n : lo;  // the last layer needs only i = n
    Solve(p, prev.data(), cur.data(), arg.data() + j * (n + 1), rows_lo, hi, j, hi - 1);
    std::swap(prev, cur);
  }
  // Walk the splits back from the end.
  std::vector<int64_t> cut(k + 1);
  cut[k] = n;
  for (int64_t j = k - 1; j >= 1; --j) cut[j] = arg[j * (n + 1) + cut[j + 1]];
  cut[0] = 0;
  for (int64_t c = 0; c < k; ++c) {
    centroids[c] = (p.wx[cut[c + 1]] - p.wx[cut[c]]) / (p.w[cut[c + 1]] - p.w[cut[c]]) + mean;
    bounds[c] = static_cast<int32_t>(cut[c]);
  }
  bounds[k] = static_cast<int32_t>(n);
}

}  // namespace

extern "C" {

// values, weights: [groups, n] (each row sorted ascending, weights > 0); centroids: [groups, k];
// bounds: [groups, k + 1] int32. Requires n < 2^31.
void AfmkitKmeans1d(const double* values, const double* weights, int64_t groups, int64_t n, int64_t k,
                    int64_t threads, double* centroids, int32_t* bounds) {
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t g = next++; g < groups; g = next++) {
      Group(values + g * n, weights + g * n, n, k, centroids + g * k, bounds + g * (k + 1));
    }
  };
  const int64_t count = std::max<int64_t>(1, std::min(threads, groups));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < count; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

}  // extern "C"
