// The element-wise steps of a Llama layer that the kernels fuse into their prologues and epilogues, rounded where
// the PyTorch code they replace rounds (llama3.py): one formula each, so the kernels stay equal to each other and
// to PyTorch.
#pragma once

#include "element_convert.cuh"

namespace rounded {

using element::from_float;
using element::round_to;
using element::to_float;

// RMSNorm's 1 / sqrt(mean(h^2) + eps) from the sum of squares of n elements (mean = sum * (1/n), as PyTorch).
__device__ __forceinline__ float inverse_rms(float sum_sq, int n, float eps) {
    return rsqrtf(sum_sq * __frcp_rn((float)n) + eps);
}

// RMSNorm's output element: weight * (h * inv_rms rounded to T), rounded to T.
template <typename T>
__device__ __forceinline__ T rms_normalize(float h, float weight, float inv_rms) {
    return from_float<T>(weight * round_to<T>(h * inv_rms));
}

// silu(gate) * up, with silu(gate) rounded to T first like F.silu's output (gate and up: T values).
template <typename T>
__device__ __forceinline__ T silu_mul(float gate, float up) {
    return from_float<T>(round_to<T>(gate / (1.f + expf(-gate))) * up);
}

// Rotary position embedding of one rotating pair: elements d and d + head_dim/2 of a head (Hugging Face's
// rotate_half convention), x * cos + rotate_half(x) * sin with each product and the sum rounded to T as the
// PyTorch ops round them (llama3.apply_rope).
// c1, s1: cos and sin at d; c2, s2: at d + head_dim/2.
template <typename T>
__device__ __forceinline__ void rope_pair(float x1, float x2, float c1, float c2, float s1, float s2, float& out1,
                                          float& out2) {
    out1 = round_to<T>(x1 * c1) + round_to<T>(-x2 * s1);
    out2 = round_to<T>(x2 * c2) + round_to<T>(x1 * s2);
}

template <typename T>
__device__ __forceinline__ void rope_pair(float x1, float x2, const T* cos_row, const T* sin_row, int d, int half,
                                          float& out1, float& out2) {
    rope_pair<T>(x1, x2, to_float(cos_row[d]), to_float(cos_row[d + half]), to_float(sin_row[d]),
                 to_float(sin_row[d + half]), out1, out2);
}

}  // namespace rounded
