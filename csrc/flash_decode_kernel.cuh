// The flash-decode kernel: one thread block per (split of the sequence, sequence, KV head, group of up to
// 8 query heads sharing that KV head).
//
// Algorithm (reference: llama3.decode_attention_reference, which computes the same thing in PyTorch):
//   1. The block's tiles of the KV cache (split s of n: tiles s, s + n, s + 2n, ...) are streamed once from
//      device memory; each warp takes 16 x kSteps consecutive rows of a tile. Every load is 16 contiguous
//      bytes of one row.
//   2. Both products run on tensor cores (mma.m16n8k16, tensor_core.cuh) with the block's query heads as
//      the 16 M rows (at most 8 used, the rest zero), so a KV byte is read once per step for the whole GQA
//      group: S = Q K^T takes 8 cache rows per mma, O += P V takes 16. The loads are laid out so that the
//      registers they fill are the mma fragments, with no shared memory in between:
//        - S: lane (g, t) loads cache row g of an 8-row group at elements 8t..8t+7 of every 32-element
//          chunk; head_dim is summed over, so this permutation of it, applied to q as well, is harmless.
//        - P V: lane (g, t) loads four rows v_row(t, 0..3) of the 16 at elements 8g..8g+7 of every 64-element
//          chunk and pairs equal elements of two rows with byte permutes (B wants two rows in one register).
//          The bulk variant with one head a stage (below) reads V from shared memory with ldmatrix.trans instead,
//          which hands each lane its B fragments directly (n-tile n is then elements 8n..8n+7).
//        - The 8-row groups of S are chosen so that the scores lane (g, t) gets back from S (C fragment) are
//          head g's for exactly the rows whose V it holds: they are already P's A fragment for P V (as in
//          FlashAttention-2). Which 16 rows a step's lanes take is otherwise free (row_in_step below); the
//          order used keeps the bulk variant's shared-memory reads free of bank conflicts.
//   3. Online softmax in the log2 domain on the float32 scores (times scale * log2(e)): each warp keeps a
//      running max m and sum l per head, and its O accumulator, rescaled once per tile; P goes into the
//      mma in the cache's 16-bit type (bf16: as a rounded part plus its rounding error, the latter in the mma's
//      unused rows 8..15). The warps are merged with exp2(m_i - m) weights through shared memory at the end.
//   4. With one split, the block writes the normalized output. Otherwise the splits are merged with
//      log-sum-exp weights, with no second kernel launch: with at most 8 splits (12 in a decode step,
//      flash_decode.h) on sm_90+ the blocks of a (sequence, KV head) form a thread-block cluster, and each
//      pushes its partial result into the first block's shared memory with asynchronous stores that count
//      their bytes on that block's mbarrier, then leaves; the first block waits for the bytes and merges.
//      Else each block writes its partial output and log-sum-exp to a float32 workspace, and the last block
//      to finish (an acquire-release atomic ticket) merges all splits, their loads in one round trip and their
//      weights in two passes a chunk of 16, and resets the ticket counter.
//   The active splits are counted on the device from the actual length, so a CUDA graph captured once
//   serves every step: short sequences use fewer splits, and splits past the end return at once.
//
// Latency hiding: the next tile's K and V loads are issued before the current tile is used (register
// double buffering). The bulk variant (kBulk: large plain launches on sm_90+, flash_decode.h) instead streams
// the block's tiles into a ring of shared-memory stages with the tensor memory accelerator (TMA: one instruction
// per 64-column box of K or V, completion counted in bytes on an mbarrier per stage), one or two tiles ahead of
// the one being computed, and each lane reads its fragments from there: a pure-read probe on an H100 (2026-11-27)
// streamed head-128 caches at 2.93 TB/s this way against the register pipeline's 2.64 inside the kernel
// (docs/perf-notes.md). The earlier CUDA-core version of this kernel (dot products with FMAs and shuffles)
// executed 3.5-4.7x the instructions of cuDNN's tensor-core kernel; moving to tensor cores made it 2-8 us
// faster at short lengths but left the long-length bandwidth where it was (docs/perf-notes.md): there the
// DRAM, not the SM, sets the pace, and what helped was the order of the reads (interleaved split tiles).
// A 4-stage cp.async pipeline through shared memory had not helped either version.
//
// Warp groups: a short launch is a chain of latencies (length and tiles in one DRAM round trip, then each warp's mma /
// softmax chain over its rows, the warps' merge, the split merge), and four warps leave one warp per SM sub-partition,
// with nobody to issue while it waits. Plain launches whose grid runs at once with one block an SM, and whose splits
// have two tiles or more (flash_decode.h, uses_warp_groups), therefore run two groups of four warps: group 1 takes the
// block's second, fourth, ... tiles, as if it were another split, and the eight warps' results merge in shared memory
// as the four's do. The tile, and so the split granularity, is unchanged. In the bulk variant each group has its own
// ring of stages.
//
// Narrow tiles (kNarrow: plain one-tile launches of four warps, where every split has at most 32 rows; flash_decode.cu,
// default_num_splits): a warp takes 8 rows instead of 32 (head 64) or 16 (head 128), so a lane issues 4 or 8 cache loads
// instead of 16 before its first use, and P V runs as mma m16n8k8 over the 8 rows. A probe that only issues the loads
// of one tile the way these warps do (an H200, 2026-11-29, 1 MB at head 128, 0.5 MB at head 64, alternating rounds)
// took 4.86 us in 32 blocks of four 16-row warps against 4.22 in 64 blocks of four 8-row warps (the timing floor 3.71),
// and at head 64 5.09 in 8 blocks of eight 32-row warps against 4.06 in 64 blocks of four 8-row warps; reading 1 MB
// with all of a thread's 16-byte loads issued at once took 4.50 us with 1-4 loads a thread, 4.93 with 8 and 5.41 with
// 16, whatever the block count. More splits cost a merge, so the rule takes them only where the standard launch would
// be one block of two warp groups, or one block anyway.
//
// KV-head pairs (kHeadPairs, the bulk variant at head 64 where the batch alone fills the GPU: flash_decode.h,
// uses_kv_head_pairs): a block takes two adjacent KV heads, one per warp group, and each tensor copy brings both heads'
// rows (a box of 64 columns x 2 heads x the tile's rows), so that the DRAM sees 256 contiguous bytes of a cache row
// where one head's box asks for 128 bytes at a 1 KB stride. Both groups read every stage of one shared ring. A
// pure-read probe on an H100 (2026-11-27, batch 64 S = 2048, nine placements of the caches) read one head's boxes in
// 91.8-95.6 us and pairs in 90.8-92.6.
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: the maps are built through the runtime's driver entry point)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "element_convert.cuh"
#include "flash_decode.h"
#include "mbarrier.cuh"
#include "programmatic_launch.cuh"
#include "tensor_core.cuh"

namespace flash_decode {

// kWarpGroups: groups of kTileWarps warps in a block, each taking every kWarpGroups-th of the block's tiles (see
// "Warp groups" above). kNarrow: warp tiles of 8 rows (see "Narrow tiles" above).
template <typename Element, int kHeadDim, int kWarpGroups = 1, bool kNarrow = false>
struct KernelTraits {
    static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim must be 64 or 128");
    static_assert(kWarpGroups == 1 || kWarpGroups == 2, "one or two warp groups");
    static constexpr int kTileWarps = 4;  // the warps that share a block tile
    static constexpr int kWarps = kTileWarps * kWarpGroups;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kHeads = kHeadsPerBlock;     // the mma's M rows 0..7
    static constexpr int kKChunks = kHeadDim / 32;    // 16-byte K loads per lane per cache row it loads
    static constexpr int kVChunks = kHeadDim / 64;    // 16-byte V loads per lane per cache row it loads
    static constexpr int kOutTiles = kHeadDim / 8;    // 8-column n-tiles of O
    // Steps of 16 rows (narrow: 8) per warp tile: 128 (head 64) or 64 (head 128) bytes per lane in flight per buffer.
    // Head 64 with one step was 1-2% slower at long lengths, 1-2 us faster at 1024 rows (H100, 2026-11-26);
    // head 128 with two steps spills.
    static constexpr int kStepRows = kNarrow ? 8 : 16;
    static constexpr int kSteps = kHeadDim == 64 && !kNarrow ? 2 : 1;
    static constexpr int kRowsPerWarpTile = kStepRows * kSteps;
    static constexpr int kKGroups = kStepRows / 8;  // S's 8-row groups (n-tiles) a step
    static constexpr int kVRows = kStepRows / 4;    // the rows of a step whose V a lane holds (P V's k / 4)
    static constexpr int kRowsPerBlockTile = kRowsPerWarpTile * kTileWarps;  // head 64: 128; head 128: 64
    // Dynamic shared memory of a cluster-merge launch: every split's partial output and log-sum-exp per head.
    static constexpr size_t cluster_merge_bytes(int num_splits) {
        return (size_t)num_splits * kHeads * (kHeadDim + 1) * sizeof(float);
    }
    // The bulk variant's ring: a stage holds one block tile, K then V, each as kHeadDim / 64 boxes of
    // [kRowsPerBlockTile rows][64 elements] (128-byte rows, 128-byte swizzle). One or two stages (CacheMaps::stages,
    // chosen per launch in flash_decode.cu); three or four (more bytes in flight) were slower at every shape measured.
    static constexpr int kMaxBulkStages = 2;
    static constexpr int kBoxColumns = 64;
    static constexpr int kBoxBytes = kRowsPerBlockTile * kBoxColumns * (int)sizeof(Element);  // 16 KB or 8 KB
    static constexpr int kBulkStageBytes = 2 * kRowsPerBlockTile * kHeadDim * (int)sizeof(Element);
    static constexpr size_t bulk_shared_bytes(int stages) { return (size_t)stages * kBulkStageBytes + 1024; }  // + alignment
};

// The bulk variant's tensor maps (CUtensorMap, built per launch in flash_decode.cu): the caches as 4-d tensors of
// dimensions (head_dim, kv_heads, seq, batch) from the innermost (coordinates in that order), boxes of 64 head_dim
// elements x 1 head (KV-head pairs: 2) x kRowsPerBlockTile rows, 128-byte swizzle.
struct CacheMaps {
    CUtensorMap k, v;
    // of each warp group's ring (KV-head pairs: of the block's one ring), 1 to KernelTraits::kMaxBulkStages; all filled
    // before the length is read, unless staggered
    int stages;
    // (two warp groups, rings of two stages: launch_bulk_groups) a group's first tile is requested at the start, its
    // second once the length has arrived, and from then on each tile read requests one more: one tile in flight, as
    // with one stage, after a start at which the refills do not wait for the first tile to land
    bool staggered = false;
};
struct NoCacheMaps {};

// ---------------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------------

using element::load_stream_16B;
using element::from_float;

// Elements past the valid rows must never produce NaN: exp2(-inf - -inf) would. When nothing was seen
// yet (m == -inf) the reference point is 0, which makes every weight exp2(-inf) = 0.
__device__ __forceinline__ float safe_ref(float m) { return m == -INFINITY ? 0.f : m; }

// The optional lse output is the natural-log sum-exp of a query head's scores; the kernels keep it in the log2 domain
// (their scores are scaled by log2 e): every writer converts through this.
__device__ __forceinline__ float natural_lse(float log2_sum_exp) { return log2_sum_exp * 0.69314718055994531f; }

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// v[0 .. kVec) in one store, to base[index ..], where base is aligned to 16 bytes and index a multiple of kVec (1, 2
// or 4). Indexed from the aligned base rather than through base + index: that way the compiler also emits one vector
// store into shared memory, where `*reinterpret_cast<float4*>(base + index)` became four scalar st.shared.
template <int kVec>
__device__ __forceinline__ void store_floats(float* base, int64_t index, const float (&v)[4]) {
    static_assert(kVec == 1 || kVec == 2 || kVec == 4, "1, 2 or 4 floats");
    if constexpr (kVec == 1) base[index] = v[0];
    else if constexpr (kVec == 2) reinterpret_cast<float2*>(base)[index / 2] = make_float2(v[0], v[1]);
    else reinterpret_cast<float4*>(base)[index / 4] = make_float4(v[0], v[1], v[2], v[3]);
}

// The same as 16-bit elements (rounded to nearest even), to `dst` aligned to 2 * kVec bytes.
template <typename Element, int kVec>
__device__ __forceinline__ void store_elements(Element* dst, const float (&v)[4]) {
    static_assert(kVec == 1 || kVec == 2 || kVec == 4, "1, 2 or 4 elements");
    if constexpr (kVec == 1) *dst = from_float<Element>(v[0]);
    else if constexpr (kVec == 2) *reinterpret_cast<uint32_t*>(dst) = tensor_core::pack2<Element>(v[0], v[1]);
    else
        *reinterpret_cast<uint2*>(dst) =
            make_uint2(tensor_core::pack2<Element>(v[0], v[1]), tensor_core::pack2<Element>(v[2], v[3]));
}

// atomicAdd with acquire-release semantics at GPU scope: the writes this thread has observed (its block's, after a
// __syncthreads: cumulativity) become visible to whoever acquires the new value, and everything released before the old
// value becomes visible to this thread (and, after a __syncthreads, to its block).
__device__ __forceinline__ int atomic_add_acq_rel(int* address, int value) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(address), "r"(value) : "memory");
    return old;
}

__device__ __forceinline__ uint32_t word(const uint4& u, int i) {
    return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// The row of a 16-row step that P V's lane (., t) holds as its i-th (0..3); every row once. Any permutation would
// do (step 2 above): loads from memory take rows 4t..4t+3. The bulk variant's reads from its swizzled stage
// (16-byte column c of row r stored at c ^ r % 8) take another order, in which no read has a shared-memory bank
// conflict:
//   - one head a stage (StageRows::kOneHead): row 8(i / 2) + 4(i % 2) + t. K's rows of lanes g and g + 1 differ in
//     bit 2, so the 8 lanes of a quarter warp read 8 different columns; V comes by ldmatrix.trans (P V's k rows 0-7 of
//     a B fragment are rows 4j + t of the step, 8-15 rows 8 + 4j + t, j = 0, 1: eight different rows mod 8);
//   - KV-head pairs (StageRows::kHeadPair): the rows of the two heads alternate in the stage (stage row 2r + head), so
//     the swizzle sees bits 0-1 of r in its bits 1-2, and eight rows of one head cannot all fall in different columns
//     (no ldmatrix there): lanes g and g + 1 take rows that differ in bit 1, and the rows of t = 0..3 differ in bits 0
//     and 1, so each lane's 16-byte V reads (and K's) meet no conflict.
// (The register-pipeline instances keep 4t + i: another order's arithmetic cost the bf16 head-128 decode-step instance
// an 8-byte spill at its 255 registers.)
//
// A narrow step (8 rows) has one 8-row group in S and P V's k of 8 (mma m16n8k8, whose B fragment b0 is B[2t, 2t+1][g]):
// lane (., t) holds rows 2t and 2t + 1, and S's column n is row n (StageRows::kNarrow).
enum class StageRows { kRegisters, kOneHead, kHeadPair, kNarrow };
template <StageRows kOrder>
__device__ __forceinline__ int row_in_step(int t, int i) {
    if constexpr (kOrder == StageRows::kOneHead) return 8 * (i >> 1) + 4 * (i & 1) + t;
    if constexpr (kOrder == StageRows::kHeadPair) return 4 * i + (t ^ (2 * (i & 1)));
    if constexpr (kOrder == StageRows::kNarrow) return 2 * t + i;
    return 4 * t + i;
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------

// kEarlyReads: Params::early_cache_reads (a separate instance, so that the plain launch's code, which
// benchmark_kernel.py times cold, stays as short as it can be).
// kClusterMerge (sm_90+): the num_splits blocks of a (sequence, KV head, head group) form one thread-block
// cluster and merge their partial results through distributed shared memory instead of the float32
// workspace (see step 4 above).
// kBulk (sm_90+, plain launches, no cluster merge): the tiles come through shared memory (see "Latency hiding").
// kWarpGroups (plain launches, either pipeline): 2 gives the block a second group of four warps (see "Warp groups").
// kHeadPairs (the bulk variant in two groups, Params::head_groups == 1): group g takes KV head 2 * (pair) + g, every
// tile of the block's split, from stages that hold both heads (see "KV-head pairs"). Launched as
// flash_decode_pairs_kernel; the bulk variant in two warp groups as flash_decode_bulk_groups_kernel; every other
// instance as flash_decode_kernel (below).
template <typename Element, int kHeadDim, bool kEarlyReads, bool kClusterMerge, bool kBulk, int kWarpGroups,
          bool kHeadPairs, bool kOneTile = false, bool kNarrow = false>
__device__ __forceinline__ void flash_decode_block(const Params& p,
                                                   const std::conditional_t<kBulk, CacheMaps, NoCacheMaps>& maps) {
    static_assert(!kBulk || (!kEarlyReads && !kClusterMerge), "the bulk variant serves plain launches, merged in memory");
    static_assert(kWarpGroups == 1 || !kEarlyReads, "warp groups serve plain launches");
    static_assert(!kHeadPairs || (kBulk && kWarpGroups == 2), "KV-head pairs: the bulk variant, a warp group a head");
    static_assert(!kOneTile || (!kBulk && !kEarlyReads), "one-tile instances: the register pipeline's plain launches");
    static_assert(!kNarrow || (kOneTile && kWarpGroups == 1), "narrow tiles: one-tile instances of four warps");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    if constexpr (kBulk) __trap();  // launched only on sm_90+ (uses_bulk_pipeline); compiled everywhere
#endif
    using Traits = KernelTraits<Element, kHeadDim, kWarpGroups, kNarrow>;
    constexpr int kWarps = Traits::kWarps;
    constexpr int kHeads = Traits::kHeads;
    constexpr int kSteps = Traits::kSteps;
    constexpr int kKGroups = Traits::kKGroups;
    constexpr int kVRows = Traits::kVRows;
    constexpr int kKChunks = Traits::kKChunks;
    constexpr int kVChunks = Traits::kVChunks;
    constexpr int kOutTiles = Traits::kOutTiles;
    constexpr int kRowsPerBlockTile = Traits::kRowsPerBlockTile;
    // The register pipeline's plain launches (short lengths at batch 1): their time is mostly a chain of dependent
    // instructions around one DRAM round trip, so their code is kept short where the other instances' may not change
    // (the decode steps' spill at the margin, the bulk variant's long launches moved with ptxas's placement of the
    // length's load: docs/perf-notes.md).
    constexpr bool kPlainRegisters = !kBulk && !kEarlyReads;

    // +1: the lanes of different heads in other banks (2-way conflicts where n-tile n is every eighth element, 4-way
    // where it is 8 contiguous ones, kVTransposed below: a store a lane and n-tile, once a block)
    __shared__ float smem_acc[kWarps][kHeads][kHeadDim + 1];
    __shared__ float smem_m[kWarps][kHeads];
    __shared__ float smem_l[kWarps][kHeads];
    __shared__ int smem_is_last;
    // kClusterMerge: the cluster's partial results, pushed into its first block's dynamic shared memory
    // (Traits::cluster_merge_bytes), which waits for their bytes on merge_bar.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ uint64_t merge_bar;
#endif
    extern __shared__ __align__(16) unsigned char merge_buffer[];
    float* const merge_o = reinterpret_cast<float*>(merge_buffer);         // [num_splits][kHeads][kHeadDim]
    float* const merge_lse2 = merge_o + p.num_splits * kHeads * kHeadDim;  // [num_splits][kHeads]
    // kBulk: the ring of stages in the dynamic shared memory instead, 1024-byte aligned for the swizzle, and its
    // barriers: K full and V full (the stage's K or V bytes have landed) and empty (every warp has read it; with
    // KV-head pairs, its V: K's half has an empty barrier of its own, bulk_k_empty).
    // With two warp groups each group has a ring of its own (stages group * stages .. + stages - 1), which its first
    // thread fills.
    // (KV-head pairs: one ring for both groups, each stage both heads' tile)
    constexpr int kRingStages = kBulk ? Traits::kMaxBulkStages * (kHeadPairs ? 1 : kWarpGroups) : 1;
    constexpr int kHeadsPerStage = kHeadPairs ? 2 : 1;
    constexpr int kStageBytes = Traits::kBulkStageBytes * kHeadsPerStage;
    constexpr int kStageBoxBytes = Traits::kBoxBytes * kHeadsPerStage;
    __shared__ uint64_t bulk_k_full[kRingStages], bulk_v_full[kRingStages], bulk_empty[kRingStages];
    __shared__ uint64_t bulk_k_empty[kHeadPairs ? kRingStages : 1];
    // (Offset from the array rather than rounded as an integer: the compiler then knows that the ring is shared memory
    // and reads the fragments with LDS and 32-bit addresses. From the rounded generic pointer it read them with generic
    // 64-bit loads, and recomputed their addresses at every tile, after each barrier's wait. With that, V's zeroing
    // branch in bulk_read_v and the slot without a division, the bulk loop of the two-group head-64 instance went from
    // 670 to 576 instructions a tile; two H200s, 2026-11-30, nine alternating rounds, us: batch 1 head 64 S = 65536
    // 36.72 -> 36.29 and 37.30 -> 36.75, S = 16384 15.68 -> 14.54 and 15.90 -> 15.06, head 128 S = 65536 66.21 ->
    // 65.86 and 66.66 -> 66.40, batch 64 head 64 S = 2048 (KV-head pairs) 65.31 -> 64.37 and 66.18 -> 65.14, S = 4096
    // 123.04 -> 121.17 and 122.77 -> 121.01; batch 64 head 128 S = 2048 level; outputs bit-identical.)
    unsigned char* const bulk_ring =
        merge_buffer + ((1024u - (static_cast<uint32_t>(__cvta_generic_to_shared(merge_buffer)) & 1023u)) & 1023u);

    programmatic_launch::allow_next_kernel();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kClusterMerge) {
        // The first block's barrier must be ready before any block pushes to it: a cluster barrier whose arrival
        // is now and whose wait comes just before the first push, long after.
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            mbarrier::init(&merge_bar, 1);
            mbarrier::fence_init_for_cluster();
        }
        __syncwarp();  // (.aligned: the whole warp executes the arrival together)
        // Relaxed: the only write it publishes is the barrier's init, which fence_init_for_cluster releases (the PTX
        // ISA's pattern). A release arrival made every thread of every block fence at GPU scope first (MEMBAR.ALL.GPU in
        // the SASS) at the start of every cluster-merge launch: 0.1-0.3 us (an H200, 2026-11-29, head 64 S = 512-4096,
        // head 128 S = 256-2048).
        mbarrier::cluster_arrive_relaxed();
    }
#endif
    // Plain launches read nothing before the wait; see below for early_cache_reads.
    if constexpr (!kEarlyReads) programmatic_launch::wait_for_previous_kernel();

    const int split = blockIdx.x, unit = blockIdx.y;  // unit: (sequence, KV head, head group), or (sequence, KV-head pair)
    const int warp = threadIdx.x / 32;  // its partial result's slot in shared memory
    const int tile_warp = warp % Traits::kTileWarps, warp_group = warp / Traits::kTileWarps;
    const int unit_heads = p.kv_heads / kHeadsPerStage;
    int head_group, kv_head, b;
    if constexpr (!kEarlyReads) {
        // Plain launches: multiply-high divisions by the host's FastDivisor, a few instructions where unsigned
        // divisions took about 45 before the first load and signed ones about 65 before the first tensor copy. Two
        // H200s (2026-11-29, alternating rounds, us; the second with the V-zeroing skip below): head 64 S = 256 6.88 ->
        // 6.66 and 6.82 -> 6.74, head 128 S = 65536 68.35 -> 67.95 and 68.05 -> 67.70, batch 16 head 128 S = 4096 66.19
        // -> 65.82 and 66.66 -> 66.42, level elsewhere (head 64 S = 1024 0.1 slower in both). The KV-head pairs' unit
        // is (sequence, pair) (head_groups is 1 there), and launch() gives them the divisor of the pairs a sequence:
        // their first tensor copy moved from instruction 127 to 104, and batch 64 head 64 S = 2048 took 65.63 -> 65.38
        // us, fp16 65.57 -> 65.22, S = 4096 124.14 -> 124.00 (an H200, 2026-11-29). The decode steps' instances keep
        // their signed divisions (with these the fp16 head-128 cluster instance spilled on sm_80).
        auto divide = [](unsigned n, unsigned magic, unsigned shift) { return (__umulhi(n, magic) + n) >> shift; };
        const unsigned sequence_head = kHeadPairs ? unit : divide(unit, p.head_groups_magic, p.divisor_shifts & 0xff);
        head_group = kHeadPairs ? 0 : unit - sequence_head * p.head_groups;
        b = divide(sequence_head, p.unit_heads_magic, p.divisor_shifts >> 8);
        kv_head = (sequence_head - b * unit_heads) * kHeadsPerStage + (kHeadPairs ? warp_group : 0);
    } else {
        int idx = unit;
        head_group = idx % p.head_groups;
        idx /= p.head_groups;
        kv_head = idx % unit_heads;
        b = idx / unit_heads;
    }
    // The threads that merge this warp's partial results with the other warps' and write them out: the block's, or
    // with KV-head pairs its warp group's (a head each).
    constexpr int kMergeWarps = kHeadPairs ? Traits::kTileWarps : kWarps;
    constexpr int kMergeThreads = 32 * kMergeWarps;
    const int merge_thread = kHeadPairs ? threadIdx.x % kMergeThreads : threadIdx.x;
    const int merge_warp0 = kHeadPairs ? warp_group * Traits::kTileWarps : 0;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // the mma fragments' row group and thread in group

    // This block's query heads: group_size heads share kv_head; the block takes up to kHeads of them.
    const int g_begin = head_group * kHeads;
    const int g_count = min(kHeads, p.group_size - g_begin);
    const int q_head0 = kv_head * p.group_size + g_begin;

    // The block's tiles: split s takes tiles s, s + num_splits, ... of the sequence (interleaved rather than a
    // contiguous range each: then all blocks stream one window of the cache that sweeps through it, which the
    // H100's DRAM serves 2-4% faster at long lengths than 33 separate streams). No tile's place depends on the
    // length, which lets the loads start before the length is known. The splits that hold rows of a sequence are
    // the first active_splits (a shorter sequence has fewer; each then holds one tile).
    // With two warp groups, group 1 takes the block's second, fourth, ... tiles: `start` and `tile_stride` are the
    // warp's group's, `block_start` the block's first tile.
    int seqlen = -1, active_splits = 0, end = 0;
    const int block_start = split * kRowsPerBlockTile, block_tile_stride = p.num_splits * kRowsPerBlockTile;
    // (KV-head pairs: each group takes every tile of the block, for its own head)
    constexpr int kTileGroups = kHeadPairs ? 1 : kWarpGroups;
    const int start = block_start + (kHeadPairs ? 0 : warp_group) * block_tile_stride;
    const int tile_stride = kTileGroups * block_tile_stride;
    // kBulk: the warp group's ring (its first stage; maps.stages of them) and the thread that fills it
    int ring0 = 0;
    if constexpr (kBulk && !kHeadPairs) ring0 = warp_group * maps.stages;
    // (a staggered ring: the two-group instances only; in the others the branches compile away, and with them any
    // change to those instances' code and rounding)
    bool staggered = false;
    if constexpr (kBulk && kWarpGroups == 2 && !kHeadPairs) staggered = maps.staggered;
    const bool ring_filler = threadIdx.x % (32 * Traits::kTileWarps * (kHeadPairs ? 2 : 1)) == 0;
    auto set_rows = [&](int length) {
        seqlen = max(0, min(length, p.seq_capacity));
        active_splits = min(p.num_splits, ceil_div(seqlen, kRowsPerBlockTile));  // 0 when the sequence is empty
        end = seqlen;
    };

    // K: elements 32c + 8t .. +7 of a row (chunk c); V: elements 64c + 8g .. +7.
    const char* k_base = reinterpret_cast<const char*>(p.k) +
                         (b * p.k_batch_stride + (int64_t)kv_head * p.k_head_stride + 8 * t) * sizeof(Element);
    const char* v_base = reinterpret_cast<const char*>(p.v) +
                         (b * p.v_batch_stride + (int64_t)kv_head * p.v_head_stride + 8 * g) * sizeof(Element);
    const int64_t k_row_bytes = p.k_seq_stride * sizeof(Element);
    const int64_t v_row_bytes = p.v_seq_stride * sizeof(Element);
    constexpr int kKChunkBytes = 32 * sizeof(Element), kVChunkBytes = 64 * sizeof(Element);
    // Row `row` (0 <= row < seq_capacity) of a cache whose rows are row_bytes apart. Plain register launches multiply in
    // 32 bits into the 64-bit address (one IMAD.WIDE.U32 a row: a row stride is below 4 GB, launch() checks it), where
    // the signed 64-bit product took four or five instructions for each of a warp's 16-24 rows before its first load.
    auto row_offset = [&](int row, int64_t row_bytes) -> int64_t {
        if constexpr (kPlainRegisters) return (int64_t)((uint64_t)(uint32_t)row * (uint32_t)row_bytes);
        return row * row_bytes;
    };

    // Cache rows of this lane's loads in the tile starting at `tile`: step s of the warp's 16 x kSteps rows, P V's
    // row i of lane (., t) and S's 8-row group nt of lane (g, .) (row_in_step; S's column n = g of group nt is P V's
    // row 2nt + n % 2 of lane (., n / 2), the C fragment -> A fragment identity above).
    auto step_row0 = [&](int tile, int s) { return tile + tile_warp * Traits::kRowsPerWarpTile + Traits::kStepRows * s; };
    constexpr StageRows kRowOrder = kNarrow ? StageRows::kNarrow
                                    : !kBulk ? StageRows::kRegisters
                                    : kHeadPairs ? StageRows::kHeadPair : StageRows::kOneHead;
    // V's B fragments straight from ldmatrix.trans (one head a stage): vt[s][q % kVRows][q / kVRows] then holds n-tiles
    // 2q and 2q + 1 (b0, b1 of each) instead of 16-byte pieces of four rows, which P V paired with 32 byte permutes a
    // tile (8 LDS.128 and 32 PRMT -> 8 LDSM a warp's tile; the two-group bulk loop at bf16 head 64 546 -> 485
    // instructions, head 128 592 -> 547; registers within 2 either way, no spills on sm_80 / sm_90). An H200,
    // 2026-11-30, nine alternating rounds, us: batch 1 head 64 S = 16384 / 32768 / 65536 / 131072 14.75 / 22.06 /
    // 36.64 / 66.45 -> 14.59 / 21.63 / 36.48 / 65.90, fp16 S = 65536 37.10 -> 36.80, head 128 S = 8192 / 65536 15.20 /
    // 66.62 -> 15.01 / 66.29, batch 16 head 128 S = 4096 65.06 -> 64.80, batch 64 head 128 S = 2048 124.90 -> 124.42;
    // the KV-head pairs (unchanged code) 65.06 / 65.20. On a second H200 0.11-0.48 faster at 8 of those 11 shapes and
    // 0.03-0.08 slower at three (S = 32768 21.92 -> 21.98, fp16 37.06 -> 37.09, batch 4 head 64 S = 16384 36.42 ->
    // 36.50), the pairs 65.25 / 65.49: a gain of about the builds' spread (docs/perf-notes.md, forty-sixth session).
    constexpr bool kVTransposed = kRowOrder == StageRows::kOneHead;
    static_assert(!kVTransposed || kOutTiles / 2 == kVRows * kVChunks, "a lane's V registers: two n-tiles a uint4");
    auto k_row = [&](int tile, int s, int nt) { return step_row0(tile, s) + row_in_step<kRowOrder>(g >> 1, 2 * nt + (g & 1)); };
    auto v_row = [&](int tile, int s, int i) { return step_row0(tile, s) + row_in_step<kRowOrder>(t, i); };

    // Rows past `end` re-read the last valid row (a finite value, never memory past the sequence) and are
    // masked out of the softmax. (A plain launch's first tile is the exception: it is loaded before the
    // length is known, see below.)
    auto load_tile = [&](int tile, uint4 (&kt)[kSteps][kKGroups][kKChunks], uint4 (&vt)[kSteps][kVRows][kVChunks]) {
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
#pragma unroll
            for (int nt = 0; nt < kKGroups; ++nt) {
                const char* row = k_base + row_offset(min(k_row(tile, s, nt), end - 1), k_row_bytes);
#pragma unroll
                for (int c = 0; c < kKChunks; ++c) kt[s][nt][c] = load_stream_16B(row + c * kKChunkBytes);
            }
#pragma unroll
            for (int i = 0; i < kVRows; ++i) {
                const char* row = v_base + row_offset(min(v_row(tile, s, i), end - 1), v_row_bytes);
#pragma unroll
                for (int c = 0; c < kVChunks; ++c) vt[s][i][c] = load_stream_16B(row + c * kVChunkBytes);
            }
        }
    };
    // V's rows at or past `end` zeroed: a tile loaded before the length was known, or a stage, holds whatever the cache
    // holds there, and 0 x NaN would poison P V. (A warp's rows all before the end, as in every tile but a sequence's
    // last: none to zero, and no select a register, 32-64 a lane, between the data's arrival and the first mma; an H200,
    // 2026-11-29: level to 0.2 us faster, head 128 S = 512 / 1024 7.42 / 8.26 -> 7.23 / 8.06.)
    auto zero_v_past_end = [&](int tile, uint4 (&vt)[kSteps][kVRows][kVChunks]) {
        if (step_row0(tile, 0) + Traits::kRowsPerWarpTile <= end) return;
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            if constexpr (kVTransposed) {
                // b0 holds the lane's rows 0 and 1 (low and high half), b1 its rows 2 and 3
                auto keep = [&](int i) { return v_row(tile, s, i) < end ? 0xffffu : 0u; };
                const uint32_t keep_b0 = keep(0) | keep(1) << 16, keep_b1 = keep(2) | keep(3) << 16;
#pragma unroll
                for (int i = 0; i < kVRows; ++i)
#pragma unroll
                    for (int c = 0; c < kVChunks; ++c) {
                        uint4& u = vt[s][i][c];
                        u = make_uint4(u.x & keep_b0, u.y & keep_b1, u.z & keep_b0, u.w & keep_b1);
                    }
            } else {
#pragma unroll
                for (int i = 0; i < kVRows; ++i)
                    if (v_row(tile, s, i) >= end)
#pragma unroll
                        for (int c = 0; c < kVChunks; ++c) vt[s][i][c] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    // kBulk: the ring's filler copies the tile starting at row `tile` into stage `slot` (K's boxes in its first half,
    // V's in its second; with KV-head pairs each box holds both heads, from the pair's first; each half alone where
    // only one is asked for); rows past the cache's capacity arrive as zeros.
    auto bulk_issue = [&](int slot, int tile, bool k_half = true, bool v_half = true) {
        if constexpr (kBulk) {
            unsigned char* stage = bulk_ring + slot * kStageBytes;
            const int box_head = kv_head - (kHeadPairs ? warp_group : 0);
            // one cache's boxes into `half` of the stage, counted on `full`
            auto copy_half = [&](const CUtensorMap* map, uint64_t* full, unsigned char* half) {
                mbarrier::arrive_expect_bytes(full, kStageBytes / 2);
#pragma unroll
                for (int box = 0; box < kHeadDim / Traits::kBoxColumns; ++box)
                    mbarrier::tensor_copy_4d(half + box * kStageBoxBytes, map, box * Traits::kBoxColumns, box_head, tile, b,
                                             full);
            };
            if (k_half) copy_half(&maps.k, &bulk_k_full[slot], stage);
            if (v_half) copy_half(&maps.v, &bulk_v_full[slot], stage + kStageBytes / 2);
        }
    };
    // kBulk: this lane's fragments of the tile in stage `slot`: the pieces load_tile loads from memory, but for V's in
    // the one-head instances (kVTransposed: ldmatrix's B fragments instead). The 16-byte piece p of a row r (elements
    // 8p..8p+7) is in box p / 8, row r (KV-head pairs: box row 2r + the group's head), at column
    // (p % 8) ^ (box row % 8) (the swizzle). V rows past the length are zeroed: the stage holds whatever the cache
    // holds there.
    auto stage_piece_address = [&](const unsigned char* stage, int row, int p16) {
        constexpr int kRowBytes = Traits::kBoxColumns * (int)sizeof(Element);
        const int box_row = kHeadPairs ? 2 * row + warp_group : row;
        return stage + (p16 / 8) * kStageBoxBytes + box_row * kRowBytes + (((p16 % 8) ^ (box_row % 8)) << 4);
    };
    auto stage_piece = [&](const unsigned char* stage, int row, int p16) {
        return *reinterpret_cast<const uint4*>(stage_piece_address(stage, row, p16));
    };
    auto bulk_read_k = [&](int slot, int tile, uint4 (&kt)[kSteps][kKGroups][kKChunks]) {
        const unsigned char* k_stage = bulk_ring + slot * kStageBytes;
#pragma unroll
        for (int s = 0; s < kSteps; ++s)
#pragma unroll
            for (int nt = 0; nt < kKGroups; ++nt)
#pragma unroll
                for (int c = 0; c < kKChunks; ++c) kt[s][nt][c] = stage_piece(k_stage, k_row(tile, s, nt) - tile, 4 * c + t);
    };
    auto bulk_read_v = [&](int slot, int tile, uint4 (&vt)[kSteps][kVRows][kVChunks]) {
        const unsigned char* v_stage = bulk_ring + slot * kStageBytes + kStageBytes / 2;
        if constexpr (kVTransposed) {
            // lane 8m + r gives row r of matrix m: P V's k rows 0-7 (m even) or 8-15 (m odd) of n-tile 2q + m / 2
            const int m = lane / 8, r = lane % 8;
            const int row = row_in_step<kRowOrder>(r / 2, 2 * (m % 2) + r % 2);
#pragma unroll
            for (int s = 0; s < kSteps; ++s)
#pragma unroll
                for (int q = 0; q < kOutTiles / 2; ++q) {
                    const unsigned char* piece =
                        stage_piece_address(v_stage, step_row0(tile, s) - tile + row, 2 * q + m / 2);
                    vt[s][q % kVRows][q / kVRows] = tensor_core::load_matrices_x4_transposed(
                        static_cast<uint32_t>(__cvta_generic_to_shared(piece)));
                }
        } else {
#pragma unroll
            for (int s = 0; s < kSteps; ++s)
#pragma unroll
                for (int i = 0; i < kVRows; ++i)
#pragma unroll
                    for (int c = 0; c < kVChunks; ++c) vt[s][i][c] = stage_piece(v_stage, v_row(tile, s, i) - tile, 8 * c + g);
        }
        // (zeroed after the reads: with a select a row, a read only where the row is valid, ptxas computed each row's
        // address after V's wait, behind its own branch)
        zero_v_past_end(tile, vt);
    };
    uint4 k_next[kSteps][kKGroups][kKChunks], v_next[kSteps][kVRows][kVChunks];
    // The block's second tile, where it is read before the length (plain launches) or the wait (early_cache_reads);
    // registers the loop needs anyway
    uint4 k_second[kBulk ? 1 : kSteps][kKGroups][kKChunks], v_second[kBulk ? 1 : kSteps][kVRows][kVChunks];

    // q as the A fragment of S: head g, its elements in the order of the K loads (past the group: load_q). Loaded as
    // soon as the wait allows, beside the length and the cache rows, so that its round trip overlaps theirs
    // (issued after the length's, behind the branches that depend on it, it was a second round trip).
    uint32_t q_frag[kKChunks * 4];
    auto load_q = [&]() {
        // The register pipeline's plain launches: lanes past the group (g >= g_count) load the group's last head
        // again instead of zeros (their rows of S, P and O are never written out), so that no branch surrounds q's
        // loads: ptxas hoisted the length's first use above such a branch, and q's loads (head 128) and a split's
        // second tile's then waited for the length's round trip (an H200, 2026-11-29: head 64 S = 256-8192 0.1-0.8 us
        // faster, head 128 S = 256-2048 0.1-0.5). The bulk variant keeps its zeros (with the duplicate heads it was
        // 0.4-0.9 us slower at batch 1 head 64 S = 65536-131072, docs/perf-notes.md), and so do the decode steps'
        // instances (the fp16 head-128 ones spilled without the branch).
        const int head = kPlainRegisters ? min(g, g_count - 1) : g;
        if (kPlainRegisters || g < g_count) {
            const char* q_ptr = reinterpret_cast<const char*>(p.q) +
                                (b * p.q_batch_stride + (int64_t)(q_head0 + head) * p.q_head_stride + 8 * t) * sizeof(Element);
#pragma unroll
            for (int c = 0; c < kKChunks; ++c) {
                const uint4 u = __ldcg(reinterpret_cast<const uint4*>(q_ptr + c * kKChunkBytes));
                q_frag[4 * c] = u.x;
                q_frag[4 * c + 1] = u.y;
                q_frag[4 * c + 2] = u.z;
                q_frag[4 * c + 3] = u.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < kKChunks * 4; ++i) q_frag[i] = 0u;
        }
    };

    // q, and at least the newest cache row, come from the kernels just before (programmatic_launch.cuh).
    // With early_cache_reads the caller promises that those kernels write no other cache row and no
    // length, so the block reads its length and issues its first two tiles' loads before waiting: with the
    // decode split rule (splits of two tiles while they fit, flash_decode.cu) those are all it reads, and their
    // memory latency hides under the previous kernel. After the wait the length is read again (a different value
    // means start over) and the newest row is loaded again through L2, where the previous kernel's write is
    // now visible.
    bool first_tile_loaded = false, second_tile_loaded = false;
    if constexpr (kEarlyReads) {
        set_rows(__ldg(p.seqlens + b));
        if (start < end) {
            load_tile(start, k_next, v_next);
            first_tile_loaded = true;
            if (start + tile_stride < end) {  // the block's second tile
                load_tile(start + tile_stride, k_second, v_second);
                second_tile_loaded = true;
            }
        }
        programmatic_launch::wait_for_previous_kernel();
        // One round trip after the wait: the length again (through L2, not the early read's L1 copy), q and the
        // newest row go out together; the newest row is the early length's, and a different length starts over.
        const int checked_length = __ldcg(p.seqlens + b);
        load_q();
        if (first_tile_loaded) {
            // the pieces of row seqlen - 1, if this lane loaded any, again
            auto reload_newest = [&](uint4* pieces, int chunks, const char* base, int64_t row_bytes, int chunk_bytes,
                                     int row) {
                if (min(row, end - 1) != seqlen - 1) return;
#pragma unroll
                for (int c = 0; c < chunks; ++c)
                    pieces[c] = __ldcg(reinterpret_cast<const uint4*>(base + (seqlen - 1) * row_bytes + c * chunk_bytes));
            };
            auto reload_tile_newest = [&](int tile, uint4 (&kt)[kSteps][kKGroups][kKChunks], uint4 (&vt)[kSteps][kVRows][kVChunks]) {
#pragma unroll
                for (int s = 0; s < kSteps; ++s) {
#pragma unroll
                    for (int nt = 0; nt < kKGroups; ++nt)
                        reload_newest(kt[s][nt], kKChunks, k_base, k_row_bytes, kKChunkBytes, k_row(tile, s, nt));
#pragma unroll
                    for (int i = 0; i < kVRows; ++i)
                        reload_newest(vt[s][i], kVChunks, v_base, v_row_bytes, kVChunkBytes, v_row(tile, s, i));
                }
            };
            reload_tile_newest(start, k_next, v_next);
            if (second_tile_loaded) reload_tile_newest(start + tile_stride, k_second, v_second);
        }
        if (max(0, min(checked_length, p.seq_capacity)) != seqlen) {
            set_rows(checked_length);
            first_tile_loaded = second_tile_loaded = false;
        }
    } else if constexpr (kBulk) {
        // Every stage of the ring is filled at once, before the length is known (rows up to the capacity; the tensor
        // copy zeroes rows past it): a short split's tiles all arrive in one round trip. Stages whose tile turns out
        // to lie past the length are waited for before the block leaves (drain_unread_stages).
        // Thread 0 sets up the barriers. In the KV-head pair kernel it is also the ring's one filler, and it requests
        // the first tiles right away: the block's barrier then only has to come before the other threads' first use of
        // the barriers. H200s (2026-11-29, alternating rounds, two machines, us): batch 64 head 64 S = 2048 65.38 ->
        // 65.31 and 65.89 -> 65.47, fp16 65.22 -> 65.12 and 65.65 -> 65.41, S = 4096 124.00 -> 123.92 and 124.51 ->
        // 124.19, batch 66 67.81 -> 67.42. The bulk variant in four warps was level to 0.2 slower that way (batch 64
        // head 128 S = 2048 122.88 -> 123.07), and the two-group kernel's second filler needs thread 0's barriers: both
        // request their first tiles after the block's barrier.
        constexpr bool kFillBeforeBarrier = kHeadPairs;
        auto request_first_tiles = [&]() {
            for (int i = 0; i < (staggered ? 1 : maps.stages); ++i)
                if (start + i * tile_stride < p.seq_capacity) bulk_issue(ring0 + i, start + i * tile_stride);
        };
        if (threadIdx.x == 0) {
            for (int i = 0; i < kRingStages; ++i) {
                mbarrier::init(&bulk_k_full[i], 1);                   // the issuing thread's arrival, plus the bytes
                mbarrier::init(&bulk_v_full[i], 1);
                // every warp of the group (of the block, with KV-head pairs) has its fragments
                mbarrier::init(&bulk_empty[i], kHeadPairs ? kWarps : Traits::kTileWarps);
                if constexpr (kHeadPairs) mbarrier::init(&bulk_k_empty[i], kWarps);
            }
            mbarrier::fence_init_for_cluster();  // (visible to the tensor copies' completions too)
            if (kFillBeforeBarrier) request_first_tiles();
        }
        if (!kFillBeforeBarrier) {
            __syncthreads();
            if (ring_filler) request_first_tiles();
        }
        load_q();
        set_rows(__ldg(p.seqlens + b));
        // (staggered: the second tile, requested a round trip after the first and never past the length)
        if (staggered && ring_filler && start + tile_stride < end) bulk_issue(ring0 + 1, start + tile_stride);
        if (kFillBeforeBarrier) __syncthreads();
    } else {
        // The first tile's loads, and the second's where the split has just two (short sequences: all of it in one
        // round trip), go out together with the length's (rows up to the capacity). Once the length is known, K rows
        // past it are masked as usual and V rows past it are zeroed: they may hold anything, and 0 x NaN would poison
        // P V. Measured on an H100 (2026-11-27, batch 1, benchmark_kernel.py's method): head 64 S = 256 (one split of
        // two tiles) 7.9-8.0 -> 7.5-7.7 us; head 128 S = 1024 in 8 splits of two tiles 11.2-11.3 -> 10.4-10.7.
        end = p.seq_capacity;
        const bool two_tiles = !kOneTile && start + tile_stride < end && start + 2 * tile_stride >= end;  // (group-wide)
        // The first tile's loads are issued whether or not the warp group has a tile (rows clamp to the last one, and
        // the capacity is at least 1: launch): behind a branch, ptxas hoisted the length's first use (set_rows' clamp)
        // above them in every plain instance, so each warp waited for the length's round trip before it issued a
        // single tile load, two DRAM round trips in series instead of one (SASS and ncu's stall samples, an H200,
        // 2026-11-28: 59 of 894 samples on that clamp, 236 on the tile's data after it; without the branch head 64
        // S = 256 took 8.06 -> 7.71 us, most short plain launches 0.1-0.5 us less, docs/perf-notes.md).
        load_tile(start, k_next, v_next);
        if (two_tiles) load_tile(start + tile_stride, k_second, v_second);
        load_q();
        set_rows(__ldg(p.seqlens + b));
        if (start < end) {
            first_tile_loaded = true;
            zero_v_past_end(start, v_next);
            if (two_tiles && start + tile_stride < end) {
                second_tile_loaded = true;
                zero_v_past_end(start + tile_stride, v_second);
            }
        }
    }

    // Head h's output row: it starts on a 16-byte boundary (the binding checks it), so aligned pieces of it take one store.
    auto final_row = [&](int h) {
        return reinterpret_cast<Element*>(p.out) + b * p.out_batch_stride + (int64_t)(q_head0 + h) * p.out_head_stride;
    };
    auto write_final = [&](int h, int d, float value) { final_row(h)[d] = from_float<Element>(value); };
    // kBulk: a block must not leave while a copy into its shared memory is in flight: it waits for the stages filled
    // at the start whose tiles it does not read (those at or past the length; refills, and a staggered ring's second
    // tile, stop at the length).
    auto drain_unread_stages = [&]() {
        if constexpr (kBulk) {
            for (int i = 0; i < (staggered ? 1 : maps.stages); ++i) {
                const int tile = start + i * tile_stride;
                if (tile >= end && tile < p.seq_capacity) {
                    mbarrier::wait(&bulk_k_full[ring0 + i], 0);
                    mbarrier::wait(&bulk_v_full[ring0 + i], 0);
                }
            }
        }
    };
    if (active_splits <= 1 && split > 0) {  // nothing to do and nobody to report to
        drain_unread_stages();
        return;
    }
    if (active_splits == 0) {
        drain_unread_stages();
        // Empty sequence: the attention of nothing is defined as 0 (lse = -inf), like the reference.
        for (int i = merge_thread; i < g_count * kHeadDim; i += kMergeThreads) write_final(i / kHeadDim, i % kHeadDim, 0.f);
        if (p.lse != nullptr && merge_thread < g_count) p.lse[b * p.q_heads + q_head0 + merge_thread] = -INFINITY;
        return;
    }

    if (block_start < end) {  // (block_start: a block-wide condition, __syncthreads below)
        // Head g's running max and (this lane's part of the) sum; O's C fragments: acc[n][j] is head g at element
        // 64(n / 8) + 8(2t + j) + n % 8 (V's B fragments by byte permutes of 16-byte row pieces: n-tile n is every
        // eighth element) or 8n + 2t + j (kVTransposed: n-tile n is ldmatrix's 8 contiguous columns), and with a bf16
        // cache at head 64 acc[n][2 + j] the same element's share from P's rounding error (rows 8..15 of the mma, see
        // accumulate), added in at the end. (Head 128 adds that share after each mma instead: 32 registers fewer, which
        // the bf16 head-128 decode-step instance on sm_80 needs to stay free of spills; a head-128 warp's tile has one
        // mma an output tile, so the fold is not between two mma. The head-64 bulk instances folded too until their
        // stage reads became LDS (bulk_ring): now 135 -> 145 registers in two groups, 105 -> 119 in the KV-head pairs
        // (their bound 128), and level within the spread of two A/Bs on H200s (2026-11-30): -0.28 to +0.18 us at the
        // bf16 head-64 shapes, -0.1 on average, where instances whose code had not changed moved by up to 0.44 between
        // the two builds.)
        constexpr bool kSplitP = tensor_core::is_bf16<Element>;
        constexpr int kAccParts = kSplitP && kHeadDim == 64 ? 4 : 2;
        float m = -INFINITY, l = 0.f;
        float acc[kOutTiles][kAccParts];
#pragma unroll
        for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
            for (int j = 0; j < kAccParts; ++j) acc[n][j] = 0.f;

        // A tile of rows from registers, in phases: S, the online softmax's rescale, O += P V. Two tiles already in
        // registers (a decode step's splits, flash_decode.cu) share one rescale, and their products overlap.
        // S = Q K^T; sc[s][i] is head g's score for row row_in_step(t, i) of step s (log2 domain), -inf past the end.
        auto scores = [&](int tile, const uint4 (&k_cur)[kSteps][kKGroups][kKChunks], float (&sc)[kSteps][kVRows]) {
#pragma unroll
            for (int s = 0; s < kSteps; ++s) {
#pragma unroll
                for (int nt = 0; nt < kKGroups; ++nt) {
                    // Two chains of dependent mma (even and odd 16-element chunks of head_dim), added at the end:
                    // the chain's latency lies between K's arrival and the softmax. H200, 2026-11-29, against one
                    // chain: head 64 S = 16384 16.45 / 16.08 -> 15.98 / 15.68 us (two machines), batch 16 head 128 S =
                    // 4096 65.71 / 65.54 -> 65.26 / 65.34; head 128 S = 256-2048 0.04-0.08 faster on one machine,
                    // level on two; the rest level, but the KV-head pairs (batch 64 head 64 S = 2048) 0.06-0.08 slower
                    // on two machines: they keep one chain.
                    constexpr int kChains = kHeadPairs ? 1 : 2;
                    float c0[kChains] = {}, c1[kChains] = {};
#pragma unroll
                    for (int kk = 0; kk < kHeadDim / 16; ++kk) {  // 16 elements of head_dim per mma
                        const uint4& kv = k_cur[s][nt][kk / 2];
                        tensor_core::mma_16x8x16_top_rows<Element>(c0[kk % kChains], c1[kk % kChains], q_frag[2 * kk],
                                                                   q_frag[2 * kk + 1], word(kv, 2 * (kk % 2)),
                                                                   word(kv, 2 * (kk % 2) + 1));
                    }
                    if constexpr (kChains == 2) {
                        c0[0] += c0[1];
                        c1[0] += c1[1];
                    }
                    sc[s][2 * nt] = c0[0] * p.scale_log2;
                    sc[s][2 * nt + 1] = c1[0] * p.scale_log2;
                }
#pragma unroll
                for (int i = 0; i < kVRows; ++i)
                    if (v_row(tile, s, i) >= end) sc[s][i] = -INFINITY;
            }
        };
        auto max_score = [&](const float (&sc)[kSteps][kVRows], float so_far) {
#pragma unroll
            for (int s = 0; s < kSteps; ++s)
#pragma unroll
                for (int i = 0; i < kVRows; ++i) so_far = fmaxf(so_far, sc[s][i]);
            return so_far;
        };
        // The online softmax: head g's new running max (its 4 lanes agree on it), acc and l rescaled once; returns
        // the reference point of the new weights. For the warp's first tiles (a constant at each call) there is nothing
        // to rescale (m = -inf, l = 0, acc = 0): skipping it takes about 35 instructions a warp off short launches, and
        // the first P V no longer waits for the correction's exp2 and multiplies (the result is the same to the bit).
        auto rescale = [&](float tiles_max, bool first_tiles) {
            float m_new = first_tiles ? tiles_max : fmaxf(m, tiles_max);
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 1));
            m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, 2));
            const float ref = safe_ref(m_new);
            if (!first_tiles) {
                const float correction = exp2f(m - ref);
                l *= correction;
#pragma unroll
                for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
                    for (int j = 0; j < kAccParts; ++j) acc[n][j] *= correction;
            }
            m = m_new;
            return ref;
        };
        // O += P V, 16 rows per mma
        auto accumulate = [&](const float (&sc)[kSteps][kVRows], const uint4 (&v_cur)[kSteps][kVRows][kVChunks], float ref) {
#pragma unroll
            for (int s = 0; s < kSteps; ++s) {
                float pw[kVRows];
#pragma unroll
                for (int i = 0; i < kVRows; ++i) {
                    pw[i] = exp2f(sc[s][i] - ref);
                    l += pw[i];
                }
                if constexpr (kNarrow) {
                    // k = 8 rows: mma m16n8k8, whose A fragment a0 (a1: rows 8..15) is exactly S's C fragment c0, c1
                    // and whose B fragment b0 is rows 2t, 2t + 1 of V; bf16 P's rounding error rides in rows 8..15 as
                    // below
                    const uint32_t a0 = tensor_core::pack2<Element>(pw[0], pw[1]);
                    uint32_t a0_lo = 0u;
                    if constexpr (kSplitP) {
                        const float2 hi0 = tensor_core::unpack2<Element>(a0);
                        a0_lo = tensor_core::pack2<Element>(pw[0] - hi0.x, pw[1] - hi0.y);
                    }
#pragma unroll
                    for (int n = 0; n < kOutTiles; ++n) {
                        const int c = n / 8, e = n % 8;
                        const uint32_t b0 =
                            tensor_core::pair_halves(word(v_cur[s][0][c], e / 2), word(v_cur[s][1][c], e / 2), e % 2);
                        if constexpr (kAccParts == 4)
                            tensor_core::mma_16x8x8<Element>(acc[n], a0, a0_lo, b0);
                        else if constexpr (kSplitP)
                            tensor_core::mma_16x8x8_fold_rows<Element>(acc[n][0], acc[n][1], a0, a0_lo, b0);
                        else
                            tensor_core::mma_16x8x8_top_rows<Element>(acc[n][0], acc[n][1], a0, b0);
                    }
                } else {
                    const uint32_t a0 = tensor_core::pack2<Element>(pw[0], pw[1]);
                    const uint32_t a2 = tensor_core::pack2<Element>(pw[2], pw[3]);
                    // bf16 keeps 8 bits of P: its rounding error goes through the same mma as A's rows 8..15 (unused: a
                    // block has at most 8 heads; see acc for where those rows' results go), so P V is exact to ~16 bits,
                    // as the float32 FMAs of the CUDA-core version were (a bf16-only P put the model's logits 1.05% off
                    // the PyTorch path after 17 decode steps; fp16's 11 bits are enough). A second mma for the error, as
                    // before, made a batch-1 decode step of Llama-3.2-1B about 1% slower (H100, 2026-11-27).
                    uint32_t a0_lo = 0u, a2_lo = 0u;
                    if constexpr (kSplitP) {
                        const float2 hi0 = tensor_core::unpack2<Element>(a0), hi2 = tensor_core::unpack2<Element>(a2);
                        a0_lo = tensor_core::pack2<Element>(pw[0] - hi0.x, pw[1] - hi0.y);
                        a2_lo = tensor_core::pack2<Element>(pw[2] - hi2.x, pw[3] - hi2.y);
                    }
#pragma unroll
                    for (int n = 0; n < kOutTiles; ++n) {
                        uint32_t b0, b1;
                        if constexpr (kVTransposed) {
                            const uint4& pair = v_cur[s][(n / 2) % kVRows][(n / 2) / kVRows];
                            b0 = word(pair, 2 * (n % 2));
                            b1 = word(pair, 2 * (n % 2) + 1);
                        } else {
                            // element 64c + 8g + e of the lane's rows v_row(., ., 0..3)
                            const int c = n / 8, e = n % 8;
                            const bool high = e % 2;
                            b0 = tensor_core::pair_halves(word(v_cur[s][0][c], e / 2), word(v_cur[s][1][c], e / 2), high);
                            b1 = tensor_core::pair_halves(word(v_cur[s][2][c], e / 2), word(v_cur[s][3][c], e / 2), high);
                        }
                        if constexpr (kAccParts == 4)
                            tensor_core::mma_16x8x16<Element>(acc[n], a0, a0_lo, a2, a2_lo, b0, b1);
                        else if constexpr (kSplitP)
                            tensor_core::mma_16x8x16_fold_rows<Element>(acc[n][0], acc[n][1], a0, a0_lo, a2, a2_lo, b0, b1);
                        else
                            tensor_core::mma_16x8x16_top_rows<Element>(acc[n][0], acc[n][1], a0, a2, b0, b1);
                    }
                }
            }
        };
        auto process_tile = [&](int tile, const uint4 (&k_cur)[kSteps][kKGroups][kKChunks],
                                const uint4 (&v_cur)[kSteps][kVRows][kVChunks], bool first_tile) {
            float sc[kSteps][kVRows];
            scores(tile, k_cur, sc);
            accumulate(sc, v_cur, rescale(max_score(sc, -INFINITY), first_tile));
        };
        auto copy_tile = [&](uint4 (&k_to)[kSteps][kKGroups][kKChunks], uint4 (&v_to)[kSteps][kVRows][kVChunks],
                             const uint4 (&k_from)[kSteps][kKGroups][kKChunks], const uint4 (&v_from)[kSteps][kVRows][kVChunks]) {
#pragma unroll
            for (int s = 0; s < kSteps; ++s) {
#pragma unroll
                for (int nt = 0; nt < kKGroups; ++nt)
#pragma unroll
                    for (int c = 0; c < kKChunks; ++c) k_to[s][nt][c] = k_from[s][nt][c];
#pragma unroll
                for (int i = 0; i < kVRows; ++i)
#pragma unroll
                    for (int c = 0; c < kVChunks; ++c) v_to[s][i][c] = v_from[s][i][c];
            }
        };

        if constexpr (kBulk) {
            // each tile: wait for its bytes, take this lane's fragments, free the stage (the ring's filler refills it
            // `stages` tiles ahead), compute. K and V land on barriers of their own, and KV-head pairs take K's fragments
            // into the scores before they wait for V's: the pair instances run two blocks an SM, in at most 128 registers
            // a thread (with one barrier for both, the compiler read V's fragments early and the fp16 instance needed
            // 146; now bf16 119, fp16 116. Split barriers alone, at every other instance, measured level on an H100,
            // 2026-11-28).
            const int stages = maps.stages;
            int n = 0;
            for (int tile = start; tile < end; tile += tile_stride, ++n) {
                // (stages is 1 or 2: with n % stages and n / stages the loop divided by a runtime value at every tile)
                static_assert(Traits::kMaxBulkStages == 2, "a ring of one or two stages");
                const int slot = ring0 + (stages == 1 ? 0 : n & 1);
                const unsigned parity = (stages == 1 ? n : n >> 1) & 1;
                uint4 k_cur[kSteps][kKGroups][kKChunks], v_cur[kSteps][kVRows][kVChunks];
                float sc[kSteps][kVRows];
                mbarrier::wait(&bulk_k_full[slot], parity);
                bulk_read_k(slot, tile, k_cur);
                if constexpr (kHeadPairs) {
                    // K's half is refilled as soon as every warp has its K fragments, while V's may still be landing:
                    // the next tile's K goes out half a tile earlier than with one empty barrier for both halves
                    // (H200s, 2026-11-29, A/Bs in alternating rounds on seven machines: batch 64 head 64 S = 2048
                    // 0.07-0.5 us faster on each, e.g. 66.85 -> 66.59, fp16 0.25-0.8, batch 66 0.45-0.8, S = 4096 level
                    // to 0.2; batch 128, two waves, 0.15-0.4 slower, also with this refill off there; outputs
                    // bit-identical).
                    // Refilled before the scores instead: no better. Both halves' refills cut in two by rows (four
                    // barriers a kind), a ring of three half-stages (the warps' results then in the drained ring), or
                    // the first tile's V requested after the length: no better or slower (docs/perf-notes.md, thirtieth
                    // session).
                    const int refill = tile + stages * tile_stride;
                    __syncwarp();
                    if (lane == 0) mbarrier::arrive(&bulk_k_empty[slot]);
                    scores(tile, k_cur, sc);
                    if (ring_filler && refill < end) {
                        mbarrier::wait(&bulk_k_empty[slot], parity);
                        bulk_issue(slot, refill, true, false);
                    }
                }
                mbarrier::wait(&bulk_v_full[slot], parity);
                bulk_read_v(slot, tile, v_cur);
                __syncwarp();
                if (lane == 0) mbarrier::arrive(&bulk_empty[slot]);
                if (staggered) {
                    // tile 0 read: tile 2 into its stage; tile 1: nothing; tile n >= 2: tile n + 1, into the stage
                    // that tile n - 1 left
                    const int next = n == 0 ? 2 : n + 1;
                    const int refill = start + next * tile_stride;
                    if (ring_filler && n != 1 && refill < end) {
                        const int refill_slot = ring0 + next % 2;
                        mbarrier::wait(&bulk_empty[refill_slot], ((next - 2) >> 1) & 1);
                        bulk_issue(refill_slot, refill);
                    }
                } else {
                    const int refill = tile + stages * tile_stride;
                    if (ring_filler && refill < end) {
                        mbarrier::wait(&bulk_empty[slot], parity);
                        bulk_issue(slot, refill, !kHeadPairs, true);
                    }
                }
                if constexpr (!kHeadPairs) scores(tile, k_cur, sc);
                accumulate(sc, v_cur, rescale(max_score(sc, -INFINITY), false));  // (the bulk variant's code unchanged)
            }
            drain_unread_stages();
        } else if constexpr (kOneTile) {
            // A warp group's one tile at most (launch_variant), loaded with the length: the code falls from the prologue
            // through the tile into the warps' merge, where the general instance jumps over the two-tile path and the loop
            // (6-7 KB of code each way, cold after the benchmarks' flush).
            if (first_tile_loaded) process_tile(start, k_next, v_next, true);
        } else {
            int first = start;
            if (second_tile_loaded && start + 2 * tile_stride >= end) {  // the block's only two tiles, both loaded
                float sc[kSteps][kVRows], sc_second[kSteps][kVRows];
                scores(start, k_next, sc);
                scores(start + tile_stride, k_second, sc_second);
                const float ref = rescale(max_score(sc_second, max_score(sc, -INFINITY)), true);
                accumulate(sc, v_next, ref);
                accumulate(sc_second, v_second, ref);
                first = end;
            } else if (kEarlyReads && second_tile_loaded) {  // the first two, read early: the first, then the loop
                process_tile(start, k_next, v_next, true);
                copy_tile(k_next, v_next, k_second, v_second);
                first = start + tile_stride;
            } else if (first_tile_loaded && start + tile_stride >= end) {
                // the warp group's only tile, loaded: straight from the registers it landed in (through the loop below it
                // was copied to the loop's registers first, 64 moves a thread) and with nothing to rescale
                process_tile(start, k_next, v_next, true);
                first = end;
            }
            if (!first_tile_loaded && start < end) load_tile(start, k_next, v_next);
            for (int tile = first; tile < end; tile += tile_stride) {
                uint4 k_cur[kSteps][kKGroups][kKChunks], v_cur[kSteps][kVRows][kVChunks];
                copy_tile(k_cur, v_cur, k_next, v_next);
                if (tile + tile_stride < end) load_tile(tile + tile_stride, k_next, v_next);
                process_tile(tile, k_cur, v_cur, false);
            }
        }

        // ---- this warp's result per head into shared memory ----
        if constexpr (kAccParts == 4) {
#pragma unroll
            for (int n = 0; n < kOutTiles; ++n) {
                acc[n][0] += acc[n][2];
                acc[n][1] += acc[n][3];
            }
        }
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (g < g_count) {
#pragma unroll
            for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int element = kVTransposed ? 8 * n + 2 * t + j : 64 * (n / 8) + 8 * (2 * t + j) + n % 8;
                    smem_acc[warp][g][element] = acc[n][j];
                }
            if (t == 0) {
                smem_m[warp][g] = m;
                smem_l[warp][g] = l;
            }
        }
        __syncthreads();

        // ---- merge the warps; write the output (one split) or this split's partial result ----
        mbarrier::FirstBlockTargets first_block;  // (kClusterMerge, split > 0)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (kClusterMerge && active_splits > 1)
            first_block = mbarrier::wait_for_first_block(merge_o, merge_lse2, &merge_bar);
#endif
        // Each thread takes kMergeVec adjacent elements of one head, as many as one pass over a block of four query
        // heads (Llama 3's GQA group) needs: the warps' weights once for all of them, and one store of the output (of
        // a partial result) where there were kMergeVec scalar ones (the cluster's first block's copy into its own
        // merge_o too, through store_floats' indexed form; level on an H100, 2026-11-28, against its kMergeVec scalar
        // st.shared). The reads of smem_acc are now kMergeVec words apart a lane: 2- or 4-way bank
        // conflicts, included in the figures below. Measured on H100s (2026-11-28, docs/perf-notes.md):
        // head 128 batch 16 S = 4096, one pass instead of two, 91.3-91.4 -> 91.0-91.2 us; batch 64 head 64 (KV-head
        // pairs) 93.2-93.7 -> 92.8-93.3; but two elements a thread where one pass took one left half the threads idle
        // (head 64 batch 16, 128 items for 256 threads: 27.9-28.1 -> 28.2-28.3).
        constexpr int kMergeVec = 4 * kHeadDim <= kMergeThreads ? 1 : 4 * kHeadDim <= 2 * kMergeThreads ? 2 : 4;
        constexpr int kVecsPerHead = kHeadDim / kMergeVec;
        for (int i = merge_thread; i < g_count * kVecsPerHead; i += kMergeThreads) {
            const int h = i / kVecsPerHead, d = kMergeVec * (i % kVecsPerHead);
            float m_max = -INFINITY;
#pragma unroll
            for (int w = merge_warp0; w < merge_warp0 + kMergeWarps; ++w) m_max = fmaxf(m_max, smem_m[w][h]);
            const float ref = safe_ref(m_max);
            float sum = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};  // (the first kMergeVec)
#pragma unroll
            for (int w = merge_warp0; w < merge_warp0 + kMergeWarps; ++w) {
                const float c = exp2f(smem_m[w][h] - ref);
                sum += smem_l[w][h] * c;
#pragma unroll
                for (int e = 0; e < kMergeVec; ++e) o[e] += smem_acc[w][h][d + e] * c;
            }
            const float inv_sum = 1.f / sum;
#pragma unroll
            for (int e = 0; e < kMergeVec; ++e) o[e] *= inv_sum;
            const float lse2 = m_max + log2f(sum);
            if (active_splits == 1) {
                store_elements<Element, kMergeVec>(final_row(h) + d, o);
                if (d == 0 && p.lse != nullptr) p.lse[b * p.q_heads + q_head0 + h] = natural_lse(lse2);
            } else if constexpr (kClusterMerge) {
                const int o_index = (split * kHeads + h) * kHeadDim + d, lse_index = split * kHeads + h;
                if (split == 0) {
                    store_floats<kMergeVec>(merge_o, o_index, o);
                    if (d == 0) merge_lse2[lse_index] = lse2;
                } else {
                    mbarrier::store_async_vec<kMergeVec>(first_block.o + 4 * o_index, o, first_block.bar);
                    if (d == 0) mbarrier::store_async(first_block.lse + 4 * lse_index, lse2, first_block.bar);
                }
            } else {
                const int64_t row = ((int64_t)b * p.q_heads + q_head0 + h) * p.num_splits + split;
                store_floats<kMergeVec>(p.partial_out, row * kHeadDim + d, o);
                if (d == 0) p.partial_lse[row] = lse2;
            }
        }
    } else {
        drain_unread_stages();  // (a split past the length, in a launch with several active splits)
    }
    if (active_splits == 1) return;  // (the same for every block of the unit: one length)

    // ---- merge the splits: the cluster's first block, or the last split to finish ----
    // Partial results of split s, head h: its log2-sum-exp and its normalized output element d.
    const int64_t head_row0 = ((int64_t)b * p.q_heads + q_head0) * p.num_splits;  // (global workspace)
    auto partial_lse2 = [&](int h, int s) -> float {
        if constexpr (kClusterMerge) return merge_lse2[s * kHeads + h];
        return __ldcg(p.partial_lse + head_row0 + h * p.num_splits + s);
    };
    // Split s's elements d..d+3 of head h, from `src` = its split 0's (global workspace).
    auto partial_o4 = [&](const float4* src, int h, int s, int d) -> float4 {
        if constexpr (kClusterMerge) return *reinterpret_cast<const float4*>(merge_o + (s * kHeads + h) * kHeadDim + d);
        return __ldcg(src + s * (kHeadDim / 4));
    };
    if constexpr (kClusterMerge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // The other splits' stores are on their way to this block, which waits for all their bytes; they do not
        // wait for anything. (The earlier merge met at a cluster barrier here, every block merged a share reading
        // the others' shared memory, and a second barrier kept each block's memory alive until read: a batch-1
        // decode step of Llama-3.2-1B on an H100 took 15-32 us longer after 512 to 2,176 positions.)
        if (split != 0) return;
        __syncthreads();  // this block's own partial result
        const int pushed_bytes = (active_splits - 1) * g_count * (kHeadDim + 1) * (int)sizeof(float);
        if (threadIdx.x == 0) mbarrier::arrive_expect_bytes(&merge_bar, pushed_bytes);
        mbarrier::wait_for_cluster(&merge_bar, 0);
#else
        __trap();  // launched only on sm_90+ (flash_decode.cu)
#endif
    } else {
        // The barrier orders the block's partial results before thread 0's ticket, whose release publishes them; the
        // last block's acquire makes every other block's visible to it, and after the second barrier to all its threads
        // (read through L2 below, never stale L1). The ticket was a relaxed atomicAdd between two __threadfence()s (in
        // every thread): 0.5-0.8 us more at batch 1 in 16 splits (H100, 2026-11-28, a standalone probe, four rounds:
        // head 64 S = 16384 / 65536 / 131072 18.9-19.2 / 51.3-51.8 / 95.5-95.8 -> 18.3-18.4 / 50.5-50.8 / 94.7-95.0
        // us, head 128 S = 8192 / 65536 19.8-20.1 / 93.8-94.0 -> 19.2-19.5 / 92.9-93.5).
        __syncthreads();
        int* counter = p.split_counters + unit;
        if (threadIdx.x == 0) smem_is_last = atomic_add_acq_rel(counter, 1) == p.num_splits - 1;
        __syncthreads();
        if (!smem_is_last) return;
        if (threadIdx.x == 0) *counter = 0;  // ready for the next launch; every block of this launch has arrived
    }

    // Each thread merges four elements of one head over the splits. Every split's log-sum-exp and output are loaded
    // together, one round trip to L2 for a workspace merge, where weights computed first took two. The workspace merge
    // issues the loads of kMergeChunk splits before it uses the first: in a loop unrolled by 8, 16 splits took two
    // round trips in series, and a count that is not a multiple of 8 one more per split of the rest (the compiler sank
    // each load of the remainder behind its own exit test; hence the compiler barrier below). Measured on H200s
    // (2026-11-29, four A/Bs in alternating rounds, us): batch 4 head 64 S = 16384 38.99 -> 38.27, 38.66 -> 38.18,
    // 38.11 -> 37.47, 38.08 -> 37.71; batch 1 head 64 S = 65536 39.04 -> 38.46, 38.78 -> 38.69, 38.24 -> 38.13, 38.22
    // -> 38.13. It then takes a chunk in two passes: the chunk's largest log-sum-exp (a tree of maxima), then each
    // split's weight against it, all independent, and one rescale of the running sums a chunk. The one-pass merge it
    // replaced (the splits' online softmax once more) rescaled at every split, a chain of a max and two exp2 a split,
    // 16 links at 16 splits after the data had arrived: two H200s (2026-11-30, nine alternating rounds each, us) had
    // batch 1 head 64 S = 65536 37.66 -> 37.12 and 38.45 -> 37.94, S = 131072 67.30 -> 66.91 and 67.65 -> 67.31, head
    // 128 S = 65536 67.20 -> 66.85 and 67.82 -> 67.31, head 64 S = 16384 15.68 -> 15.23 and 17.06 -> 16.54, head 128 S
    // = 4096 12.82 -> 12.29 and 12.90 -> 12.50, batch 4 head 64 S = 16384 38.06 -> 37.97 and 36.86 -> 36.59
    // (docs/perf-notes.md). A cluster merge reads shared memory, where the chunk's predicated loads cost more than the
    // round trips they save (head 64 S = 2048 in 8 splits 8.37 -> 8.61), and where two passes (a max loop, then a
    // weights loop) were level on one H200 (head 64 S = 256-4096, -0.10 to +0.06 us): it keeps the one-pass loop. So do
    // the KV-head pairs, which merge splits only when forced (their automatic rule takes one split), so that their code
    // stays as it was (the chunk took their registers from 111 to 127).
    constexpr int kVecPerHead = kHeadDim / 4;
    constexpr int kMergeChunk = 16;
    for (int i = merge_thread; i < g_count * kVecPerHead; i += kMergeThreads) {
        const int h = i / kVecPerHead, c = (i % kVecPerHead) * 4;
        const float4* src = reinterpret_cast<const float4*>(p.partial_out + (head_row0 + h * p.num_splits) * kHeadDim + c);
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
        float m_max = -INFINITY, sum = 0.f;
        auto add_split = [&](float lse2, const float4& part) {
            const float m_new = fmaxf(m_max, lse2), ref = safe_ref(m_new);
            const float rescale = exp2f(m_max - ref), w = exp2f(lse2 - ref);
            sum = fmaf(sum, rescale, w);
            o.x = fmaf(w, part.x, o.x * rescale);
            o.y = fmaf(w, part.y, o.y * rescale);
            o.z = fmaf(w, part.z, o.z * rescale);
            o.w = fmaf(w, part.w, o.w * rescale);
            m_max = m_new;
        };
        if constexpr (kClusterMerge || kHeadPairs) {
#pragma unroll 8
            for (int s = 0; s < active_splits; ++s) add_split(partial_lse2(h, s), partial_o4(src, h, s, c));
        } else {
            for (int s0 = 0; s0 < active_splits; s0 += kMergeChunk) {
                float lse2[kMergeChunk];
                float4 part[kMergeChunk];
#pragma unroll
                for (int j = 0; j < kMergeChunk; ++j) {
                    const bool active = s0 + j < active_splits;
                    lse2[j] = active ? partial_lse2(h, s0 + j) : -INFINITY;  // (an idle slot weighs exp2(-inf) = 0)
                    part[j] = active ? partial_o4(src, h, s0 + j, c) : make_float4(0.f, 0.f, 0.f, 0.f);
                }
                asm volatile("" ::: "memory");  // (every load above is issued before the first result is used)
                // The chunk's largest log-sum-exp by a tree of maxima, then its splits' weights against it, all
                // independent: one rescale a chunk where the running one chained a max and two exp2 a split.
                float top[kMergeChunk / 2];
#pragma unroll
                for (int j = 0; j < kMergeChunk / 2; ++j) top[j] = fmaxf(lse2[j], lse2[j + kMergeChunk / 2]);
#pragma unroll
                for (int half = kMergeChunk / 4; half > 0; half /= 2)
#pragma unroll
                    for (int j = 0; j < half; ++j) top[j] = fmaxf(top[j], top[j + half]);
                const float m_new = fmaxf(m_max, top[0]), ref = safe_ref(m_new);  // (top[0] >= split s0's: finite)
                const float rescale = exp2f(m_max - ref);
                float chunk_sum = 0.f;
                float4 chunk_o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int j = 0; j < kMergeChunk; ++j) {
                    const float w = exp2f(lse2[j] - ref);
                    chunk_sum += w;
                    chunk_o.x = fmaf(w, part[j].x, chunk_o.x);
                    chunk_o.y = fmaf(w, part[j].y, chunk_o.y);
                    chunk_o.z = fmaf(w, part[j].z, chunk_o.z);
                    chunk_o.w = fmaf(w, part[j].w, chunk_o.w);
                }
                sum = fmaf(sum, rescale, chunk_sum);
                o.x = fmaf(o.x, rescale, chunk_o.x);
                o.y = fmaf(o.y, rescale, chunk_o.y);
                o.z = fmaf(o.z, rescale, chunk_o.z);
                o.w = fmaf(o.w, rescale, chunk_o.w);
                m_max = m_new;
            }
        }
        const float inv_sum = 1.f / sum;
        const float o4[4] = {o.x * inv_sum, o.y * inv_sum, o.z * inv_sum, o.w * inv_sum};
        store_elements<Element, 4>(final_row(h) + c, o4);
        if (c == 0 && p.lse != nullptr)
            p.lse[b * p.q_heads + q_head0 + h] = natural_lse(m_max + log2f(sum));
    }
}

// The launched kernels: flash_decode_kernel for every instance but two kinds, which have kernels of their own below for
// their register bounds: the bulk variant in two warp groups (one block an SM) and the KV-head pairs (two).
template <typename Element, int kHeadDim, bool kEarlyReads, bool kClusterMerge, bool kBulk, int kWarpGroups,
          bool kOneTile = false, bool kNarrow = false>
__global__ void __launch_bounds__(KernelTraits<Element, kHeadDim, kWarpGroups>::kThreads)
    flash_decode_kernel(const Params p, const __grid_constant__ std::conditional_t<kBulk, CacheMaps, NoCacheMaps> maps) {
    flash_decode_block<Element, kHeadDim, kEarlyReads, kClusterMerge, kBulk, kWarpGroups, false, kOneTile, kNarrow>(p,
                                                                                                                maps);
}

// The bulk variant in two warp groups runs one block an SM (uses_warp_groups), and says so: without the minimum of one
// block, ptxas held the bf16 head-64 instance to 128 registers, and with the split merge's loads all in flight it then
// spilled in the main loop; with it the four instances take 144-185 (no spills). On its own the bound was faster or
// within the rounds' spread (an H200, 2026-11-29, nine alternating rounds: batch 1 head 64 S = 32768 / 65536 24.29 ->
// 24.03 / 39.04 -> 38.72 us, batch 4 S = 16384 38.99 -> 38.72, head 128 S = 65536 68.48 -> 68.58).
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(KernelTraits<Element, kHeadDim, 2>::kThreads, 1)
    flash_decode_bulk_groups_kernel(const Params p, const __grid_constant__ CacheMaps maps) {
    flash_decode_block<Element, kHeadDim, false, false, true, 2, false>(p, maps);
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(KernelTraits<Element, kHeadDim, 2>::kThreads, 2)
    flash_decode_pairs_kernel(const Params p, const __grid_constant__ CacheMaps maps) {
    flash_decode_block<Element, kHeadDim, false, false, true, 2, true>(p, maps);
}

}  // namespace flash_decode
