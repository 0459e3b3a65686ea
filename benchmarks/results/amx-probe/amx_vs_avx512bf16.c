#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static uint16_t bf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
int main() {
  syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  enum { M = 16, K = 2048, N = 16 };
  static uint16_t A[M][K], B[K / 2][N * 2];  // B rows: k pair, lanes n*2+e
  srand(1);
  for (int m = 0; m < M; ++m) for (int k = 0; k < K; ++k) A[m][k] = bf(((rand() / (float)RAND_MAX) - 0.5f) * (1 << (rand() % 8)));
  for (int p = 0; p < K / 2; ++p) for (int j = 0; j < 2 * N; ++j) B[p][j] = bf(((rand() / (float)RAND_MAX) - 0.5f) * (1 << (rand() % 8)));
  // AVX512-BF16 chain per row: acc over pairs in order
  float ref[M][N];
  for (int m = 0; m < M; ++m) {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < K / 2; ++p) {
      uint32_t pair = A[m][2 * p] | ((uint32_t)A[m][2 * p + 1] << 16);
      __m512i xa = _mm512_set1_epi32(pair);
      __m512i wb = _mm512_loadu_si512(B[p]);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)xa, (__m512bh)wb);
    }
    _mm512_storeu_ps(ref[m], acc);
  }
  // AMX: C[16x16] += A[16 x 32 bf16] * B[16 pairs x 16 cols]
  uint8_t cfg[64]; memset(cfg, 0, 64); cfg[0] = 1;
  cfg[16] = 64; cfg[48] = 16;      // tile 0: C 16 rows x 64 bytes
  cfg[18] = 64; cfg[49] = 16;      // tile 1: A 16 rows x 64 bytes (32 bf16)
  cfg[20] = 64; cfg[50] = 16;      // tile 2: B 16 rows x 64 bytes
  _tile_loadconfig(cfg);
  float C[M][N]; memset(C, 0, sizeof C);
  _tile_loadd(0, C, 64);
  for (int k0 = 0; k0 < K; k0 += 32) {
    _tile_loadd(1, &A[0][k0], K * 2);
    _tile_loadd(2, B[k0 / 2], N * 4);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, C, 64);
  _tile_release();
  int diff = 0; double maxrel = 0;
  for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
    if (memcmp(&C[m][n], &ref[m][n], 4)) { ++diff; double r = (C[m][n] - ref[m][n]) / (ref[m][n] + 1e-30); if (r < 0) r = -r; if (r > maxrel) maxrel = r; }
  }
  printf("differing outputs: %d of %d, max rel %.3g\n", diff, M * N, maxrel);
  return 0;
}
