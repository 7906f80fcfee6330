// Small-batch GEMV for the decode step (see gemv.h for what it computes).
//
// 1 to 4 rows (CUDA cores; 5 to 16 rows use tensor cores, further down): a warp owns one weight row (one
// output; with silu_mul the gate and the up row of one output; with the RoPE epilogue rows d and d + D/2
// of a head), its lanes walk the row in 16-byte pieces (lane l takes pieces l, l + 32, ...), and dot each
// with the matching piece of every x row; a warp shuffle sums the lanes at the end. Long rows without a
// fused prologue or epilogue (down_proj) are cut into 2 or 4 parts, one warp each, summed through shared
// memory (Params::split_k). x (and the RMSNorm weight) is staged in shared
// memory once per block, so the only device-memory stream is the weights, read once. Before the prologue
// touches x, each warp already issues its first 8 pieces (a whole 2048-wide row, or half of two): weight loads
// depend on no earlier kernel, so they are issued even before the previous kernel has finished
// (programmatic_launch.cuh), and the residual add + RMSNorm of the prologue hides under their latency.
// One row per warp rather than more: at batch 1 the small projections (8-13 MB) are latency-bound, and a
// row per warp puts twice as many bytes in flight at once (measured on an H100: o_proj 7.0 us with two).
// Rounding follows the PyTorch code it replaces (llama3.py): fp32 accumulation rounded once to the model
// dtype, like cuBLAS; the prologue rounds where RMSNorm.forward does (as fused_ops' add_rmsnorm); silu_mul
// rounds gate, up and silu(gate) to the model dtype first, like F.silu(gate) * up on the linear's output;
// the RoPE epilogue rounds like fused_ops' rope_kv_write on the rounded projection.
// Reference: llama3.gemv_reference (then llama3.apply_rope for the RoPE epilogue).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "element_convert.cuh"
#include "gemv.h"
#include "programmatic_launch.cuh"
#include "rounded_ops.cuh"
#include "tensor_core.cuh"

namespace gemv {
namespace {

using element::from_float;
using element::load_stream_16B;
using element::round_to;
using element::to_float;
using element::unpack8;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPiecesInFlight = 8;  // 16-byte weight pieces per lane in flight, over the warp's rows


// What a warp does with its dot products.
enum class Epilogue { kStore, kSiluMul, kRopeKv };

// Blocks per SM the registers must allow: room for the next kernel's blocks to start streaming their
// weights while this one runs (programmatic_launch.cuh). On sm_90 the one-row RoPE variant fits 64
// registers too, so all 192 blocks of Llama-3.2-1B's qkv projection are resident beside down_proj's and have
// their weights in flight before down_proj ends (+0.5% tokens/s at batch 1 on an H100, 2026-11-26); more x
// rows, RoPE with two, or RoPE on sm_80 (no early start there anyway) need more (64 would spill).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kRopeFits64Registers = false;
#else
constexpr bool kRopeFits64Registers = true;
#endif
template <int kRows, Epilogue kEpilogue>
constexpr int kMinBlocksPerSm =
    kEpilogue == Epilogue::kRopeKv ? (kRows == 1 && kRopeFits64Registers ? 4 : 2) : (kRows <= 2 ? 4 : 2);

// Variants that may split k between warps (Params::split_k).
template <bool kNorm, Epilogue kEpilogue>
constexpr bool kSplitK = !kNorm && kEpilogue == Epilogue::kStore;

template <typename T, int kRows, bool kNorm, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<kRows, kEpilogue>)
    gemv_kernel(const __grid_constant__ Params p) {
    extern __shared__ uint4 smem[];  // x: [kRows, k] as 16-byte pieces
    __shared__ float warp_sums[kWarps][kRows];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int k = p.k, pieces = k / 8;
    const T* weight = static_cast<const T*>(p.weight);

    // This warp's weight rows: one; or the gate and up rows of one output; or, for RoPE, rows d and
    // d + head_dim / 2 of one head (the pair that rotates together).
    constexpr bool kSiluMul = kEpilogue == Epilogue::kSiluMul;
    constexpr bool kRope = kEpilogue == Epilogue::kRopeKv;
    constexpr int kWarpRows = kEpilogue == Epilogue::kStore ? 1 : 2;
    constexpr int kUnroll = kPiecesInFlight / kWarpRows;
    // The output (pair) this warp computes, and which of its split_k consecutive parts of k (split_k warps
    // of the block share an output; only the plain variant: the others are at the 64-register bound).
    const int split_k = kSplitK<kNorm, kEpilogue> ? p.split_k : 1;
    const int task = (blockIdx.x * kWarps + warp) / split_k;
    const int part_pieces = pieces / split_k;  // (the host makes it a whole number)
    const int piece0 = (warp % split_k) * part_pieces;
    const int half = kRope ? p.head_dim / 2 : 1;
    const int rope_head = task / half, rope_d = task % half;
    const bool valid = task < (kRope ? p.n_out / 2 : p.n_out);
    const T* wrow[kWarpRows];
    if constexpr (kRope) {
        wrow[0] = weight + ((int64_t)rope_head * p.head_dim + rope_d) * k;
        wrow[1] = wrow[0] + (int64_t)half * k;
    } else {
        wrow[0] = weight + (int64_t)task * k;
        if constexpr (kSiluMul) wrow[kWarpRows - 1] = weight + (int64_t)(task + p.n_out) * k;
    }

    // The first kernel of a decode step (x_rows: it gathers the step's tokens) lets the next kernel start only
    // once it has passed its own wait, i.e. once the previous step has completed: the kernels of a step read their
    // lengths and older cache rows before their waits (programmatic_launch.cuh), and would otherwise run ahead into
    // what the previous step's sampler has not yet written. It still streams its own weights early.
    const bool starts_step = kNorm && p.x_rows != nullptr;
    if (!starts_step) programmatic_launch::allow_next_kernel();
    uint4 wv[kWarpRows][kUnroll];
    auto load_batch = [&](int base) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int piece = base + u * 32 + lane;
#pragma unroll
            for (int j = 0; j < kWarpRows; ++j)
                wv[j][u] = valid && piece < part_pieces ? load_stream_16B(wrow[j] + (piece0 + piece) * 8)
                                                        : make_uint4(0, 0, 0, 0);
        }
    };
    load_batch(0);
    // The RMSNorm weight depends on no earlier kernel either: copied into shared memory now (cp.async, no
    // registers), it is not a dependent round trip between the prologue's two barriers (-15 us a batch-1 step on
    // an H100). Through L1 (.ca): every block reads these same bytes at the same moment, and L2-only loads of one
    // hot line from ~500 blocks queue at its L2 slice (gate_up's norm weight read into registers through
    // L1::no_allocate cost +30 us a step).
    uint4* norm_staged = smem + kRows * pieces;  // [pieces] after x (shared_bytes)
    if constexpr (kNorm) {
        const T* norm_weight = static_cast<const T*>(p.norm_weight);
        for (int i = threadIdx.x; i < pieces; i += kThreads) {
            const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(norm_staged + i));
            asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(norm_weight + i * 8) : "memory");
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    programmatic_launch::wait_for_previous_kernel();  // x and residual come from the previous kernel
    if (starts_step) programmatic_launch::allow_next_kernel();

    // Prologue: x, or rmsnorm(x + residual) * norm_weight, into shared memory (16-byte pieces).
    const T* x = static_cast<const T*>(p.x);
    if constexpr (!kNorm) {
#pragma unroll 2  // the weight pieces in flight already hold 32 registers
        for (int i = threadIdx.x; i < kRows * pieces; i += kThreads)
            smem[i] = *reinterpret_cast<const uint4*>(x + (int64_t)i * 8);
        __syncthreads();
    } else {
        const T* residual = static_cast<const T*>(p.residual);
        T* residual_out = blockIdx.x == 0 ? static_cast<T*>(p.residual_out) : nullptr;
        float sum_sq[kRows] = {};
        if (p.x_rows != nullptr && threadIdx.x < kRows && (uint64_t)p.x_rows[threadIdx.x] >= (uint64_t)p.x_table_rows)
            __trap();  // a token id outside the embedding table
        for (int i = threadIdx.x; i < kRows * pieces; i += kThreads) {
            const int r = i / pieces;
            int64_t source = i;  // in 16-byte pieces
            if (p.x_rows != nullptr) {  // the embedding lookup of the step's tokens, folded in
                source = p.x_rows[r] * pieces + i % pieces;
            }
            uint4 hv = *reinterpret_cast<const uint4*>(x + source * 8);
            if (residual != nullptr) {
                const uint4 rv = *reinterpret_cast<const uint4*>(residual + (int64_t)i * 8);
                T* he = reinterpret_cast<T*>(&hv);
                const T* re = reinterpret_cast<const T*>(&rv);
#pragma unroll
                for (int e = 0; e < 8; ++e) he[e] = from_float<T>(to_float(he[e]) + to_float(re[e]));
            }
            if (residual_out != nullptr) *reinterpret_cast<uint4*>(residual_out + (int64_t)i * 8) = hv;
            float h[8];
            unpack8<T>(hv, h);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s += h[e] * h[e];
#pragma unroll
            for (int r2 = 0; r2 < kRows; ++r2) sum_sq[r2] += r2 == r ? s : 0.f;
            smem[i] = hv;
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            float v = sum_sq[r];
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
            if (lane == 0) warp_sums[warp][r] = v;
        }
        asm volatile("cp.async.wait_all;" ::: "memory");  // this thread's norm weight copies; the barrier: all
        __syncthreads();
        float inv_rms[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) total += warp_sums[w][r];
            inv_rms[r] = rounded::inverse_rms(total, k, p.eps);
        }
        for (int i = threadIdx.x; i < kRows * pieces; i += kThreads) {
            const int r = i / pieces;
            float rms = inv_rms[0];
#pragma unroll
            for (int r2 = 1; r2 < kRows; ++r2) rms = r2 == r ? inv_rms[r2] : rms;
            float h[8], g[8];
            unpack8<T>(smem[i], h);
            unpack8<T>(norm_staged[i % pieces], g);
            uint4 ov;
            T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
            for (int e = 0; e < 8; ++e) oe[e] = rounded::rms_normalize<T>(h[e], g[e], rms);
            smem[i] = ov;  // each thread rewrites only the pieces it read
        }
        __syncthreads();
    }

    // Main loop: dot products of the warp's weight rows with every x row.
    float acc[kWarpRows][kRows] = {};
    for (int base = 0; base < part_pieces; base += 32 * kUnroll) {
        if (base > 0) load_batch(base);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int piece = base + u * 32 + lane;
            if (piece >= part_pieces) break;
            float wf[kWarpRows][8];
#pragma unroll
            for (int j = 0; j < kWarpRows; ++j) unpack8<T>(wv[j][u], wf[j]);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                float xf[8];
                unpack8<T>(smem[r * pieces + piece0 + piece], xf);
#pragma unroll
                for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[j][r] = fmaf(wf[j][e], xf[e], acc[j][r]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2)
                acc[j][r] += __shfl_xor_sync(0xffffffffu, acc[j][r], offset);
    if (split_k > 1) {  // the first warp of each output adds the others' parts, in a fixed order
        __shared__ float part_sums[kWarps][kWarpRows][kRows];
        if (lane == 0) {
#pragma unroll
            for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
                for (int r = 0; r < kRows; ++r) part_sums[warp][j][r] = acc[j][r];
        }
        __syncthreads();
        if (warp % split_k != 0) return;
#pragma unroll
        for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                float sum = 0.f;
                for (int q = 0; q < split_k; ++q) sum += part_sums[warp + q][j][r];
                acc[j][r] = sum;
            }
    }

    if (lane != 0 || !valid) return;
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        if constexpr (kRope) {  // fused_ops' rope_kv_write_kernel, on the rounded projection outputs
            const float x1 = round_to<T>(acc[0][r]), x2 = round_to<T>(acc[1][r]);
            const int64_t pos = p.positions[r];
            if (pos < 0 || pos >= p.max_seq) __trap();  // never write another sequence's rows
            const int64_t cache_row = ((int64_t)r * p.max_seq + pos) * p.kv_heads * p.head_dim;
            const int d = rope_d, h = rope_head;
            T* dst;
            float out1 = x1, out2 = x2;
            if (h < p.q_heads + p.kv_heads) {
                const T* cos_row = static_cast<const T*>(p.cos) + pos * p.head_dim;
                const T* sin_row = static_cast<const T*>(p.sin) + pos * p.head_dim;
                rounded::rope_pair(x1, x2, cos_row, sin_row, d, half, out1, out2);
                dst = h < p.q_heads ? out + ((int64_t)r * p.q_heads + h) * p.head_dim
                                    : static_cast<T*>(p.k_cache) + cache_row + (int64_t)(h - p.q_heads) * p.head_dim;
            } else {
                dst = static_cast<T*>(p.v_cache) + cache_row + (int64_t)(h - p.q_heads - p.kv_heads) * p.head_dim;
            }
            dst[d] = from_float<T>(out1);
            dst[d + half] = from_float<T>(out2);
        } else if constexpr (kSiluMul) {
            const float g = round_to<T>(acc[0][r]);
            const float u = round_to<T>(acc[kWarpRows - 1][r]);
            out[(int64_t)r * p.n_out + task] = rounded::silu_mul<T>(g, u);
        } else {
            out[(int64_t)r * p.n_out + task] = from_float<T>(acc[0][r]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 5 to 16 rows: tensor cores. Four x rows per 16-byte weight piece already make the CUDA-core loop
// issue-bound (lm_head at 4 rows: 280 us against 168 at one row), so past 4 rows the dot products go through
// mma.m16n8k16 (x as the 16-row A operand, zero-padded; eight weight rows as B), which costs two
// instructions per 512 bytes of weights whatever the row count.
// A block owns 8 weight rows (with silu_mul: 8 gate rows and the 8 matching up rows); its 8 warps split k
// into 32-wide chunks (chunk c to warp c % 8) and meet in shared memory at the end. In a chunk, lane
// (g = lane / 4, t = lane % 4) loads 16 bytes of weight row g at k offset 8t, and 16 bytes of x rows g and
// g + 8 at the same offset: k is permuted inside the chunk, the same way for x and W, so those registers are
// directly the mma's A and B fragments (a dot product does not care about the order of k).
constexpr int kMmaWarps = 8;


template <typename T, bool kSiluMul>
__global__ void __launch_bounds__(kMmaWarps * 32, 2) gemv_mma_kernel(const __grid_constant__ Params p) {
    constexpr int kTiles = kSiluMul ? 2 : 1;  // 8-row weight tiles: the outputs', or the gate's and the up's
    constexpr int kUnroll = 8 / kTiles;        // chunks in flight per warp
    __shared__ float partial[kMmaWarps][kTiles][32][4];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int k = p.k, chunks = k / 32, n0 = blockIdx.x * 8;
    const T* weight = static_cast<const T*>(p.weight);
    const int n = min(n0 + g, p.n_out - 1);  // rows past the end read the last row; never stored
    const T* wrow[kTiles];
    wrow[0] = weight + (int64_t)n * k + 8 * t;
    if constexpr (kSiluMul) wrow[kTiles - 1] = weight + (int64_t)(n + p.n_out) * k + 8 * t;
    const T* x = static_cast<const T*>(p.x);
    const bool lo_valid = g < p.rows, hi_valid = g + 8 < p.rows;
    const T* x_lo = x + (int64_t)g * k + 8 * t;
    const T* x_hi = x + (int64_t)(g + 8) * k + 8 * t;

    programmatic_launch::allow_next_kernel();
    uint4 w[kTiles][kUnroll];
    auto load_w = [&](int j0) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int c = warp + kMmaWarps * (j0 + u);
#pragma unroll
            for (int i = 0; i < kTiles; ++i)
                w[i][u] = c < chunks ? load_stream_16B(wrow[i] + c * 32) : make_uint4(0, 0, 0, 0);
        }
    };
    load_w(0);  // depends on no earlier kernel
    programmatic_launch::wait_for_previous_kernel();

    // No double buffering: kUnroll chunks per warp in flight, and 8 warps a block, 2 blocks an SM, overlap.
    float acc[kTiles][4] = {};
    for (int j0 = 0; warp + kMmaWarps * j0 < chunks; j0 += kUnroll) {
        if (j0 > 0) load_w(j0);
        uint4 xl[kUnroll], xh[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int c = warp + kMmaWarps * (j0 + u);
            xl[u] = lo_valid && c < chunks ? *reinterpret_cast<const uint4*>(x_lo + c * 32) : make_uint4(0, 0, 0, 0);
            xh[u] = hi_valid && c < chunks ? *reinterpret_cast<const uint4*>(x_hi + c * 32) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
            for (int i = 0; i < kTiles; ++i) {  // zero pieces past the end add nothing
                tensor_core::mma_16x8x16<T>(acc[i], xl[u].x, xh[u].x, xl[u].y, xh[u].y, w[i][u].x, w[i][u].y);
                tensor_core::mma_16x8x16<T>(acc[i], xl[u].z, xh[u].z, xl[u].w, xh[u].w, w[i][u].z, w[i][u].w);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) partial[warp][i][lane][e] = acc[i][e];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < kMmaWarps; ++w) sum += partial[w][i][lane][e];
            acc[i][e] = sum;
        }
    // Accumulator element e of lane (g, t): x row g (e < 2) or g + 8 (e >= 2), weight row n0 + 2t + e % 2.
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int row = e < 2 ? g : g + 8;
        const int col = n0 + 2 * t + e % 2;
        if (row >= p.rows || col >= p.n_out) continue;
        T y;
        if constexpr (kSiluMul)
            y = rounded::silu_mul<T>(round_to<T>(acc[0][e]), round_to<T>(acc[kTiles - 1][e]));
        else
            y = from_float<T>(acc[0][e]);
        out[(int64_t)row * p.n_out + col] = y;
    }
}

template <typename T>
cudaError_t launch_mma(const Params& p, cudaStream_t stream) {
    const int blocks = (p.n_out + 7) / 8;
    if (p.silu_mul)
        return programmatic_launch::launch(gemv_mma_kernel<T, true>, dim3(blocks), dim3(kMmaWarps * 32), 0, stream, p);
    return programmatic_launch::launch(gemv_mma_kernel<T, false>, dim3(blocks), dim3(kMmaWarps * 32), 0, stream, p);
}

template <typename T, int kRows, bool kNorm, Epilogue kEpilogue>
cudaError_t launch_variant(const Params& p, cudaStream_t stream) {
    const size_t smem = shared_bytes(kRows, p.k, kNorm);
    auto kernel = gemv_kernel<T, kRows, kNorm, kEpilogue>;
    if (smem > 48 * 1024) {  // above the default dynamic shared memory limit: opt in
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return err;
    }
    const int tasks = kEpilogue == Epilogue::kRopeKv ? p.n_out / 2 : p.n_out;
    // A warp streams its row in rounds of kPiecesInFlight 16-byte pieces per lane, one DRAM round trip
    // each; from 4 rounds on (down_proj of Llama-3.2-1B, k = 8192) 2 (from 8 on, 4) warps split k, so each
    // waits on fewer round trips and more bytes are in flight at once.
    const int rounds = (p.k / 8 + 32 * kPiecesInFlight - 1) / (32 * kPiecesInFlight);
    Params q = p;
    q.split_k = 1;
    while (kSplitK<kNorm, kEpilogue> && q.split_k < 4 && rounds >= 4 * q.split_k && (p.k / 8) % (2 * q.split_k) == 0)
        q.split_k *= 2;
    const int tasks_per_block = kWarps / q.split_k;
    const int blocks = (tasks + tasks_per_block - 1) / tasks_per_block;
    return programmatic_launch::launch(kernel, dim3(blocks), dim3(kThreads), smem, stream, q);
}

template <typename T, int kRows>
cudaError_t launch_rows(const Params& p, cudaStream_t stream) {
    const bool norm = p.norm_weight != nullptr;
    if (p.rope_kv) {  // the qkv projection: always after an RMSNorm
        if (!norm || p.silu_mul) return cudaErrorInvalidValue;
        return launch_variant<T, kRows, true, Epilogue::kRopeKv>(p, stream);
    }
    if (norm && p.silu_mul) return launch_variant<T, kRows, true, Epilogue::kSiluMul>(p, stream);
    if (norm) return launch_variant<T, kRows, true, Epilogue::kStore>(p, stream);
    if (p.silu_mul) return launch_variant<T, kRows, false, Epilogue::kSiluMul>(p, stream);
    return launch_variant<T, kRows, false, Epilogue::kStore>(p, stream);
}

template <typename T>
cudaError_t launch_typed(const Params& p, cudaStream_t stream) {
    if (p.rows > kMaxNormRows) {
        if (p.norm_weight != nullptr || p.rope_kv || p.k % 32 != 0) return cudaErrorInvalidValue;
        return launch_mma<T>(p, stream);
    }
    switch (p.rows) {
        case 1: return launch_rows<T, 1>(p, stream);
        case 2: return launch_rows<T, 2>(p, stream);
        case 3: return launch_rows<T, 3>(p, stream);
        case 4: return launch_rows<T, 4>(p, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

size_t shared_bytes(int rows, int k, bool norm) { return (size_t)(rows + (norm ? 1 : 0)) * k * 2; }  // 2-byte dtypes

cudaError_t launch(const Params& p, DType dtype, cudaStream_t stream) {
    if (p.rows == 0 || p.n_out == 0) return cudaSuccess;
    if (p.rows < 0 || p.rows > kMaxRows || p.k <= 0 || p.k % 8 != 0) return cudaErrorInvalidValue;
    return dtype == DType::kBFloat16 ? launch_typed<__nv_bfloat16>(p, stream) : launch_typed<__half>(p, stream);
}

}  // namespace gemv
