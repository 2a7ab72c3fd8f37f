// What every tiergen CPU kernel shares: the instruction-set check and bfloat16 rows
// moved in and out of float32 vectors.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define TIERGEN_HAVE_KERNEL 1
#else
#define TIERGEN_HAVE_KERNEL 0
#endif

inline bool available() { return TIERGEN_HAVE_KERNEL; }

#if TIERGEN_HAVE_KERNEL
namespace tiergen {

// the first n (<= 16) lanes
inline __mmask16 tail(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

// 16 bfloat16 values (the lanes of m) widened to float32, exactly
inline __m512 load_bf16(const uint16_t* p, __mmask16 m = 0xffff) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// float32 lanes rounded to bfloat16 (to nearest, ties to even, as torch rounds)
inline void store_bf16(uint16_t* p, __m512 x, __mmask16 m = 0xffff) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

}  // namespace tiergen
#endif
