// The greedy head screened in int8 (AVX-512 VNNI), exact: the same argmax as lm_head_avx512's,
// for a fraction of its work.
//
// Greedy decoding needs only each row's best id, and nearly every id loses by a wide margin. So
// every logit is first estimated from int8 codes -- vpdpbusd does twice the multiply-adds of
// vdpbf16ps a cycle -- with a bound on the estimate's error, and only the ids whose upper bound
// reaches the row's best lower bound are computed exactly, in float32, by the very sums the
// AVX-512 head kernel runs (so the answer is the same id, bit for bit in the logits it compares).
//
// A feature vector has a few channels far larger than the rest (SmolLM2's final features: a
// row's largest value ~15x its RMS), which would make one int8 scale per row coarse and the
// bound loose. So the channels that are large on average stay bfloat16 (``outliers``, chosen by
// the caller); the rest are int8 with one scale per row, the weight with one scale per id. For a
// logit l = e.x with int8 estimates e' (step s_e) and x' (step s_x) of the rest:
//   |e.x - e'.x'| <= |(e - e').x| + |e'.(x - x')| <= s_e/2 |x|_1 + s_x/2 |e'|_1,
// plus a margin for float32 rounding. SmolLM2 on real text: 3-9 candidates a row of 49,152.
//
// Layouts (weights/screen.py makes them): the weight codes as u8 (code + 128) in blocks of 16
// ids, [V/16][KQ][16][4] (a 64-byte line per 4 dims of 16 ids, what vpdpbusd takes); the
// features' codes as s8 panels of 8 rows [N/8][KQ][8][4], so each row's 4 codes are one broadcast;
// the outlier channels as bfloat16 pairs, [V/16][PO][16] and [N/8][PO][8] dwords.

#include "common.h"

#include <algorithm>
#include <vector>

#if TIERGEN_HAVE_KERNEL && defined(__AVX512VNNI__)
#define TIERGEN_HAVE_SCREEN 1
#else
#define TIERGEN_HAVE_SCREEN 0
#endif

namespace {

#if TIERGEN_HAVE_SCREEN
constexpr int kRows = 8;     // rows of a feature panel
constexpr int kBlocks = 3;   // 16-id blocks a step: 24 int32 sums in registers, 3 weight lines

struct Screen {
  const int8_t* xq;      // [NP][KQ][8][4] feature codes
  const uint32_t* xo;    // [NP][PO][8] feature outlier pairs
  const float* rows;     // [N][5]: s_x, the row's code sum, and the bound's factors of sv, l1, em
  const uint8_t* wq;     // [VB][KQ][16][4] weight codes + 128
  const uint32_t* wo;    // [VB][PO][16] weight outlier pairs
  const float *sv, *l1, *em;   // [VB * 16] each id's step, |e'|_1 and largest |e|
  int64_t N, NP, KQ, PO, V, VB;
};

struct Candidate {
  int32_t id;
  float upper;
};

// One thread's running best lower bound per row and its candidates (ids in increasing order).
struct Share {
  std::vector<float> floor;
  std::vector<std::vector<Candidate>> cand;
};

// acc += the u8 codes w times the s8 codes x, 4 at a time. In asm: GCC 12's builtin moved each
// sum through another register around the instruction, two moves per multiply-add.
inline void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
}

// The estimates of rows panel*8 .. +7 against id blocks vb .. vb + NB - 1 into est: the int8
// sums (less 128 x the row's code sum) times both steps, then the outliers' bfloat16 products.
// Each loop keeps its sums in registers (locals: an array the caller owns would go through
// memory); not inlined, as inlined into step() GCC 12 (-std=c++20) spills the 24 sums (2.4x slower).
template <int NB>
__attribute__((noinline)) void estimate(const Screen& s, int64_t panel, int64_t vb, __m512 (&est)[kRows][NB]) {
  __m512i acc[kRows][NB];
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const int32_t* x = (const int32_t*)(s.xq + panel * s.KQ * 4 * kRows);
  const uint8_t* w = s.wq + vb * s.KQ * 64;
  const int64_t wstride = s.KQ * 64;   // from one block's codes to the next
  for (int64_t q = 0; q < s.KQ; ++q, x += kRows, w += 64) {
    __m512i wv[NB];
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(w + j * wstride);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const __m512i xv = _mm512_set1_epi32(x[i]);
#pragma GCC unroll 3
      for (int j = 0; j < NB; ++j) dpbusd(acc[i][j], wv[j], xv);
    }
  }
  __m512 e[kRows][NB];
  const int64_t r0 = panel * kRows;
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) {
    const int64_t r = std::min(r0 + i, s.N - 1);   // a panel's rows past N are padding
    const __m512i shift = _mm512_set1_epi32(128 * (int32_t)s.rows[5 * r + 1]);
    const __m512 sx = _mm512_set1_ps(s.rows[5 * r]);
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j)
      e[i][j] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], shift)),
                                            _mm512_loadu_ps(s.sv + 16 * (vb + j))), sx);
  }
  const uint32_t* xo = s.xo + panel * s.PO * kRows;
  const uint32_t* wo = s.wo + vb * s.PO * 16;
  for (int64_t p = 0; p < s.PO; ++p, xo += kRows, wo += 16) {
    __m512i wv[NB];
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wo + j * s.PO * 16);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < NB; ++j) e[i][j] = tiergen::dot_pair(e[i][j], xo[i], wv[j]);
  }
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) est[i][j] = e[i][j];
}

// Rows panel*8 .. +7 against id blocks vb .. vb + NB - 1: estimates, bounds, candidates.
template <int NB>
void step(const Screen& s, int64_t panel, int64_t vb, Share& sh) {
  __m512 est[kRows][NB];
  estimate<NB>(s, panel, vb, est);
  const int64_t r0 = panel * kRows;
  __m512 sv[NB];
  for (int j = 0; j < NB; ++j) sv[j] = _mm512_loadu_ps(s.sv + 16 * (vb + j));
  // Bounds, the row's floor, and the ids whose upper bound reaches it.
  for (int i = 0; i < kRows && r0 + i < s.N; ++i) {
    const int64_t r = r0 + i;
    const float* c = s.rows + 5 * r + 2;
    __m512 up[NB], lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int j = 0; j < NB; ++j) {
      const int64_t id0 = 16 * (vb + j);
      const __m512 bound = _mm512_fmadd_ps(sv[j], _mm512_set1_ps(c[0]), _mm512_fmadd_ps(
          _mm512_loadu_ps(s.l1 + id0), _mm512_set1_ps(c[1]), _mm512_mul_ps(_mm512_loadu_ps(s.em + id0), _mm512_set1_ps(c[2]))));
      const __mmask16 real = tiergen::tail(s.V - 16 * (vb + j));
      up[j] = _mm512_maskz_add_ps(real, est[i][j], bound);
      lowest = _mm512_mask_max_ps(lowest, real, lowest, _mm512_sub_ps(est[i][j], bound));
    }
    float& floor = sh.floor[r];
    floor = std::max(floor, _mm512_reduce_max_ps(lowest));
    const __m512 f = _mm512_set1_ps(floor);
    for (int j = 0; j < NB; ++j) {
      __mmask16 hit = _mm512_cmp_ps_mask(up[j], f, _CMP_GE_OQ) & tiergen::tail(s.V - 16 * (vb + j));
      if (!hit) continue;
      alignas(64) float u[16];
      _mm512_store_ps(u, up[j]);
      for (; hit; hit &= hit - 1) {
        const int l = __builtin_ctz(hit);
        sh.cand[r].push_back({(int32_t)(16 * (vb + j) + l), u[l]});
      }
    }
  }
}

// Exact float32 logits of (row, id) pairs, 16 at a time: lane by lane the sums lm_head_avx512's
// kernel runs for that row and id (pair by pair from zero, odd K's last dim alone), so the
// compared logits are the same bits whichever kernel computed them.
void exact(const uint16_t* h, int64_t hs, const uint16_t* w, int64_t ws, int64_t K, const int32_t* row,
           const int32_t* id, int64_t n, float* out) {
  const int64_t P = K / 2;
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = tiergen::tail(n - c);
    const __m512i xi = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, row + c), _mm512_set1_epi32((int)(hs / 2)));
    const __m512i wi = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(m, id + c), _mm512_set1_epi32((int)(ws / 2)));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const __m512i off = _mm512_set1_epi32((int)p);
      const __m512i xv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, _mm512_add_epi32(xi, off), h, 4);
      const __m512i wv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, _mm512_add_epi32(wi, off), w, 4);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)wv, (__m512bh)xv);
    }
    if (K % 2) {   // the last dim with a zero beside it, read alone (nothing past the row)
      alignas(64) uint32_t xl[16] = {}, wl[16] = {};
      for (int l = 0; l < 16 && c + l < n; ++l) {
        xl[l] = h[(int64_t)row[c + l] * hs + K - 1];
        wl[l] = w[(int64_t)id[c + l] * ws + K - 1];
      }
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_load_si512(wl), (__m512bh)_mm512_load_si512(xl));
    }
    _mm512_mask_storeu_ps(out + c, m, acc);
  }
}
#endif

void check_args(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& xq, const torch::Tensor& xo,
                const torch::Tensor& rows, const torch::Tensor& wq, const torch::Tensor& wo, const torch::Tensor& ids) {
  TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.stride(1) == 1 && h.size(0) > 0,
              "head_screen: bfloat16 features [N, K] with unit last stride expected");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.stride(1) == 1 && w.size(1) == h.size(1) &&
              h.stride(0) % 2 == 0 && w.stride(0) % 2 == 0 && h.size(0) * h.stride(0) < (1LL << 31) &&
              w.size(0) * w.stride(0) < (1LL << 31),
              "head_screen: a bfloat16 weight [V, K] (even row strides, under 2^31 elements) expected");
  const int64_t N = h.size(0), V = w.size(0), NP = (N + kRows - 1) / kRows, VB = (V + 15) / 16;
  TORCH_CHECK(xq.is_contiguous() && xq.scalar_type() == at::kChar && xq.dim() == 4 && xq.size(0) == NP &&
              xq.size(2) == kRows && xq.size(3) == 4, "head_screen: feature codes [N/8, KQ, 8, 4] int8 expected");
  TORCH_CHECK(xo.is_contiguous() && xo.scalar_type() == at::kInt && xo.dim() == 3 && xo.size(0) == NP &&
              xo.size(2) == kRows, "head_screen: feature outliers [N/8, PO, 8] int32 expected");
  TORCH_CHECK(rows.is_contiguous() && rows.scalar_type() == at::kFloat && rows.dim() == 2 && rows.size(0) == N &&
              rows.size(1) == 5, "head_screen: row terms [N, 5] float32 expected");
  TORCH_CHECK(wq.is_contiguous() && wq.scalar_type() == at::kByte && wq.dim() == 4 && wq.size(0) == VB &&
              wq.size(1) == xq.size(1) && wq.size(2) == 16 && wq.size(3) == 4,
              "head_screen: weight codes [V/16, KQ, 16, 4] uint8 expected");
  TORCH_CHECK(wo.is_contiguous() && wo.scalar_type() == at::kInt && wo.dim() == 3 && wo.size(0) == VB &&
              wo.size(1) == xo.size(1) && wo.size(2) == 16, "head_screen: weight outliers [V/16, PO, 16] int32 expected");
  TORCH_CHECK(ids.is_contiguous() && ids.scalar_type() == at::kFloat && ids.dim() == 2 && ids.size(0) == 3 &&
              ids.size(1) == 16 * VB, "head_screen: id terms [3, V/16 * 16] float32 expected");
}

// The greedy head's ids (as lm_head_avx512's argmax(h, w), ties to the lowest id) and the number
// of candidates computed exactly.
std::tuple<torch::Tensor, int64_t> argmax(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& xq,
                                          const torch::Tensor& xo, const torch::Tensor& rows, const torch::Tensor& wq,
                                          const torch::Tensor& wo, const torch::Tensor& ids) {
  check_args(h, w, xq, xo, rows, wq, wo, ids);
  auto arg = torch::zeros({h.size(0)}, h.options().dtype(at::kLong));
  int64_t total = 0;
#if TIERGEN_HAVE_SCREEN
  const float* idp = ids.data_ptr<float>();
  const int64_t VB = (w.size(0) + 15) / 16;
  const Screen s{xq.data_ptr<int8_t>(), (const uint32_t*)xo.data_ptr<int32_t>(), rows.data_ptr<float>(),
                 wq.data_ptr<uint8_t>(), (const uint32_t*)wo.data_ptr<int32_t>(), idp, idp + 16 * VB,
                 idp + 32 * VB, h.size(0), xq.size(0), xq.size(1), xo.size(1), w.size(0), VB};
  std::vector<Share> shares(std::max(1, at::get_num_threads()));
  // The threads split the vocabulary; each walks its id blocks 3 at a time (their codes stay in
  // L1) under every feature panel (all of them in L2).
  const int64_t groups = (s.VB + kBlocks - 1) / kBlocks;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    Share& sh = shares[at::get_thread_num()];
    if (sh.floor.empty())
      sh.floor.assign(s.N, -std::numeric_limits<float>::infinity()), sh.cand.resize(s.N);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t vb = g * kBlocks, nb = std::min<int64_t>(kBlocks, s.VB - vb);
      for (int64_t panel = 0; panel < s.NP; ++panel) {
        if (nb == 3) step<3>(s, panel, vb, sh);
        else if (nb == 2) step<2>(s, panel, vb, sh);
        else step<1>(s, panel, vb, sh);
      }
    }
  });
  // What survives the final floor of its row, computed exactly.
  std::vector<int32_t> crow, cid;
  for (int64_t r = 0; r < s.N; ++r) {
    float floor = -std::numeric_limits<float>::infinity();
    for (const Share& sh : shares)
      if (!sh.floor.empty()) floor = std::max(floor, sh.floor[r]);
    for (const Share& sh : shares)
      if (!sh.floor.empty())
        for (const Candidate& c : sh.cand[r])
          if (c.upper >= floor) crow.push_back((int32_t)r), cid.push_back(c.id);
  }
  const int64_t n = (int64_t)crow.size();
  std::vector<float> val(n);
  const uint16_t* hp = (const uint16_t*)h.data_ptr();
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  at::parallel_for(0, (n + 15) / 16, 16, [&](int64_t b, int64_t e) {
    const int64_t c0 = 16 * b, c1 = std::min(n, 16 * e);
    exact(hp, h.stride(0), wp, w.stride(0), h.size(1), crow.data() + c0, cid.data() + c0, c1 - c0, val.data() + c0);
  });
  // A row's candidates arrive thread by thread, ids increasing within each: keep the largest
  // logit, the lowest id among equals (NaNs are not ordered).
  int64_t* out = arg.data_ptr<int64_t>();
  std::vector<float> best(s.N, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> who(s.N, -1);
  for (int64_t c = 0; c < n; ++c) {
    const int64_t r = crow[c];
    if (val[c] > best[r] || (val[c] == best[r] && cid[c] < who[r]))   // who -1: no id is below it
      best[r] = val[c], who[r] = cid[c];
  }
  for (int64_t r = 0; r < s.N; ++r) out[r] = who[r] < 0 ? 0 : who[r];
  total = n;
#else
  TORCH_CHECK(false, "head_screen: built without AVX-512 VNNI and BF16");
#endif
  return {arg, total};
}

bool screen_available() { return TIERGEN_HAVE_SCREEN; }

}  // namespace

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &screen_available, "whether this build can use the kernel (AVX-512 VNNI and BF16)");
  m.def("argmax", &argmax, "the greedy head screened in int8: each row's id and the candidates computed exactly",
        py::call_guard<py::gil_scoped_release>());
}
