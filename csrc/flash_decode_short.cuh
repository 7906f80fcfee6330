// The short-launch kernel at head 128: plain launches in which every split has at most one 32-row tile, one split or
// 2 to 8 merged in a thread-block cluster (the launches narrow_tiles_for gives to launch_narrow, flash_decode.cu).
//
// Algorithm (the same result as flash_decode_kernel.cuh's narrow one-tile instance, and as
// llama3.decode_attention_reference): a block takes rows 32s .. 32s + 31 of split s, in eight warps: warps w and w + 4
// take the same 8 rows, each one half of head_dim (64 elements), so a lane issues 4 cache loads and 2 of q instead of
// 8 and 4.
//   1. S = q K^T over the warp's half: lane (g, t) loads cache row g at elements 8t..8t+7 of both 32-element chunks of
//      the half (the B fragments of four mma.m16n8k16, in two chains); q likewise (the A fragments, head g). The pair's
//      partial scores are added through shared memory behind a 64-thread named barrier: both warps then hold head g's
//      full scores for rows 2t and 2t + 1 (float addition commutes, so both hold the same bits).
//   2. One tile's softmax in the log2 domain: the row max over the four lanes of a head, exp2, the lane's part of the
//      sum. Rows past the length score -inf and their V is zeroed (0 x NaN would poison P V).
//   3. O = P V over the warp's 64 output elements: eight mma.m16n8k8 whose A fragment is S's C fragment (rows 2t,
//      2t + 1 of head g) and whose B fragment pairs equal elements of V rows 2t and 2t + 1 (bf16 P carries its
//      rounding error in the mma's unused rows 8..15, as in flash_decode_kernel.cuh).
//   4. The four warps of each half merge with exp2(m_w - m) weights through shared memory; each thread takes two
//      adjacent elements of a head (at most two such pairs with eight heads), all loops unrolled over compile-time
//      bounds. One split writes the output; otherwise each block pushes its normalized partial result and its
//      log2-sum-exp into the first block's shared memory with 8-byte asynchronous stores counted on that block's
//      mbarrier, and the first block merges all 8 slots (the idle ones zero-weighted) and writes the output.
// Why a kernel of its own: a standalone probe of this structure for batch 1, 32 / 8 heads, S = 256 (an H200,
// 2026-11-29, docs/perf-notes.md, thirty-ninth session) took 5.82-5.92 us against 6.40 for the general kernel's
// launch in the same rounds (the timing floor 3.84-3.87): the general block's runtime loops over heads, elements and
// splits, and its zero-length and one-split branches, cost more than the data's round trip does here. This kernel
// kept that lead once its merge lost its branch a split and a group of 4 got compile-time loop bounds (fortieth
// session: 0.37-0.51 us faster than the general kernel at head 128 S = 97-256, 0.1-0.2 behind the probe).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstddef>
#include <cstdint>

#include "element_convert.cuh"
#include "flash_decode.h"
#include "flash_decode_kernel.cuh"  // safe_ref, natural_lse, store_elements, word
#include "mbarrier.cuh"
#include "programmatic_launch.cuh"
#include "tensor_core.cuh"

namespace flash_decode {

struct ShortTraits {
    static constexpr int kHeadDim = 128;
    static constexpr int kHalf = kHeadDim / 2;  // a warp's share of head_dim
    static constexpr int kRowWarps = 4;          // 8 rows each
    static constexpr int kWarps = 2 * kRowWarps;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRows = 8 * kRowWarps;  // a split's rows
    static constexpr int kMaxSplits = kMaxClusterSplits;
    // the query heads a block serves: exactly kGroup (a compile-time group, one head group), or up to kHeadsPerBlock
    __host__ __device__ static constexpr int heads(int group) { return group != 0 ? group : kHeadsPerBlock; }
    // the first block's buffer: every split slot's partial output and log2-sum-exp per head (all kMaxSplits slots, so
    // that the merge reads a fixed set of them without a branch a split)
    static constexpr size_t merge_bytes(int group) {
        return (size_t)kMaxSplits * heads(group) * (kHeadDim + 1) * sizeof(float);
    }
};
static_assert(ShortTraits::kRows == kNarrowRowsPerBlockTile, "the narrow rule's tile");

// The short-launch kernel's parameters: the fields of Params that it reads, ordered so that everything a block reads
// before its cache loads (pointers, strides, the unit's divisors, the capacity) lies in the first 112 bytes, which on
// sm_90 are the first two 64-byte lines of the kernel's parameter bank (0x210-0x27f). After the timing's L2 flush the
// parameters are as cold as the code, and every line a block touches before its loads is a miss on that path: in
// Params' order this kernel touched a third one (q's strides). Measured on an H200 (2026-11-30, nine alternating
// rounds, batch 1, 32 / 8 heads, us): S = 256 6.10 -> 5.98, S = 128 5.92 -> 5.76, batch 2 S = 128 5.73 -> 5.54
// (docs/perf-notes.md).
struct ShortParams {
    const void* k;
    const void* v;
    const void* q;
    const int* seqlens;
    int64_t k_batch_stride, k_head_stride, v_batch_stride, v_head_stride, q_batch_stride, q_head_stride;
    int64_t k_seq_stride, v_seq_stride;
    uint32_t unit_heads_magic, divisor_shifts;
    int kv_heads, seq_capacity;
    // (read after the loads, or only with a group not known at compile time)
    uint32_t head_groups_magic;
    int head_groups, group_size, num_splits, q_heads;
    float scale_log2;
    void* out;
    float* lse;
    int64_t out_batch_stride, out_head_stride;
};
static_assert(offsetof(ShortParams, head_groups_magic) <= 112, "a block's first reads in two constant lines");

inline ShortParams short_params(const Params& p) {
    ShortParams s;
    s.k = p.k;
    s.v = p.v;
    s.q = p.q;
    s.seqlens = p.seqlens;
    s.k_batch_stride = p.k_batch_stride;
    s.k_head_stride = p.k_head_stride;
    s.v_batch_stride = p.v_batch_stride;
    s.v_head_stride = p.v_head_stride;
    s.q_batch_stride = p.q_batch_stride;
    s.q_head_stride = p.q_head_stride;
    s.k_seq_stride = p.k_seq_stride;
    s.v_seq_stride = p.v_seq_stride;
    s.unit_heads_magic = p.unit_heads_magic;
    s.divisor_shifts = p.divisor_shifts;
    s.kv_heads = p.kv_heads;
    s.seq_capacity = p.seq_capacity;
    s.head_groups_magic = p.head_groups_magic;
    s.head_groups = p.head_groups;
    s.group_size = p.group_size;
    s.num_splits = p.num_splits;
    s.q_heads = p.q_heads;
    s.scale_log2 = p.scale_log2;
    s.out = p.out;
    s.lse = p.lse;
    s.out_batch_stride = p.out_batch_stride;
    s.out_head_stride = p.out_head_stride;
    return s;
}

// kCluster: 2 to ShortTraits::kMaxSplits splits merged in one cluster (sm_90+); else one split.
// kGroup: 4 serves exactly a group of 4 query heads (Llama 3 8B's GQA) with every head loop's bound known;
// 0 serves any group (Llama 3.2 3B's 3), up to kHeadsPerBlock heads a block (head_groups beyond).
template <typename Element, bool kCluster, int kGroup>
__device__ __forceinline__ void short_block(const ShortParams& p) {
    using T = ShortTraits;
    constexpr int kD = T::kHeadDim, kHalf = T::kHalf, kHeads = T::heads(kGroup);
    constexpr int kPairs = (kHeads * kHalf + T::kThreads - 1) / T::kThreads;  // element pairs a thread merges at most
    constexpr bool kSplitP = tensor_core::is_bf16<Element>;
    __shared__ float smem_acc[T::kWarps][kHeads][kHalf + 1];  // +1: lanes of different heads, other banks
    __shared__ float smem_m[T::kWarps][kHeads], smem_l[T::kWarps][kHeads];
    __shared__ float2 smem_scores[T::kWarps][32];
    extern __shared__ __align__(16) float merge_o[];  // [kMaxSplits][kHeads][kD], then the log2-sum-exps
    float* const merge_lse2 = merge_o + T::kMaxSplits * kHeads * kD;  // [kMaxSplits][kHeads]
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ uint64_t merge_bar;
#endif

    const int split = blockIdx.x, unit = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int row_warp = warp % T::kRowWarps, half = warp / T::kRowWarps;

    programmatic_launch::allow_next_kernel();
    if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // the first block's barrier is ready before any block pushes to it (as in flash_decode_kernel.cuh)
        if (split == 0 && tid == 0) {
            mbarrier::init(&merge_bar, 1);
            mbarrier::fence_init_for_cluster();
        }
        __syncwarp();
        mbarrier::cluster_arrive_relaxed();
#else
        __trap();  // launched only on sm_90+ (uses_cluster_merge)
#endif
    }
    programmatic_launch::wait_for_previous_kernel();

    // the unit: (sequence, KV head, head group), by the host's FastDivisors
    auto divide = [](unsigned n, unsigned magic, unsigned shift) { return (__umulhi(n, magic) + n) >> shift; };
    // (a compile-time group is one block's, head_groups 1: the unit is the (sequence, KV head), with no division; one
    // multiply-high less on the way to the first load, and two fewer parameters: S = 256 6.18 -> 6.10 us, H200)
    static_assert(kGroup <= kHeadsPerBlock, "a compile-time group fits one block");
    const unsigned sequence_head = kGroup != 0 ? unit : divide(unit, p.head_groups_magic, p.divisor_shifts & 0xff);
    const int head_group = kGroup != 0 ? 0 : unit - sequence_head * p.head_groups;
    const int b = divide(sequence_head, p.unit_heads_magic, p.divisor_shifts >> 8);
    const int kv_head = sequence_head - b * p.kv_heads;
    const int g_begin = head_group * kHeads;
    const int group_size = kGroup != 0 ? kGroup : p.group_size;
    const int g_count = kGroup != 0 ? kGroup : min(kHeads, group_size - g_begin);
    const int q_head0 = kv_head * group_size + g_begin;

    // Every load goes out before the length is known (rows clamp to the capacity, which is at least 1: launch).
    const int row0 = split * T::kRows + 8 * row_warp, last_row = p.seq_capacity - 1;
    const char* k_base = reinterpret_cast<const char*>(p.k) +
                         (b * p.k_batch_stride + (int64_t)kv_head * p.k_head_stride + kHalf * half + 8 * t) * sizeof(Element);
    const char* v_base = reinterpret_cast<const char*>(p.v) +
                         (b * p.v_batch_stride + (int64_t)kv_head * p.v_head_stride + kHalf * half + 8 * g) * sizeof(Element);
    const uint32_t k_row_bytes = (uint32_t)(p.k_seq_stride * sizeof(Element));  // (below 4 GB: launch)
    const uint32_t v_row_bytes = (uint32_t)(p.v_seq_stride * sizeof(Element));
    auto row_at = [](const char* base, int row, uint32_t row_bytes) { return base + (uint64_t)(uint32_t)row * row_bytes; };
    constexpr int kChunkBytes = 32 * sizeof(Element);
    const char* k_row = row_at(k_base, min(row0 + g, last_row), k_row_bytes);
    uint4 k_frag[2] = {element::load_stream_16B(k_row), element::load_stream_16B(k_row + kChunkBytes)};
    uint4 v_frag[2] = {element::load_stream_16B(row_at(v_base, min(row0 + 2 * t, last_row), v_row_bytes)),
                       element::load_stream_16B(row_at(v_base, min(row0 + 2 * t + 1, last_row), v_row_bytes))};
    // q's head g (lanes past the group load its last head again: their rows are never written)
    const char* q_ptr = reinterpret_cast<const char*>(p.q) +
                        (b * p.q_batch_stride + (int64_t)(q_head0 + min(g, g_count - 1)) * p.q_head_stride + kHalf * half +
                         8 * t) * sizeof(Element);
    const uint4 q_lo = __ldcg(reinterpret_cast<const uint4*>(q_ptr));
    const uint4 q_hi = __ldcg(reinterpret_cast<const uint4*>(q_ptr + kChunkBytes));
    const int seqlen = max(0, min(__ldg(p.seqlens + b), p.seq_capacity));

    auto final_row = [&](int h) {
        return reinterpret_cast<Element*>(p.out) + b * p.out_batch_stride + (int64_t)(q_head0 + h) * p.out_head_stride;
    };
    // ---- S over this warp's half, the pair's halves added ----
    const uint32_t q_frag[8] = {q_lo.x, q_lo.y, q_lo.z, q_lo.w, q_hi.x, q_hi.y, q_hi.z, q_hi.w};
    float c0[2] = {0.f, 0.f}, c1[2] = {0.f, 0.f};  // two chains of dependent mma
#pragma unroll
    for (int kk = 0; kk < kHalf / 16; ++kk)
        tensor_core::mma_16x8x16_top_rows<Element>(c0[kk % 2], c1[kk % 2], q_frag[2 * kk], q_frag[2 * kk + 1],
                                                   word(k_frag[kk / 2], 2 * (kk % 2)), word(k_frag[kk / 2], 2 * (kk % 2) + 1));
    float s0 = c0[0] + c0[1], s1 = c1[0] + c1[1];
    smem_scores[warp][lane] = make_float2(s0, s1);
    asm volatile("bar.sync %0, 64;" ::"r"(1 + row_warp) : "memory");  // (barrier 0 is __syncthreads')
    const float2 other = smem_scores[warp ^ T::kRowWarps][lane];
    s0 = (s0 + other.x) * p.scale_log2;
    s1 = (s1 + other.y) * p.scale_log2;
    const bool valid0 = row0 + 2 * t < seqlen, valid1 = row0 + 2 * t + 1 < seqlen;
    if (!valid0) s0 = -INFINITY;
    if (!valid1) s1 = -INFINITY;

    // ---- the tile's softmax and P V ----
    float m = fmaxf(s0, s1);
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    const float ref = safe_ref(m);
    const float p0 = exp2f(s0 - ref), p1 = exp2f(s1 - ref);
    float l = p0 + p1;
    if (!valid0) v_frag[0] = make_uint4(0u, 0u, 0u, 0u);
    if (!valid1) v_frag[1] = make_uint4(0u, 0u, 0u, 0u);
    const uint32_t a0 = tensor_core::pack2<Element>(p0, p1);
    uint32_t a0_lo = 0u;
    if constexpr (kSplitP) {
        const float2 hi = tensor_core::unpack2<Element>(a0);
        a0_lo = tensor_core::pack2<Element>(p0 - hi.x, p1 - hi.y);
    }
    float acc[8][2];  // n-tile n, column 2t + j: element kHalf * half + 8 (2t + j) + n of head g
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        acc[n][0] = acc[n][1] = 0.f;
        const uint32_t b0 = tensor_core::pair_halves(word(v_frag[0], n / 2), word(v_frag[1], n / 2), n % 2);
        if constexpr (kSplitP)
            tensor_core::mma_16x8x8_fold_rows<Element>(acc[n][0], acc[n][1], a0, a0_lo, b0);
        else
            tensor_core::mma_16x8x8_top_rows<Element>(acc[n][0], acc[n][1], a0, b0);
    }

    // ---- the warps' merge: each half's four warps ----
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (g < g_count) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int j = 0; j < 2; ++j) smem_acc[warp][g][8 * (2 * t + j) + n] = acc[n][j];
        if (t == 0) {
            smem_m[warp][g] = m;
            smem_l[warp][g] = l;
        }
    }
    // (The exits come only here, after the shared-memory stores: where they came right after the loads, ptxas sank the
    // cache loads below them, behind the length's round trip. A split past the length computed on zeroed V and
    // -inf scores, harmlessly.)
    const int active_splits = min(p.num_splits, (seqlen + T::kRows - 1) / T::kRows);  // 0 when the sequence is empty
    if (active_splits == 0) {
        // the attention of nothing is 0 (lse = -inf), like the reference
        if (split == 0) {
            const float zeros[4] = {0.f, 0.f, 0.f, 0.f};
            for (int i = tid; i < g_count * (kD / 2); i += T::kThreads)
                store_elements<Element, 2>(final_row(i / (kD / 2)) + 2 * (i % (kD / 2)), zeros);
            if (p.lse != nullptr && tid < g_count) p.lse[b * p.q_heads + q_head0 + tid] = -INFINITY;
        }
        return;
    }
    if (split >= active_splits) return;  // past the length: nobody waits for it
    __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    mbarrier::FirstBlockTargets first;
    if (kCluster && active_splits > 1) first = mbarrier::wait_for_first_block(merge_o, merge_lse2, &merge_bar);
#endif
#pragma unroll
    for (int it = 0; it < kPairs; ++it) {
        // element pair i % (kD / 2) of head i / (kD / 2) (unsigned: shifts and masks, no signed-division fix-ups)
        const unsigned i = tid + it * T::kThreads;
        if (kGroup == 0 && i >= (unsigned)g_count * (kD / 2)) break;  // (kGroup 4: each thread exactly one pair)
        const unsigned h = i / (kD / 2), d = 2 * (i % (kD / 2)), w0 = (d / kHalf) * T::kRowWarps, e = d % kHalf;
        float m_max = -INFINITY;
#pragma unroll
        for (int w = 0; w < T::kRowWarps; ++w) m_max = fmaxf(m_max, smem_m[w0 + w][h]);
        const float merge_ref = safe_ref(m_max);
        float sum = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};  // (the first two)
#pragma unroll
        for (int w = 0; w < T::kRowWarps; ++w) {
            const float c = exp2f(smem_m[w0 + w][h] - merge_ref);
            sum += smem_l[w0 + w][h] * c;
            o[0] += smem_acc[w0 + w][h][e] * c;
            o[1] += smem_acc[w0 + w][h][e + 1] * c;
        }
        // (an active split has a valid row in its first 8, which both halves' first warps hold: sum > 0)
        const float inv_sum = 1.f / sum;
        o[0] *= inv_sum;
        o[1] *= inv_sum;
        const float lse2 = merge_ref + log2f(sum);
        if (active_splits == 1) {
            store_elements<Element, 2>(final_row(h) + d, o);
            if (d == 0 && p.lse != nullptr) p.lse[b * p.q_heads + q_head0 + h] = natural_lse(lse2);
        } else if (split == 0) {
            merge_o[h * kD + d] = o[0];
            merge_o[h * kD + d + 1] = o[1];
            if (d == 0) merge_lse2[h] = lse2;
            // The slots past the active splits get zero weight and zero data (the same threads read them below, the
            // log2-sum-exps after the barrier), so that the merge reads all kMaxSplits slots without a branch or a
            // select a split: a branch a split there cost 0.17 us at batch 1 S = 256 in a probe (H200, 2026-11-29).
#pragma unroll
            for (int s = 1; s < T::kMaxSplits; ++s) {
                if (s >= active_splits) {
                    *reinterpret_cast<float2*>(merge_o + (s * kHeads + h) * kD + d) = make_float2(0.f, 0.f);
                    if (d == 0) merge_lse2[s * kHeads + h] = -INFINITY;
                }
            }
        } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            mbarrier::store_async_vec<2>(first.o + 4 * ((split * kHeads + h) * kD + d), o, first.bar);
            if (d == 0) mbarrier::store_async(first.lse + 4 * (split * kHeads + h), lse2, first.bar);
#endif
        }
    }
    if (active_splits == 1 || split != 0) return;

    // ---- the first block merges the splits ----
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // (the output addresses before the wait: off the path from the last push to the store)
    Element* out_at[kPairs];
#pragma unroll
    for (int it = 0; it < kPairs; ++it) {
        const unsigned i = tid + it * T::kThreads;
        out_at[it] = final_row(i / (kD / 2)) + 2 * (i % (kD / 2));
    }
    __syncthreads();  // this block's own partial result and the idle slots
    if (tid == 0)
        mbarrier::arrive_expect_bytes(&merge_bar, (active_splits - 1) * g_count * (kD + 1) * (int)sizeof(float));
    mbarrier::wait_for_cluster(&merge_bar, 0);
#pragma unroll
    for (int it = 0; it < kPairs; ++it) {
        const unsigned i = tid + it * T::kThreads;
        if (kGroup == 0 && i >= (unsigned)g_count * (kD / 2)) break;
        const unsigned h = i / (kD / 2), d = 2 * (i % (kD / 2));
        float m_max = -INFINITY;
#pragma unroll
        for (int s = 0; s < T::kMaxSplits; ++s) m_max = fmaxf(m_max, merge_lse2[s * kHeads + h]);  // (split 0's: finite)
        float sum = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int s = 0; s < T::kMaxSplits; ++s) {
            const float w = exp2f(merge_lse2[s * kHeads + h] - m_max);  // (0 for an idle slot)
            const float2 part = *reinterpret_cast<const float2*>(merge_o + (s * kHeads + h) * kD + d);
            sum += w;
            o[0] += w * part.x;
            o[1] += w * part.y;
        }
        const float inv_sum = 1.f / sum;
        o[0] *= inv_sum;
        o[1] *= inv_sum;
        store_elements<Element, 2>(out_at[it], o);
        if (d == 0 && p.lse != nullptr) p.lse[b * p.q_heads + q_head0 + h] = natural_lse(m_max + log2f(sum));
    }
#endif
}

// The launched kernels: one split, and 2 to kMaxSplits merged in a cluster, the latter declared for cluster launches
// only (CLUSTER_LAUNCHES_ONLY, mbarrier.cuh: no run-time test for a cluster, and one constant line less).
template <typename Element, int kGroup>
__global__ void __launch_bounds__(ShortTraits::kThreads, 1)
    flash_decode_short_kernel(const __grid_constant__ ShortParams p) {
    short_block<Element, false, kGroup>(p);
}

template <typename Element, int kGroup>
__global__ void CLUSTER_LAUNCHES_ONLY __launch_bounds__(ShortTraits::kThreads, 1)
    flash_decode_short_cluster_kernel(const __grid_constant__ ShortParams p) {
    short_block<Element, true, kGroup>(p);
}

}  // namespace flash_decode
