// Small-batch linear layers of the decode step: y = x @ W^T for a handful of rows (batch 1..16), where a
// GEMM library's tiles are mostly empty and the layer is a pure weight stream. Optional fusions of the
// neighbours of each Llama projection (see gemv.cu):
//   prologue: x <- rmsnorm(x + residual) * norm_weight (the residual add and RMSNorm before qkv, gate_up
//             and lm_head), the new residual stream written once to residual_out;
//   epilogue: W = [gate; up] (2 * n_out rows), y = silu(x @ gate^T) * (x @ up^T); or, for the qkv projection,
//             RoPE on q and k and the write of k and v into the KV cache (what fused_ops::rope_kv_write does).
// Torch-free like flash_decode.h; the binding is in flash_decode_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_decode.h"

namespace gemv {

using flash_decode::DType;

// Rows (batch sizes) served: up to kMaxNormRows by the CUDA-core kernel, which also has the RMSNorm
// prologue; up to kMaxRows by the tensor-core kernel (no prologue: run add_rmsnorm first), which needs k to
// be a multiple of 32. Larger batches belong to a GEMM.
constexpr int kMaxNormRows = 4;
constexpr int kMaxRows = 16;

struct Params {
    const void* x;             // [rows, k]; or with x_rows a table [x_table_rows, k] (the token embeddings)
    const int64_t* x_rows;     // [rows] or null: row r of the input is row x_rows[r] of x (RMSNorm prologue only;
                               // residual_out then receives the gathered rows when there is no residual). Such a
                               // launch starts a decode step: it streams its weights early, but lets the next
                               // kernel start only after its own wait, so no later kernel of the step starts
                               // before the previous step's sampler has written the tokens and lengths (the
                               // attention reads its length before its wait: programmatic_launch.cuh)
    int64_t x_table_rows;
    const void* residual;      // [rows, k] or null: the stream is x + residual (prologue only)
    void* residual_out;        // [rows, k] or null: receives x + residual, or x (prologue only; must not alias inputs)
    const void* norm_weight;   // [k] or null: no prologue, x is used as it is
    float eps;
    const void* weight;        // [n_out, k], or [2 * n_out, k] = [gate; up] with silu_mul
    void* out;                 // [rows, n_out]
    int rows, k, n_out;
    bool silu_mul;
    int split_k;               // warps per output, each taking a contiguous part of k (set by launch)
    // RoPE + KV-cache write epilogue (rope_kv; 1 to 4 rows, with the RMSNorm prologue), weight = wqkv with
    // n_out = (q_heads + 2 kv_heads) * head_dim: rotates q and k like fused_ops::rope_kv_write, writes q to
    // out [rows, q_heads, head_dim] and k, v to row positions[r] of k_cache, v_cache
    // [max_batch, max_seq, kv_heads, head_dim] (contiguous); cos/sin [max_seq, head_dim].
    bool rope_kv;
    const void* cos;
    const void* sin;
    const int64_t* positions;
    void* k_cache;
    void* v_cache;
    int q_heads, kv_heads, head_dim, max_seq;
};

// Shared memory the launch needs (x staged once per block by the CUDA-core kernel, and with the RMSNorm prologue
// its weight), for checking against the device's limit.
size_t shared_bytes(int rows, int k, bool norm);

cudaError_t launch(const Params& params, DType dtype, cudaStream_t stream);

}  // namespace gemv
