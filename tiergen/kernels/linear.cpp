// A layer's product y = x w^T on x86 CPUs with AMX, for decode-sized batches: bfloat16 in,
// float32 sums, and an epilogue (a bias, a residual, or silu(g) * u of a gated pair) applied
// before the one rounding.
//
// The weight [N, K] is kept in AMX's right-operand layout: block (nb, kb) is one 1 KiB tile
// whose row r holds, for the 16 output columns 16 nb .. 16 nb + 15, the input pair
// (32 kb + 2r, 32 kb + 2r + 1); an n block's tiles follow each other over kb. A resident weight
// is packed so once at load; a plain one (streamed) is packed the same way each call, so every
// placement computes the same bits.
//
// Each step is 2 x 2 tiles, 32 rows x 32 columns over 32 input dims. The threads split the
// column pairs; a column pair's weight tiles (36 KiB at K = 576) are read from L1 for every
// 32 rows of x, whose tiles are loaded with the streaming hint so they do not evict them
// (SmolLM2's decode shapes at 256 rows: 1.6x the rate of plain tile loads). The next column
// pair's tiles are prefetched into L2 meanwhile. Rows go panel by panel, a panel's x sized
// to stay in L2, so long prompts run here too. A block's epilogue runs a few rows at a time
// between the next block's tile products, which keeps the tile unit busy through it (a
// decode step's products 10-13 % faster than epilogue-then-products). A row's sums run over
// the same tiles in the same order whatever the batch, so its result does not depend on the
// other rows.
#include "amx.h"
#include "tile_pack.h"

#include <unistd.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

using tiergen::blocks_of;

#if TIERGEN_HAVE_AMX
using tiergen::load_bf16;
using tiergen::store_bf16;
using tiergen::tail;
using tiergen::kTile;

constexpr int64_t kRowSplitBlocks = 16;   // row blocks a thread needs before the threads split the rows

// A block whose sums are stored but not yet through the epilogue: its rows go through it a
// few at a time while the next block's tile products run.
struct Pending {
  explicit Pending(int64_t KB) : per_step((32 + KB - 1) / KB) {}   // all 32 rows over a block's KB k steps
  const float* c = nullptr;
  int64_t mp = 0, np = 0, row = 0, rows = 0, per_step;
};

struct Product {
  const uint16_t *x, *tail_rows, *b, *bias, *other;
  void* out;
  int64_t M, N, KB, MP, NP, FB, xs, ts, os, PB, PC, GP;   // FB > 0: gated, F = 16 FB gate columns, then as
                                                         // many up; PB / PC: row blocks a panel split by rows /
                                                         // by columns; GP: pairs a group
  bool out_float;

  // the two n blocks of column pair np
  const uint16_t* b_block(int64_t np, int half) const {
    return b + (FB ? np + half * FB : 2 * np + half) * KB * kTile;
  }

  // The two n blocks of pair nn into next (false, and nothing, where nn is no pair).
  bool blocks_of_pair(int64_t nn, const char* next[2]) const {
    if (nn < 0 || nn >= NP) return false;
    next[0] = (const char*)b_block(nn, 0), next[1] = (const char*)b_block(nn, 1);
    return true;
  }

  // c [32 x 32] = rows 32 mp .. +31 x the columns of pair np. Meanwhile the next pair's two n
  // blocks (``next``, KB * 16 cache lines each; null: none) go into L2, ``per_step`` lines a
  // k step from line ``pl`` on.
  void tiles(int64_t mp, int64_t np, float* c, const char* const* next, int64_t& pl, int64_t per_step,
             Pending& pend) const {
    const int64_t lines = KB * 16;
    const bool full = tail_rows == nullptr || 32 * mp + 32 <= M;
    const int64_t rs = full ? xs : ts;
    const uint16_t* a0 = full ? x + 32 * mp * xs : tail_rows;
    const uint16_t* a1 = a0 + 16 * rs;
    const uint16_t* b0 = b_block(np, 0);
    const uint16_t* b1 = b_block(np, 1);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    const bool two = 32 * mp + 16 < M;   // a second row tile (small batches: often not)
    const int64_t rows = std::min<int64_t>(32, M - 32 * mp), per_kb = (rows + KB - 1) / KB;
    for (int64_t kb = 0, r = 0; kb < KB; ++kb) {
      for (const int64_t stop = std::min(rows, r + per_kb); r < stop; ++r) touch(32 * mp + r, np);
      if (next != nullptr)
        for (const int64_t stop = std::min(2 * lines, pl + per_step); pl < stop; ++pl)
          _mm_prefetch(pl < lines ? next[0] + pl * 64 : next[1] + (pl - lines) * 64, _MM_HINT_T1);
      _tile_stream_loadd(0, a0 + 32 * kb, rs * 2);
      _tile_loadd(2, b0 + kb * kTile, 64);
      _tile_loadd(3, b1 + kb * kTile, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      if (two) {
        _tile_stream_loadd(1, a1 + 32 * kb, rs * 2);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
      if (pend.c != nullptr && pend.row < pend.rows) {   // the last block's epilogue, under these products
        const int64_t stop = std::min(pend.rows, pend.row + pend.per_step);
        finish(pend.mp, pend.np, pend.c, pend.row, stop);
        pend.row = stop;
      }
    }
    _tile_stored(4, c, 128);
    _tile_stored(5, c + 16, 128);
    if (two) {
      _tile_stored(6, c + 16 * 32, 128);
      _tile_stored(7, c + 16 * 32 + 16, 128);
    }
  }

  // Ask for the lines the epilogue will write (and the residual it will read) of one row of
  // pair np's block, a block ahead: a long prompt's output is fresh memory each call, and its
  // stores' misses stalled the products (a 2,730-row gated product 5.2 -> 3.6 ms).
  void touch(int64_t row, int64_t np) const {
    const int64_t col = FB ? 16 * np : 32 * np, width = FB ? 16 : std::min<int64_t>(32, N - col);
    const char* o = (const char*)out + (row * os + col) * (out_float ? 4 : 2);
    __builtin_prefetch(o, 1, 3);
    __builtin_prefetch(o + width * (out_float ? 4 : 2) - 1, 1, 3);
    if (other) {
      const char* r = (const char*)(other + row * N + col);
      _mm_prefetch(r, _MM_HINT_T0);
      _mm_prefetch(r + 2 * width - 1, _MM_HINT_T0);
    }
  }

  void store(int64_t row, int64_t col, __m512 v, __mmask16 m) const {
    if (out_float)
      _mm512_mask_storeu_ps((float*)out + row * os + col, m, v);
    else
      store_bf16((uint16_t*)out + row * os + col, v, m);
  }

  // c's rows that exist, through the epilogue into out
  void finish(int64_t mp, int64_t np, const float* c, int64_t r0, int64_t rows) const {
    if (FB) {   // gate columns 16 np.., up columns F + 16 np..; out column 16 np..
      const int64_t col = 16 * np, F = 16 * FB;
      const __m512 bg = bias ? load_bf16(bias + col) : _mm512_setzero_ps();
      const __m512 bu = bias ? load_bf16(bias + F + col) : _mm512_setzero_ps();
      for (int64_t r = r0; r < rows; ++r) {
        const __m512 g = _mm512_add_ps(_mm512_loadu_ps(c + 32 * r), bg);
        const __m512 u = _mm512_add_ps(_mm512_loadu_ps(c + 32 * r + 16), bu);
        store(32 * mp + r, col, _mm512_mul_ps(tiergen::silu512(g), u), 0xffff);
      }
      return;
    }
    const int64_t col = 32 * np;
    const __mmask16 m0 = tail(N - col), m1 = N - col > 16 ? tail(N - col - 16) : 0;
    const __m512 b0 = bias ? load_bf16(bias + col, m0) : _mm512_setzero_ps();
    const __m512 b1 = bias && m1 ? load_bf16(bias + col + 16, m1) : _mm512_setzero_ps();
    for (int64_t r = r0; r < rows; ++r) {
      const int64_t row = 32 * mp + r;
      __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + 32 * r), b0);
      __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(c + 32 * r + 16), b1);
      if (other) {
        v0 = _mm512_add_ps(v0, load_bf16(other + row * N + col, m0));
        if (m1) v1 = _mm512_add_ps(v1, load_bf16(other + row * N + col + 16, m1));
      }
      store(row, col, v0, m0);
      if (m1) store(row, col + 16, v1, m1);
    }
  }

  // What is left of the pending block's epilogue.
  void drain(Pending& pend) const {
    if (pend.c != nullptr && pend.row < pend.rows) finish(pend.mp, pend.np, pend.c, pend.row, pend.rows);
    pend.row = pend.rows;
  }

  // Block (mp, np) through the tiles, with the last one's epilogue under them; ``next``: the
  // pair whose tiles to bring into L2 meanwhile (null: none).
  void step(int64_t mp, int64_t np, float (*c)[32 * 32], int64_t& block, const char* const* next, int64_t& pl,
            int64_t per_step, Pending& pend) const {
    float* cbuf = c[block++ & 1];
    tiles(mp, np, cbuf, next, pl, per_step, pend);
    drain(pend);
    pend.c = cbuf, pend.mp = mp, pend.np = np, pend.row = 0, pend.rows = std::min<int64_t>(32, M - 32 * mp);
  }

  // All rows x column pairs [cb, ce), panel by panel of PC row blocks (x's panel stays in L2),
  // each panel over the pairs, a pair over the panel's row blocks (its tiles stay in L1).
  void run_cols(int64_t cb, int64_t ce) const {
    const tiergen::TileScope scope;
    alignas(64) float c[2][32 * 32];
    const int64_t lines = KB * 16;
    Pending pend(KB);
    int64_t block = 0;
    for (int64_t p0 = 0; p0 < MP; p0 += PC) {
      const int64_t p1 = std::min(MP, p0 + PC), per_step = (2 * lines + (p1 - p0) * KB - 1) / ((p1 - p0) * KB);
      for (int64_t np = cb; np < ce; ++np) {
        const int64_t nn = np + 1 < ce ? np + 1 : p1 < MP ? cb : -1;   // the pair after this one
        const char* next[2];
        const bool ahead = blocks_of_pair(nn, next);
        int64_t pl = 0;
        for (int64_t mp = p0; mp < p1; ++mp) step(mp, np, c, block, ahead ? next : nullptr, pl, per_step, pend);
      }
    }
    drain(pend);
  }

  // Row blocks [rb, re) x all pairs, panel by panel; a panel's pairs in groups of GP whose tiles
  // stay in L2, each row block across a group's pairs, so its output rows are written in runs
  // of lines rather than a line at a time down the panel (the output of a prompt's products is
  // memory no cache holds: line-at-a-time stores stalled them ~2 ms per 8 MiB written).
  void run_rows(int64_t rb, int64_t re) const {
    const tiergen::TileScope scope;
    alignas(64) float c[2][32 * 32];
    Pending pend(KB);
    const int64_t lines = KB * 16;
    int64_t block = 0;
    for (int64_t p0 = rb; p0 < re; p0 += PB) {
      const int64_t p1 = std::min(re, p0 + PB), share = (2 * lines + (p1 - p0) - 1) / (p1 - p0),
                    per_step = (share + KB - 1) / KB;
      for (int64_t g0 = 0; g0 < NP; g0 += GP) {
        const int64_t g1 = std::min(NP, g0 + GP);
        for (int64_t mp = p0; mp < p1; ++mp)
          for (int64_t np = g0; np < g1; ++np) {
            // the next group's pair (or the next panel's first group's) comes into L2 a share
            // at each of this group's row blocks
            const int64_t nn = g1 < NP ? g1 + (np - g0) : p1 < re ? np - g0 : -1;
            const char* next[2];
            const bool ahead = blocks_of_pair(nn, next);
            int64_t pl = (mp - p0) * share;
            step(mp, np, c, block, ahead ? next : nullptr, pl, per_step, pend);
          }
      }
    }
    drain(pend);
  }
};
#endif

// A quarter of L2: what x's panel and a group of column pairs' tiles are each kept to when the
// threads split the rows; split by columns, x's panel may take half (a 2,048-wide layer at 256
// rows in one panel instead of two: 0.77 -> 0.96x oneDNN).
int64_t l2_quarter() {
  const int64_t l2 = tiergen::l2_bytes(0);
  return l2 > 0 ? std::max<int64_t>(l2 / 4, 128 << 10) : int64_t{512} << 10;
}

// Row blocks of 32 in a panel of ``bytes`` of x: every thread reads all of x's panel for each of
// its column pairs (a 2,730-row prompt chunk in one panel spilled x to L3).
int64_t panel_blocks(int64_t KP, int64_t bytes) { return std::max<int64_t>(1, bytes / (64 * KP)); }

// Column pairs in a group (two n blocks of KB 1 KiB tiles each).
int64_t group_pairs(int64_t KB) { return std::max<int64_t>(1, l2_quarter() / (2048 * KB)); }

}  // namespace

// x [M, K] times w^T, w [n, K] plain or packed (``pack``). gated: w = (g | u) with n = 2F, F a
// multiple of 16, and the result silu(g) * u [M, F]; otherwise x w^T + bias (+ other [M, n]).
// float32 out where out_float, else bfloat16.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n, const std::optional<torch::Tensor>& bias,
                     const std::optional<torch::Tensor>& other, bool gated, bool out_float) {
  TORCH_CHECK(tiergen::amx_ready(), "linear: AMX is not available to this process");
  tiergen::check_product(x, w, n, bias, other, gated);
  const int64_t M = x.size(0), K = x.size(1), KB = blocks_of(K, 32), N = n, cols = gated ? N / 2 : N;
  auto out = tiergen::product_out(x, n, gated, out_float);
#if TIERGEN_HAVE_AMX
  if (M == 0) return out;
  const torch::Tensor blocks = tiergen::weight_blocks(w, N, K);
  // rows past M (the last rows' tiles) and dims past K come from a zero-padded copy
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  int64_t xs = x.stride(0);
  std::vector<uint16_t> padded, last;
  const int64_t KP = 32 * KB, MP = blocks_of(M, 32);
  if (K % 32) {
    padded.assign(32 * MP * KP, 0);
    for (int64_t m = 0; m < M; ++m) std::copy_n(xp + m * xs, K, padded.data() + m * KP);
    xp = padded.data(), xs = KP;
  } else if (M % 32) {
    last.assign(32 * KP, 0);
    for (int64_t m = 32 * (MP - 1); m < M; ++m) std::copy_n(xp + m * xs, K, last.data() + (m - 32 * (MP - 1)) * KP);
  }
  const Product p{xp, last.empty() ? nullptr : last.data(), (const uint16_t*)blocks.data_ptr(),
                  bias ? (const uint16_t*)bias->data_ptr() : nullptr, other ? (const uint16_t*)other->data_ptr() : nullptr,
                  out.data_ptr(), M, N, KB, MP, gated ? N / 32 : blocks_of(N, 32), gated ? N / 32 : 0, xs, KP, cols,
                  panel_blocks(KP, l2_quarter()), panel_blocks(KP, 2 * l2_quarter()), group_pairs(KB), out_float};
  // With a panel and 512 rows or more for each thread, the threads split the rows: each reads
  // only its own rows of x, which the op before wrote from the same thread (x read across cores
  // made a prompt's products 1.7x slower), though each then reads all of w. Else, as at decode
  // sizes, the column pairs (a 2,048-wide layer at 256 rows split by rows: 0.74x oneDNN).
  if (MP >= std::max<int64_t>(p.PB, kRowSplitBlocks) * at::get_num_threads())
    at::parallel_for(0, MP, 1, [&](int64_t begin, int64_t end) { p.run_rows(begin, end); });
  else
    at::parallel_for(0, p.NP, 1, [&](int64_t begin, int64_t end) { p.run_cols(begin, end); });
#else
  TORCH_CHECK(false, "linear: built without AMX");
#endif
  return out;
}

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &tiergen::amx_ready, "whether this build and this process can use the kernel (AMX BF16)");
  m.def("pack", &tiergen::pack, "a bfloat16 weight in the kernel's tile layout", py::call_guard<py::gil_scoped_release>());
  m.def("unpack", &tiergen::unpack, "the plain weight of packed tiles", py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "x w^T with a fused epilogue, on AMX", py::arg("x"), py::arg("w"), py::arg("n"),
        py::arg("bias") = py::none(), py::arg("other") = py::none(), py::arg("gated") = false,
        py::arg("out_float") = false, py::call_guard<py::gil_scoped_release>());
}
