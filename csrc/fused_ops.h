// Small fused kernels for the decode step: each replaces a chain of 4 to 10 tiny PyTorch kernels whose
// launch gaps, not their bytes, dominate a batch-1 decode step inside a CUDA graph. The prefill uses them
// too, for their bytes: PyTorch's RoPE (mul, neg, cat, mul, add) plus the cache copy took 1.2 of the 9.3 ms of
// a 2048-token prefill of Llama-3.2-1B on an H100. Each one reproduces
// the rounding points of the PyTorch code it replaces (llama3.py: RMSNorm.forward, apply_rope plus the
// cache write, F.silu(gate) * up), so results match it to the last bit except where fp32 accumulation order
// or exp/rsqrt approximations differ (at most an ulp, rarely).
//
// Torch-free like flash_decode.h; the binding is in flash_decode_binding.cpp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "flash_decode.h"

namespace fused_ops {

using flash_decode::DType;

// h = x + residual (rounded to the model dtype; skipped when residual is null, then h = x),
// out = weight * round(h * rsqrt(mean(h^2) + eps)). x, residual, h_out, out: [rows, dim] contiguous.
// h_out may be null (not wanted) and may alias residual.
cudaError_t add_rmsnorm(const void* x, const void* residual, void* h_out, const void* weight, void* out,
                        int rows, int dim, float eps, DType dtype, cudaStream_t stream);

// RoPE and KV-cache write for `tokens` consecutive tokens of each of `batch` sequences (decode: 1; prefill:
// the padded prompt length). qkv [batch * tokens, (q_heads + 2 * kv_heads) * head_dim] is the fused
// projection output, token i of sequence b in row b * tokens + i; cos/sin [max_seq, head_dim] the model's
// tables; positions [batch] int64, the position of each sequence's first token. Writes the rotated q to
// q_out [batch * tokens, q_heads, head_dim] (contiguous) and the rotated k and the v of token i of sequence
// b to row positions[b] + i of k_cache/v_cache [max_batch, max_seq, kv_heads, head_dim] (contiguous).
cudaError_t rope_kv_write(const void* qkv, const void* cos, const void* sin, const int64_t* positions,
                          void* q_out, void* k_cache, void* v_cache, int batch, int tokens, int q_heads,
                          int kv_heads, int head_dim, int max_seq, DType dtype, cudaStream_t stream);

// out = silu(gate) * up for gate_up [rows, 2 * width] = [gate | up]; out [rows, width].
cudaError_t silu_mul(const void* gate_up, void* out, int rows, int width, DType dtype, cudaStream_t stream);

}  // namespace fused_ops
