// Flash-decode (split-KV) attention for one new query token per sequence.
//
// Plain CUDA C++ interface: no torch headers, so `nvcc -c csrc/flash_decode.cu` builds on its own
// (CI does exactly that). The torch binding lives in flash_decode_binding.cpp.
//
// Layouts (element strides, the last dimension of every tensor is contiguous):
//   q        [batch, q_heads, head_dim]
//   k, v     [batch, seq, kv_heads, head_dim]   (the model's static KV cache, FlashAttention's kvcache
//                                              layout; any batch/seq/head strides, e.g. a batch slice)
//   out      [batch, q_heads, head_dim]
//   lse      [batch, q_heads] float32, natural log of sum_j exp(scale * q.k_j) (optional)
//   seqlens  [batch] int32 on the device: valid cache rows of each sequence (ragged batches)
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace flash_decode {

enum class DType { kBFloat16, kFloat16 };

// Query heads that share one KV head are processed by the same thread block (the tensor-core tile's
// rows), at most this many at a time; a larger group (GQA ratio 16, ...) is cut into several head groups.
constexpr int kHeadsPerBlock = 8;
// Upper bound on splits of one sequence: bounds the combine's work and its shared memory.
constexpr int kMaxSplits = 128;

// (The field order matters for speed, not for meaning: a kernel reads its parameters through the constant cache, and
// after the benchmarks' L2 flush the first read of each cache line is a miss that stalls the warps. What a block reads
// before its first cache loads therefore comes first, in three 64-byte lines where it took five: an H200, 2026-11-29,
// level to 0.23 us faster at the short launches than the old order, docs/perf-notes.md.)
struct Params {
    const void* k;
    const void* v;
    const int* seqlens;
    const void* q;
    int64_t k_batch_stride, k_seq_stride, k_head_stride;  // (k_seq_stride and v_seq_stride: below 4 GB in bytes)
    int64_t v_batch_stride, v_seq_stride, v_head_stride;
    // Set by launch(), not by the caller: the FastDivisor (below) of head_groups and of the units' heads a sequence
    // (kv_heads; the KV-head pair kernel's: kv_heads / 2), the shifts in bits 0-7 and 8-15 of divisor_shifts, for the
    // block's decode of its unit.
    uint32_t head_groups_magic, unit_heads_magic, divisor_shifts;
    int kv_heads, seq_capacity;
    int group_size;          // q_heads / kv_heads
    int head_groups;         // head_groups_for(group_size)
    int num_splits;          // blocks along the sequence, >= 1
    int64_t q_batch_stride, q_head_stride;
    float scale_log2;        // softmax scale * log2(e): the kernel works with exp2
    // No kernel that may still run when this one starts (those launched since the last plain launch:
    // programmatic_launch.cuh) writes a length or a cache row except each sequence's newest (seqlens - 1),
    // as in a decode step: the kernel may then read the lengths and the older rows before they finish.
    bool early_cache_reads;
    int batch, q_heads, head_dim;

    void* out;
    float* lse;              // optional, nullptr when not requested
    int64_t out_batch_stride, out_head_stride;
    // Split-KV workspace, used only when num_splits > 1 and the merge is not a cluster's (uses_cluster_merge).
    float* partial_out;      // [batch, q_heads, num_splits, head_dim]
    float* partial_lse;      // [batch, q_heads, num_splits], log2 domain
    int* split_counters;     // [batch * kv_heads * head_groups], zero between launches (self-resetting)
};

// Unsigned division by a divisor fixed for a launch, as a multiply-high, an add and a shift (Granlund and Montgomery's
// round-up method), where the hardware's integer division is a dependent chain of about 20 instructions: for 1 <= d
// and n < 2^31, n / d == (umulhi(n, magic) + n) >> shift.
struct FastDivisor {
    uint32_t magic, shift;
};
inline FastDivisor fast_divisor(uint32_t d) {
    uint32_t shift = 0;
    while (shift < 31 && (1u << shift) < d) ++shift;
    const uint64_t magic = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
    return {(uint32_t)magic, shift};
}

// The number of splits the launcher uses when the caller passes 0 (about two blocks per SM, no split
// shorter than one tile of rows; early_cache_reads: the launch's Params::early_cache_reads). *error
// receives the result of the device queries it needs (then 1 is returned).
int default_num_splits(int batch, int q_heads, int kv_heads, int head_dim, int max_seqlen, bool early_cache_reads,
                       int device, cudaError_t* error);

// Thread blocks per (sequence, KV head) along the query heads of its group.
inline int head_groups_for(int group_size) { return (group_size + kHeadsPerBlock - 1) / kHeadsPerBlock; }

// Launches the kernel on `stream`; returns the launch error (cudaSuccess when it was queued). seq_capacity, kv_heads and
// head_groups must be at least 1 (cudaErrorInvalidValue otherwise; a cache without rows holds only empty sequences,
// whose output is zeros), and the row strides below 4 GB. launch() fills in the Params fields it sets (the divisors).
cudaError_t launch(const Params& params, DType dtype, cudaStream_t stream);

// Split results are merged inside a thread-block cluster (distributed shared memory, sm_90+) when there are
// 2 to kMaxClusterSplits splits and this process-wide switch is on (the default), else through the float32
// workspace and an atomic ticket (Params::partial_out, split_counters). Measured on an H100 (2026-11-26,
// batch 1, L2 flushed, the first cluster merge, which met at two cluster barriers): 4 and 8 splits 0.2-0.8 us
// faster in a cluster (h64 S=512 10.3 -> 9.5 us); 16 splits (a non-portable cluster size) 0.5-0.6 us slower
// than the global merge, so clusters stop at the portable 8.
constexpr int kMaxClusterSplits = 8;
// Decode steps (early_cache_reads) also use non-portable clusters of up to 12 blocks, whose splits read their
// tiles before the wait (default_num_splits). Measured on an H100 (2026-11-27, 11:02 UTC, batch-1 decode steps of
// Llama-3.2-1B with the one-way merge, after 2,176 / 3,072 / 4,096 positions): 12 splits in a cluster 985 / 997 /
// 1,021 us, 16 in a cluster 1,011 / 1,013 / 1,028, 16 through the workspace 1,031 / 1,039 / 1,047.
constexpr int kMaxDecodeClusterSplits = 12;
bool& cluster_merge_enabled();
bool uses_cluster_merge(int num_splits, bool early_cache_reads = false);

// Narrow tiles (flash_decode_kernel.cuh): plain launches of the register pipeline in which every split has at most one
// tile of kNarrowRowsPerBlockTile rows (8 a warp, where the standard tile gives a warp 32 rows at head 64 and 16 at head
// 128), in one block or merged in a cluster, in blocks of four warps, while this process-wide switch is on (the default).
// default_num_splits gives a plain launch of one wave a split a narrow tile where the standard tile would give it one
// block (at most 32 rows) or one split of two tiles in two warp groups (head 64: 129-256 rows, head 128: 65-128).
constexpr int kNarrowRowsPerBlockTile = 32;
bool& narrow_tiles_enabled();
// units: batch x kv_heads x head_groups; on the current device
bool uses_narrow_tiles(int units, int num_splits, int head_dim, int seq_capacity, bool early_cache_reads = false);

// The short-launch kernel (flash_decode_short.cuh): the narrow tiles' launches at head 128 run in blocks of eight warps,
// a warp pair per 8 rows (each half of head_dim), with every loop unrolled over compile-time bounds, while this
// process-wide switch is on (the default); off, the narrow one-tile instance of flash_decode_kernel.cuh serves them.
// default_num_splits gives head 128 narrow splits wherever they fit one cluster and half an SM count of blocks.
bool& short_kernel_enabled();
// units: batch x kv_heads x head_groups; on the current device
bool uses_short_kernel(int units, int num_splits, int head_dim, int seq_capacity, bool early_cache_reads = false);

// The bulk variant (flash_decode_kernel.cuh) streams the cache through shared memory with the tensor memory
// accelerator; it serves plain launches (not early_cache_reads) on sm_90+, merging several splits through the
// workspace (it takes precedence over the cluster merge), where the driver accepts the caches as tensor maps (else
// the register pipeline serves the launch). Process-wide mode: kAuto (the default) takes it where it was measured
// faster, for launches of at least kBulkMinWorkTiles block tiles of K and V over all blocks (32 MB),
// default_num_splits then giving one block per SM; kAlways for every plain launch (tests, comparisons); kOff never.
// Measured on an H100 (2026-11-27, 18:10-18:18 UTC, benchmark_kernel.py's method with L2 flushed by a read, 32 query /
// 8 KV heads), bulk against registers: batch 1 head 64 S = 16384 / 32768 / 65536 20.6 / 30.5 / 52.4 us against
// 22.2 / 34.2 / 54.4 (the register path's automatic splits; its best count 32.0 at 32768, 54.6 at 65536), head 128
// S = 8192 / 16384 / 32768 20.8-21.5 / 30.9 / 52.7 against 21.5-21.8 / 33.2 / 53.7, batch 16 head 64 S = 2048 (one
// split) 28.3-29.3 against 30.8-31.3; head 64 S = 8192 (512 tiles) 15.1-15.8 against 15.4-15.8. Three or four
// stages, or two blocks an SM with two stages each, were no faster at batch 1 and slower at batch 16 and 64. (Under
// the zeroing flush the thresholds measured were 8192 tiles, or 4096 in one split: that flush's write-backs cost the
// bulk variant more at those sizes, batch 1 head 128 S = 32768 59.6 -> 61.1 us, batch 16 head 64 S = 2048 36.3 ->
// 38.1.)
enum class BulkPipeline { kOff, kAuto, kAlways };
constexpr int kBulkMinWorkTiles = 1024;
BulkPipeline& bulk_pipeline_mode();
// units: batch x kv_heads x head_groups (the blocks of one split)
bool uses_bulk_pipeline(int units, int head_dim, int seq_capacity, bool early_cache_reads = false);

// Plain launches (not a decode step's) in blocks of two groups of four warps (flash_decode_kernel.cuh, "Warp groups";
// the bulk variant's: launch_bulk_groups in flash_decode.cu). Process-wide mode: kAuto (the default) where the grid
// runs at once with one block an SM (blocks of eight warps need an SM's registers; a cluster merge's clusters must fit
// the GPCs too) and, in the register pipeline, a split has at least two tiles (else the second group is idle); kAlways
// for every such launch (tests, comparisons); kOff never. The split counts are default_num_splits's either way: a block
// of two groups with half the splits was slower at head 64 S = 512 / 1024 (8.1 / 8.4 us against 7.4 / 7.8 with four
// warps). Measured on an H100 (2026-11-27, 21:00 UTC, benchmark_kernel.py's method, the best of four rounds), four
// warps -> two groups: batch 1 head 128 S = 2048 12.7 -> 10.8 us, S = 4096 15.2 -> 14.5; head 64 S = 4096 12.2 -> 10.4,
// S = 8192 15.4 -> 14.0; batch 8 head 64 S = 1024 14.1 -> 13.0; S = 256 to 1024 level within the rounds' spread (0.5-1
// us); on an H200 (2026-11-29) four warps were 0.2-0.4 us faster wherever a split has one tile (flash_decode.cu,
// warp_groups_for).
enum class WarpGroups { kOff, kAuto, kAlways };
WarpGroups& warp_groups_mode();
// units: batch x kv_heads x head_groups (the blocks of one split); on the current device, for the register pipeline or
// the bulk variant, whichever serves the launch (uses_bulk_pipeline)
bool uses_warp_groups(int units, int num_splits, int head_dim, int seq_capacity, bool early_cache_reads = false);

// The bulk variant at head 64 in blocks of a KV-head pair (flash_decode_kernel.cuh, "KV-head pairs"): each tensor copy
// brings two adjacent heads' rows, 256 contiguous bytes of a cache row instead of 128 at a 1 KB stride. Process-wide
// mode: kAuto (the default) for launches of one split whose pair blocks fill their waves of two an SM to 15/16 (batch
// 62-66 or 124-132 x 8 KV heads on an H100); kAlways for every bulk launch that can (tests, comparisons); kOff never.
// Either way only for an even number of KV heads and at most kHeadsPerBlock query heads a KV head. Measured on an H100
// (2026-11-27, 22:55 UTC, batch 64 head 64 S = 2048 bf16, the caches at seven offsets in larger buffers): one head a
// block 94.2-96.1 us, pairs 93.7-94.3, cuDNN 94.5-95.2; fp16 (2026-11-28, 01:08 UTC, two rounds, best): 94.4-96.5,
// 93.3-93.8 and 94.5-95.1.
enum class KvHeadPairs { kOff, kAuto, kAlways };
KvHeadPairs& kv_head_pairs_mode();
bool uses_kv_head_pairs(int batch, int q_heads, int kv_heads, int head_dim, int seq_capacity, int num_splits,
                        DType dtype);

}  // namespace flash_decode
