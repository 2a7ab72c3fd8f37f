// The packed weight both layer-product kernels read (linear.cpp on AMX, linear_avx512.cpp on
// AVX-512 BF16): a bfloat16 [N, K] matrix as blocks [NB, KB, 16, 32], NB = 2 ceil(N / 32),
// KB = ceil(K / 32). Block (nb, kb) is one 1 KiB tile whose row r holds, for the 16 columns
// 16 nb .. 16 nb + 15, the input pair (32 kb + 2r, 32 kb + 2r + 1): AMX's right operand, and
// for each pair one 64-byte line of what vdpbf16ps multiplies a broadcast pair into. An n
// block's tiles follow each other over kb, so its pairs are one run of lines.
#pragma once

#include "common.h"

#include <optional>

namespace tiergen {

constexpr int64_t kTile = 512;   // bfloat16 words in a 16 x 32 tile

inline int64_t blocks_of(int64_t n, int64_t size) { return (n + size - 1) / size; }

inline void check_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.stride(1) == 1 && w.size(0) > 0 && w.size(1) > 0,
              "linear: a bfloat16 weight [N, K] with unit last stride expected");
}

#if TIERGEN_HAVE_KERNEL
// w [N, K] into blocks [NB, KB, 16, 32]; zeros past N or K.
inline void pack_into(const torch::Tensor& w, uint16_t* dst, int64_t NB, int64_t KB) {
  const int64_t N = w.size(0), K = w.size(1), rs = w.stride(0);
  const uint16_t* wp = (const uint16_t*)w.data_ptr();
  at::parallel_for(0, NB, 4, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      pack_right_tiles(wp + std::min(16 * nb, N) * rs, rs, std::clamp<int64_t>(N - 16 * nb, 0, 16), K, KB,
                       dst + nb * KB * kTile);
  });
}

// The inverse: one n block's tiles back into rows w[0 .. n).
inline void unpack_block(const uint16_t* src, int64_t n, int64_t K, int64_t KB, uint16_t* w, int64_t rs) {
  for (int64_t kb = 0; kb < KB; ++kb, src += kTile) {
    const __mmask32 m = first_words(K - 32 * kb);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + 32 * i);
    transpose16(r);
    for (int64_t i = 0; i < n; ++i) _mm512_mask_storeu_epi16(w + i * rs + 32 * kb, m, r[i]);
  }
}
#endif

// w [N, K] bfloat16 (unit last stride) as its blocks: the form the kernels read without packing again.
inline torch::Tensor pack(const torch::Tensor& w) {
  check_weight(w);
  auto out = torch::empty({2 * blocks_of(w.size(0), 32), blocks_of(w.size(1), 32), 16, 32}, w.options());
#if TIERGEN_HAVE_KERNEL
  pack_into(w, (uint16_t*)out.data_ptr(), out.size(0), out.size(1));
#else
  TORCH_CHECK(false, "linear: built without AVX-512 BF16");
#endif
  return out;
}

// The plain weight [n, k] that ``pack`` made ``blocks`` of.
inline torch::Tensor unpack(const torch::Tensor& blocks, int64_t n, int64_t k) {
  TORCH_CHECK(blocks.scalar_type() == at::kBFloat16 && blocks.is_contiguous() && blocks.dim() == 4 && n > 0 && k > 0 &&
              blocks.size(0) == 2 * blocks_of(n, 32) && blocks.size(1) == blocks_of(k, 32) && blocks.size(2) == 16 &&
              blocks.size(3) == 32, "linear: packed blocks of an [n, k] weight expected");
  auto w = torch::empty({n, k}, blocks.options());
#if TIERGEN_HAVE_KERNEL
  const int64_t KB = blocks.size(1);
  const uint16_t* src = (const uint16_t*)blocks.data_ptr();
  uint16_t* wp = (uint16_t*)w.data_ptr();
  at::parallel_for(0, blocks_of(n, 16), 4, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      unpack_block(src + nb * KB * kTile, std::min<int64_t>(16, n - 16 * nb), k, KB, wp + 16 * nb * k, k);
  });
#else
  TORCH_CHECK(false, "linear: built without AVX-512 BF16");
#endif
  return w;
}

// The checks both kernels make of linear(x, w, n, bias, other, gated, out_float).
inline void check_product(const torch::Tensor& x, const torch::Tensor& w, int64_t n,
                          const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& other,
                          bool gated) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0,
              "linear: bfloat16 x [M, K] with unit last stride expected");
  const int64_t M = x.size(0), K = x.size(1), KB = blocks_of(K, 32), N = n, NB = 2 * blocks_of(N, 32);
  const bool packed = w.dim() == 4;
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && N > 0 &&
              (packed ? w.is_contiguous() && w.size(0) == NB && w.size(1) == KB && w.size(2) == 16 && w.size(3) == 32
                      : w.dim() == 2 && w.stride(1) == 1 && w.size(0) == N && w.size(1) == K),
              "linear: a bfloat16 weight [n, K], or its packed blocks, matching x expected");
  TORCH_CHECK(!gated || (N % 32 == 0 && !other), "linear: a gated product needs n = 2F, F a multiple of 16, and no residual");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == N),
              "linear: a bfloat16 bias [n] expected");
  TORCH_CHECK(!other || (other->scalar_type() == at::kBFloat16 && other->is_contiguous() && other->dim() == 2 &&
                         other->size(0) == M && other->size(1) == N),
              "linear: a contiguous bfloat16 residual [M, n] expected");
}

// linear's output: [M, n] (gated: [M, n / 2]), float32 or bfloat16.
inline torch::Tensor product_out(const torch::Tensor& x, int64_t n, bool gated, bool out_float) {
  return torch::empty({x.size(0), gated ? n / 2 : n}, x.options().dtype(out_float ? at::kFloat : at::kBFloat16));
}

#if TIERGEN_HAVE_KERNEL
// The blocks of w [n, k]: w itself where it is packed, else packed now (a streamed weight, each call).
inline torch::Tensor weight_blocks(const torch::Tensor& w, int64_t n, int64_t k) {
  if (w.dim() == 4) return w;
  const int64_t NB = 2 * blocks_of(n, 32), KB = blocks_of(k, 32);
  auto blocks = torch::empty({NB, KB, 16, 32}, w.options());
  pack_into(w, (uint16_t*)blocks.data_ptr(), NB, KB);
  return blocks;
}
#endif

}  // namespace tiergen
