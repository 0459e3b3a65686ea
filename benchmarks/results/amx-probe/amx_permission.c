#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
int main() {
  long r = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  printf("req perm: %ld\n", r);
  unsigned long bits = 0;
  syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits);
  printf("perm bits: %lx\n", bits);
  fflush(stdout);
  uint8_t cfg[64]; memset(cfg, 0, 64); cfg[0] = 1;
  for (int i = 0; i < 3; ++i) { cfg[16 + 2*i] = 64; cfg[48 + i] = 16; }
  _tile_loadconfig(cfg);
  printf("ldtilecfg ok\n");
  _tile_release();
  return 0;
}
