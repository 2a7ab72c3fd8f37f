// The LM head on x86 CPUs with AMX: float32 logits of bfloat16 features, or straight their
// greedy argmax.
//
// oneDNN's bfloat16 product rounds each logit to bfloat16, whose step at |logit| ~ 25 is
// 0.125: wider than the lead of the right token in many greedy steps (SmolLM2 on "What is
// the capital of France?": "The" 25.42, "L" 25.34, both 25.375 once rounded, and the tie
// went to the lower id). Here the logits stay float32 from the AMX accumulators, and the
// greedy form takes each row's maximum tile by tile, so the [N, V] logits never exist.
//
// The weight is read as it is stored ([V, K] rows, resident or streamed alike): AMX takes its
// rows as the left operand, so the product computed is logits^T, 16 ids x 16 feature rows a
// tile, the features put once a call into the right operand's pair-interleaved layout. Each
// step is a 2 x 2 block of tiles (32 ids x 32 rows over 32 input dims), and a row's best
// id is kept lane-wise, one lane per row.
#include "amx.h"

#include <algorithm>
#include <limits>
#include <vector>

#if TIERGEN_HAVE_AMX
namespace {

using tiergen::amx_ready;

constexpr int64_t kRowChunk = 512;   // feature rows whose packed form stays in L2

// The features h [N, K] in AMX's right-operand layout: block (nb, kb) row r holds, for rows
// n = 0..15, the dims (32 kb + 2r, 32 kb + 2r + 1) of row 16 nb + n. Past N or K: zeros.
struct Features {
  int64_t N, NP, KB;
  std::vector<uint16_t> x;
  explicit Features(const torch::Tensor& h)
      : N(h.size(0)), NP((h.size(0) + 31) / 32 * 32), KB((h.size(1) + 31) / 32), x(NP * KB * 32) {
    const uint16_t* src = (const uint16_t*)h.data_ptr();
    const int64_t K = h.size(1), rs = h.stride(0);
    for (int64_t nb = 0; nb < NP / 16; ++nb)
      tiergen::pack_right_tiles(src + std::min(16 * nb, N) * rs, rs, std::clamp<int64_t>(N - 16 * nb, 0, 16), K, KB,
                                x.data() + nb * KB * 512);
  }
  const uint16_t* block(int64_t nb, int64_t kb) const { return x.data() + (nb * KB + kb) * 512; }
};

// The weight's rows as left operands: 32 ids from id0, each k block read in place, or from a
// zero-padded copy where the block runs past V or K (never past the tensor's end).
struct IdBlock {
  const uint16_t* rows;   // id0's row
  int64_t stride, KB;
  bool copied_tail;       // the last k block comes from ``tail``
  alignas(64) uint16_t tail[32 * 32];
  std::vector<uint16_t> whole;   // all 32 rows, where ids run past V

  IdBlock(const uint16_t* w, int64_t V, int64_t K, int64_t rs, int64_t id0) : KB((K + 31) / 32) {
    const int64_t n = std::min<int64_t>(32, V - id0);
    if (n < 32) {   // the vocabulary's last, partial block
      whole.assign(32 * KB * 32, 0);
      for (int64_t i = 0; i < n; ++i) std::copy_n(w + (id0 + i) * rs, K, whole.data() + i * KB * 32);
      rows = whole.data(), stride = KB * 32, copied_tail = false;
      return;
    }
    rows = w + id0 * rs, stride = rs, copied_tail = K % 32 != 0;
    if (copied_tail) {
      std::fill(std::begin(tail), std::end(tail), 0);
      for (int64_t i = 0; i < 32; ++i) std::copy_n(rows + i * rs + (KB - 1) * 32, K % 32, tail + i * 32);
    }
  }
  // ids 16 half .. 16 half + 15, k block kb: pointer and row stride in bytes
  const uint16_t* at(int half, int64_t kb, int64_t& bytes) const {
    if (copied_tail && kb == KB - 1) {
      bytes = 64;
      return tail + half * 16 * 32;
    }
    bytes = stride * 2;
    return rows + half * 16 * stride + 32 * kb;
  }
};

// logits^T of ids id0 .. id0 + 31 and feature rows r0 .. r0 + 31 into c [32 ids x 32 rows].
// Tiles 0-1: two blocks of 16 ids' weights; 2-3: two blocks of 16 feature rows; 4-7: products.
inline void block(const Features& f, const IdBlock& w, int64_t r0, float* c) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  int64_t s0, s1;
  for (int64_t kb = 0; kb < f.KB; ++kb) {
    const uint16_t* a0 = w.at(0, kb, s0);
    const uint16_t* a1 = w.at(1, kb, s1);
    _tile_loadd(0, a0, s0);
    _tile_stream_loadd(2, f.block(r0 / 16, kb), 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_loadd(1, a1, s1);
    _tile_dpbf16ps(6, 1, 2);
    _tile_stream_loadd(3, f.block(r0 / 16 + 1, kb), 64);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(7, 1, 3);
  }
  _tile_stored(4, c, 128);
  _tile_stored(5, c + 16, 128);
  _tile_stored(6, c + 16 * 32, 128);
  _tile_stored(7, c + 16 * 32 + 16, 128);
}

// Runs fn(id0, r0, c) over every 32 x 32 block, the vocabulary split between the threads
// (each reads its share of the weight once per chunk of rows).
template <typename Fn>
void for_blocks(const Features& f, const torch::Tensor& w, Fn&& fn) {
  const int64_t V = w.size(0), K = w.size(1), rs = w.stride(0);
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  at::parallel_for(0, (V + 31) / 32, 1, [&](int64_t begin, int64_t end) {
    const tiergen::TileScope tiles;
    alignas(64) float c[32 * 32];
    for (int64_t rc = 0; rc < f.NP; rc += kRowChunk)
      for (int64_t v32 = begin; v32 < end; ++v32) {
        const IdBlock ids(wp, V, K, rs, 32 * v32);
        for (int64_t r0 = rc; r0 < std::min(f.NP, rc + kRowChunk); r0 += 32) {
          block(f, ids, r0, c);
          fn(32 * v32, r0, (const float*)c);
        }
      }
  });
}

void check(const torch::Tensor& h, const torch::Tensor& w) {
  TORCH_CHECK(amx_ready(), "lm_head: AMX is not available to this process");
  TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.stride(1) == 1 && h.size(0) > 0,
              "lm_head: bfloat16 features [N, K] with unit last stride expected");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.stride(1) == 1 && w.size(1) == h.size(1) &&
              w.size(0) > 0 && w.size(0) < (1LL << 31),
              "lm_head: a bfloat16 weight [V, K] with unit last stride expected");
}

}  // namespace
#endif

// float32 logits [N, V] of features h [N, K] against the weight w [V, K].
torch::Tensor logits(const torch::Tensor& h, const torch::Tensor& w) {
  auto out = torch::empty({h.size(0), w.size(0)}, h.options().dtype(at::kFloat));
#if TIERGEN_HAVE_AMX
  check(h, w);
  const Features f(h);
  float* op = out.data_ptr<float>();
  const int64_t N = f.N, V = w.size(0);
  for_blocks(f, w, [&](int64_t id0, int64_t r0, const float* c) {
    for (int64_t ih = 0; ih < 2 && id0 + 16 * ih < V; ++ih)
      for (int64_t rh = 0; rh < 2 && r0 + 16 * rh < N; ++rh) {   // c's 16 ids x 16 rows, transposed
        __m512i t[16];
        for (int i = 0; i < 16; ++i) t[i] = _mm512_castps_si512(_mm512_loadu_ps(c + (16 * ih + i) * 32 + 16 * rh));
        tiergen::transpose16(t);
        const __mmask16 in = tiergen::tail(V - id0 - 16 * ih);
        for (int64_t r = 0; r < 16 && r0 + 16 * rh + r < N; ++r)
          _mm512_mask_storeu_ps(op + (r0 + 16 * rh + r) * V + id0 + 16 * ih, in, _mm512_castsi512_ps(t[r]));
      }
  });
#else
  TORCH_CHECK(false, "lm_head: built without AMX");
#endif
  return out;
}

// The greedy head: for each row of h [N, K], the id of its largest float32 logit against
// w [V, K]; ties go to the lowest id, as torch's argmax. NaNs are not ordered.
torch::Tensor argmax(const torch::Tensor& h, const torch::Tensor& w) {
  auto arg = torch::empty({h.size(0)}, h.options().dtype(at::kLong));
#if TIERGEN_HAVE_AMX
  check(h, w);
  const Features f(h);
  const int64_t V = w.size(0);
  tiergen::RowArgmax best(f.NP);
  for_blocks(f, w, [&](int64_t id0, int64_t r0, const float* c) {
    for (int64_t half = 0; half < 2; ++half)
      best.update(r0 + 16 * half, id0, std::min<int64_t>(32, V - id0),
                  [&](int64_t i) { return _mm512_loadu_ps(c + i * 32 + 16 * half); });
  });
  best.write(arg.data_ptr<int64_t>(), f.N);
#else
  TORCH_CHECK(false, "lm_head: built without AMX");
#endif
  return arg;
}

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &tiergen::amx_ready, "whether this build and this process can use the kernels (AMX BF16)");
  m.def("logits", &logits, "float32 logits of bfloat16 features", py::call_guard<py::gil_scoped_release>());
  m.def("argmax", &argmax, "the greedy head: each row's largest float32 logit's id",
        py::call_guard<py::gil_scoped_release>());
}
