// Decode attention over a bfloat16 KV cache on x86 CPUs with AVX-512 BF16.
//
// One query token per sequence, grouped-query heads: each (sequence, K/V head)
// pair reads its cached K and V rows once for all G query heads that share
// them, so the step runs at close to memory speed instead of paying a small
// matrix product per query head. Software prefetches keep the reads ahead of the
// arithmetic: the next key block into L1, the value rows into L2 while keys are
// scored, and the next pair's keys into L2 during the value sum (SmolLM2's 30
// layers at 256 x 81 columns: 34 -> 22 ms a step, 14 -> 23 GB/s).
#include "common.h"
#include "decode_args.h"

#include <cstring>
#include <limits>
#include <vector>

#if TIERGEN_HAVE_KERNEL
namespace {

using tiergen::exp512;
using tiergen::load_bf16;
using tiergen::store_bf16;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// r[i] = sum of the lanes of v[i], for 16 vectors at once (45 shuffles and adds
// instead of 16 separate horizontal reductions).
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

struct Args {
  const uint16_t *q, *k, *v;
  const bool* mask;
  uint16_t* out;
  int64_t H, Hkv, S, qsb, qsh, ksb, ksh, kss, vsb, vsh, vss, msb, mss;
  float scale;
};

// One (sequence b, K/V head j) pair: G query heads, head size 32 * DP. s: G * SP float32
// scores, then weights; w: the weights as bfloat16 pairs for the value sum; next_k: the
// keys of the pair this thread does next (nullptr: none), to prefetch.
template <int G, int DP>
void attend_one(const Args& a, int64_t b, int64_t j, float* s, uint16_t* w, const uint16_t* next_k) {
  const int64_t S = a.S, SP = (S + 15) / 16 * 16;
  const uint16_t* kb = a.k + b * a.ksb + j * a.ksh;
  const uint16_t* vb = a.v + b * a.vsb + j * a.vsh;
  const bool* mrow = a.mask + b * a.msb;
  __m512bh qv[G][DP];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DP; ++c)
      qv[g][c] = (__m512bh)_mm512_loadu_si512(a.q + b * a.qsb + (j * G + g) * a.qsh + 32 * c);
  const __m512 scale = _mm512_set1_ps(a.scale), ninf = _mm512_set1_ps(kNegInf);
  // scores, 16 keys at a time: s[g * SP + t]. The 16 key rows are re-read from L1 for each
  // query head rather than held in registers, which they would overflow.
  for (int64_t t0 = 0; t0 < SP; t0 += 16) {
    const int n = (int)std::min<int64_t>(16, S - t0);
    const uint16_t* kt = kb + t0 * a.kss;
    for (int i = 0; i < 16 && t0 + 16 + i < S; ++i)   // the next block of keys into L1
      for (int c = 0; c < DP; ++c) _mm_prefetch((const char*)(kt + (16 + i) * a.kss + 32 * c), _MM_HINT_T0);
    for (int i = 0; i < 16 && t0 + i < S; ++i)        // this block's value rows into L2
      for (int c = 0; c < DP; ++c) _mm_prefetch((const char*)(vb + (t0 + i) * a.vss + 32 * c), _MM_HINT_T1);
    __mmask16 valid = 0;
    for (int i = 0; i < n; ++i)
      valid |= (__mmask16)(mrow[(t0 + i) * a.mss] ? 1u << i : 0u);
    for (int g = 0; g < G; ++g) {
      __m512 part[16];
      for (int i = 0; i < 16; ++i) {
        __m512 acc = _mm512_setzero_ps();
        if (i < n)
          for (int c = 0; c < DP; ++c)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(kt + i * a.kss + 32 * c), qv[g][c]);
        part[i] = acc;
      }
      _mm512_storeu_ps(s + g * SP + t0, _mm512_mask_mov_ps(ninf, valid, _mm512_mul_ps(sum16(part), scale)));
    }
  }
  // softmax weights, unnormalised (to bfloat16 for the value sum, as SDPA's CPU kernel
  // rounds them for its product); 1 / their float32 sum per head
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * SP;
    __m512 mv = ninf;
    for (int64_t t = 0; t < SP; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sg + t));
    const float m = _mm512_reduce_max_ps(mv);
    const __m512 mm = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (int64_t t = 0; t < SP; t += 16) {
      const __m512 x = _mm512_loadu_ps(sg + t);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, mm)));
      store_bf16(w + g * SP + t, e);
      sv = _mm512_add_ps(sv, e);
    }
    const float sum = _mm512_reduce_add_ps(sv);
    inv[g] = sum > 0.f ? 1.f / sum : 0.f;   // a row with no visible key attends to nothing
  }
  // weighted sum of the value rows, two at a time: interleaving rows t and t+1 word by word
  // makes each bfloat16 pair (v_t[d], v_t+1[d]) meet the weight pair (w_t, w_t+1) in one
  // vdpbf16ps. Lane l of lo[c] holds dim 32c + 8(l/4) + l%4, of hi[c] the same + 4.
  __m512 lo_acc[G][DP], hi_acc[G][DP];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < DP; ++c) lo_acc[g][c] = hi_acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < S; t += 2) {
    const uint16_t* v0 = vb + t * a.vss;
    const uint16_t* v1 = v0 + a.vss;
    const bool pair = t + 1 < S;   // past the last row: a zero row (its weight is 0 too)
    for (int64_t r = t + 8; r < t + 10 && r < S; ++r)   // value rows, L2 -> L1
      for (int c = 0; c < DP; ++c) _mm_prefetch((const char*)(vb + r * a.vss + 32 * c), _MM_HINT_T0);
    if (next_k != nullptr)                                  // the next pair's keys into L2
      for (int64_t r = t; r < t + 2 && r < S; ++r)
        for (int c = 0; c < DP; ++c) _mm_prefetch((const char*)(next_k + r * a.kss + 32 * c), _MM_HINT_T1);
    __m512i lo[DP], hi[DP];
    for (int c = 0; c < DP; ++c) {
      const __m512i r0 = _mm512_loadu_si512(v0 + 32 * c);
      const __m512i r1 = pair ? _mm512_loadu_si512(v1 + 32 * c) : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(r0, r1);
      hi[c] = _mm512_unpackhi_epi16(r0, r1);
    }
    for (int g = 0; g < G; ++g) {
      uint32_t wp;
      std::memcpy(&wp, w + g * SP + t, sizeof wp);
      const __m512bh p = (__m512bh)_mm512_set1_epi32((int)wp);
      for (int c = 0; c < DP; ++c) {
        lo_acc[g][c] = _mm512_dpbf16_ps(lo_acc[g][c], (__m512bh)lo[c], p);
        hi_acc[g][c] = _mm512_dpbf16_ps(hi_acc[g][c], (__m512bh)hi[c], p);
      }
    }
  }
  // back to dim order: 128-bit chunks lo0 hi0 lo1 hi1 | lo2 hi2 lo3 hi3
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < G; ++g) {
    uint16_t* orow = a.out + (b * a.H + j * G + g) * (32 * DP);
    const __m512 iv = _mm512_set1_ps(inv[g]);
    for (int c = 0; c < DP; ++c) {
      store_bf16(orow + 32 * c, _mm512_mul_ps(_mm512_permutex2var_ps(lo_acc[g][c], first, hi_acc[g][c]), iv));
      store_bf16(orow + 32 * c + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo_acc[g][c], second, hi_acc[g][c]), iv));
    }
  }
}

using ItemFn = void (*)(const Args&, int64_t, int64_t, float*, uint16_t*, const uint16_t*);

template <int DP>
struct Head {
  template <int G>
  struct Item {
    static void run(const Args& a, int64_t b, int64_t j, float* s, uint16_t* w, const uint16_t* next_k) { attend_one<G, DP>(a, b, j, s, w, next_k); }
  };
};

template <int DP>
ItemFn pick_group(int64_t G) { return tiergen::by_group<Head<DP>::template Item>(G); }

ItemFn pick(int64_t G, int64_t D) {
  switch (D) {
    case 64: return pick_group<2>(G);
    case 96: return pick_group<3>(G);
    case 128: return pick_group<4>(G);
    default: return nullptr;
  }
}

}  // namespace
#endif

bool supports(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
#if TIERGEN_HAVE_KERNEL
  return pick(tiergen::group_size(num_heads, num_kv_heads), head_dim) != nullptr;
#else
  return false;
#endif
}

// q [B,H,1,D], k/v [B,Hkv,S,D] bfloat16 with unit last stride, mask [B,1,1,S] bool
// (true: may attend). Returns softmax(q k^T * scale + mask) v as [B,H,1,D].
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale) {
  tiergen::check_decode_args(q, k, v, mask, at::kBFloat16);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  auto out = torch::empty({B, H, 1, D}, q.options());
#if TIERGEN_HAVE_KERNEL
  const ItemFn fn = pick(tiergen::group_size(H, Hkv), D);
  TORCH_CHECK(fn != nullptr, "decode_attention: unsupported head layout");
  Args a{(const uint16_t*)q.data_ptr(), (const uint16_t*)k.data_ptr(), (const uint16_t*)v.data_ptr(),
         mask.data_ptr<bool>(), (uint16_t*)out.data_ptr(), H, Hkv, S, q.stride(0), q.stride(1),
         k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), mask.stride(0),
         mask.stride(3), (float)scale};
  const int64_t G = H / Hkv, SP = (S + 15) / 16 * 16;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * SP);
    std::vector<uint16_t> w(G * SP);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t nb = (item + 1) / Hkv, nj = (item + 1) % Hkv;
      fn(a, item / Hkv, item % Hkv, s.data(), w.data(), item + 1 < end ? a.k + nb * a.ksb + nj * a.ksh : nullptr);
    }
  });
#else
  TORCH_CHECK(false, "decode_attention: built without AVX-512 BF16");
#endif
  return out;
}

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the kernel (AVX-512 BF16)");
  m.def("supports", &supports, "whether the kernel handles this head layout");
  m.def("decode_attention", &decode_attention, "one-token GQA attention over a bfloat16 cache",
        py::call_guard<py::gil_scoped_release>());
}
