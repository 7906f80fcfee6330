// Sort-free temperature + top-p sampling of the next token (see sampling.cu for the algorithm).
// Torch-free like flash_decode.h; the binding is in flash_decode_binding.cpp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sampling {

enum class LogitsType { kFloat32, kBFloat16, kFloat16 };

// The decode loop's state, advanced in place by the sampler when positions is given, so that a CUDA-graph decode
// step needs no small kernels around it: the token drawn for row r goes to cache position p = positions[r] + 1,
// and the sampler sets positions[r] = p, cache_seqlens[r] = p + 1 (the next step's attention lengths) and
// history[r * history_len + p] = token (when p < history_len). Sampled draws are then keyed by (seed, p) instead
// of the step counter, which therefore needs no update between steps.
struct DecodeState {
    int64_t* positions = nullptr;      // [rows]
    int32_t* cache_seqlens = nullptr;  // [rows] or null
    int64_t* history = nullptr;        // [rows, history_len] or null
    int64_t history_len = 0;
};

// logits [rows, vocab] (contiguous, of `type`) -> out [rows] int64 token ids.
// temperature <= 0: greedy argmax. Otherwise x = logits / temperature, keep the top-p set of softmax(x)
// (top_p >= 1 keeps everything) and sample from it renormalized. rng_state: int64 [2] on the device,
// {seed, counter}; the same (seed, counter) gives the same tokens, so the caller advances the counter
// between steps.
// ctas_per_row: 1 = one thread block per row; max_ctas_per_row(vocab) (> 1 on sm_90+ for vocabularies up to
// 131072) = a cluster of blocks per row, faster for a few rows; 0 = default_ctas_per_row. Any other value:
// cudaErrorInvalidValue. The two kernels walk the row in different orders, so they draw different (equally
// distributed) tokens.
cudaError_t sample(const void* logits, LogitsType type, int64_t* out, int rows, int vocab, float temperature,
                   float top_p, const int64_t* rng_state, int ctas_per_row, cudaStream_t stream,
                   const DecodeState& state = DecodeState{});

// Rows up to which the cluster kernel is the default (where one block per row leaves most SMs idle).
constexpr int kClusterMaxRows = 16;
int max_ctas_per_row(int vocab);
int default_ctas_per_row(int rows, int vocab);

}  // namespace sampling
