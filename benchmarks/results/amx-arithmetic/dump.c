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
// T trials: each: A 16x32 bf16, B 16x32 bf16 (pairs), C0 16x16 f32 -> C1
int main(int argc, char **argv) {
  syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  int T = atoi(argv[1]), spread = atoi(argv[2]); float cscale = atof(argv[3]);
  srand(7);
  uint8_t cfg[64]; memset(cfg, 0, 64); cfg[0] = 1;
  cfg[16] = 64; cfg[48] = 16; cfg[18] = 64; cfg[49] = 16; cfg[20] = 64; cfg[50] = 16;
  _tile_loadconfig(cfg);
  FILE *f = fopen("dump.bin", "wb");
  static uint16_t A[16][32], B[16][32]; static float C0[16][16], C1[16][16];
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < 16; ++i) for (int j = 0; j < 32; ++j) {
      A[i][j] = bf(((rand() / (float)RAND_MAX) - 0.5f) * (1 << (rand() % spread)));
      B[i][j] = bf(((rand() / (float)RAND_MAX) - 0.5f) * (1 << (rand() % spread)));
    }
    for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) C0[i][j] = ((rand() / (float)RAND_MAX) - 0.5f) * cscale;
    _tile_loadd(0, C0, 64); _tile_loadd(1, A, 64); _tile_loadd(2, B, 64);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, C1, 64);
    fwrite(A, 1, sizeof A, f); fwrite(B, 1, sizeof B, f); fwrite(C0, 1, sizeof C0, f); fwrite(C1, 1, sizeof C1, f);
  }
  _tile_release(); fclose(f); return 0;
}
