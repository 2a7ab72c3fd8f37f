// What both decode-attention kernels share: the checks of their arguments, and the
// choice of an instantiation by the number of query heads per K/V head.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace tiergen {

// q [B,H,1,D], k/v [B,Hkv,S,D] of ``dtype`` with unit last stride, mask [B,1,1,S] bool.
inline void check_decode_args(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& mask, at::ScalarType dtype) {
  TORCH_CHECK(q.scalar_type() == dtype && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "decode_attention: q, k, v of the kernel's dtype expected");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "decode_attention: a bool mask expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4 && q.size(2) == 1,
              "decode_attention: q [B,H,1,D], k/v [B,Hkv,S,D], mask [B,1,1,S] expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: unit last stride expected");
  const int64_t B = q.size(0), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(3) == D && v.size(1) == Hkv &&
              v.size(2) == S && mask.size(0) == B && mask.size(3) == S && S > 0,
              "decode_attention: mismatched shapes");
}

// Query heads per K/V head, or 0 for a layout no kernel handles.
inline int64_t group_size(int64_t num_heads, int64_t num_kv_heads) {
  return num_kv_heads > 0 && num_heads % num_kv_heads == 0 ? num_heads / num_kv_heads : 0;
}

// Item<G>::run for G = 1..8 query heads per K/V head (nullptr for more): the group size is a
// template argument so each head's sums stay in registers.
template <template <int> class Item>
auto by_group(int64_t G) -> decltype(&Item<1>::run) {
  switch (G) {
    case 1: return &Item<1>::run;
    case 2: return &Item<2>::run;
    case 3: return &Item<3>::run;
    case 4: return &Item<4>::run;
    case 5: return &Item<5>::run;
    case 6: return &Item<6>::run;
    case 7: return &Item<7>::run;
    case 8: return &Item<8>::run;
    default: return nullptr;
  }
}

}  // namespace tiergen
