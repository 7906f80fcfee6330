// Fused decode-step kernels (see fused_ops.h for what each computes and why it exists).
// Rounding: every intermediate that PyTorch stores in the model dtype is rounded here too (round<T>).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "element_convert.cuh"
#include "fused_ops.h"
#include "programmatic_launch.cuh"
#include "rounded_ops.cuh"

namespace fused_ops {
namespace {

using element::from_float;
using element::round_to;
using element::to_float;


constexpr int kNormThreads = 256;

// Sum of every thread's v, returned to all threads of the (kNormThreads-wide) block.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[kNormThreads / 32];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
    return total;
}


// Any dim: one block per row, two passes over the row (the second from L1/L2).
template <typename T>
__global__ void __launch_bounds__(kNormThreads) add_rmsnorm_kernel(const T* __restrict__ x, const T* residual,
                                                                   T* h_out, const T* __restrict__ weight,
                                                                   T* __restrict__ out, int dim, float eps) {
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();  // x is the output of the kernel before
    const int64_t row = blockIdx.x;
    x += row * dim;
    out += row * dim;
    if (residual != nullptr) residual += row * dim;
    if (h_out != nullptr) h_out += row * dim;

    float sum_sq = 0.f;
    for (int i = threadIdx.x; i < dim; i += kNormThreads) {
        float h = to_float(x[i]);
        if (residual != nullptr) h = round_to<T>(h + to_float(residual[i]));
        sum_sq += h * h;
    }
    const float inv_rms = rounded::inverse_rms(block_sum(sum_sq), dim, eps);

    // The second pass re-reads x (and residual) from L1/L2; it is a few KB per row.
    for (int i = threadIdx.x; i < dim; i += kNormThreads) {
        float h = to_float(x[i]);
        if (residual != nullptr) h = round_to<T>(h + to_float(residual[i]));
        out[i] = rounded::rms_normalize<T>(h, to_float(weight[i]), inv_rms);
        if (h_out != nullptr) h_out[i] = from_float<T>(h);  // may alias residual: written after its last read
    }
}

// The common case (dim a multiple of 8, at most 8192): each thread keeps its kVecs 16-byte pieces of the
// row in registers, so the row is read once and the block waits for memory once, not twice. At batch 1
// the step is all latency, so this halves the kernel's time (5.4 us -> about 2.5 on an H100).
template <typename T, int kVecs>
__global__ void __launch_bounds__(kNormThreads) add_rmsnorm_vec_kernel(const T* __restrict__ x, const T* residual,
                                                                       T* h_out, const T* __restrict__ weight,
                                                                       T* __restrict__ out, int dim, float eps) {
    constexpr int kElems = 16 / sizeof(T);
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();  // x is the output of the kernel before
    const int64_t row = blockIdx.x;
    float h[kVecs][kElems];
    float sum_sq = 0.f;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
        const int col = (j * kNormThreads + threadIdx.x) * kElems;
        if (col < dim) {
            const uint4 xv = *reinterpret_cast<const uint4*>(x + row * dim + col);
            uint4 rv = make_uint4(0, 0, 0, 0);
            if (residual != nullptr) rv = *reinterpret_cast<const uint4*>(residual + row * dim + col);
            const T* xe = reinterpret_cast<const T*>(&xv);
            const T* re = reinterpret_cast<const T*>(&rv);
#pragma unroll
            for (int e = 0; e < kElems; ++e) {
                float v = to_float(xe[e]);
                if (residual != nullptr) v = round_to<T>(v + to_float(re[e]));
                h[j][e] = v;
                sum_sq += v * v;
            }
        }
    }
    const float inv_rms = rounded::inverse_rms(block_sum(sum_sq), dim, eps);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
        const int col = (j * kNormThreads + threadIdx.x) * kElems;
        if (col < dim) {
            const uint4 wv = *reinterpret_cast<const uint4*>(weight + col);
            const T* we = reinterpret_cast<const T*>(&wv);
            uint4 ov, hv;
            T* oe = reinterpret_cast<T*>(&ov);
            T* he = reinterpret_cast<T*>(&hv);
#pragma unroll
            for (int e = 0; e < kElems; ++e) {
                oe[e] = rounded::rms_normalize<T>(h[j][e], to_float(we[e]), inv_rms);
                he[e] = from_float<T>(h[j][e]);
            }
            *reinterpret_cast<uint4*>(out + row * dim + col) = ov;
            if (h_out != nullptr) *reinterpret_cast<uint4*>(h_out + row * dim + col) = hv;
        }
    }
}

// Grid (batch * tokens): a block per token, one thread per (head, kVec consecutive rotation pairs) of q and k
// plus one per (head, kVec element pairs) of v. RoPE pairs dimension d with d + head_dim/2 (Hugging Face's
// rotate_half convention). kVec = 8 (head_dim % 16 == 0 and every row on 16 bytes): 16-byte loads and stores (on
// an H100, Llama-3.2-1B, 2026-11-27: 17.7 -> 9.4 us a call for 2,048 tokens, 242 -> 134 us for 16 x 2,048, against
// 2-byte accesses); else 1.
template <typename T, int kVec>
__global__ void rope_kv_write_kernel(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                                     const int64_t* __restrict__ positions, T* __restrict__ q_out, T* k_cache,
                                     T* v_cache, int tokens, int q_heads, int kv_heads, int head_dim, int max_seq) {
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();  // qkv is the projection just before
    const int64_t token = blockIdx.x;  // row of qkv and q_out
    const int b = (int)(token / tokens);
    const int half = head_dim / 2;
    const int64_t pos = positions[b] + token % tokens;
    if (pos < 0 || pos >= max_seq) __trap();  // like PyTorch's index assert: never write another sequence's rows
    const int rotated_heads = q_heads + kv_heads;
    const int64_t row_len = (int64_t)(q_heads + 2 * kv_heads) * head_dim;
    const T* src = qkv + token * row_len;
    const T* cos_row = cos + pos * head_dim;
    const T* sin_row = sin + pos * head_dim;
    const int64_t cache_row = ((int64_t)b * max_seq + pos) * kv_heads * head_dim;
    union Piece {
        T e[kVec];
        typename std::conditional<kVec == 8, uint4, T>::type raw;
    };
    auto load = [](const T* p) { Piece v; v.raw = *reinterpret_cast<const decltype(v.raw)*>(p); return v; };
    auto store = [](T* p, const Piece& v) { *reinterpret_cast<decltype(v.raw)*>(p) = v.raw; };

    const int pieces = half / kVec;
    for (int i = threadIdx.x; i < (rotated_heads + kv_heads) * pieces; i += blockDim.x) {
        const int head = i / pieces, d = i % pieces * kVec;
        const T* x = src + (int64_t)head * head_dim;
        T* dst;
        Piece out1, out2;
        if (head < rotated_heads) {
            const Piece x1 = load(x + d), x2 = load(x + d + half);
            const Piece c1 = load(cos_row + d), c2 = load(cos_row + d + half);
            const Piece s1 = load(sin_row + d), s2 = load(sin_row + d + half);
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
                float o1, o2;
                rounded::rope_pair<T>(to_float(x1.e[e]), to_float(x2.e[e]), to_float(c1.e[e]), to_float(c2.e[e]),
                                      to_float(s1.e[e]), to_float(s2.e[e]), o1, o2);
                out1.e[e] = from_float<T>(o1);
                out2.e[e] = from_float<T>(o2);
            }
            dst = head < q_heads ? q_out + (token * q_heads + head) * head_dim
                                 : k_cache + cache_row + (int64_t)(head - q_heads) * head_dim;
        } else {
            out1 = load(x + d);
            out2 = load(x + d + half);
            dst = v_cache + cache_row + (int64_t)(head - rotated_heads) * head_dim;
        }
        store(dst + d, out1);
        store(dst + d + half, out2);
    }
}


// Any width: one element per thread.
template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t rows, int width) {
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();  // gate_up is the projection just before
    const int64_t n = rows * width;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / width;
        const int col = (int)(i % width);
        out[i] = rounded::silu_mul<T>(to_float(gate_up[row * 2 * width + col]),
                                 to_float(gate_up[row * 2 * width + width + col]));
    }
}

// Width a multiple of 8 and 16-byte aligned rows: 8 elements (16-byte loads and store) per thread. The
// element version ran at 1.25 TB/s in a 2048-token prefill (80 us a call for [2048, 16384] on an H100).
template <typename T>
__global__ void silu_mul_vec_kernel(const uint4* __restrict__ gate_up, uint4* __restrict__ out, int64_t rows,
                                    int width_vecs) {
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();
    const int64_t n = rows * width_vecs;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / width_vecs;
        const int col = (int)(i % width_vecs);
        const uint4 gv = gate_up[row * 2 * width_vecs + col];
        const uint4 uv = gate_up[row * 2 * width_vecs + width_vecs + col];
        const T* ge = reinterpret_cast<const T*>(&gv);
        const T* ue = reinterpret_cast<const T*>(&uv);
        uint4 ov;
        T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
        for (int e = 0; e < 8; ++e) oe[e] = rounded::silu_mul<T>(to_float(ge[e]), to_float(ue[e]));
        out[i] = ov;
    }
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(DType dtype, Args... args) {
    if (dtype == DType::kBFloat16) Launch<__nv_bfloat16>::run(args...);
    else Launch<__half>::run(args...);
    return cudaGetLastError();
}

template <typename T>
struct AddRmsnorm {
    static void run(const void* x, const void* residual, void* h_out, const void* weight, void* out, int rows,
                    int dim, float eps, cudaStream_t stream) {
        const auto args = std::make_tuple(static_cast<const T*>(x), static_cast<const T*>(residual),
                                          static_cast<T*>(h_out), static_cast<const T*>(weight), static_cast<T*>(out),
                                          dim, eps);
        constexpr int kRowPiece = kNormThreads * 16 / sizeof(T);  // elements covered by one vector per thread
        const int vecs = (dim + kRowPiece - 1) / kRowPiece;
        auto launch = [&](auto kernel) {
            std::apply([&](auto... a) {
                programmatic_launch::launch(kernel, dim3(rows), dim3(kNormThreads), 0, stream, a...);
            }, args);
        };
        auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
        const bool vectorizable = dim % (16 / sizeof(T)) == 0 && vecs <= 4 && aligned(x) && aligned(residual) &&
                                  aligned(h_out) && aligned(weight) && aligned(out);
        if (!vectorizable) launch(add_rmsnorm_kernel<T>);
        else if (vecs == 1) launch(add_rmsnorm_vec_kernel<T, 1>);
        else if (vecs == 2) launch(add_rmsnorm_vec_kernel<T, 2>);
        else if (vecs == 3) launch(add_rmsnorm_vec_kernel<T, 3>);
        else launch(add_rmsnorm_vec_kernel<T, 4>);
    }
};

template <typename T>
struct RopeKvWrite {
    static void run(const void* qkv, const void* cos, const void* sin, const int64_t* positions, void* q_out,
                    void* k_cache, void* v_cache, int batch, int tokens, int q_heads, int kv_heads, int head_dim,
                    int max_seq, cudaStream_t stream) {
        auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
        const bool vectorized = head_dim % 16 == 0 && aligned(qkv) && aligned(cos) && aligned(sin) &&
                                aligned(q_out) && aligned(k_cache) && aligned(v_cache);
        programmatic_launch::launch(vectorized ? rope_kv_write_kernel<T, 8> : rope_kv_write_kernel<T, 1>,
                                    dim3((unsigned)((int64_t)batch * tokens)), dim3(256), 0, stream,
                                    static_cast<const T*>(qkv), static_cast<const T*>(cos), static_cast<const T*>(sin),
                                    positions, static_cast<T*>(q_out), static_cast<T*>(k_cache),
                                    static_cast<T*>(v_cache), tokens, q_heads, kv_heads, head_dim, max_seq);
    }
};

template <typename T>
struct SiluMul {
    static void run(const void* gate_up, void* out, int rows, int width, cudaStream_t stream) {
        const int threads = 256;
        // a few waves of blocks on any GPU; the grid-stride loops take the rest
        auto blocks_for = [&](int64_t n) { return (int)std::min<int64_t>((n + threads - 1) / threads, 65535); };
        auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
        if (width % 8 == 0 && aligned(gate_up) && aligned(out)) {
            const int64_t n = (int64_t)rows * (width / 8);
            programmatic_launch::launch(silu_mul_vec_kernel<T>, dim3(blocks_for(n)), dim3(threads), 0, stream,
                                        static_cast<const uint4*>(gate_up), static_cast<uint4*>(out), (int64_t)rows,
                                        width / 8);
            return;
        }
        programmatic_launch::launch(silu_mul_kernel<T>, dim3(blocks_for((int64_t)rows * width)), dim3(threads), 0,
                                    stream, static_cast<const T*>(gate_up), static_cast<T*>(out), (int64_t)rows, width);
    }
};

}  // namespace

cudaError_t add_rmsnorm(const void* x, const void* residual, void* h_out, const void* weight, void* out, int rows,
                        int dim, float eps, DType dtype, cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;
    return dispatch<AddRmsnorm>(dtype, x, residual, h_out, weight, out, rows, dim, eps, stream);
}

cudaError_t rope_kv_write(const void* qkv, const void* cos, const void* sin, const int64_t* positions, void* q_out,
                          void* k_cache, void* v_cache, int batch, int tokens, int q_heads, int kv_heads,
                          int head_dim, int max_seq, DType dtype, cudaStream_t stream) {
    if (batch == 0 || tokens == 0) return cudaSuccess;
    return dispatch<RopeKvWrite>(dtype, qkv, cos, sin, positions, q_out, k_cache, v_cache, batch, tokens, q_heads,
                                 kv_heads, head_dim, max_seq, stream);
}

cudaError_t silu_mul(const void* gate_up, void* out, int rows, int width, DType dtype, cudaStream_t stream) {
    if (rows == 0 || width == 0) return cudaSuccess;
    return dispatch<SiluMul>(dtype, gate_up, out, rows, width, stream);
}

}  // namespace fused_ops
