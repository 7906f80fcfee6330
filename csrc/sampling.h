// Sort-free temperature + top-p sampling of the next token (see sampling.cu for the algorithm).
// Torch-free like flash_decode.h; the binding is in flash_decode_binding.cpp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sampling {

enum class LogitsType { kFloat32, kBFloat16, kFloat16 };

// logits [rows, vocab] (contiguous, of `type`) -> out [rows] int64 token ids.
// temperature <= 0: greedy argmax. Otherwise x = logits / temperature, keep the top-p set of softmax(x)
// (top_p >= 1 keeps everything) and sample from it renormalized. rng_state: int64 [2] on the device,
// {seed, counter}; the same (seed, counter) gives the same tokens, so the caller advances the counter
// between steps.
cudaError_t sample(const void* logits, LogitsType type, int64_t* out, int rows, int vocab, float temperature,
                   float top_p, const int64_t* rng_state, cudaStream_t stream);

}  // namespace sampling
