// What the AMX kernels share: whether this build and process may use the tiles, and the
// one tile shape they all use.
#pragma once

#include "common.h"

#if TIERGEN_HAVE_KERNEL && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TIERGEN_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define TIERGEN_HAVE_AMX 0
#endif

namespace tiergen {

// Linux hands out AMX's tile state only to a process that asks for it (arch_prctl).
inline bool amx_ready() {
#if TIERGEN_HAVE_AMX
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#if TIERGEN_HAVE_AMX
// Tiles 0-7 all 16 rows x 64 bytes (16 x 32 bfloat16 operands, 16 x 16 float32 sums); each
// kernel says what it keeps in which.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) colsb[i] = 64, rows[i] = 16;
  }
};

// The tile configuration held for one thread's stretch of work, released after it.
struct TileScope {
  TileScope() {
    const TileConfig cfg;
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};
#endif

}  // namespace tiergen
