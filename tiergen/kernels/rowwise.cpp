// Token-wise row operations on bfloat16 rows, each in one pass: RMSNorm, rotary embedding and
// the gated SiLU of a Llama layer, and the greedy head's running argmax. Each reproduces the torch
// code it stands in for (tiergen/models/llama.py rms_norm, tiergen/models/rope.py apply_rope_into,
// tiergen/models/base.py linear_gated):
// float32 arithmetic with the same roundings to bfloat16, so only the order of
// a row's sum of squares and the last bits of e^x can differ.
#include "common.h"

#include <cmath>
#include <limits>

#if TIERGEN_HAVE_KERNEL
namespace {

using tiergen::silu512;
using tiergen::load_bf16;
using tiergen::store_bf16;
using tiergen::tail;

inline __m512 round_bf16(__m512 x) {   // x rounded to bfloat16 and widened back
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

}  // namespace
#endif

// y = w * bf16(x * rsqrt(mean(x^2) + eps)), rows of x [N, E] with unit last stride.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
              w.dim() == 1 && w.size(0) == x.size(1) && x.stride(1) == 1 && w.is_contiguous(),
              "rms_norm: bfloat16 x [N, E] and w [E] expected");
  const int64_t N = x.size(0), E = x.size(1), xs = x.stride(0);
  auto y = torch::empty({N, E}, x.options());
#if TIERGEN_HAVE_KERNEL
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  uint16_t* yp = (uint16_t*)y.data_ptr();
  const float e = (float)eps;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = xp + r * xs;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < E; c += 16) {
        const __m512 v = load_bf16(row + c, tail(E - c));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / (float)E + e);
      const __m512 iv = _mm512_set1_ps(inv);
      for (int64_t c = 0; c < E; c += 16) {
        const __mmask16 m = tail(E - c);
        const __m512 n = round_bf16(_mm512_mul_ps(load_bf16(row + c, m), iv));
        store_bf16(yp + r * E + c, _mm512_mul_ps(n, load_bf16(wp + c, m)), m);
      }
    }
  });
#else
  TORCH_CHECK(false, "rms_norm: built without AVX-512 BF16");
#endif
  return y;
}

// out[n, h] = x[n, h] with dims [0, rd) rotated: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) in float32,
// rounded once. x, out [N, H, D] bfloat16 with unit last stride; cos, sin [N, 1, rd] float32 whose
// two halves repeat (only the first is read).
void rope_into(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
              cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_into: bfloat16 x/out and float32 cos/sin expected");
  TORCH_CHECK(x.dim() == 3 && out.sizes() == x.sizes() && cos.dim() == 3 && sin.sizes() == cos.sizes() &&
              cos.size(0) == x.size(0) && cos.size(2) <= x.size(2) && cos.size(2) % 2 == 0 &&
              x.stride(2) == 1 && out.stride(2) == 1 && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rope_into: x/out [N, H, D], cos/sin [N, 1, rd] expected");
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2), rd = cos.size(2), half = rd / 2;
#if TIERGEN_HAVE_KERNEL
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t xn = x.stride(0), xh = x.stride(1), on = out.stride(0), oh = out.stride(1);
  const int64_t cn = cos.stride(0), sn = sin.stride(0);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * cn;
      const float* s = sp + r * sn;
      for (int64_t h = 0; h < H; ++h) {
        const uint16_t* xr = xp + r * xn + h * xh;
        uint16_t* orow = op + r * on + h * oh;
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 m = tail(half - i);
          const __m512 x1 = load_bf16(xr + i, m), x2 = load_bf16(xr + half + i, m);
          const __m512 cv = _mm512_maskz_loadu_ps(m, c + i), sv = _mm512_maskz_loadu_ps(m, s + i);
          store_bf16(orow + i, _mm512_fnmadd_ps(x2, sv, _mm512_mul_ps(x1, cv)), m);
          store_bf16(orow + half + i, _mm512_fmadd_ps(x1, sv, _mm512_mul_ps(x2, cv)), m);
        }
        for (int64_t i = rd; i < D; ++i) orow[i] = xr[i];   // dims past the rotary ones pass through
      }
    }
  });
#else
  TORCH_CHECK(false, "rope_into: built without AVX-512 BF16");
#endif
}

// out = silu(g) * u for gu [N, 2F] = (g | u) bfloat16 rows with unit last stride: silu(g) =
// g / (1 + e^-g) and the product in float32, rounded once (models/base.py linear_gated).
torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.scalar_type() == at::kBFloat16 && gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) % 2 == 0,
              "silu_mul: bfloat16 gu [N, 2F] expected");
  const int64_t N = gu.size(0), F = gu.size(1) / 2, gs = gu.stride(0);
  auto out = torch::empty({N, F}, gu.options());
#if TIERGEN_HAVE_KERNEL
  const uint16_t* gp = (const uint16_t*)gu.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* g = gp + r * gs;
      for (int64_t c = 0; c < F; c += 16) {
        const __mmask16 m = tail(F - c);
        const __m512 x = load_bf16(g + c, m);
        store_bf16(op + r * F + c, _mm512_mul_ps(silu512(x), load_bf16(g + F + c, m)), m);
      }
    }
  });
#else
  TORCH_CHECK(false, "silu_mul: built without AVX-512 BF16");
#endif
  return out;
}

// The greedy head over one vocabulary slice: for each row of logits [N, C] (bfloat16, unit
// last stride) its largest value and first index; best [N] float32 and arg [N] int64 take
// them (plus offset) where ``first`` or where they beat the row's best so far -- ties go to
// the lower id, as torch's argmax over the whole vocabulary. NaNs are not ordered.
void argmax_update(const torch::Tensor& logits, torch::Tensor& best, torch::Tensor& arg, int64_t offset,
                   bool first) {
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 && logits.dim() == 2 && logits.stride(1) == 1 &&
              best.scalar_type() == at::kFloat && arg.scalar_type() == at::kLong && best.is_contiguous() &&
              arg.is_contiguous() && best.numel() == logits.size(0) && arg.numel() == logits.size(0) &&
              logits.size(1) > 0 && logits.size(1) < (1LL << 31),
              "argmax_update: bfloat16 logits [N, C], float32 best [N] and int64 arg [N] expected");
  const int64_t N = logits.size(0), C = logits.size(1), ls = logits.stride(0);
#if TIERGEN_HAVE_KERNEL
  const uint16_t* lp = (const uint16_t*)logits.data_ptr();
  float* bp = best.data_ptr<float>();
  int64_t* ap = arg.data_ptr<int64_t>();
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = lp + r * ls;
      __m512 vmax = ninf;
      __m512i vidx = _mm512_setzero_si512();
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = tail(C - c);
        const __m512 v = _mm512_mask_mov_ps(ninf, m, load_bf16(row + c, m));
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);   // strict: each lane keeps its first
        vmax = _mm512_mask_mov_ps(vmax, gt, v);
        vidx = _mm512_mask_mov_epi32(vidx, gt, _mm512_add_epi32(lane, _mm512_set1_epi32((int)c)));
      }
      const float mx = _mm512_reduce_max_ps(vmax);
      const __mmask16 at_max = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(mx), _CMP_EQ_OQ);
      const int idx = at_max ? _mm512_mask_reduce_min_epi32(at_max, vidx) : 0;   // all -inf: the first id
      if (first || mx > bp[r]) {
        bp[r] = mx;
        ap[r] = offset + idx;
      }
    }
  });
#else
  TORCH_CHECK(false, "argmax_update: built without AVX-512 BF16");
#endif
}

// The kernels touch no Python object, so other Python threads run meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the kernels (AVX-512 BF16)");
  m.def("rms_norm", &rms_norm, "RMSNorm of bfloat16 rows in one pass",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_into", &rope_into, "rotary embedding of bfloat16 rows into out, in one pass",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "gated SiLU of bfloat16 rows (g | u) in one pass",
        py::call_guard<py::gil_scoped_release>());
  m.def("argmax_update", &argmax_update, "running greedy argmax over one slice of bfloat16 logits",
        py::call_guard<py::gil_scoped_release>());
}
