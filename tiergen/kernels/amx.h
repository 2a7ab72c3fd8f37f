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

// the first n (<= 32) bfloat16 words of a 64-byte tile row
inline __mmask32 first_words(int64_t n) { return n >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << n) - 1); }

// Rows r[0 .. n), n <= 16, of row stride rs (K bfloat16 each) as the KB right-operand tiles
// of one 16-row block, into dst (KB x 16 x 32): tile kb's row i holds, for rows c = 0..15,
// the pair (32 kb + 2i, 32 kb + 2i + 1) of row c -- a 16 x 16 transpose of 32-bit pairs.
// Rows past n and dims past K are zero; nothing past them is read.
inline void pack_right_tiles(const uint16_t* rows, int64_t rs, int64_t n, int64_t K, int64_t KB, uint16_t* dst) {
  for (int64_t kb = 0; kb < KB; ++kb, dst += 512) {
    const __mmask32 m = first_words(K - 32 * kb);
    __m512i r[16];
    for (int64_t i = 0; i < 16; ++i)
      r[i] = i < n ? _mm512_maskz_loadu_epi16(m, rows + i * rs + 32 * kb) : _mm512_setzero_si512();
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + 32 * i, r[i]);
  }
}

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
