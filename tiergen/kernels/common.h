// What every tiergen CPU kernel shares: the instruction-set check and bfloat16 rows
// moved in and out of float32 vectors.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

// e^x as 2^n * 2^f with |f| <= 1/2 and 2^f by its Taylor series to degree 6
// (relative error ~2e-8); inputs are clamped to where float32 e^x is finite.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-104.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(x) = x / (1 + e^-x), as every kernel here computes it
inline __m512 silu512(__m512 x) {
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// rows r[0..15] of 16 dwords each, transposed in place: r[c][i] becomes r[i][c]
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4q + m], 128-bit lane L: column 4L + m of rows 4q .. 4q + 3
  for (int q = 0; q < 16; q += 4) {
    u[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
    u[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
    u[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
    u[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i even0 = _mm512_shuffle_i32x4(u[m], u[4 + m], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i odd0 = _mm512_shuffle_i32x4(u[m], u[4 + m], _MM_SHUFFLE(3, 1, 3, 1));
    const __m512i even1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512i odd1 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], _MM_SHUFFLE(3, 1, 3, 1));
    r[m] = _mm512_shuffle_i32x4(even0, even1, _MM_SHUFFLE(2, 0, 2, 0));
    r[8 + m] = _mm512_shuffle_i32x4(even0, even1, _MM_SHUFFLE(3, 1, 3, 1));
    r[4 + m] = _mm512_shuffle_i32x4(odd0, odd1, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + m] = _mm512_shuffle_i32x4(odd0, odd1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// acc += the bfloat16 pair ``pair`` (dim 2p in its low half) times each pair of x, lane by lane
inline __m512 dot_pair(__m512 acc, uint32_t pair, __m512i x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)pair), (__m512bh)x);
}

// the bfloat16 pair at p (any alignment) as dot_pair takes it
inline uint32_t pair_at(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Bytes of this core's L2 (sysconf), or ``fallback`` where the system does not say.
inline int64_t l2_bytes(int64_t fallback) {
  static const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return l2 > 0 ? (int64_t)l2 : fallback;
}

// the first n (<= 32) bfloat16 words of a 64-byte row
inline __mmask32 first_words(int64_t n) { return n >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << n) - 1); }

// Rows r[0 .. n), n <= 16, of row stride rs (K bfloat16 each) in the pair-interleaved layout of
// AMX's right operand and of AVX-512's dot products, one 16-row block into dst (KB x 16 x 32):
// tile kb's row i holds, for rows c = 0..15,
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

// The greedy head's bookkeeping (lm_head*.cpp): each thread's running best logit and its id for
// every row, and at the end each row's winner over the threads. Ids reach a thread in increasing
// order and ties go to the lowest id, as torch's argmax; NaNs are not ordered.
class RowArgmax {
 public:
  explicit RowArgmax(int64_t rows) : rows_((rows + 15) / 16 * 16), shares_(std::max(1, at::get_num_threads())) {}

  // The calling thread's rows r0 .. r0 + 15 against ids id0 .. id0 + n - 1, logits(i) holding
  // id id0 + i's logits of those rows.
  template <typename Logits>
  void update(int64_t r0, int64_t id0, int64_t n, Logits&& logits) {
    Share& s = shares_[at::get_thread_num()];
    if (s.val.empty()) s.val.assign(rows_, -std::numeric_limits<float>::infinity()), s.id.assign(rows_, 0);
    __m512 vmax = _mm512_loadu_ps(s.val.data() + r0);
    __m512i vidx = _mm512_loadu_si512(s.id.data() + r0);
    for (int64_t i = 0; i < n; ++i) {   // strict > keeps a row's first best
      const __m512 x = logits(i);
      const __mmask16 gt = _mm512_cmp_ps_mask(x, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, x);
      vidx = _mm512_mask_mov_epi32(vidx, gt, _mm512_set1_epi32((int)(id0 + i)));
    }
    _mm512_storeu_ps(s.val.data() + r0, vmax);
    _mm512_storeu_si512(s.id.data() + r0, vidx);
  }

  // Each of the first n rows' best id into out (a row whose logits are all -inf: id 0).
  void write(int64_t* out, int64_t n) const {
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < n; ++r) {
      float best = ninf;
      int64_t id = -1;
      for (const Share& s : shares_) {
        if (s.val.empty() || s.val[r] == ninf) continue;
        if (id < 0 || s.val[r] > best || (s.val[r] == best && s.id[r] < id)) best = s.val[r], id = s.id[r];
      }
      out[r] = id < 0 ? 0 : id;
    }
  }

 private:
  struct Share {
    std::vector<float> val;
    std::vector<int32_t> id;
  };
  int64_t rows_;
  std::vector<Share> shares_;
};

}  // namespace tiergen
#endif
