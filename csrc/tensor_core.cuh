// The tensor-core instruction the kernels use: mma.sync m16n8k16 (and m16n8k8, below), 16-bit inputs, float32
// accumulators (sm_80 and newer). Fragment layout (PTX ISA), lane = 4 g + t:
//   A (16 x 16, row-major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, k x n):      b0 = B[2t, 2t+1][g],  b1 = B[2t+8, 2t+9][g]
//   C (16 x 8, float):      c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// Each 32-bit register holds two elements, the lower-indexed one in the low half.
// The kernels load 16 contiguous bytes per lane and let those be the fragments: the k dimension (a sum)
// may be permuted freely, as long as both operands use the same permutation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace tensor_core {

// The instruction for 16-bit inputs of PTX type TYPE ("bf16" or "f16") and float32 accumulators; the wrappers below
// emit it through a macro of their own operand list, once per input type.
#define TENSOR_CORE_MMA(TYPE) "mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 "
template <typename Element>
constexpr bool is_bf16 = std::is_same<Element, __nv_bfloat16>::value;

template <typename Element>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MMA_ASM(TYPE)                                                                                  \
    asm volatile(TENSOR_CORE_MMA(TYPE) "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"          \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                      \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
    if constexpr (is_bf16<Element>) MMA_ASM("bf16");
    else MMA_ASM("f16");
#undef MMA_ASM
#endif
}

// The same with A's rows 8..15 zero: only c0, c1 (row g) are accumulated; the other half of the
// result is discarded, so it costs no live registers.
template <typename Element>
__device__ __forceinline__ void mma_16x8x16_top_rows(float& c0, float& c1, uint32_t a0, uint32_t a2, uint32_t b0,
                                                     uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float unused2, unused3;
#define MMA_ASM(TYPE)                                                                                  \
    asm(TENSOR_CORE_MMA(TYPE) "{%0,%1,%2,%3}, {%4,%8,%5,%8}, {%6,%7}, {%0,%1,%9,%9};"                  \
        : "+f"(c0), "+f"(c1), "=f"(unused2), "=f"(unused3)                                             \
        : "r"(a0), "r"(a2), "r"(b0), "r"(b1), "r"(0u), "f"(0.f))
    if constexpr (is_bf16<Element>) MMA_ASM("bf16");
    else MMA_ASM("f16");
#undef MMA_ASM
    (void)unused2;
    (void)unused3;
#endif
}

// C[g] += A[g] B + A[g+8] B: A's rows 8..15 carry a second operand for the same rows of the result (the rounding
// error of rows 0..7's values, say), whose product lands in registers of its own and is added: one mma instead of
// two, for the price of two additions.
template <typename Element>
__device__ __forceinline__ void mma_16x8x16_fold_rows(float& c0, float& c1, uint32_t a0, uint32_t a1, uint32_t a2,
                                                      uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float bottom2, bottom3;
#define MMA_ASM(TYPE)                                                                                  \
    asm(TENSOR_CORE_MMA(TYPE) "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%10,%10};"                \
        : "+f"(c0), "+f"(c1), "=f"(bottom2), "=f"(bottom3)                                             \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f))
    if constexpr (is_bf16<Element>) MMA_ASM("bf16");
    else MMA_ASM("f16");
#undef MMA_ASM
    c0 += bottom2;
    c1 += bottom3;
#endif
}
#undef TENSOR_CORE_MMA

// mma.sync m16n8k8 (the narrow tiles' P V: 8 rows a warp), fragments (PTX ISA), lane = 4 g + t:
//   A (16 x 8, row-major): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1]
//   B (8 x 8, k x n):      b0 = B[2t, 2t+1][g]
//   C as m16n8k16's. bf16 inputs need sm_80, f16 sm_75.
#define TENSOR_CORE_MMA_K8(TYPE) "mma.sync.aligned.m16n8k8.row.col.f32." TYPE "." TYPE ".f32 "
template <typename Element>
__device__ __forceinline__ void mma_16x8x8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MMA_ASM(TYPE)                                                                                  \
    asm(TENSOR_CORE_MMA_K8(TYPE) "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"                        \
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                               \
        : "r"(a0), "r"(a1), "r"(b0))
    if constexpr (is_bf16<Element>) MMA_ASM("bf16");
    else MMA_ASM("f16");
#undef MMA_ASM
#endif
}

// m16n8k8 with A's rows 8..15 zero (mma_16x8x16_top_rows' counterpart; rows 8..15 of the result are dead)
template <typename Element>
__device__ __forceinline__ void mma_16x8x8_top_rows(float& c0, float& c1, uint32_t a0, uint32_t b0) {
    float c[4] = {c0, c1, 0.f, 0.f};
    mma_16x8x8<Element>(c, a0, 0u, b0);
    c0 = c[0];
    c1 = c[1];
}

// m16n8k8 with rows 8..15 folded into rows 0..7 of the result (mma_16x8x16_fold_rows' counterpart)
template <typename Element>
__device__ __forceinline__ void mma_16x8x8_fold_rows(float& c0, float& c1, uint32_t a0, uint32_t a1, uint32_t b0) {
    float c[4] = {c0, c1, 0.f, 0.f};
    mma_16x8x8<Element>(c, a0, a1, b0);
    c0 = c[0] + c[2];
    c1 = c[1] + c[3];
}
#undef TENSOR_CORE_MMA_K8

// ldmatrix.x4.trans: four 8 x 8 matrices of 16-bit elements from shared memory, lanes 8m..8m+7 giving the addresses of
// matrix m's rows (16 contiguous bytes each, 16-byte aligned, anywhere in shared memory). Lane 4g + t receives in
// register m elements [2t][g] and [2t + 1][g] of matrix m: with the stored rows as k and the columns as n, an mma B
// fragment's register (b0 or b1) without a byte permute. The reads are ordered after the barrier waits before it
// ("memory").
__device__ __forceinline__ uint4 load_matrices_x4_transposed(uint32_t shared_address) {
    uint4 r = make_uint4(0u, 0u, 0u, 0u);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(shared_address)
                 : "memory");
#endif
    return r;
}

// Two floats rounded into one register of 16-bit elements (lo in the low half), an mma operand.
template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (is_bf16<Element>) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
}

// The two floats a register of 16-bit elements holds (the inverse of pack2, exact).
template <typename Element>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
    if constexpr (is_bf16<Element>) {
        return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
    } else {
        return __half22float2(*reinterpret_cast<const __half2*>(&v));
    }
}

// The low (or the high) 16-bit halves of two registers, paired into one: x's in the low half.
__device__ __forceinline__ uint32_t pair_halves(uint32_t x, uint32_t y, bool high) {
    return __byte_perm(x, y, high ? 0x7632 : 0x5410);
}

}  // namespace tensor_core
