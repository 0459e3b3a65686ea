// AMX tiles for the kernels' bf16 GEMMs (included by cpu_kernels.cc and palettized_kernels.cc; the
// build key in afmkit/kernels/__init__.py covers this file too). AFMKIT_AMX is defined where the
// build targets a CPU with AMX (-march=native there), and only then.
//
// What one TDPBF16PS computes (measured bit for bit on a Xeon, benchmarks/results/amx-arithmetic/,
// and as Intel's SDM gives it): for each block of 32 inputs (16 pairs), two fp32 sums from zero, one
// of the even inputs' products and one of the odd ones', each in order (a product of two bf16
// numbers is exact in fp32; each addition rounds to nearest even), then acc = acc + (even + odd).
// The kernels' paths that do not run on the tiles compute the same sums with vdpbf16ps, which adds
// its upper product, then its lower one: pairs (k + 2, k) and (k + 3, k + 1) make one instruction
// two steps of the even or the odd sum. Both flush subnormal results to zero; the emulation's
// additions of the two sums do not, which differs only below fp32's normal range (2^-126).
#pragma once

#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define AFMKIT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#endif

namespace afmkit_amx {

#if defined(AFMKIT_AMX)
constexpr bool kOrder = true;  // every bf16 path sums as AMX does
#else
constexpr bool kOrder = false;
#endif
constexpr int64_t kInputs = 32;  // inputs per dot-product block

#if defined(AFMKIT_AMX)
// Whether this process may use the tiles: Linux grants them on request (arch_prctl), once per
// process. AFMKIT_AMX=0 keeps them off (the same bits, from the emulation; tests compare the two).
inline bool granted() {
  static const bool granted = [] {
    const char* setting = std::getenv("AFMKIT_AMX");
    if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// Every tile 16 rows of 64 bytes (palette 1).
inline void configure() {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;
  for (int tile = 0; tile < 8; ++tile) {
    config[16 + 2 * tile] = 64;
    config[48 + tile] = 16;
  }
  _tile_loadconfig(config);
}
#else
inline bool granted() { return false; }
#endif

// The arithmetic of the bf16 paths here, for afmkit.kernels: "amx" (AMX's sums, the tiles in use),
// "amx-emulated" (AMX's sums without the tiles), "pairs" (one vdpbf16ps chain per output) or "none".
inline const char* arithmetic() {
#if defined(AFMKIT_AMX)
  return granted() ? "amx" : "amx-emulated";
#elif defined(__AVX512BF16__)
  return "pairs";
#else
  return "none";
#endif
}

}  // namespace afmkit_amx
