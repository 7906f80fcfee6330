// Sort-free top-p sampling: one block per row of logits.
//
// The PyTorch reference (llama3.filter_top_k_top_p + sample_next_token) sorts each row of the vocabulary
// (128K entries for Llama 3) every decode step; at batch 256 that sort dominates the step. This kernel finds
// the same top-p set without sorting:
//   1. the row's max m of x = logit / temperature;
//   2. the weights w = exp(x - m) are positive floats, whose bit patterns order like their values, so a
//      3-pass radix select over those bits (11 + 11 + 10 bits, each a mass histogram in shared memory, in
//      64-bit fixed point so that the result does not depend on the order of the atomic adds) finds tau,
//      the smallest weight that top-p keeps: the largest value whose tail mass sum(w >= tau) reaches
//      top_p * sum(w). A token is kept when w >= tau, which is the reference's rule (drop a token once
//      the strictly more likely ones cover top_p), except that equal weights at the boundary are all kept;
//   3. a Gumbel race among the kept tokens: argmax(x + g), g = -log(-log u), samples the renormalized
//      top-p distribution (the same exponential race as the reference, in log form).
// The random numbers u come from a counter-based hash of (seed, step counter, row, token), both read from a
// device tensor, so the kernel runs inside a CUDA graph and the caller advances the counter on the device.
// temperature == 0 is greedy: a plain argmax (first index on ties, like torch.argmax).
#include <cstdint>

#include "sampling.h"

namespace sampling {
namespace {

constexpr int kThreads = 512;  // 1024 would cap registers at 32 and spill
constexpr int kUnroll = 4;     // float4 loads in flight per thread before any use
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;  // 11-bit digits

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {  // murmur3's finalizer
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

// Uniform in (0, 1), never 0 or 1, so the Gumbel noise is finite. The (seed, counter, row) part is mixed
// once per block into `key`; per token only two 32-bit rounds, because at batch 1 a single block hashes the
// whole vocabulary (a 64-bit mix per token made the kernel 4x slower there).
__device__ __forceinline__ float uniform(uint64_t key, uint32_t index) {
    const uint32_t h = fmix32(fmix32(index ^ (uint32_t)key) ^ (uint32_t)(key >> 32));
    return ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Calls f(value, index) for every element of the row, each thread reading kUnroll float4s before using
// them: at batch 1 one block streams the whole row, so loads in flight decide the speed. `vectorized`
// needs the row to start on 16 bytes and the vocabulary to be a multiple of 4; else plain loads.
template <typename F>
__device__ __forceinline__ void for_each(const float* row, int vocab, bool vectorized, F&& f) {
    if (vectorized) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const int n4 = vocab / 4;
        for (int base = threadIdx.x; base < n4; base += kThreads * kUnroll) {
            float4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int c = base + u * kThreads;
                v[u] = c < n4 ? __ldg(row4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int c = base + u * kThreads;
                if (c < n4) {
                    f(v[u].x, 4 * c);
                    f(v[u].y, 4 * c + 1);
                    f(v[u].z, 4 * c + 2);
                    f(v[u].w, 4 * c + 3);
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += kThreads) f(row[i], i);
    }
}

// A weight in (0, 1] as 32.32 fixed point (weights under 2^-32 count as no mass).
__device__ __forceinline__ uint64_t to_fixed(float w) { return (uint64_t)(w * 4294967296.0f); }

struct ArgMax {
    float value;
    int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    // larger value wins; on ties the smaller index (torch.argmax's choice); NaN-free inputs assumed
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
    return a;
}

__device__ ArgMax block_argmax(ArgMax v, ArgMax* smem) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        ArgMax other{__shfl_xor_sync(0xffffffffu, v.value, offset), __shfl_xor_sync(0xffffffffu, v.index, offset)};
        v = better(v, other);
    }
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    ArgMax result = smem[0];
    for (int w = 1; w < kWarps; ++w) result = better(result, smem[w]);
    __syncthreads();  // smem is reused by the caller
    return result;
}

// The largest x = logit / temperature of the row (the softmax's reference point), on every thread.
__device__ float block_max_scaled(const float* row, int vocab, bool vectorized, float inv_temperature,
                                  float* smem) {
    float m = -INFINITY;
    // __fmul_rn: no FMA contraction, so every pass computes the very same x
    for_each(row, vocab, vectorized, [&](float v, int) { m = fmaxf(m, __fmul_rn(v, inv_temperature)); });
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = m;
    __syncthreads();
    float result = -INFINITY;
    for (int w = 0; w < kWarps; ++w) result = fmaxf(result, smem[w]);
    __syncthreads();
    return result;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float* __restrict__ logits, int64_t* __restrict__ out,
                                                          uint8_t* keep_mask, int vocab, float temperature,
                                                          float top_p, const int64_t* __restrict__ rng_state) {
    __shared__ unsigned long long hist[kBins];
    __shared__ float smem_a[kWarps];
    __shared__ ArgMax smem_arg[kWarps];
    __shared__ uint32_t smem_digit;
    __shared__ uint64_t smem_needed;

    const int64_t row_index = blockIdx.x;
    const float* row = logits + row_index * vocab;
    const bool vectorized = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;

    if (temperature <= 0.f) {  // greedy
        ArgMax best{-INFINITY, 0x7fffffff};
        for_each(row, vocab, vectorized, [&](float v, int i) { best = better(best, ArgMax{v, i}); });
        best = block_argmax(best, smem_arg);
        if (threadIdx.x == 0) out[row_index] = best.index;
        return;
    }

    const float inv_t = 1.f / temperature;
    const float m = block_max_scaled(row, vocab, vectorized, inv_t, smem_a);

    // Radix select of tau over the weights' bits, most significant digit first. `prefix` holds the digits
    // fixed so far; `needed` is the mass still to cover among the weights that share that prefix. Masses
    // are 32.32 fixed point in 64-bit integers: integer sums do not depend on the order the threads add
    // them in, so the kept set (and the sampled token) is the same on every run.
    uint32_t prefix = 0;
    int fixed_bits = 0;
    uint64_t needed = 0;
    const bool keep_all = top_p >= 1.f;
    if (!keep_all) {
        for (int pass = 0; pass < 3; ++pass) {
            const int digit_bits = pass < 2 ? 11 : 10;
            const int shift = 32 - fixed_bits - digit_bits;
            for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
            __syncthreads();
            // Each thread accumulates runs of equal digits in a register before touching shared memory:
            // flat distributions put most weights in a few bins, where per-element atomics would serialize.
            int run_digit = -1;
            uint64_t run_mass = 0;
            for_each(row, vocab, vectorized, [&](float v, int) {
                const float w = __expf(__fmul_rn(v, inv_t) - m);
                const uint32_t bits = __float_as_uint(w);
                if (fixed_bits > 0 && (bits >> (32 - fixed_bits)) != (prefix >> (32 - fixed_bits))) return;
                const int digit = (bits >> shift) & ((1u << digit_bits) - 1);
                if (digit != run_digit) {
                    if (run_digit >= 0) atomicAdd(&hist[run_digit], (unsigned long long)run_mass);
                    run_digit = digit;
                    run_mass = 0;
                }
                run_mass += to_fixed(w);
            });
            if (run_digit >= 0) atomicAdd(&hist[run_digit], (unsigned long long)run_mass);
            __syncthreads();
            // The digit of tau: walking down from the largest digit, the first bin whose cumulative mass
            // reaches `needed`. One warp scans the (at most 2048) bins in chunks of 32.
            if (threadIdx.x < 32) {
                const int bins = 1 << digit_bits;
                if (pass == 0) {  // every weight is in this histogram: the target is top_p of their total
                    uint64_t total = 0;
                    for (int b = threadIdx.x; b < bins; b += 32) total += hist[b];
#pragma unroll
                    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
                    needed = (uint64_t)ceil((double)top_p * (double)total);
                }
                uint64_t above = 0;
                int found = 0;  // unreachable with exact sums; would keep everything in this prefix
                for (int top = bins - 1; top >= 0; top -= 32) {
                    const int b = top - threadIdx.x;
                    const uint64_t mass = b >= 0 ? hist[b] : 0;
                    // inclusive prefix sum over lanes: lane k holds the mass of bins top .. top-k
                    uint64_t cumulative = mass;
#pragma unroll
                    for (int offset = 1; offset < 32; offset *= 2) {
                        const uint64_t other = __shfl_up_sync(0xffffffffu, cumulative, offset);
                        if ((int)threadIdx.x >= offset) cumulative += other;
                    }
                    const unsigned reached =
                        __ballot_sync(0xffffffffu, b >= 0 && mass > 0 && above + cumulative >= needed);
                    if (reached != 0) {
                        const int lane = __ffs(reached) - 1;
                        found = top - lane;
                        above += __shfl_sync(0xffffffffu, cumulative - mass, lane);
                        break;
                    }
                    above += __shfl_sync(0xffffffffu, cumulative, 31);
                }
                if (threadIdx.x == 0) {
                    smem_digit = (uint32_t)found;
                    smem_needed = needed - above;
                }
            }
            __syncthreads();
            prefix |= smem_digit << shift;
            needed = smem_needed;
            fixed_bits += digit_bits;
            __syncthreads();
        }
    }
    const uint32_t tau_bits = prefix;  // all 32 bits fixed: the exact weight of the last kept token

    // Gumbel race among the kept tokens.
    const uint64_t key = mix64(mix64((uint64_t)rng_state[0] ^ mix64((uint64_t)rng_state[1])) ^ (uint64_t)row_index);
    ArgMax best{-INFINITY, 0x7fffffff};
    for_each(row, vocab, vectorized, [&](float v, int i) {
        const float x = __fmul_rn(v, inv_t);
        const bool keep = x != -INFINITY && (keep_all || __float_as_uint(__expf(x - m)) >= tau_bits);
        if (keep_mask != nullptr) keep_mask[row_index * vocab + i] = keep;
        if (!keep) return;
        const float gumbel = -__logf(-__logf(uniform(key, (uint32_t)i)));
        best = better(best, ArgMax{x + gumbel, i});
    });
    best = block_argmax(best, smem_arg);
    if (threadIdx.x == 0) out[row_index] = best.index;
}

}  // namespace

cudaError_t sample(const float* logits, int64_t* out, uint8_t* keep_mask, int rows, int vocab, float temperature,
                   float top_p, const int64_t* rng_state, cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;
    sample_kernel<<<rows, kThreads, 0, stream>>>(logits, out, keep_mask, vocab, temperature, top_p, rng_state);
    return cudaGetLastError();
}

}  // namespace sampling
