// Rotary position embedding of one rotating pair: elements d and d + head_dim/2 of a head (Hugging Face's
// rotate_half convention), x * cos + rotate_half(x) * sin with each product and the sum rounded to T as the
// PyTorch ops round them (llama3.apply_rope). Shared by every kernel that applies RoPE.
#pragma once

#include "element_convert.cuh"

namespace rope {

template <typename T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, const T* cos_row, const T* sin_row, int d, int half,
                                            float& out1, float& out2) {
    using element::round_to;
    using element::to_float;
    const float c1 = to_float(cos_row[d]), c2 = to_float(cos_row[d + half]);
    const float s1 = to_float(sin_row[d]), s2 = to_float(sin_row[d + half]);
    out1 = round_to<T>(x1 * c1) + round_to<T>(-x2 * s1);
    out2 = round_to<T>(x2 * c2) + round_to<T>(x1 * s2);
}

}  // namespace rope
