// The K/V read bound (kv_read.h). Algorithm: grid (blocks_per_segment, 2 * batch); block (x, y) streams segment y
// (sequence y / 2's K or V) in steps of kBlockStep bytes, taking every gridDim.x-th step; in a step each thread issues
// kLoadsInFlight independent 16-byte loads (coalesced: load i of the block covers 4 KB after load i - 1's) before it
// uses any of them, so every SM keeps 128 KB in flight. The checksum (XOR of all 32-bit words) keeps the loads alive
// and makes the kernel testable: a plain XOR over the same bytes in PyTorch is its reference (tests/test_kernel.py).
//
// The loads all go out before the first XOR only where a thread may hold their 32 registers: at eight blocks an SM
// (32 registers a thread) ptxas interleaved them with the XORs, three or four in flight (SASS, nvcc 13.0, sm_90), as
// this kernel did until the forty-third session. Four blocks an SM with all eight in flight, against the old loop and
// grid in a probe timed in the same rounds (an H200, 2026-11-30, nine alternating rounds, us): batch 1 head 64 S =
// 32768 / 65536 / 131072 19.26 / 34.30 / 63.30 -> 18.82 / 33.90 / 62.66, head 128 S = 65536 64.24 -> 63.55
// (docs/perf-notes.md, forty-third session).
#include <algorithm>

#include "element_convert.cuh"
#include "kv_read.h"

namespace kv_read {
namespace {

constexpr int kThreads = 256;
constexpr int kLoadsInFlight = 8;
constexpr int64_t kBlockStep = (int64_t)kThreads * kLoadsInFlight * 16;  // 32 KB
constexpr int kBlocksPerSm = 4;  // (up to 64 registers a thread: a step's loads all issued before their use)

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) kv_read_kernel(const Params p) {
    const int segment = blockIdx.y, b = segment / 2;
    const char* base = segment % 2 == 0 ? static_cast<const char*>(p.k) + b * p.k_batch_bytes
                                        : static_cast<const char*>(p.v) + b * p.v_batch_bytes;
    uint32_t acc = 0;
    for (int64_t step = (int64_t)blockIdx.x * kBlockStep; step < p.segment_bytes; step += gridDim.x * kBlockStep) {
        uint4 piece[kLoadsInFlight];
#pragma unroll
        for (int i = 0; i < kLoadsInFlight; ++i) {
            const int64_t offset = step + ((int64_t)i * kThreads + threadIdx.x) * 16;
            piece[i] = offset < p.segment_bytes ? element::load_stream_16B(base + offset) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int i = 0; i < kLoadsInFlight; ++i) acc ^= piece[i].x ^ piece[i].y ^ piece[i].z ^ piece[i].w;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
    __shared__ uint32_t warp_xor[kThreads / 32];
    if (threadIdx.x % 32 == 0) warp_xor[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t block = 0;
#pragma unroll
        for (int w = 0; w < kThreads / 32; ++w) block ^= warp_xor[w];
        p.block_xor[(int64_t)blockIdx.y * gridDim.x + blockIdx.x] = block;
    }
}

}  // namespace

int blocks_per_segment(int batch, int64_t segment_bytes, int num_sms) {
    const int64_t steps = std::max<int64_t>(1, (segment_bytes + kBlockStep - 1) / kBlockStep);
    const int64_t share = std::max<int64_t>(1, (int64_t)kBlocksPerSm * num_sms / (2 * (int64_t)std::max(batch, 1)));
    return (int)std::min(steps, share);
}

cudaError_t launch(const Params& params, int blocks_per_segment, cudaStream_t stream) {
    if (params.batch < 1 || blocks_per_segment < 1 || params.segment_bytes % 16 != 0 || 2 * params.batch > 65535)
        return cudaErrorInvalidValue;
    kv_read_kernel<<<dim3(blocks_per_segment, 2 * params.batch), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
}

}  // namespace kv_read
