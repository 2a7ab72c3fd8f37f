// The LM head on x86 CPUs with AVX-512 BF16 but no AMX (Zen 4, Cooper Lake): float32 logits
// of bfloat16 features, or straight their greedy argmax -- lm_head.cpp's job on the dot-product
// instruction instead of tiles.
//
// Why not oneDNN: its bfloat16 product rounds each logit to bfloat16, a step wider than the
// lead of the right token in many greedy steps (lm_head.cpp says more). Here the logits stay
// float32 from the accumulators.
//
// The weight is read as it is stored ([V, K] rows, resident or streamed alike): a block of 24
// ids' rows is copied into a pair-major buffer (24 ids' dims 2p, 2p + 1 side by side), and each
// step broadcasts one id's pair and multiplies it into the same pair of 16 feature rows, which
// are put once a call into a pair-interleaved layout. So the product computed is logits^T, 24
// sums in registers (6 ids x 64 rows, ... 24 ids x 16 rows), and the block's buffer stays in L1
// while every block of feature rows passes under it. SmolLM2's head at 256 rows: ~400 GFLOP/s
// on a 2-core Zen 4, as oneDNN's bfloat16 product there.

#include "common.h"

#include <algorithm>
#include <vector>


#if TIERGEN_HAVE_KERNEL
namespace {

constexpr int kIds = 24;    // weight rows per block
constexpr int kVecs = 4;    // vectors of 16 feature rows per block, at most
// Ids per pass over a block's rows with R vectors of features: 24 sums in registers (plus R
// features and a broadcast), so even one vector of rows has 24 independent chains of sums.
template <int R>
constexpr int kPassIds = kIds / R;
// Up to this many rows, the sums run along K instead, each id's row read in place: one block of
// rows does not repay copying the weight into the pair-major layout (SmolLM2's head, 1 row: 6.4
// -> 2.9 ms, oneDNN's bfloat16 2.6; 16 rows: 6.3 -> 5.1 ms, oneDNN 3.4, the reductions' cost).
constexpr int64_t kFewRows = 16;

// The features h [N, K] as dwords: block nb, pair p holds, for rows n = 0..15, the dims
// (2p, 2p + 1) of row 16 nb + n -- the right-operand layout the AMX kernels use too, pairs padded
// to a multiple of 16. Past N or K: zeros.
struct Features {
  int64_t N, NB, KP, stride;   // KP pairs are summed; blocks are ``stride`` dwords apart
  const uint16_t* rows;        // h itself, for the few-rows path
  int64_t rs, K;
  std::vector<uint32_t> x;     // packed only for more than kFewRows rows
  explicit Features(const torch::Tensor& h)
      : N(h.size(0)), NB((h.size(0) + 15) / 16), KP((h.size(1) + 1) / 2), stride((h.size(1) + 31) / 32 * 256),
        rows((const uint16_t*)h.data_ptr()), rs(h.stride(0)), K(h.size(1)) {
    if (N <= kFewRows) return;
    x.resize(NB * stride);
    for (int64_t nb = 0; nb < NB; ++nb)
      tiergen::pack_right_tiles(rows + 16 * nb * rs, rs, std::min<int64_t>(16, N - 16 * nb), K, stride / 256,
                                (uint16_t*)(x.data() + nb * stride));
  }
  const uint32_t* block(int64_t nb) const { return x.data() + nb * stride; }
};

// kIds rows of the weight from id0 as dwords [pair][id]: pair p of every id next to each other,
// so a pass broadcasts them from one pointer at fixed offsets (24 row pointers would not stay in
// registers). Ids past V and the second dim of an odd K's last pair: zeros.
struct IdBlock {
  int64_t KP;
  std::vector<uint32_t> pairs;
  explicit IdBlock(int64_t K) : KP((K + 1) / 2), pairs(KP * kIds) {}

  void fill(const uint16_t* w, int64_t V, int64_t K, int64_t rs, int64_t id0) {
    const int64_t n = std::min<int64_t>(kIds, V - id0);
    if (n < kIds) std::fill(pairs.begin(), pairs.end(), 0);
    const int64_t P = K / 2;
    int64_t p0 = 0;
    if (n == kIds)   // 16 pairs of all 24 rows at a time, as two 16 x 16 dword transposes
      for (; p0 + 16 <= P; p0 += 16) {
        __m512i lo[16], hi[16];
        for (int i = 0; i < 16; ++i) {
          lo[i] = _mm512_loadu_si512(w + (id0 + i) * rs + 2 * p0);
          hi[i] = i < kIds - 16 ? _mm512_loadu_si512(w + (id0 + 16 + i) * rs + 2 * p0) : _mm512_setzero_si512();
        }
        tiergen::transpose16(lo);
        tiergen::transpose16(hi);
        for (int q = 0; q < 16; ++q) {
          _mm512_storeu_si512(pairs.data() + kIds * (p0 + q), lo[q]);
          _mm512_mask_storeu_epi32(pairs.data() + kIds * (p0 + q) + 16, tiergen::tail(kIds - 16), hi[q]);
        }
      }
    for (int64_t i = 0; i < n; ++i) {   // what is left: little-endian, so dim 2p is the low half
      const uint16_t* row = w + (id0 + i) * rs;
      uint32_t* dst = pairs.data() + i;
      for (int64_t p = p0; p < P; ++p) dst[kIds * p] = tiergen::pair_at(row + 2 * p);
      if (K % 2) dst[kIds * (KP - 1)] = row[K - 1];
    }
  }
  const uint32_t* at(int64_t p) const { return pairs.data() + kIds * p; }
};

// acc[g + i][v] for i < I: logits of id id0 + g + i for the 16 rows of block nb + v, v < R. The
// sums are locals until the end: __m512 may alias anything, so sums kept in acc would go
// through memory.
template <int R, int I>
inline void pass(const Features& f, const IdBlock& w, int64_t nb, int g, __m512 (&acc)[kIds][kVecs]) {
  __m512 a[I][R];
  // every loop over ids and vectors unrolled, or the sums would live in memory
#pragma GCC unroll 24
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < R; ++v) a[i][v] = _mm512_setzero_ps();
  const uint32_t* xs = f.block(nb);
  const uint32_t* ws = w.at(0) + g;
  const int64_t vstride = f.stride;   // from one block of 16 rows to the next
  for (int64_t p = 0; p < f.KP; ++p, xs += 16, ws += kIds) {
    __m512i x[R];
#pragma GCC unroll 4
    for (int v = 0; v < R; ++v) x[v] = _mm512_loadu_si512(xs + v * vstride);
#pragma GCC unroll 24
    for (int i = 0; i < I; ++i) {
      const uint32_t pair = ws[i];
#pragma GCC unroll 4
      for (int v = 0; v < R; ++v) a[i][v] = tiergen::dot_pair(a[i][v], pair, x[v]);
    }
  }
#pragma GCC unroll 24
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < R; ++v) acc[g + i][v] = a[i][v];
}

// All kIds ids of the block against R vectors of rows, kPassIds<R> ids a pass (the ids' rows
// stay in L1 from one pass and one block of rows to the next).
template <int R>
inline void block(const Features& f, const IdBlock& w, int64_t nb, __m512 (&acc)[kIds][kVecs]) {
  for (int g = 0; g < kIds; g += kPassIds<R>) pass<R, kPassIds<R>>(f, w, nb, g, acc);
}

// The next block's rows into L2: the copy reads them a column of lines at a time, which the
// hardware prefetchers follow poorly.
inline void prefetch_rows(const uint16_t* w, int64_t V, int64_t K, int64_t rs, int64_t id0) {
  const int64_t n = std::min<int64_t>(kIds, V - id0);
  for (int64_t i = 0; i < n; ++i) {
    const char* row = (const char*)(w + (id0 + i) * rs);
    for (int64_t b = 0; b < 2 * K; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
  }
}

// Feature rows per chunk: their packed form takes at most half of L2, so it stays there while
// the thread's share of the vocabulary passes (at least one 64-row block).
int64_t row_chunk_blocks(int64_t stride) {
  return std::max<int64_t>(kVecs, tiergen::l2_bytes(int64_t{1} << 20) / 2 / (stride * 4) / kVecs * kVecs);
}

// The few-rows form: sums of 32 dims at a time of I ids' rows and NR feature rows, as they are
// stored, reduced at the end into t[g + i][n] (the logit of id id0 + g + i for row r0 + n).
template <int NR, int I>
inline void few_pass(const Features& f, const uint16_t* w, int64_t rs, int64_t r0, int g, float (&t)[kIds][16]) {
  __m512 a[I][NR];
#pragma GCC unroll 24
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) a[i][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < f.K; k += 32) {
    const __mmask32 m = tiergen::first_words(f.K - k);
    __m512i x[NR];
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) x[n] = _mm512_maskz_loadu_epi16(m, f.rows + (r0 + n) * f.rs + k);
#pragma GCC unroll 24
    for (int i = 0; i < I; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi16(m, w + (g + i) * rs + k);
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) a[i][n] = _mm512_dpbf16_ps(a[i][n], (__m512bh)wv, (__m512bh)x[n]);
    }
  }
#pragma GCC unroll 24
  for (int i = 0; i < I; ++i)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) t[g + i][r0 + n] = _mm512_reduce_add_ps(a[i][n]);
}

// kIds ids from w's row pointer (n of them real) against every feature row, into acc[i][0].
inline void few_block(const Features& f, const uint16_t* w, int64_t rs, int64_t n, __m512 (&acc)[kIds][kVecs]) {
  alignas(64) float t[kIds][16] = {};
  if (n == kIds)
    for (int64_t r0 = 0; r0 < f.N; r0 += 4) {
      switch (std::min<int64_t>(4, f.N - r0)) {
        case 4: for (int g = 0; g < kIds; g += 6) few_pass<4, 6>(f, w, rs, r0, g, t); break;
        case 3: for (int g = 0; g < kIds; g += 8) few_pass<3, 8>(f, w, rs, r0, g, t); break;
        case 2: for (int g = 0; g < kIds; g += 12) few_pass<2, 12>(f, w, rs, r0, g, t); break;
        default: few_pass<1, 24>(f, w, rs, r0, 0, t); break;
      }
    }
  else   // the vocabulary's last ids: one at a time, reading no row past V
    for (int64_t r0 = 0; r0 < f.N; ++r0)
      for (int64_t i = 0; i < n; ++i) few_pass<1, 1>(f, w, rs, r0, (int)i, t);
  for (int i = 0; i < kIds; ++i) acc[i][0] = _mm512_load_ps(t[i]);
}

// Runs fn(id0, nb, R, acc) over every block of kIds ids x R * 16 rows, the vocabulary split
// between the threads (each reads its share of the weight once per chunk of rows).
template <typename Fn>
void for_blocks(const Features& f, const torch::Tensor& w, Fn&& fn) {
  const int64_t V = w.size(0), K = w.size(1), rs = w.stride(0);
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  if (f.N <= kFewRows) {
    at::parallel_for(0, (V + kIds - 1) / kIds, 1, [&](int64_t begin, int64_t end) {
      __m512 acc[kIds][kVecs];
      for (int64_t b = begin; b < end; ++b) {
        few_block(f, wp + kIds * b * rs, rs, std::min<int64_t>(kIds, V - kIds * b), acc);
        fn(kIds * b, 0, 1, acc);
      }
    });
    return;
  }
  const int64_t chunk = row_chunk_blocks(f.stride);
  at::parallel_for(0, (V + kIds - 1) / kIds, 1, [&](int64_t begin, int64_t end) {
    __m512 acc[kIds][kVecs];
    IdBlock ids(K);
    for (int64_t c0 = 0; c0 < f.NB; c0 += chunk)
      for (int64_t b = begin; b < end; ++b) {
        if (b + 1 < end) prefetch_rows(wp, V, K, rs, kIds * (b + 1));   // its reads overlap this block's sums
        ids.fill(wp, V, K, rs, kIds * b);
        for (int64_t nb = c0; nb < std::min(f.NB, c0 + chunk); nb += kVecs) {
          const int R = (int)std::min<int64_t>(kVecs, f.NB - nb);
          switch (R) {
            case 4: block<4>(f, ids, nb, acc); break;
            case 3: block<3>(f, ids, nb, acc); break;
            case 2: block<2>(f, ids, nb, acc); break;
            default: block<1>(f, ids, nb, acc); break;
          }
          fn(kIds * b, nb, R, acc);
        }
      }
  });
}

void check(const torch::Tensor& h, const torch::Tensor& w) {
  TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.stride(1) == 1 && h.size(0) > 0,
              "lm_head: bfloat16 features [N, K] with unit last stride expected");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.stride(1) == 1 && w.size(1) == h.size(1) &&
              w.size(0) > 0 && w.size(0) < (1LL << 31) && w.size(0) * 16 < (1LL << 31),
              "lm_head: a bfloat16 weight [V, K] with unit last stride expected");
}

}  // namespace
#endif

// float32 logits [N, V] of features h [N, K] against the weight w [V, K].
torch::Tensor logits(const torch::Tensor& h, const torch::Tensor& w) {
  auto out = torch::empty({h.size(0), w.size(0)}, h.options().dtype(at::kFloat));
#if TIERGEN_HAVE_KERNEL
  check(h, w);
  const Features f(h);
  float* op = out.data_ptr<float>();
  const int64_t N = f.N, V = w.size(0);
  const __m512i lane_rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32((int)V));
  for_blocks(f, w, [&](int64_t id0, int64_t nb, int R, const __m512 (&acc)[kIds][kVecs]) {
    for (int v = 0; v < R; ++v) {   // a vector holds one id's logits for 16 rows: a column of out
      const int64_t r0 = 16 * (nb + v);
      const __mmask16 rows = tiergen::tail(N - r0);
      for (int i = 0; i < kIds && id0 + i < V; ++i)
        _mm512_mask_i32scatter_ps(op + r0 * V + id0 + i, rows, lane_rows, acc[i][v], 4);
    }
  });
#else
  TORCH_CHECK(false, "lm_head: built without AVX-512 BF16");
#endif
  return out;
}

// The greedy head: for each row of h [N, K], the id of its largest float32 logit against
// w [V, K]; ties go to the lowest id, as torch's argmax. NaNs are not ordered.
torch::Tensor argmax(const torch::Tensor& h, const torch::Tensor& w) {
  auto arg = torch::empty({h.size(0)}, h.options().dtype(at::kLong));
#if TIERGEN_HAVE_KERNEL
  check(h, w);
  const Features f(h);
  const int64_t V = w.size(0);
  tiergen::RowArgmax best(f.N);
  for_blocks(f, w, [&](int64_t id0, int64_t nb, int R, const __m512 (&acc)[kIds][kVecs]) {
    for (int v = 0; v < R; ++v)
      best.update(16 * (nb + v), id0, std::min<int64_t>(kIds, V - id0), [&](int64_t i) { return acc[i][v]; });
  });
  best.write(arg.data_ptr<int64_t>(), f.N);
#else
  TORCH_CHECK(false, "lm_head: built without AVX-512 BF16");
#endif
  return arg;
}

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build can use the kernels (AVX-512 BF16)");
  m.def("logits", &logits, "float32 logits of bfloat16 features", py::call_guard<py::gil_scoped_release>());
  m.def("argmax", &argmax, "the greedy head: each row's largest float32 logit's id",
        py::call_guard<py::gil_scoped_release>());
}
