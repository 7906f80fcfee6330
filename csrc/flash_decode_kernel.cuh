// The flash-decode kernel: one thread block per (split of the sequence, sequence, KV head, head group).
//
// Algorithm (reference: llama3.decode_attention_reference, which computes the same thing in PyTorch):
//   1. The block's rows [start, end) of the KV cache are streamed once from device memory. Each 16-byte
//      load brings 8 elements of one row; `kLanesPerRow` lanes together hold a whole row, so one warp
//      load instruction covers `kRowsPerLoad` rows, each a contiguous, fully used 128/256-byte segment.
//   2. Every query head of the GQA group is dotted with each K row while the row is in registers, so a KV
//      byte is read from memory once per step, not once per query head.
//   3. Online softmax in the log2 domain (q is pre-scaled by scale*log2(e)): each lane group keeps a
//      running max m, sum l and weighted V sum acc for the rows it saw; the groups of a warp, then the
//      warps of the block, are merged with exp2(m_i - m) weights at the end.
//   4. With one split, the block writes the normalized output. Otherwise it writes its partial output and
//      its log-sum-exp to a float32 workspace; the last block of the (sequence, KV head) to finish (an
//      atomic ticket after a memory fence) merges all splits with log-sum-exp weights, so no second
//      kernel launch is needed, and resets the ticket counter for the next launch.
//   The split size is computed on the device from the actual length, so a CUDA graph captured once serves
//   every step: short sequences use fewer, fuller splits, and splits past the end return at once.
//
// Latency hiding: the next tile's K and V loads are issued before the current tile is used (register
// double buffering), so every warp always has 8 x 16 bytes per lane in flight. A 4-stage cp.async
// pipeline through shared memory was tried on the H100 (2026-11-26): no faster at long lengths and up to
// 15% slower at 16K rows, so the simpler register double buffer stays.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "element_convert.cuh"
#include "flash_decode.h"
#include "programmatic_launch.cuh"

namespace flash_decode {

template <typename Element, int kHeadDim, int kGroupTile>
struct KernelTraits {
    static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim must be 64 or 128");
    static constexpr int kThreads = 128;
    static constexpr int kWarps = kThreads / 32;
    static constexpr int kElemsPerLoad = 16 / sizeof(Element);          // 8
    static constexpr int kLanesPerRow = kHeadDim / kElemsPerLoad;       // 8 or 16
    static constexpr int kRowsPerLoad = 32 / kLanesPerRow;              // 4 or 2
    // K loads (and as many V loads) per lane per tile; a group of 8 heads keeps 8 x 8 scores and
    // weights live per tile, so it streams shallower tiles to stay within 255 registers without spills.
    static constexpr int kLoadsPerTile = kGroupTile <= 4 ? 4 : 2;
    static constexpr int kRowsPerWarpTile = kRowsPerLoad * kLoadsPerTile;
    static constexpr int kRowsPerBlockTile = kRowsPerWarpTile * kWarps;  // head 64: 64 (32 for 8 heads); head 128: 32 (16)
};

// ---------------------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------------------

using element::load_stream_16B;
using element::unpack8;
using element::from_float;

// Elements past the valid rows must never produce NaN: exp2(-inf - -inf) would. When nothing was seen
// yet (m == -inf) the reference point is 0, which makes every weight exp2(-inf) = 0.
__device__ __forceinline__ float safe_ref(float m) { return m == -INFINITY ? 0.f : m; }

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Rows of one split, decided on the device from the sequence's actual length so a captured CUDA graph
// adapts to the growing length: as many splits as needed, each a whole number of block tiles.
template <int kRowsPerBlockTile>
__device__ __forceinline__ int split_rows(int seqlen, int num_splits) {
    const int rows = ceil_div(ceil_div(seqlen, num_splits), kRowsPerBlockTile) * kRowsPerBlockTile;
    return rows;
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------

// kEarlyReads: Params::early_cache_reads (a separate instance, so that the plain launch's code, which
// benchmark_kernel.py times cold, stays as short as it was: the early path's extra code cost ~0.8 us there).
template <typename Element, int kHeadDim, int kGroupTile, bool kEarlyReads>
__global__ void __launch_bounds__(128) flash_decode_kernel(const Params p) {
    using Traits = KernelTraits<Element, kHeadDim, kGroupTile>;
    constexpr int kLanesPerRow = Traits::kLanesPerRow;
    constexpr int kRowsPerLoad = Traits::kRowsPerLoad;
    constexpr int kLoads = Traits::kLoadsPerTile;
    constexpr int kWarps = Traits::kWarps;
    constexpr int kThreads = Traits::kThreads;
    constexpr int kRowsPerBlockTile = Traits::kRowsPerBlockTile;

    __shared__ float smem_acc[kWarps][kGroupTile][kHeadDim];
    __shared__ float smem_m[kWarps][kGroupTile];
    __shared__ float smem_l[kWarps][kGroupTile];
    __shared__ float smem_split_w[kGroupTile][kMaxSplits];
    __shared__ float smem_lse2[kGroupTile];
    __shared__ int smem_is_last;

    programmatic_launch::allow_next_kernel();
    // Plain launches read nothing before the wait; see below for early_cache_reads.
    if constexpr (!kEarlyReads) programmatic_launch::wait_for_previous_kernel();

    const int split = blockIdx.x;
    int idx = blockIdx.y;
    const int head_group = idx % p.head_groups;
    idx /= p.head_groups;
    const int kv_head = idx % p.kv_heads;
    const int b = idx / p.kv_heads;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row_in_load = lane / kLanesPerRow;
    const int col = (lane % kLanesPerRow) * 8;

    // This block's query heads: group_size heads share kv_head; the block takes kGroupTile of them.
    const int g_begin = head_group * kGroupTile;
    const int g_count = min(kGroupTile, p.group_size - g_begin);
    const int q_head0 = kv_head * p.group_size + g_begin;

    // The block's rows [start, end) follow from the sequence's length.
    int seqlen = -1, active_splits = 0, start = 0, end = 0;
    auto set_rows = [&](int length) {
        seqlen = max(0, min(length, p.seq_capacity));
        const int rows_per_split = split_rows<kRowsPerBlockTile>(max(seqlen, 1), p.num_splits);
        active_splits = ceil_div(seqlen, rows_per_split);  // 0 when the sequence is empty
        start = split * rows_per_split;
        end = min(seqlen, start + rows_per_split);
    };

    const char* k_base = reinterpret_cast<const char*>(p.k) +
                         (b * p.k_batch_stride + (int64_t)kv_head * p.k_head_stride + col) * sizeof(Element);
    const char* v_base = reinterpret_cast<const char*>(p.v) +
                         (b * p.v_batch_stride + (int64_t)kv_head * p.v_head_stride + col) * sizeof(Element);
    const int64_t k_row_bytes = p.k_seq_stride * sizeof(Element);
    const int64_t v_row_bytes = p.v_seq_stride * sizeof(Element);

    // Row of load i of the tile starting at `tile`; rows past `end` re-read the last valid row (a
    // finite value, never memory past the sequence) and are masked out of the softmax.
    auto tile_row = [&](int tile, int i) { return tile + warp * Traits::kRowsPerWarpTile + i * kRowsPerLoad + row_in_load; };
    auto load_tile = [&](int tile, uint4 (&kr)[kLoads], uint4 (&vr)[kLoads]) {
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
            const int row = min(tile_row(tile, i), end - 1);
            kr[i] = load_stream_16B(k_base + row * k_row_bytes);
            vr[i] = load_stream_16B(v_base + row * v_row_bytes);
        }
    };
    uint4 k_next[kLoads], v_next[kLoads];

    // q, and at least the newest cache row, come from the kernels just before (programmatic_launch.cuh).
    // With early_cache_reads the caller promises that those kernels write no other cache row and no
    // length, so the block reads its length and issues its first tile's loads before waiting: at short
    // lengths that tile is all the block reads, and its memory latency hides under the previous kernel.
    // After the wait the length is read again (a different value means start over) and the newest row
    // is loaded again through L2, where the previous kernel's write is now visible.
    bool first_tile_loaded = false;
    if constexpr (kEarlyReads) {
        set_rows(__ldg(p.seqlens + b));
        if (start < end) {
            load_tile(start, k_next, v_next);
            first_tile_loaded = true;
        }
        programmatic_launch::wait_for_previous_kernel();
        const int early_seqlen = seqlen;
        set_rows(__ldcg(p.seqlens + b));  // through L2, not the early read's L1 copy
        if (first_tile_loaded && seqlen != early_seqlen) first_tile_loaded = false;
        if (first_tile_loaded) {
#pragma unroll
            for (int i = 0; i < kLoads; ++i) {
                const int row = min(tile_row(start, i), end - 1);
                if (row == seqlen - 1) {
                    k_next[i] = __ldcg(reinterpret_cast<const uint4*>(k_base + row * k_row_bytes));
                    v_next[i] = __ldcg(reinterpret_cast<const uint4*>(v_base + row * v_row_bytes));
                }
            }
        }
    } else {
        set_rows(__ldg(p.seqlens + b));
    }

    auto write_final = [&](int g, int d, float value) {
        Element* out = reinterpret_cast<Element*>(p.out) + b * p.out_batch_stride +
                       (int64_t)(q_head0 + g) * p.out_head_stride;
        out[d] = from_float<Element>(value);
    };

    if (active_splits <= 1 && split > 0) return;  // nothing to do and nobody to report to
    if (active_splits == 0) {
        // Empty sequence: the attention of nothing is defined as 0 (lse = -inf), like the reference.
        for (int i = threadIdx.x; i < g_count * kHeadDim; i += kThreads) write_final(i / kHeadDim, i % kHeadDim, 0.f);
        if (p.lse != nullptr && threadIdx.x < g_count) p.lse[b * p.q_heads + q_head0 + threadIdx.x] = -INFINITY;
        return;
    }

    if (start < end) {
        // ---- q, pre-scaled into the log2 domain; heads past the group are zero and never stored ----
        float q[kGroupTile][8];
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
            if (g < g_count) {
                const Element* q_ptr = reinterpret_cast<const Element*>(p.q) + b * p.q_batch_stride +
                                       (int64_t)(q_head0 + g) * p.q_head_stride + col;
                unpack8<Element>(*reinterpret_cast<const uint4*>(q_ptr), q[g]);
#pragma unroll
                for (int e = 0; e < 8; ++e) q[g][e] *= p.scale_log2;
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) q[g][e] = 0.f;
            }
        }

        float m[kGroupTile], l[kGroupTile], acc[kGroupTile][8];
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
            m[g] = -INFINITY;
            l[g] = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
        }

        if (!first_tile_loaded) load_tile(start, k_next, v_next);
        for (int tile = start; tile < end; tile += kRowsPerBlockTile) {
            uint4 k_cur[kLoads], v_cur[kLoads];
#pragma unroll
            for (int i = 0; i < kLoads; ++i) { k_cur[i] = k_next[i]; v_cur[i] = v_next[i]; }
            if (tile + kRowsPerBlockTile < end) load_tile(tile + kRowsPerBlockTile, k_next, v_next);

            // scores s[i][g] = q_g . k_row(i), reduced over the lanes that hold the row
            float s[kLoads][kGroupTile];
#pragma unroll
            for (int i = 0; i < kLoads; ++i) {
                float kf[8];
                unpack8<Element>(k_cur[i], kf);
#pragma unroll
                for (int g = 0; g < kGroupTile; ++g) {
                    float dot = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) dot = fmaf(q[g][e], kf[e], dot);
                    s[i][g] = dot;
                }
            }
#pragma unroll
            for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
#pragma unroll
                for (int i = 0; i < kLoads; ++i)
#pragma unroll
                    for (int g = 0; g < kGroupTile; ++g) s[i][g] += __shfl_xor_sync(0xffffffffu, s[i][g], offset);
            }
#pragma unroll
            for (int i = 0; i < kLoads; ++i)
                if (tile_row(tile, i) >= end)
#pragma unroll
                    for (int g = 0; g < kGroupTile; ++g) s[i][g] = -INFINITY;

            // online softmax: one rescale of acc per tile, not per row
            float pw[kLoads][kGroupTile];
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) {
                float m_new = m[g];
#pragma unroll
                for (int i = 0; i < kLoads; ++i) m_new = fmaxf(m_new, s[i][g]);
                const float ref = safe_ref(m_new);
                const float correction = exp2f(m[g] - ref);
                m[g] = m_new;
                float row_sum = 0.f;
#pragma unroll
                for (int i = 0; i < kLoads; ++i) {
                    pw[i][g] = exp2f(s[i][g] - ref);
                    row_sum += pw[i][g];
                }
                l[g] = l[g] * correction + row_sum;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] *= correction;
            }
#pragma unroll
            for (int i = 0; i < kLoads; ++i) {
                float vf[8];
                unpack8<Element>(v_cur[i], vf);
#pragma unroll
                for (int g = 0; g < kGroupTile; ++g)
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pw[i][g], vf[e], acc[g][e]);
            }
        }

        // ---- merge the row groups of the warp (lanes with the same columns) ----
#pragma unroll
        for (int offset = kLanesPerRow; offset < 32; offset *= 2) {
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) {
                const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
                const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
                const float m_new = fmaxf(m[g], m_other);
                const float ref = safe_ref(m_new);
                const float c_self = exp2f(m[g] - ref), c_other = exp2f(m_other - ref);
                m[g] = m_new;
                l[g] = l[g] * c_self + l_other * c_other;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const float a_other = __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
                    acc[g][e] = acc[g][e] * c_self + a_other * c_other;
                }
            }
        }
        if (row_in_load == 0) {
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
                for (int e = 0; e < 8; ++e) smem_acc[warp][g][col + e] = acc[g][e];
                if (lane == 0) {
                    smem_m[warp][g] = m[g];
                    smem_l[warp][g] = l[g];
                }
            }
        }
        __syncthreads();

        // ---- merge the warps; write the output (one split) or this split's partial result ----
        for (int i = threadIdx.x; i < g_count * kHeadDim; i += kThreads) {
            const int g = i / kHeadDim, d = i % kHeadDim;
            float m_max = -INFINITY;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, smem_m[w][g]);
            const float ref = safe_ref(m_max);
            float sum = 0.f, o = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float c = exp2f(smem_m[w][g] - ref);
                sum += smem_l[w][g] * c;
                o += smem_acc[w][g][d] * c;
            }
            o /= sum;
            const float lse2 = m_max + log2f(sum);
            if (active_splits == 1) {
                write_final(g, d, o);
                if (d == 0 && p.lse != nullptr) p.lse[b * p.q_heads + q_head0 + g] = lse2 * 0.69314718055994531f;
            } else {
                const int64_t row = ((int64_t)b * p.q_heads + q_head0 + g) * p.num_splits + split;
                p.partial_out[row * kHeadDim + d] = o;
                if (d == 0) p.partial_lse[row] = lse2;
            }
        }
    }
    if (active_splits == 1) return;

    // ---- the last split to finish merges all of them ----
    __threadfence();  // publish this block's partial results before taking a ticket
    __syncthreads();
    int* counter = p.split_counters + blockIdx.y;
    if (threadIdx.x == 0) {
        const int ticket = atomicAdd(counter, 1);
        smem_is_last = (ticket == p.num_splits - 1);
    }
    __syncthreads();
    if (!smem_is_last) return;
    __threadfence();  // see the other blocks' partial results (read through L2 below, never stale L1)
    if (threadIdx.x == 0) *counter = 0;  // ready for the next launch; every block of this launch has arrived

    const int64_t head_row0 = ((int64_t)b * p.q_heads + q_head0) * p.num_splits;
    for (int i = threadIdx.x; i < g_count * active_splits; i += kThreads) {
        const int g = i / active_splits, s = i % active_splits;
        smem_split_w[g][s] = __ldcg(p.partial_lse + head_row0 + g * p.num_splits + s);
    }
    __syncthreads();
    // One warp per head turns log-sum-exps into normalized weights.
    for (int g = warp; g < g_count; g += kWarps) {
        float m_max = -INFINITY;
        for (int s = lane; s < active_splits; s += 32) m_max = fmaxf(m_max, smem_split_w[g][s]);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, offset));
        float sum = 0.f;
        for (int s = lane; s < active_splits; s += 32) {
            const float w = exp2f(smem_split_w[g][s] - m_max);
            smem_split_w[g][s] = w;
            sum += w;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        __syncwarp();
        const float inv_sum = 1.f / sum;
        for (int s = lane; s < active_splits; s += 32) smem_split_w[g][s] *= inv_sum;
        if (lane == 0) {
            smem_lse2[g] = m_max + log2f(sum);
        }
    }
    __syncthreads();

    constexpr int kVecPerHead = kHeadDim / 4;
    for (int i = threadIdx.x; i < g_count * kVecPerHead; i += kThreads) {
        const int g = i / kVecPerHead, c = (i % kVecPerHead) * 4;
        const float4* src = reinterpret_cast<const float4*>(p.partial_out + (head_row0 + g * p.num_splits) * kHeadDim + c);
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = 0; s < active_splits; ++s) {
            const float4 part = __ldcg(src + s * (kHeadDim / 4));
            const float w = smem_split_w[g][s];
            o.x = fmaf(w, part.x, o.x);
            o.y = fmaf(w, part.y, o.y);
            o.z = fmaf(w, part.z, o.z);
            o.w = fmaf(w, part.w, o.w);
        }
        write_final(g, c, o.x);
        write_final(g, c + 1, o.y);
        write_final(g, c + 2, o.z);
        write_final(g, c + 3, o.w);
    }
    if (p.lse != nullptr && threadIdx.x < g_count) {
        p.lse[b * p.q_heads + q_head0 + threadIdx.x] = smem_lse2[threadIdx.x] * 0.69314718055994531f;
    }
}

}  // namespace flash_decode
