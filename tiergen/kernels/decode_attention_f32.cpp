// Decode attention over a float32 KV cache on x86 CPUs with AVX2 and FMA.
//
// The float32 twin of decode_attention.cpp, for CPUs without AVX-512 BF16 (where
// tiergen computes in float32). One query token per sequence, grouped-query heads:
// each (sequence, K/V head) pair reads its cached K and V rows once for all G query
// heads that share them, instead of a batched matrix product per query head that
// reads them G times and writes the scores out between passes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "decode_args.h"

#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TIERGEN_HAVE_F32_KERNEL 1
#else
#define TIERGEN_HAVE_F32_KERNEL 0
#endif

bool available() { return TIERGEN_HAVE_F32_KERNEL; }

#if TIERGEN_HAVE_F32_KERNEL
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// e^x as 2^n * 2^f with |f| <= 1/2 and 2^f by its Taylor series to degree 6
// (relative error ~2e-8); inputs are clamped to where 2^n is a normal float32.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402265069591007f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471805599453f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// r[i] = sum of the lanes of v[i], for 8 vectors at once (a transpose by adds).
inline __m256 sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  // ab: lanes (0 1 2 3 | 0 1 2 3) of vectors 0-3, low and high halves; cd: of 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

struct Args {
  const float *q, *k, *v;
  const bool* mask;
  float* out;
  int64_t H, Hkv, S, qsb, qsh, ksb, ksh, kss, vsb, vsh, vss, msb, mss;
  float scale;
};

// One (sequence b, K/V head j) pair: G query heads, head size 8 * DV. s: G * SP scores,
// then softmax weights.
template <int G, int DV>
void attend_one(const Args& a, int64_t b, int64_t j, float* s) {
  const int64_t S = a.S, SP = (S + 7) / 8 * 8;
  const float* kb = a.k + b * a.ksb + j * a.ksh;
  const float* vb = a.v + b * a.vsb + j * a.vsh;
  const bool* mrow = a.mask + b * a.msb;
  const float* qb = a.q + b * a.qsb + j * G * a.qsh;
  const __m256 scale = _mm256_set1_ps(a.scale), ninf = _mm256_set1_ps(kNegInf);
  // scores, 8 keys at a time: s[g * SP + t]; the 8 key rows stay in L1 across the G heads
  for (int64_t t0 = 0; t0 < SP; t0 += 8) {
    const int n = (int)std::min<int64_t>(8, S - t0);
    const float* kt = kb + t0 * a.kss;
    for (int i = 0; i < 8 && t0 + 8 + i < S; ++i)   // the next block of keys
      for (int c = 0; c < DV; c += 2) _mm_prefetch((const char*)(kt + (8 + i) * a.kss + 8 * c), _MM_HINT_T0);
    alignas(32) int valid[8];
    for (int i = 0; i < 8; ++i) valid[i] = i < n && mrow[(t0 + i) * a.mss] ? -1 : 0;
    const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)valid));
    for (int g = 0; g < G; ++g) {
      const float* qg = qb + g * a.qsh;
      __m256 part[8];
      for (int i = 0; i < 8; ++i) {
        __m256 acc = _mm256_setzero_ps();
        if (i < n)
          for (int c = 0; c < DV; ++c)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(kt + i * a.kss + 8 * c), _mm256_loadu_ps(qg + 8 * c), acc);
        part[i] = acc;
      }
      _mm256_storeu_ps(s + g * SP + t0, _mm256_blendv_ps(ninf, _mm256_mul_ps(sum8(part), scale), keep));
    }
  }
  // softmax weights in place, and 1 / their sum per head
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * SP;
    __m256 mv = ninf;
    for (int64_t t = 0; t < SP; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sg + t));
    const __m256 mm = _mm256_set1_ps(hmax(mv));
    __m256 sv = _mm256_setzero_ps();
    for (int64_t t = 0; t < SP; t += 8) {
      const __m256 x = _mm256_loadu_ps(sg + t);
      const __m256 seen = _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(seen, exp256(_mm256_sub_ps(x, mm)));
      _mm256_storeu_ps(sg + t, e);
      sv = _mm256_add_ps(sv, e);
    }
    const float sum = hsum(sv);
    inv[g] = sum > 0.f ? 1.f / sum : 0.f;   // a row with no visible key attends to nothing
  }
  // weighted sum of the value rows, 32 dims at a time so G heads' sums stay in registers
  for (int c0 = 0; c0 < DV; c0 += 4) {
    const int nc = DV - c0 < 4 ? DV - c0 : 4;
    __m256 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < S; ++t) {
      const float* vt = vb + t * a.vss + 8 * c0;
      if (t + 8 < S) _mm_prefetch((const char*)(vt + 8 * a.vss), _MM_HINT_T0);
      __m256 vr[4];
      for (int c = 0; c < nc; ++c) vr[c] = _mm256_loadu_ps(vt + 8 * c);
      for (int g = 0; g < G; ++g) {
        const __m256 p = _mm256_broadcast_ss(s + g * SP + t);
        for (int c = 0; c < nc; ++c) acc[g][c] = _mm256_fmadd_ps(p, vr[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g) {
      float* orow = a.out + (b * a.H + j * G + g) * (8 * DV) + 8 * c0;
      const __m256 iv = _mm256_set1_ps(inv[g]);
      for (int c = 0; c < nc; ++c) _mm256_storeu_ps(orow + 8 * c, _mm256_mul_ps(acc[g][c], iv));
    }
  }
}

using ItemFn = void (*)(const Args&, int64_t, int64_t, float*);

template <int DV>
struct Head {
  template <int G>
  struct Item {
    static void run(const Args& a, int64_t b, int64_t j, float* s) { attend_one<G, DV>(a, b, j, s); }
  };
};

template <int DV>
ItemFn pick_group(int64_t G) { return tiergen::by_group<Head<DV>::template Item>(G); }

ItemFn pick(int64_t G, int64_t D) {
  switch (D) {
    case 64: return pick_group<8>(G);
    case 80: return pick_group<10>(G);
    case 96: return pick_group<12>(G);
    case 128: return pick_group<16>(G);
    default: return nullptr;
  }
}

}  // namespace
#endif

bool supports(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
#if TIERGEN_HAVE_F32_KERNEL
  return pick(tiergen::group_size(num_heads, num_kv_heads), head_dim) != nullptr;
#else
  return false;
#endif
}

// q [B,H,1,D], k/v [B,Hkv,S,D] float32 with unit last stride, mask [B,1,1,S] bool
// (true: may attend). Returns softmax(q k^T * scale + mask) v as [B,H,1,D].
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale) {
  tiergen::check_decode_args(q, k, v, mask, at::kFloat);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  auto out = torch::empty({B, H, 1, D}, q.options());
#if TIERGEN_HAVE_F32_KERNEL
  const ItemFn fn = pick(tiergen::group_size(H, Hkv), D);
  TORCH_CHECK(fn != nullptr, "decode_attention: unsupported head layout");
  Args a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), mask.data_ptr<bool>(),
         out.data_ptr<float>(), H, Hkv, S, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
         v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(3), (float)scale};
  const int64_t G = H / Hkv, SP = (S + 7) / 8 * 8;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * SP);
    for (int64_t item = begin; item < end; ++item) fn(a, item / Hkv, item % Hkv, s.data());
  });
#else
  TORCH_CHECK(false, "decode_attention: built without AVX2 and FMA");
#endif
  return out;
}

// The kernel touches no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the kernel (AVX2, FMA)");
  m.def("supports", &supports, "whether the kernel handles this head layout");
  m.def("decode_attention", &decode_attention, "one-token GQA attention over a float32 cache",
        py::call_guard<py::gil_scoped_release>());
}
