// Every transformer layer of a batch-1 decode step in one persistent kernel (sm_90+; see decode_layers.cu for
// how it works and why). It computes what the GEMV path (gemv.h, flash_decode.h) computes layer by layer,
// with the same roundings: from the step's token embedding to the residual stream after the last layer,
// returned as (h, delta) for the lm_head GEMV's residual-add + RMSNorm prologue; lm_head and sampling stay
// separate kernels. Torch-free like flash_decode.h; the binding is in flash_decode_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_decode.h"

namespace decode_layers {

using flash_decode::DType;

// One row of the layer table (int64 [n_layers, kLayerPointers] on the device): the layer's tensors' device
// addresses. Weights are [out, in] row-major: wqkv [(q_heads + 2 kv_heads) head_dim, dim], wo [dim, q_heads
// head_dim], w_gate_up [2 hidden, dim] (gate rows, then up rows), w_down [dim, hidden]; norms [dim]; the
// caches [max_batch, max_seq, kv_heads, head_dim] contiguous (batch row 0 is used).
enum LayerPointer { kWqkv, kWo, kWGateUp, kWDown, kAttentionNorm, kFfnNorm, kKCache, kVCache, kLayerPointers };

constexpr int kMaxGroup = 4;    // query heads per KV head (1 to 4)
constexpr int kMaxSplits = 16;  // attention splits per KV head

struct Params {
    const int64_t* layers;       // the layer table
    const void* embedding;       // [vocab, dim]
    int64_t vocab;
    const int64_t* tokens;       // [1] the step's token
    const int64_t* positions;    // [1] its cache position
    const int* cache_seqlens;    // [1] positions + 1
    const void* cos;             // [max_seq, head_dim]
    const void* sin;
    int n_layers, dim, hidden, q_heads, kv_heads, head_dim, max_seq;
    float eps, scale_log2;       // RMSNorm epsilon; softmax scale * log2(e)
    // Workspace (device buffers of the model's dtype unless float):
    void* q;                     // [q_heads * head_dim]
    void* attention;             // [q_heads * head_dim]
    void* act;                   // [hidden]
    void* delta;                 // [dim] out: the last layer's down_proj output
    void* stream;                // [dim] out: the residual stream before it (the stream after the layers is
                                 // stream + delta, rounded, as the lm_head prologue computes it)
    float* partial_out;          // [q_heads, kMaxSplits, head_dim]
    float* partial_lse;          // [q_heads, kMaxSplits] (log2 domain)
    unsigned* counters;          // [kCounterWords], zero before the first launch
    // Optional phase trace (null: off): per block, kTraceEventsPerLayer %globaltimer stamps (ns) per layer, then
    // kTraceTotals clock totals (cycles): the producer's waits (for a free stage, or pacing), the first consumer
    // warp's waits for a stage's data, thread 0's grid-barrier waits. See DecodeLayers.set_trace in the binding.
    unsigned long long* trace;
};

// Trace events of a layer, in order: layer start (after its barrier), qkv done, barrier, attention done, barrier,
// o done, barrier, gate_up done, barrier, down done.
constexpr int kTraceEventsPerLayer = 10;
constexpr int kTraceTotals = 3;
#ifdef __CUDACC__
__host__ __device__
#endif
inline int trace_slots_per_block(int n_layers) { return n_layers * kTraceEventsPerLayer + kTraceTotals; }

// the grid barrier's count and the exit ticket, then one split ticket per KV head
constexpr int kCounterWords(int kv_heads) { return 2 + kv_heads; }

// nullptr when the kernel serves these dimensions on `device`, else why not (for the caller's fallback and
// error messages). *error receives a failed device query.
const char* unsupported_reason(int dim, int hidden, int q_heads, int kv_heads, int head_dim, int device,
                               cudaError_t* error);

// Launches the kernel (one block per SM) on `stream`.
cudaError_t launch(const Params& params, DType dtype, cudaStream_t stream);

}  // namespace decode_layers
