// The bandwidth bound of the decode-attention benchmarks (benchmark_kernel.py's kv_read): a kernel that reads
// exactly the K and V bytes an ideal decode kernel must read, and computes nothing but a checksum of them. Timed
// the same way as the attention kernels, it shows what the memory system and the timing method allow at each shape
// (launch, ramp-up and tail included), where the copy bandwidth alone hides the fixed costs of a short kernel.
//
// Torch-free like flash_decode.h; the binding is in flash_decode_binding.cpp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace kv_read {

struct Params {
    const void* k;            // [batch, ...]: the first segment_bytes of each sequence are its valid rows
    const void* v;
    int64_t k_batch_bytes;    // the distance between sequences, in bytes
    int64_t v_batch_bytes;
    int64_t segment_bytes;    // valid bytes of one sequence's K (and of its V): rows x row bytes, a multiple of 16
    int batch;
    uint32_t* block_xor;      // [2 * batch * blocks_per_segment]: the XOR of the 32-bit words each block read
};

// Blocks per (sequence, cache) segment: one per 32 KB step of a short segment (each thread's loads all in flight at
// once), about four blocks an SM over the whole grid for long ones.
int blocks_per_segment(int batch, int64_t segment_bytes, int num_sms);

// Launches the read (block_xor must hold 2 * batch * blocks_per_segment words); returns the launch error.
cudaError_t launch(const Params& params, int blocks_per_segment, cudaStream_t stream);

}  // namespace kv_read
