// Prompt attention (many query tokens per sequence) over a bfloat16 KV cache, on x86 CPUs
// with AVX-512 BF16, on AMX tiles where the CPU has them.
//
// With a prompt's queries, Q K^T and P V are true matrix products, and one AMX instruction
// runs a 16 x 16 x 32 block of either (SmolLM2's 256 x 64-token prefill: 4.4 ms a layer,
// SDPA's CPU kernel 10.7); without AMX, AVX-512's pair dot products run the same blocks from
// the same layout (a 2-core Zen 4: 9.6 ms a layer, SDPA 31.6). Each (sequence, K/V head) pair puts
// its keys and values into the pair-interleaved layout once; every query head of its group and every block of 16
// query rows then reads them. Scores, softmax and the value sums are float32; the softmax
// weights are rounded to bfloat16 for the value product, as SDPA's CPU kernel rounds them.
// Key blocks that no row of a query block may see (the causal future, left padding) are
// skipped.
#include "amx.h"

#include <algorithm>
#include <limits>
#include <vector>

#include <optional>

#if TIERGEN_HAVE_KERNEL
namespace {

using tiergen::amx_ready;
using tiergen::exp512;
using tiergen::store_bf16;
using tiergen::tail;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Tiles: 0-1 left operands (queries, or softmax weights), 2-3 right operands (keys, or
// values), 4-7 four blocks of sums (scores, or value sums of 64 output dims).
struct Args {
  const uint16_t *q, *k, *v;
  const bool* mask;
  uint16_t* out;   // [B, T, H, D]
  int64_t H, Hkv, T, S, D, qsb, qsh, qst, ksb, ksh, kss, vsb, vsh, vss, msb, mst, mss;
  float scale;
  bool tiles;      // the products on AMX tiles, else on AVX-512 dot products
};

// One thread's buffers, sized for the longest key range.
struct Scratch {
  int64_t SP16, SP32;
  std::vector<uint32_t> kt;   // keys: [SP16/16][D/32] blocks of 16 dim pairs x 16 keys
  std::vector<uint16_t> vv;   // values: [SP32/32][D/16] blocks of 16 key pairs x 16 dims x 2
  std::vector<uint16_t> qt;   // one query block: 16 rows x D
  std::vector<float> sc;      // its scores: 16 rows x SP16
  std::vector<uint16_t> p;    // its softmax weights: 16 rows x SP32
  std::vector<float> acc;     // value sums: 16 rows x 64 dims
  std::vector<int64_t> first, end;   // per query row: its first visible key, one past its last
  Scratch(int64_t S, int64_t T, int64_t D)
      : SP16((S + 15) / 16 * 16), SP32((S + 31) / 32 * 32), kt(SP16 * D / 2), vv(SP32 * D), qt(16 * D),
        sc(16 * SP16), p(16 * SP32), acc(16 * 64), first(T), end(T) {}
};

// K^T in AMX's B layout: block (kb, db) row r holds, for keys n = 0..15, the dims
// (32 db + 2r, 32 db + 2r + 1) of key 16 kb + n: a 16 x 16 transpose of 32-bit pairs.
// Keys past S are zero.
void pack_keys(const Args& a, const uint16_t* kb, Scratch& w) {
  const int64_t DB = a.D / 32;
  for (int64_t t0 = 0; t0 < w.SP16; t0 += 16)
    tiergen::pack_right_tiles(kb + t0 * a.kss, a.kss, std::min<int64_t>(16, a.S - t0), a.D, DB,
                              (uint16_t*)(w.kt.data() + (t0 / 16) * DB * 256));
}

// V in AMX's B layout: block (kp, dd) row r holds, for dims n = 0..15, the values of keys
// 32 kp + 2r and 32 kp + 2r + 1 at dim 16 dd + n, interleaved. Keys past S are zero.
void pack_values(const Args& a, const uint16_t* vb, Scratch& w) {
  const int64_t DB16 = a.D / 16;
  __m512i lo_idx, hi_idx;
  {
    alignas(64) uint16_t lo[32], hi[32];
    for (int i = 0; i < 32; ++i) lo[i] = (uint16_t)((i & 1) * 32 + i / 2), hi[i] = (uint16_t)(lo[i] + 16);
    lo_idx = _mm512_load_si512(lo), hi_idx = _mm512_load_si512(hi);
  }
  for (int64_t t = 0; t < w.SP32; t += 2) {
    const int64_t kp = t / 32, r = (t % 32) / 2;
    for (int64_t c = 0; c < a.D / 32; ++c) {
      const __m512i r0 = t < a.S ? _mm512_loadu_si512(vb + t * a.vss + 32 * c) : _mm512_setzero_si512();
      const __m512i r1 = t + 1 < a.S ? _mm512_loadu_si512(vb + (t + 1) * a.vss + 32 * c) : _mm512_setzero_si512();
      uint16_t* dst = w.vv.data() + (kp * DB16 + 2 * c) * 512 + r * 32;
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(r0, lo_idx, r1));
      _mm512_storeu_si512(dst + 512, _mm512_permutex2var_epi16(r0, hi_idx, r1));
    }
  }
}

// Bit i: key c0 + i is visible to query row t (keys past S are not).
inline __mmask16 visible(const Args& a, const bool* mrow, int64_t c0) {
  const __mmask16 in = tail(a.S - c0);
  if (a.mss == 1)
    return _mm_mask_cmpneq_epi8_mask(in, _mm_maskz_loadu_epi8(in, mrow + c0), _mm_setzero_si128());
  __mmask16 m = 0;
  for (int i = 0; i < 16 && c0 + i < a.S; ++i) m |= (__mmask16)(mrow[(c0 + i) * a.mss] ? 1u << i : 0u);
  return m;
}

// Each query row's visible keys lie in [first, end) (first = S: none), found 16 at a time.
void visible_ranges(const Args& a, int64_t b, Scratch& w) {
  for (int64_t t = 0; t < a.T; ++t) {
    const bool* mrow = a.mask + b * a.msb + t * a.mst;
    int64_t first = a.S, end = 0;
    for (int64_t c0 = 0; c0 < a.S; c0 += 16)
      if (const __mmask16 m = visible(a, mrow, c0)) { first = c0 + __builtin_ctz(m); break; }
    for (int64_t c0 = (a.S - 1) / 16 * 16; c0 >= first; c0 -= 16)
      if (const __mmask16 m = visible(a, mrow, c0)) { end = c0 + 32 - __builtin_clz((uint32_t)m); break; }
    w.first[t] = first, w.end[t] = end;
  }
}

#if TIERGEN_HAVE_AMX
// acc[i] += tile A x B[i] for tiles acc = 4 .. 3 + N, the B tiles read from b0 + i * bstep,
// alternating between tiles 2 and 3 so one's load overlaps the other's product. A macro:
// the tile intrinsics take their register numbers as literals.
#define TIERGEN_PRODUCTS(A, b0, bstep)                                                 \
  do {                                                                                 \
    const char* b_ = (const char*)(b0);                                                \
    _tile_loadd(2, b_, 64);                                                            \
    _tile_dpbf16ps(4, A, 2);                                                           \
    if constexpr (N > 1) { _tile_loadd(3, b_ + (bstep), 64); _tile_dpbf16ps(5, A, 3); }     \
    if constexpr (N > 2) { _tile_loadd(2, b_ + 2 * (bstep), 64); _tile_dpbf16ps(6, A, 2); } \
    if constexpr (N > 3) { _tile_loadd(3, b_ + 3 * (bstep), 64); _tile_dpbf16ps(7, A, 3); } \
  } while (0)

template <int N>
inline void zero_acc() {
  _tile_zero(4);
  if constexpr (N > 1) _tile_zero(5);
  if constexpr (N > 2) _tile_zero(6);
  if constexpr (N > 3) _tile_zero(7);
}

// tile 4 + i to dst + 16 i floats, rows ``stride`` bytes apart
template <int N>
inline void store_acc(float* dst, int64_t stride) {
  _tile_stored(4, dst, stride);
  if constexpr (N > 1) _tile_stored(5, dst + 16, stride);
  if constexpr (N > 2) _tile_stored(6, dst + 32, stride);
  if constexpr (N > 3) _tile_stored(7, dst + 48, stride);
}

// Scores of 16 query rows against N consecutive key blocks from kb0, into sc. The A tiles
// (query dims) alternate between tiles 0 and 1 for the same overlap.
template <int N>
void score_tiles(const Args& a, const uint16_t* qrows, int64_t qstride, Scratch& w, int64_t kb0) {
  const int64_t DB = a.D / 32, step = DB * 256 * 4;
  zero_acc<N>();
  for (int64_t db = 0; db < DB; ++db) {
    const uint32_t* blk = w.kt.data() + (kb0 * DB + db) * 256;
    if (db % 2 == 0) {
      _tile_loadd(0, qrows + 32 * db, qstride);
      TIERGEN_PRODUCTS(0, blk, step);
    } else {
      _tile_loadd(1, qrows + 32 * db, qstride);
      TIERGEN_PRODUCTS(1, blk, step);
    }
  }
  store_acc<N>(w.sc.data() + kb0 * 16, w.SP16 * 4);
}

// The value sums of output dim blocks dd0 .. dd0 + N - 1 over key pair blocks [kp0, kp1).
template <int N>
void value_tiles(const Args& a, Scratch& w, int64_t dd0, int64_t kp0, int64_t kp1) {
  const int64_t DB16 = a.D / 16;
  zero_acc<N>();
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    const uint16_t* blk = w.vv.data() + (kp * DB16 + dd0) * 512;
    if (kp % 2 == 0) {
      _tile_loadd(0, w.p.data() + kp * 32, w.SP32 * 2);
      TIERGEN_PRODUCTS(0, blk, 1024);
    } else {
      _tile_loadd(1, w.p.data() + kp * 32, w.SP32 * 2);
      TIERGEN_PRODUCTS(1, blk, 1024);
    }
  }
  store_acc<N>(w.acc.data(), 256);
}

#endif  // TIERGEN_HAVE_AMX

// score_tiles without AMX: 4 query rows x N key blocks of sums a pass, each step one dim pair
// of 4 rows broadcast against the same pair of 16 keys (a row of the packed key block).
template <int N>
void score_dots(const Args& a, const uint16_t* qrows, int64_t qstride, Scratch& w, int64_t kb0) {
  const int64_t DB = a.D / 32;
  const char* q = (const char*)qrows;
  for (int t = 0; t < 16; t += 4) {
    __m512 acc[4][N];
    for (int i = 0; i < 4; ++i)
      for (int n = 0; n < N; ++n) acc[i][n] = _mm512_setzero_ps();
    for (int64_t db = 0; db < DB; ++db)
      for (int r = 0; r < 16; ++r) {
        __m512i k[N];
        for (int n = 0; n < N; ++n) k[n] = _mm512_loadu_si512(w.kt.data() + ((kb0 + n) * DB + db) * 256 + 16 * r);
        for (int i = 0; i < 4; ++i) {
          const char* pair = q + (t + i) * qstride + (32 * db + 2 * r) * 2;
          for (int n = 0; n < N; ++n) acc[i][n] = tiergen::dot_pair(acc[i][n], tiergen::pair_at(pair), k[n]);
        }
      }
    for (int i = 0; i < 4; ++i)
      for (int n = 0; n < N; ++n) _mm512_storeu_ps(w.sc.data() + (t + i) * w.SP16 + (kb0 + n) * 16, acc[i][n]);
  }
}

// value_tiles without AMX: 4 rows x N blocks of 16 output dims a pass, each step one key pair's
// weights of 4 rows broadcast against that pair's values (a row of the packed value block).
template <int N>
void value_dots(const Args& a, Scratch& w, int64_t dd0, int64_t kp0, int64_t kp1) {
  const int64_t DB16 = a.D / 16;
  for (int t = 0; t < 16; t += 4) {
    __m512 acc[4][N];
    for (int i = 0; i < 4; ++i)
      for (int n = 0; n < N; ++n) acc[i][n] = _mm512_setzero_ps();
    for (int64_t kp = kp0; kp < kp1; ++kp)
      for (int r = 0; r < 16; ++r) {
        __m512i v[N];
        for (int n = 0; n < N; ++n) v[n] = _mm512_loadu_si512(w.vv.data() + (kp * DB16 + dd0 + n) * 512 + 32 * r);
        for (int i = 0; i < 4; ++i) {
          const uint16_t* pair = w.p.data() + (t + i) * w.SP32 + 32 * kp + 2 * r;
          for (int n = 0; n < N; ++n) acc[i][n] = tiergen::dot_pair(acc[i][n], tiergen::pair_at(pair), v[n]);
        }
      }
    for (int i = 0; i < 4; ++i)
      for (int n = 0; n < N; ++n) _mm512_storeu_ps(w.acc.data() + (t + i) * 64 + 16 * n, acc[i][n]);
  }
}

// Scores of 16 query rows against N consecutive key blocks from kb0, into sc.
template <int N>
void score_blocks(const Args& a, const uint16_t* qrows, int64_t qstride, Scratch& w, int64_t kb0) {
#if TIERGEN_HAVE_AMX
  if (a.tiles) return score_tiles<N>(a, qrows, qstride, w, kb0);
#endif
  score_dots<N>(a, qrows, qstride, w, kb0);
}

// The value sums of output dim blocks dd0 .. dd0 + N - 1 over key pair blocks [kp0, kp1), into acc.
template <int N>
void value_sums(const Args& a, Scratch& w, int64_t dd0, int64_t kp0, int64_t kp1) {
#if TIERGEN_HAVE_AMX
  if (a.tiles) return value_tiles<N>(a, w, dd0, kp0, kp1);
#endif
  value_dots<N>(a, w, dd0, kp0, kp1);
}

// fn<N>(...) for N = min(4, n)
#define TIERGEN_BY_COUNT(n, fn, ...)              \
  switch (n) {                                    \
    case 1: fn<1>(__VA_ARGS__); break;            \
    case 2: fn<2>(__VA_ARGS__); break;            \
    case 3: fn<3>(__VA_ARGS__); break;            \
    default: fn<4>(__VA_ARGS__); break;           \
  }

// Query rows t0 .. t0 + 15 of query head h over the packed keys and values of its pair.
void attend_block(const Args& a, int64_t b, int64_t h, int64_t t0, Scratch& w) {
  const int64_t rows = std::min<int64_t>(16, a.T - t0), D = a.D, DB16 = D / 16;
  // the key blocks any row may see
  int64_t lo = a.S, hi = 0;
  for (int64_t i = 0; i < rows; ++i)
    if (w.first[t0 + i] < a.S) lo = std::min(lo, w.first[t0 + i]), hi = std::max(hi, w.end[t0 + i]);
  uint16_t* orow0 = a.out + ((b * a.T + t0) * a.H + h) * D;
  if (lo >= hi) {   // no row sees a key: it attends to nothing
    for (int64_t i = 0; i < rows; ++i) std::fill(orow0 + i * a.H * D, orow0 + i * a.H * D + D, 0);
    return;
  }
  const int64_t kb0 = lo / 16, kb1 = (hi + 15) / 16, kp0 = lo / 32, kp1 = (hi + 31) / 32;
  // a full block's queries are read in place; a last, partial one from a zero-padded copy
  const uint16_t* qrows = a.q + b * a.qsb + h * a.qsh + t0 * a.qst;
  int64_t qstride = a.qst * 2;
  if (rows < 16) {
    for (int64_t i = 0; i < 16; ++i)
      for (int64_t c = 0; c < D; c += 32)
        _mm512_storeu_si512(w.qt.data() + i * D + c, i < rows ? _mm512_loadu_si512(qrows + i * a.qst + c)
                                                             : _mm512_setzero_si512());
    qrows = w.qt.data(), qstride = D * 2;
  }
  for (int64_t kb = kb0; kb < kb1; kb += 4) TIERGEN_BY_COUNT(kb1 - kb, score_blocks, a, qrows, qstride, w, kb)
  // softmax per row: unnormalised weights to bfloat16, 1 / their float32 sum
  float inv[16];
  const __m512 scale = _mm512_set1_ps(a.scale), ninf = _mm512_set1_ps(kNegInf);
  for (int64_t i = 0; i < 16; ++i) {
    uint16_t* prow = w.p.data() + i * w.SP32;
    for (int64_t c = kp0 * 32; c < kp1 * 32; c += 32) _mm512_storeu_si512(prow + c, _mm512_setzero_si512());
    inv[i] = 0.f;
    if (i >= rows) continue;
    const bool* mrow = a.mask + b * a.msb + (t0 + i) * a.mst;
    float* srow = w.sc.data() + i * w.SP16;
    __m512 mv = ninf;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const __m512 x = _mm512_mask_mov_ps(ninf, visible(a, mrow, kb * 16),
                                          _mm512_mul_ps(_mm512_loadu_ps(srow + kb * 16), scale));
      _mm512_storeu_ps(srow + kb * 16, x);
      mv = _mm512_max_ps(mv, x);
    }
    const float m = _mm512_reduce_max_ps(mv);
    if (m == kNegInf) continue;
    const __m512 mm = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const __m512 x = _mm512_loadu_ps(srow + kb * 16);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp512(_mm512_sub_ps(x, mm)));
      store_bf16(prow + kb * 16, e);
      sv = _mm512_add_ps(sv, e);
    }
    inv[i] = 1.f / _mm512_reduce_add_ps(sv);
  }
  for (int64_t dd0 = 0; dd0 < DB16; dd0 += 4) {
    const int64_t n = std::min<int64_t>(4, DB16 - dd0);
    TIERGEN_BY_COUNT(n, value_sums, a, w, dd0, kp0, kp1)
    for (int64_t i = 0; i < rows; ++i) {
      const __m512 iv = _mm512_set1_ps(inv[i]);
      for (int64_t c = 0; c < n; ++c)
        store_bf16(orow0 + i * a.H * D + (dd0 + c) * 16, _mm512_mul_ps(_mm512_loadu_ps(w.acc.data() + i * 64 + c * 16), iv));
    }
  }
}

}  // namespace
#endif

bool supports(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
#if TIERGEN_HAVE_KERNEL
  return num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim % 32 == 0 &&
         head_dim <= 256;
#else
  return false;
#endif
}

// q [B,H,T,D], k/v [B,Hkv,S,D] bfloat16 with unit last stride, mask [B,1,T,S] bool (true:
// may attend). Returns softmax(q k^T * scale + mask) v as a [B,H,T,D] view of [B,T,H,D]
// memory, so the layer's token-major reshape after it is free.
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& mask, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16, "prefill_attention: bfloat16 q, k, v expected");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "prefill_attention: a bool mask expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4,
              "prefill_attention: q [B,H,T,D], k/v [B,Hkv,S,D], mask [B,1,T,S] expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "prefill_attention: unit last stride expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(1) == Hkv &&
              v.size(2) == S && mask.size(0) == B && mask.size(2) == T && mask.size(3) == S && S > 0 && T > 0,
              "prefill_attention: mismatched shapes");
  TORCH_CHECK(supports(H, Hkv, D), "prefill_attention: unsupported head layout or no AVX-512 BF16");
  auto out = torch::empty({B, T, H, D}, q.options());
#if TIERGEN_HAVE_KERNEL
  const Args a{(const uint16_t*)q.data_ptr(), (const uint16_t*)k.data_ptr(), (const uint16_t*)v.data_ptr(),
               mask.data_ptr<bool>(), (uint16_t*)out.data_ptr(), H, Hkv, T, S, D, q.stride(0), q.stride(1),
               q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
               mask.stride(0), mask.stride(2), mask.stride(3), (float)scale, amx_ready()};
  const int64_t G = H / Hkv, pairs = B * Hkv, blocks = G * ((T + 15) / 16);
  // Fewer than two pairs a thread (one long prompt): each pair's query blocks are dealt out
  // to `split` items, which each pack the pair's keys and values for themselves -- a small
  // price beside a long prompt's products, for cores that would otherwise idle or wait.
  const int64_t split = std::min(blocks, std::max<int64_t>(1, (2 * at::get_num_threads() + pairs - 1) / pairs));
  at::parallel_for(0, pairs * split, 1, [&](int64_t begin, int64_t end) {
#if TIERGEN_HAVE_AMX
    std::optional<tiergen::TileScope> tiles;
    if (a.tiles) tiles.emplace();
#endif
    Scratch w(S, T, D);
    int64_t packed = -1, ranged = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / split, part = item % split, b = pair / Hkv, j = pair % Hkv;
      if (pair != packed) {
        pack_keys(a, a.k + b * a.ksb + j * a.ksh, w);
        pack_values(a, a.v + b * a.vsb + j * a.vsh, w);
        packed = pair;
      }
      if (b != ranged) visible_ranges(a, b, w), ranged = b;   // one mask row serves a sequence's K/V heads
      // block i is head i % G's query block i / G: dealt round-robin, each part gets early
      // (cheap, causal) and late (dear) blocks alike
      for (int64_t i = part; i < blocks; i += split) attend_block(a, b, j * G + i % G, 16 * (i / G), w);
    }
  });
#endif
  return out.transpose(1, 2);
}

// The kernel touches no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build can use the kernel (AVX-512 BF16; AMX where the CPU has it)");
  m.def("supports", &supports, "whether the kernel handles this head layout");
  m.def("prefill_attention", &prefill_attention, "many-token GQA attention over a bfloat16 cache",
        py::call_guard<py::gil_scoped_release>());
}
