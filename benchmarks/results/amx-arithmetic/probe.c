#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static uint16_t bf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
static float fb(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
enum { M = 16, K = 4096, N = 16 };
static uint16_t A[M][K], B[K / 2][N * 2];
static float ref[M][N], C[M][N], E[8][M][N];
int main(int argc, char **argv) {
  syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  int spread = argc > 1 ? atoi(argv[1]) : 8;
  int seed = argc > 2 ? atoi(argv[2]) : 1;
  srand(seed);
  for (int m = 0; m < M; ++m) for (int k = 0; k < K; ++k) A[m][k] = bf(((rand() / (float)RAND_MAX) - 0.5f) * (1 << (rand() % spread)));
  for (int p = 0; p < K / 2; ++p) for (int j = 0; j < 2 * N; ++j) B[p][j] = bf(((rand() / (float)RAND_MAX) - 0.5f) * (1 << (rand() % spread)));
  for (int m = 0; m < M; ++m) {
    __m512 acc = _mm512_setzero_ps();
    for (int p = 0; p < K / 2; ++p) {
      uint32_t pair = A[m][2 * p] | ((uint32_t)A[m][2 * p + 1] << 16);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(pair), (__m512bh)_mm512_loadu_si512(B[p]));
    }
    _mm512_storeu_ps(ref[m], acc);
  }
  uint8_t cfg[64]; memset(cfg, 0, 64); cfg[0] = 1;
  cfg[16] = 64; cfg[48] = 16; cfg[18] = 64; cfg[49] = 16; cfg[20] = 64; cfg[50] = 16;
  _tile_loadconfig(cfg);
  memset(C, 0, sizeof C);
  _tile_loadd(0, C, 64);
  for (int k0 = 0; k0 < K; k0 += 32) {
    _tile_loadd(1, &A[0][k0], K * 2);
    _tile_loadd(2, B[k0 / 2], N * 4);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, C, 64);
  _tile_release();
  _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ + DAZ
  for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
    float e0 = 0, e1 = 0, e2 = 0, e3 = 0, e4 = 0, e5 = 0;
    for (int p = 0; p < K / 2; ++p) {
      float a0 = fb(A[m][2*p]), a1 = fb(A[m][2*p+1]), b0 = fb(B[p][2*n]), b1 = fb(B[p][2*n+1]);
      e0 = fmaf(a0, b0, e0); e0 = fmaf(a1, b1, e0);          // even then odd
      e1 = fmaf(a1, b1, e1); e1 = fmaf(a0, b0, e1);          // odd then even
      e2 = (float)((double)e2 + (double)a0 * b0 + (double)a1 * b1);  // pair fused, one rounding
      e3 = e3 + (a0 * b0 + a1 * b1);                          // pair rounded then added
    }
    // per instruction (16 pairs): sum exactly then add once
    for (int k0 = 0; k0 < K; k0 += 32) {
      double s = 0; float s5 = 0;
      for (int k = k0; k < k0 + 32; ++k) { s += (double)fb(A[m][k]) * fb(B[k/2][2*n + (k&1)]); }
      e4 = (float)((double)e4 + s);
      for (int p = k0/2; p < k0/2 + 16; ++p) s5 += fb(A[m][2*p]) * fb(B[p][2*n]) + fb(A[m][2*p+1]) * fb(B[p][2*n+1]);
      e5 = e5 + s5;
    }
    E[0][m][n] = e0; E[1][m][n] = e1; E[2][m][n] = e2; E[3][m][n] = e3; E[4][m][n] = e4; E[5][m][n] = e5;
  }
  const char *names[] = {"fma even,odd", "fma odd,even", "pair fused", "pair rounded", "instr exact", "instr fp32 seq"};
  for (int e = 0; e < 6; ++e) {
    int da = 0, dv = 0;
    for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) { da += memcmp(&C[m][n], &E[e][m][n], 4) != 0; dv += memcmp(&ref[m][n], &E[e][m][n], 4) != 0; }
    printf("%-16s differs from amx %3d, from vdpbf16ps %3d (of %d)\n", names[e], da, dv, M * N);
  }
  int d = 0; for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) d += memcmp(&C[m][n], &ref[m][n], 4) != 0;
  printf("amx vs vdpbf16ps %d\n", d);
  return 0;
}
