// A layer's product y = x w^T on x86 CPUs with AVX-512 BF16 but no AMX (Zen 4, Cooper Lake):
// linear.cpp's job -- the same packed weight, the same epilogues (a bias, a residual, or
// silu(g) * u of a gated pair, before the one rounding) -- on the dot-product instruction.
//
// In the packed weight (tile_pack.h) each input pair of a 16-column block is one 64-byte line,
// the operand vdpbf16ps multiplies a broadcast pair of x into. A step keeps MR rows x NR blocks
// of sums in registers (8 x 3; 6 x 4 for a gated pair's 2 gate and 2 up blocks; 2 x 8 for one
// or two rows, which would otherwise have too few independent sums to keep the unit busy) and
// runs over all of K, the epilogue applied from the registers. So no partial sums go through
// memory, and a row's sums go over the pairs in one order whatever the batch, the thread split
// or the placement: every placement computes the same bits.
//
// The threads split the output columns at decode sizes and the rows for long prompts (each
// then reads only its own rows of x). Within a thread the rows go panel by panel (x's panel at
// most half of L2 split by columns, a quarter split by rows) and the columns group by group (a
// group's weight blocks a quarter of L2); a block of rows runs across the group's columns
// while its x stays in L1. SmolLM2's layer products at 256 rows: 1.06-1.08x oneDNN's (with
// the SiLU pass oneDNN needs), 96-100 % of the bfloat16 peak in cache; 1-4 rows 1.8-2.3x.

#include "tile_pack.h"

#include <algorithm>
#include <optional>

namespace {

using tiergen::blocks_of;

#if TIERGEN_HAVE_KERNEL
using tiergen::kTile;
using tiergen::load_bf16;
using tiergen::tail;

// Rows per thread from which the threads split the rows rather than the columns.
constexpr int64_t kRowSplit = 512;

struct Product {
  const uint16_t *x, *b, *bias, *other;
  void* out;
  int64_t M, N, K, KB, OB, FB, xs, os;   // OB: 16-column output blocks; FB > 0: gated, F = 16 FB
  bool out_float;

  // weight block nb's pair p is its line p
  const uint16_t* block(int64_t nb) const { return b + nb * KB * kTile; }

  // acc[i][j] = rows m0 + i of x times the weight blocks wb[j], over all of K.
  template <int MR, int NR>
  void sums(int64_t m0, const uint16_t* const* wb, __m512 (&acc)[MR][NR]) const {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    const uint16_t* a = x + m0 * xs;
    const int64_t full = K / 2;
    for (int64_t p = 0; p < full; ++p) {
      __m512i w[NR];
      for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_si512(wb[j] + 32 * p);
      for (int i = 0; i < MR; ++i) {
        const uint32_t pair = tiergen::pair_at(a + i * xs + 2 * p);
        for (int j = 0; j < NR; ++j) acc[i][j] = tiergen::dot_pair(acc[i][j], pair, w[j]);
      }
    }
    if (K & 1) {   // an odd K's last dim, paired with a zero (nothing past the row is read)
      __m512i w[NR];
      for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_si512(wb[j] + 32 * full);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = tiergen::dot_pair(acc[i][j], a[i * xs + K - 1], w[j]);
    }
  }

  void store(int64_t row, int64_t col, __m512 v, __mmask16 m) const {
    if (out_float)
      _mm512_mask_storeu_ps((float*)out + row * os + col, m, v);
    else
      tiergen::store_bf16((uint16_t*)out + row * os + col, v, m);
  }

  // Rows m0 .. m0 + MR - 1 of output blocks ob .. ob + OU - 1.
  template <int MR, int OU, bool Gated>
  void step(int64_t m0, int64_t ob) const {
    if constexpr (Gated) {   // gate blocks ob.., up blocks FB + ob..
      const uint16_t* wb[2 * OU];
      for (int j = 0; j < OU; ++j) wb[j] = block(ob + j), wb[OU + j] = block(FB + ob + j);
      __m512 acc[MR][2 * OU];
      sums<MR, 2 * OU>(m0, wb, acc);
      for (int j = 0; j < OU; ++j) {
        const int64_t col = 16 * (ob + j);
        const __m512 bg = bias ? load_bf16(bias + col) : _mm512_setzero_ps();
        const __m512 bu = bias ? load_bf16(bias + 16 * FB + col) : _mm512_setzero_ps();
        for (int i = 0; i < MR; ++i) {
          const __m512 g = _mm512_add_ps(acc[i][j], bg), u = _mm512_add_ps(acc[i][OU + j], bu);
          store(m0 + i, col, _mm512_mul_ps(tiergen::silu512(g), u), 0xffff);
        }
      }
    } else {
      const uint16_t* wb[OU];
      for (int j = 0; j < OU; ++j) wb[j] = block(ob + j);
      __m512 acc[MR][OU];
      sums<MR, OU>(m0, wb, acc);
      for (int j = 0; j < OU; ++j) {
        const int64_t col = 16 * (ob + j);
        const __mmask16 m = tail(N - col);
        const __m512 bj = bias ? load_bf16(bias + col, m) : _mm512_setzero_ps();
        for (int i = 0; i < MR; ++i) {
          __m512 v = _mm512_add_ps(acc[i][j], bj);
          if (other) v = _mm512_add_ps(v, load_bf16(other + (m0 + i) * N + col, m));
          store(m0 + i, col, v, m);
        }
      }
    }
  }

  // The step for mr <= MR rows of ou <= OU blocks: every shape compiled on its own, so the
  // sums stay in registers.
  template <int MR, int OU, bool Gated>
  void step_of(int64_t m0, int64_t mr, int64_t ob, int64_t ou) const {
    if constexpr (OU > 1) {
      if (ou < OU) return step_of<MR, OU - 1, Gated>(m0, mr, ob, ou);
    }
    if constexpr (MR > 1) {
      if (mr < MR) return step_of<MR - 1, OU, Gated>(m0, mr, ob, ou);
    }
    step<MR, OU, Gated>(m0, ob);
  }

  // A step's rows and output blocks: 8 x 3 (6 x 2, 4 weight blocks, gated); for one or two rows
  // 2 x 8 (2 x 4 gated), so even they have 8 or more independent sums.
  bool few() const { return M <= 2; }
  int64_t step_rows() const { return few() ? 2 : FB ? 6 : 8; }
  int64_t step_blocks() const { return few() ? (FB ? 4 : 8) : (FB ? 2 : 3); }

  void any_step(int64_t m0, int64_t mr, int64_t ob, int64_t ou) const {
    if (FB)
      few() ? step_of<2, 4, true>(m0, mr, ob, ou) : step_of<6, 2, true>(m0, mr, ob, ou);
    else
      few() ? step_of<2, 8, false>(m0, mr, ob, ou) : step_of<8, 3, false>(m0, mr, ob, ou);
  }

  // Rows [rb, re) x output blocks [cb, ce). (Prefetching the next group's weight into L2
  // while a group runs made no difference measured: the hardware's prefetch keeps up.)
  void run(int64_t rb, int64_t re, int64_t cb, int64_t ce, bool by_rows) const {
    const int64_t l2 = tiergen::l2_bytes(1 << 20) / 4, OU = step_blocks(), MR = step_rows();
    const int64_t block_bytes = KB * kTile * 2 * (FB ? 2 : 1);   // a weight block's (gated: and its up block's)
    // panels of even size (256 rows in one panel rather than 224 + 32, which read the weight twice)
    const int64_t panels = blocks_of((re - rb) * 2 * K, (by_rows ? 1 : 2) * l2);
    const int64_t PR = blocks_of(blocks_of(re - rb, panels), MR) * MR;
    const int64_t G = std::max<int64_t>(OU, l2 / block_bytes / OU * OU);
    for (int64_t p0 = rb; p0 < re; p0 += PR) {
      const int64_t p1 = std::min(re, p0 + PR);
      for (int64_t g0 = cb; g0 < ce; g0 += G) {
        const int64_t g1 = std::min(ce, g0 + G);
        for (int64_t m0 = p0; m0 < p1; m0 += MR) {
          const int64_t mr = std::min(MR, p1 - m0);
          for (int64_t ob = g0; ob < g1; ob += OU) any_step(m0, mr, ob, std::min(OU, g1 - ob));
        }
      }
    }
  }
};
#endif

}  // namespace

// x [M, K] times w^T, w [n, K] plain or packed (tile_pack.h ``pack``). gated: w = (g | u) with
// n = 2F, F a multiple of 16, and the result silu(g) * u [M, F]; otherwise x w^T + bias
// (+ other [M, n]). float32 out where out_float, else bfloat16.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, int64_t n, const std::optional<torch::Tensor>& bias,
                     const std::optional<torch::Tensor>& other, bool gated, bool out_float) {
  tiergen::check_product(x, w, n, bias, other, gated);
  const int64_t M = x.size(0), K = x.size(1), KB = blocks_of(K, 32), N = n, cols = gated ? N / 2 : N;
  auto out = tiergen::product_out(x, n, gated, out_float);
#if TIERGEN_HAVE_KERNEL
  if (M == 0) return out;
  const torch::Tensor blocks = tiergen::weight_blocks(w, N, K);
  const Product p{(const uint16_t*)x.data_ptr(), (const uint16_t*)blocks.data_ptr(),
                  bias ? (const uint16_t*)bias->data_ptr() : nullptr, other ? (const uint16_t*)other->data_ptr() : nullptr,
                  out.data_ptr(), M, N, K, KB, gated ? N / 32 : blocks_of(N, 16), gated ? N / 32 : 0, x.stride(0), cols,
                  out_float};
  const int64_t threads = at::get_num_threads();
  if (M >= kRowSplit * threads) {   // each thread its own rows, in whole steps
    const int64_t MR = p.step_rows(), steps = blocks_of(M, MR);
    at::parallel_for(0, steps, 1, [&](int64_t begin, int64_t end) {
      p.run(begin * MR, std::min(M, end * MR), 0, p.OB, true);
    });
  } else {   // each thread its own columns, in whole steps where there are enough
    const int64_t OU = p.step_blocks(), units = blocks_of(p.OB, OU), per = units >= threads ? OU : 1;
    at::parallel_for(0, blocks_of(p.OB, per), 1, [&](int64_t begin, int64_t end) {
      p.run(0, M, begin * per, std::min(p.OB, end * per), false);
    });
  }
#else
  TORCH_CHECK(false, "linear: built without AVX-512 BF16");
#endif
  return out;
}

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build can use the kernel (AVX-512 BF16)");
  m.def("pack", &tiergen::pack, "a bfloat16 weight in the kernel's packed layout",
        py::call_guard<py::gil_scoped_release>());
  m.def("unpack", &tiergen::unpack, "the plain weight of packed blocks", py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "x w^T with a fused epilogue, on AVX-512 BF16", py::arg("x"), py::arg("w"), py::arg("n"),
        py::arg("bias") = py::none(), py::arg("other") = py::none(), py::arg("gated") = false,
        py::arg("out_float") = false, py::call_guard<py::gil_scoped_release>());
}
