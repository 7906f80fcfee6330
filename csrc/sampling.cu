// Sort-free top-p sampling: one block per row of logits, "sample, then check".
//
// The PyTorch reference (llama3.filter_top_k_top_p + sample_next_token) sorts each row of the vocabulary
// (128K entries for Llama 3) every decode step. A token j is in the top-p set (the nucleus) iff the tokens
// strictly more likely than j carry less than top_p of the mass. So instead of finding the set, this kernel
// draws a token and checks that one token:
//   1. one pass over the row: the max M of x = logit / temperature, the mass Z = sum exp(x - M) (online, as
//      in flash attention's softmax), the argmax, and per-warp masses;
//   2. inverse-CDF draw of j from softmax(x): the per-warp masses point to one warp's segment of the row,
//      which that warp walks again with a prefix scan to find the token where the cumulative mass crosses
//      u * Z (u uniform). Any fixed token order is a valid order for the CDF; ours is the walk order;
//   3. one pass for A = the mass of the tokens with x > x_j. A < top_p * Z: j is in the nucleus, done.
//      Else every token of the nucleus has x > x_j; draw again among {x > x_j} (whose per-warp masses the
//      check pass just produced) and check again. A draw restricted to a superset of the nucleus and
//      accepted only inside it is distributed as the renormalized nucleus, which is the reference's
//      distribution. The first draw is accepted with probability top_p or more, so ~2.1 passes on average.
//      Tokens tied with the boundary token are all kept (the reference keeps some of them, by sort order).
// Each pass is a plain reduction (no atomics, no histogram contention), so flat rows (random weights) cost
// what peaked ones do, and fixed reduction orders make the result deterministic. The uniforms come from a
// counter-based hash of (seed, step counter, row, round), read from a device tensor, so the kernel runs in a
// CUDA graph and the caller advances the counter on the device (or, when the kernel advances the decode state
// itself, of the drawn token's cache position instead of the counter: sampling.h). temperature <= 0 is greedy: a
// plain argmax (first index on ties, like torch.argmax).
#include <cstdint>

#include "element_convert.cuh"
#include "mbarrier.cuh"
#include "programmatic_launch.cuh"
#include "sampling.h"

// SAMPLING_TRACE (probes only; the built module never defines it): thread 0 of each of the first 64 cluster CTAs
// records clock64() at the cluster kernel's phase boundaries into sampling_trace[block][slot].
#ifdef SAMPLING_TRACE
__device__ long long sampling_trace[64][16];
#define SAMPLING_TRACE_POINT(slot) \
    if (threadIdx.x == 0 && blockIdx.x < 64) sampling_trace[blockIdx.x][slot] = clock64()
#else
#define SAMPLING_TRACE_POINT(slot)
#endif

namespace sampling {
namespace {

constexpr int kThreads = 1024;  // one block per row: at batch 1 a single SM streams the whole row
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;       // 16-byte loads in flight per thread before any use
constexpr int kMaxRounds = 32;   // draws before falling back to the argmax (P(reaching it) < (1-top_p)^32)

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Uniform in (0, 1), never 0 or 1.
__device__ __forceinline__ float uniform(uint64_t key, uint32_t round) {
    const uint64_t h = mix64(key ^ mix64(round + 1));
    return ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float to_float(float x) { return x; }
template <typename T>
__device__ __forceinline__ float to_float(T x) { return element::to_float<T>(x); }

// A row as a sequence of 16-byte vectors of kVec elements. Warp w owns the vectors
// [w * seg, (w + 1) * seg); in iteration `it` its lane l reads vector w * seg + it * 32 + l (coalesced).
// That (warp, iteration, lane, element) order is the token order of the inverse-CDF draw.
template <typename T>
struct Row {
    static constexpr int kVec = 16 / sizeof(T);
    const T* data;
    int vocab;
    bool vectorized;  // row on 16 bytes and vocab a multiple of kVec, else element loads
    int iterations;   // per warp; seg = iterations * 32 vectors

    __device__ Row(const T* row, int vocab_, bool aligned) : data(row), vocab(vocab_) {
        vectorized = aligned && vocab % kVec == 0;
        const int vectors = (vocab + kVec - 1) / kVec;
        iterations = (vectors + kWarps * 32 - 1) / (kWarps * 32);
    }
    __device__ int first_token(int warp, int it, int lane) const {
        return ((warp * iterations + it) * 32 + lane) * kVec;
    }
    // x = logit * inv_t for the kVec tokens from `token`; tokens past the vocabulary read as -inf.
    __device__ void load(int token, float inv_t, float (&x)[kVec]) const {
        if (vectorized && token < vocab) {
            union { uint4 raw; T v[kVec]; } u;
            u.raw = __ldg(reinterpret_cast<const uint4*>(data + token));
#pragma unroll
            for (int e = 0; e < kVec; ++e) x[e] = __fmul_rn(to_float(u.v[e]), inv_t);  // no FMA: same x everywhere
        } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e)
                x[e] = token + e < vocab ? __fmul_rn(to_float(data[token + e]), inv_t) : -INFINITY;
        }
    }
    // Calls f(x[kVec], first token) for every vector of this thread's warp segment, in walk order,
    // kUnroll loads in flight.
    template <typename F>
    __device__ __forceinline__ void for_each(int warp, int lane, float inv_t, F&& f) const {
        for (int it0 = 0; it0 < iterations; it0 += kUnroll) {
            float x[kUnroll][kVec];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) load(first_token(warp, it0 + u, lane), inv_t, x[u]);
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
                if (it0 + u < iterations) f(x[u], first_token(warp, it0 + u, lane));
        }
    }
};

struct ArgMax {
    float value;
    int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    // larger value wins; on ties the smaller index (torch.argmax's choice); NaN-free inputs assumed
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
    return a;
}

// Running softmax statistics: s = sum exp(x - m) over the tokens seen.
struct SoftmaxStats {
    float m, s;
};

__device__ __forceinline__ float shfl_xor(float v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); }
__device__ __forceinline__ ArgMax shfl_xor(ArgMax v, int offset) {
    return {shfl_xor(v.value, offset), __shfl_xor_sync(0xffffffffu, v.index, offset)};
}
__device__ __forceinline__ SoftmaxStats shfl_xor(SoftmaxStats v, int offset) {
    return {shfl_xor(v.m, offset), shfl_xor(v.s, offset)};
}

// combine() of the 32 lanes' values in a fixed butterfly order: every lane gets the same bits (the combines
// used here are commutative).
template <typename V, typename Combine>
__device__ __forceinline__ V warp_all_reduce(V v, Combine combine) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = combine(v, shfl_xor(v, offset));
    return v;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax v) { return warp_all_reduce(v, better); }

__device__ __forceinline__ float warp_sum(float v) {
    return warp_all_reduce(v, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ SoftmaxStats merge(SoftmaxStats a, SoftmaxStats b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return a;
    return {m, (a.m == -INFINITY ? 0.f : a.s * __expf(a.m - m)) + (b.m == -INFINITY ? 0.f : b.s * __expf(b.m - m))};
}

// Folds kVec values x of tokens first.. (in index order) into a thread's argmax and (unless greedy) its
// online softmax statistics.
template <int kVec>
__device__ __forceinline__ void accumulate_stats(const float (&x)[kVec], int first, bool greedy, ArgMax& best,
                                                 SoftmaxStats& stats) {
    float vmax = -INFINITY;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
        if (x[e] > best.value) best = {x[e], first + e};
        vmax = fmaxf(vmax, x[e]);
    }
    if (greedy || vmax == -INFINITY) return;
    const float m = fmaxf(stats.m, vmax);
    float s = stats.m == -INFINITY ? 0.f : stats.s * __expf(stats.m - m);
#pragma unroll
    for (int e = 0; e < kVec; ++e) s += __expf(x[e] - m);
    stats = {m, s};
}

// The check pass: adds to `above` the mass (relative to exp(max_x)) of the kVec tokens x more likely than
// the drawn token.
template <int kVec>
__device__ __forceinline__ void add_mass_above(const float (&x)[kVec], float drawn_x, float max_x, float& above) {
#pragma unroll
    for (int e = 0; e < kVec; ++e)
        if (x[e] > drawn_x) above += __expf(x[e] - max_x);
}

// The check's verdict: the drawn token is kept (true) when the tokens more likely than it carry less than
// top_p of the row's mass; otherwise the next draw is restricted to those tokens (mass `above`).
__device__ __forceinline__ bool accept_draw(float above, float top_p, float total, int drawn, float drawn_x,
                                            int& token, float& threshold, float& mass) {
    if (above < top_p * total) {
        token = drawn;
        return true;
    }
    threshold = drawn_x;
    mass = above;
    return false;
}

__device__ __forceinline__ SoftmaxStats warp_merge(SoftmaxStats v) { return warp_all_reduce(v, merge); }

// The key of a row's draws: (seed, step counter, row), or with a DecodeState (seed, the drawn token's cache
// position, row). Positions grow by one each step, so they number the steps of a row without a counter that
// some kernel would have to advance (and that other rows' blocks might still be reading); the tag keeps the
// two kinds of keys apart.
constexpr uint64_t kPositionKeyTag = 1ull << 62;
__device__ __forceinline__ uint64_t row_key(const int64_t* rng_state, const DecodeState& state, int64_t row_index) {
    const uint64_t counter = state.positions != nullptr ? (uint64_t)(state.positions[row_index] + 1) | kPositionKeyTag
                                                        : (uint64_t)rng_state[1];
    return mix64(mix64((uint64_t)rng_state[0] ^ mix64(counter)) ^ (uint64_t)row_index);
}

// Writes the row's token, and advances the decode state (sampling.h) when there is one. Called by one thread
// per row after every thread of the row has read positions[row_index] (row_key).
__device__ __forceinline__ void finish_row(int64_t* out, const DecodeState& state, int64_t row_index, int token) {
    out[row_index] = token;
    if (state.positions == nullptr) return;
    const int64_t position = state.positions[row_index] + 1;
    state.positions[row_index] = position;
    if (state.cache_seqlens != nullptr) state.cache_seqlens[row_index] = (int32_t)(position + 1);
    if (state.history != nullptr && position < state.history_len)
        state.history[row_index * state.history_len + position] = token;
}

struct Shared {
    float warp_mass[kWarps];  // per-warp mass of the tokens the current draw is restricted to
    SoftmaxStats warp_stats[kWarps];
    ArgMax warp_best[kWarps];
    float max_x, total;       // M and Z of the whole row
    int chosen_warp;
    float base, target;       // the draw's cumulative mass before the chosen warp, and u * mass
    uint64_t key;             // of the row's draws (row_key)
    int token;
    float token_x;
};

// Each warp's argmax and softmax statistics into warp_best[warp] / warp_stats[warp], then a block barrier.
__device__ __forceinline__ void warp_stats_to_shared(ArgMax best, SoftmaxStats stats, ArgMax* warp_best,
                                                     SoftmaxStats* warp_stats, int warp, int lane) {
    best = warp_argmax(best);
    stats = warp_merge(stats);
    if (lane == 0) {
        warp_best[warp] = best;
        warp_stats[warp] = stats;
    }
    __syncthreads();
}

// Within one warp, each lane holding the mass `own` of one segment of the walk (segments in lane order):
// the lane whose segment the cumulative mass crosses `target` in, and in `base` the mass before that
// segment (on every lane). If float rounding put the target past the total: the last lane with mass.
__device__ __forceinline__ int crossing_lane(float own, float target, int lane, float& base) {
    float inclusive = own;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
        const float other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    unsigned hits = __ballot_sync(0xffffffffu, own > 0.f && inclusive > target);
    if (hits == 0) {
        const unsigned with_mass = __ballot_sync(0xffffffffu, own > 0.f);
        hits = with_mass != 0 ? 1u << (31 - __clz(with_mass)) : 1u;  // (mass > 0 is checked by the caller)
    }
    const int chosen = __ffs(hits) - 1;
    base = __shfl_sync(0xffffffffu, inclusive - own, chosen);
    return chosen;
}

// Warp 0 sums the per-warp masses in a fixed order; returns the sum on warp 0's lanes.
__device__ __forceinline__ float block_mass(const Shared& sh, int lane) { return warp_sum(sh.warp_mass[lane]); }

// The inverse-CDF draw among the tokens with x > threshold (their per-warp masses in sh.warp_mass, total
// `mass`): warp 0 picks the warp segment, that warp re-walks it. Result in sh.token / sh.token_x.
template <typename T>
__device__ void draw(const Row<T>& row, Shared& sh, float inv_t, float threshold, float mass, float u, int warp,
                     int lane) {
    if (warp == 0) {
        const float target = u * mass;
        float base;
        const int chosen = crossing_lane(sh.warp_mass[lane], target, lane, base);
        if (lane == chosen) {
            sh.chosen_warp = chosen;
            sh.base = base;
            sh.target = target;
        }
    }
    __syncthreads();
    if (warp == sh.chosen_warp) {
        constexpr int kVec = Row<T>::kVec;
        const float target = sh.target;
        float running = sh.base;  // mass of the walk order before the current iteration
        int found = -1, last_positive = -1;
        float found_x = 0.f, last_positive_x = 0.f;
        row.for_each(warp, lane, inv_t, [&](const float (&x)[kVec], int first) {
            if (found >= 0) return;  // warp-uniform
            float w[kVec], lane_sum = 0.f;
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
                w[e] = x[e] > threshold ? __expf(x[e] - sh.max_x) : 0.f;
                lane_sum += w[e];
            }
            float inclusive = lane_sum;
#pragma unroll
            for (int offset = 1; offset < 32; offset *= 2) {
                const float other = __shfl_up_sync(0xffffffffu, inclusive, offset);
                if (lane >= offset) inclusive += other;
            }
            // the token where the cumulative mass crosses the target, in this lane's kVec tokens
            int hit = -1, last = -1;
            float acc = running + (inclusive - lane_sum);
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
                acc += w[e];
                if (w[e] > 0.f) {
                    last = e;
                    if (hit < 0 && acc > target) hit = e;
                }
            }
            const unsigned crossing = __ballot_sync(0xffffffffu, hit >= 0);
            if (crossing != 0) {
                const int src = __ffs(crossing) - 1;
                const int e = __shfl_sync(0xffffffffu, hit, src);
                found = __shfl_sync(0xffffffffu, first, src) + e;
                float xe = x[0];
#pragma unroll
                for (int k = 1; k < kVec; ++k) if (k == e) xe = x[k];
                found_x = __shfl_sync(0xffffffffu, xe, src);
            } else {
                const unsigned positive = __ballot_sync(0xffffffffu, last >= 0);
                if (positive != 0) {
                    const int src = 31 - __clz(positive);
                    const int e = __shfl_sync(0xffffffffu, last, src);
                    float xe = x[0];
#pragma unroll
                    for (int k = 1; k < kVec; ++k) if (k == e) xe = x[k];
                    last_positive = __shfl_sync(0xffffffffu, first, src) + e;
                    last_positive_x = __shfl_sync(0xffffffffu, xe, src);
                }
                running += __shfl_sync(0xffffffffu, inclusive, 31);
            }
        });
        if (found < 0) {  // float rounding put the target past this segment's mass: its last token with mass
            found = last_positive;
            found_x = last_positive_x;
        }
        if (lane == 0) {
            sh.token = found;
            sh.token_x = found_x;
        }
    }
    __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const T* __restrict__ logits, int64_t* __restrict__ out, int vocab, float temperature, float top_p,
                  const int64_t* __restrict__ rng_state, const DecodeState state) {
    __shared__ Shared sh;
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();  // the logits are the lm_head's output
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t row_index = blockIdx.x;
    const T* data = logits + row_index * vocab;
    const Row<T> row(data, vocab, reinterpret_cast<uintptr_t>(data) % 16 == 0);
    constexpr int kVec = Row<T>::kVec;
    const bool greedy = temperature <= 0.f;
    const float inv_t = greedy ? 1.f : 1.f / temperature;

    // Pass 1: argmax, and (sampling) the online softmax statistics.
    ArgMax best{-INFINITY, 0x7fffffff};
    SoftmaxStats stats{-INFINITY, 0.f};
    row.for_each(warp, lane, inv_t, [&](const float (&x)[kVec], int first) {
        accumulate_stats(x, first, greedy, best, stats);  // walk order is index order within a lane
    });
    warp_stats_to_shared(best, stats, sh.warp_best, sh.warp_stats, warp, lane);
    if (warp == 0) {
        best = warp_argmax(sh.warp_best[lane]);
        if (lane == 0) sh.max_x = -INFINITY;  // stays so when greedy
        if (!greedy) {
            const SoftmaxStats all = warp_merge(sh.warp_stats[lane]);
            const SoftmaxStats mine = sh.warp_stats[lane];
            sh.warp_mass[lane] = mine.m == -INFINITY ? 0.f : mine.s * __expf(mine.m - all.m);
            if (lane == 0) sh.max_x = all.m;
        }
        // a row with no finite logit has no argmax: token 0, as torch.argmax gives for an all -inf row
        if (lane == 0) sh.token = best.index < vocab ? best.index : 0;
    }
    __syncthreads();
    if (greedy || sh.max_x == -INFINITY) {  // greedy, or nothing to sample from (all logits -inf)
        if (threadIdx.x == 0) finish_row(out, state, row_index, sh.token);
        return;
    }
    const int argmax_token = sh.token;
    if (warp == 0) {
        const float total = block_mass(sh, lane);
        if (lane == 0) {
            sh.total = total;
            sh.key = row_key(rng_state, state, row_index);  // (kept in shared memory: 64 registers on sm_80)
        }
    }
    __syncthreads();
    const float total = sh.total, max_x = sh.max_x;

    // Draw, check, and redraw above the rejected token.
    float threshold = -INFINITY, mass = total;
    int token = argmax_token;  // kept if every round is rejected (the argmax is always in the nucleus)
    for (int round = 0; round < kMaxRounds; ++round) {
        draw(row, sh, inv_t, threshold, mass, uniform(sh.key, (uint32_t)round), warp, lane);
        const int drawn = sh.token;
        const float drawn_x = sh.token_x;
        if (top_p >= 1.f) {
            token = drawn;
            break;
        }
        float above = 0.f;  // this thread's mass of the tokens more likely than the drawn one
        row.for_each(warp, lane, inv_t, [&](const float (&x)[kVec], int) { add_mass_above(x, drawn_x, max_x, above); });
        above = warp_sum(above);
        if (lane == 0) sh.warp_mass[warp] = above;
        __syncthreads();
        if (warp == 0) {
            const float a = block_mass(sh, lane);
            if (lane == 0) sh.base = a;
        }
        __syncthreads();
        if (accept_draw(sh.base, top_p, total, drawn, drawn_x, token, threshold, mass)) break;
        __syncthreads();  // sh.base is rewritten by the next draw
    }
    if (threadIdx.x == 0) finish_row(out, state, row_index, token);
}

// ---------------------------------------------------------------------------------------------------
// Small batches on sm_90+: one row across a cluster of kClusterCtas CTAs. With one block per row, a batch-1
// decode step samples on a single SM: 25 us per step on an H100 for Llama 3's 128K vocabulary, bound by that
// SM's exp throughput and its passes through L2. Here each CTA reads 1/kClusterCtas of the row once into
// registers, and each thread keeps w = exp(x - m) of its own tokens (m: its own maximum), so that after the one
// pass of exps the draw and the check are plain sums and comparisons:
//   1. each thread: its max m and mass s = sum w; the CTA's (max, mass, argmax) go to every CTA of the cluster;
//   2. every thread reduces the CTAs' summaries in the same order: the row's max M, mass Z and argmax;
//   3. draw: u * Z falls in one CTA's share (CTA masses), in it one warp's (warp masses), one lane's (a scan of
//      the lanes' masses s * exp(m - M)) and one of that lane's tokens (its w, in order); that thread sends the
//      token to every CTA;
//   4. check: each thread sums the w of its tokens more likely than the drawn one; each warp's sum goes to every
//      CTA, every thread adds them up in the same order: A. Accepted if A < top_p * Z, else the next draw is
//      among those tokens, whose per-thread and per-warp masses are the check's sums.
// The CTAs exchange results by storing into each other's shared memory before a cluster barrier (a one-way
// trip), never by reading another CTA's, so a CTA may leave once the last exchange is done. Between two
// barriers no buffer is both written and read (a buffer written before a barrier is read after it, and written
// again only after the next one, which every CTA reaches after reading it); the rejection loop's buffers also
// alternate by round, a margin beyond that. The row order of the draw is CTA by CTA, then thread by thread,
// each thread's tokens in order.
constexpr int kClusterCtas = 8;
constexpr int kClusterThreads = 512;
constexpr int kMaxTokensPerThread = 32;  // logits a thread holds in registers: 131072 a row, Llama 3 has 128256

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // (device code for sm_80 has no use for these)
constexpr int kClusterWarps = kClusterThreads / 32;
static_assert(kClusterCtas <= 32 && kClusterWarps <= 32, "one lane per CTA and per warp");

struct CtaSummary {
    SoftmaxStats stats;  // of x over the CTA's tokens
    ArgMax best;
};

// (warp_above is read as float4: the kernel's one __shared__ variable starts at offset 0, 16-byte aligned; alignas
// here would do, but it changes the fp32 instance's register allocation into an 8-byte spill)
struct ClusterShared {
    // written by every CTA of the cluster (each into its own slot) before a cluster barrier
    CtaSummary cta[kClusterCtas];
    int token[2];  // the draw of the round (by parity), from the thread that drew it
    float token_x[2];
    float warp_above[2][kClusterCtas][kClusterWarps];  // each warp's mass more likely than the round's draw
    // this CTA's own
    SoftmaxStats warp_stats[kClusterWarps];
    ArgMax warp_best[kClusterWarps];
};
#endif

template <typename T>
__global__ void __launch_bounds__(kClusterThreads, 1)
    sample_cluster_kernel(const T* __restrict__ logits, int64_t* __restrict__ out, int vocab, float temperature,
                          float top_p, const int64_t* __restrict__ rng_state, const DecodeState state) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ ClusterShared sh;
    const unsigned rank = mbarrier::cluster_rank();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t row_index = blockIdx.x / kClusterCtas;  // (rows along x: grid y stops at 65535)
    const bool greedy = temperature <= 0.f;
    const float inv_t = greedy ? 1.f : 1.f / temperature;

    // This thread's pieces: kVec tokens each, `count` consecutive ones from piece p0.
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kMaxPieces = kMaxTokensPerThread / kVec;
    const T* data = logits + row_index * vocab;
    const bool vectorized = reinterpret_cast<uintptr_t>(data) % 16 == 0 && vocab % kVec == 0;
    const int pieces = (vocab + kVec - 1) / kVec;
    const int per_cta = (pieces + kClusterCtas - 1) / kClusterCtas;
    const int per_thread = (per_cta + kClusterThreads - 1) / kClusterThreads;  // <= kMaxPieces (the host checks)
    const int p0 = rank * per_cta + (int)threadIdx.x * per_thread;
    const int count = max(0, min(per_thread, min((int)(rank + 1) * per_cta, pieces) - p0));

    SAMPLING_TRACE_POINT(0);
    mbarrier::cluster_arrive_relaxed();  // this CTA has started: the others may write to its shared memory
    programmatic_launch::allow_next_kernel();
    programmatic_launch::wait_for_previous_kernel();  // the logits are the lm_head's output
    SAMPLING_TRACE_POINT(1);
    union Piece { uint4 raw; T v[kVec]; };
    Piece held[kMaxPieces];
#pragma unroll
    for (int i = 0; i < kMaxPieces; ++i) {
        if (i >= count) break;
        const int token = (p0 + i) * kVec;
        if (vectorized) {
            held[i].raw = __ldg(reinterpret_cast<const uint4*>(data + token));
        } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) held[i].v[e] = token + e < vocab ? data[token + e] : T{};
        }
    }
    // (the draws' key: its loads go out with the logits')
    const uint64_t key = greedy ? 0 : row_key(rng_state, state, row_index);
    // x of piece i (tokens past the vocabulary are -inf), as sample_kernel computes it. Recomputed at each use
    // (the empty asm hides that it was computed before): keeping all x live beside w would spill.
    auto piece_x = [&](int i, float (&x)[kVec]) {
        const int first = (p0 + i) * kVec;
        uint4 raw = held[i].raw;
        asm volatile("" : "+r"(raw.x), "+r"(raw.y), "+r"(raw.z), "+r"(raw.w));
        Piece p;
        p.raw = raw;
#pragma unroll
        for (int e = 0; e < kVec; ++e)
            x[e] = first + e < vocab ? __fmul_rn(to_float(p.v[e]), inv_t) : -INFINITY;
    };

    // 1. This thread's argmax (its max m), and w = exp(x - m) of its tokens with their sum s.
    ArgMax best{-INFINITY, 0x7fffffff};
#pragma unroll
    for (int i = 0; i < kMaxPieces; ++i) {
        if (i >= count) break;
        float x[kVec];
        piece_x(i, x);
#pragma unroll
        for (int e = 0; e < kVec; ++e)
            if (x[e] > best.value) best = {x[e], (p0 + i) * kVec + e};  // index order: the first of equals
    }
    const float m = best.value;
    float w[kMaxTokensPerThread];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPieces; ++i) {
        float x[kVec];
        if (i < count) piece_x(i, x);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
            w[i * kVec + e] = greedy || i >= count || x[e] == -INFINITY ? 0.f : __expf(x[e] - m);
            s += w[i * kVec + e];
        }
    }
    SAMPLING_TRACE_POINT(2);
    {
        const ArgMax warp_best = warp_argmax(best);
        const SoftmaxStats warp_stats = warp_merge(SoftmaxStats{m, s});
        if (lane == 0) {
            sh.warp_best[warp] = warp_best;
            sh.warp_stats[warp] = warp_stats;
        }
    }
    __syncthreads();
    SAMPLING_TRACE_POINT(3);
    mbarrier::cluster_wait();  // (the start: every CTA has started)
    if (warp == 0) {  // the CTA's summary, into every CTA's slot `rank`
        const bool mine = lane < kClusterWarps;
        const ArgMax b = warp_argmax(mine ? sh.warp_best[lane] : ArgMax{-INFINITY, 0x7fffffff});
        const SoftmaxStats st = warp_merge(mine ? sh.warp_stats[lane] : SoftmaxStats{-INFINITY, 0.f});
        if (lane < kClusterCtas) *mbarrier::cluster_map(&sh.cta[rank], lane) = CtaSummary{st, b};
        __syncwarp();  // (.aligned: the whole warp arrives together)
    }
    mbarrier::cluster_arrive();
    mbarrier::cluster_wait();
    SAMPLING_TRACE_POINT(4);

    // 2. The row's max, mass and argmax, and each CTA's mass relative to the max (every thread, same order).
    ArgMax row_best{-INFINITY, 0x7fffffff};
    float max_x = -INFINITY;
#pragma unroll
    for (int c = 0; c < kClusterCtas; ++c) {
        row_best = better(row_best, sh.cta[c].best);
        max_x = fmaxf(max_x, sh.cta[c].stats.m);
    }
    // a row with no finite logit has no argmax: token 0, as torch.argmax gives for an all -inf row
    int token = row_best.index < vocab ? row_best.index : 0;  // greedy; or kept if every round is rejected
    if (greedy || max_x == -INFINITY) {  // (every CTA leaves here: no more exchanges)
        if (rank == 0 && threadIdx.x == 0) finish_row(out, state, row_index, token);
        return;
    }
    float cta_mass[kClusterCtas];  // of the tokens the current draw is restricted to
    float total = 0.f;
#pragma unroll
    for (int c = 0; c < kClusterCtas; ++c) {
        const SoftmaxStats st = sh.cta[c].stats;
        cta_mass[c] = st.m == -INFINITY ? 0.f : st.s * __expf(st.m - max_x);
        total += cta_mass[c];
    }
    const float scale = m == -INFINITY ? 0.f : __expf(m - max_x);  // this thread's w relative to exp(max_x)
    float own = s * scale;  // this thread's mass of the tokens the current draw is restricted to
    float threshold = -INFINITY, mass = total;
    SAMPLING_TRACE_POINT(5);
    for (int round = 0; round < kMaxRounds; ++round) {
        const int parity = round & 1;
        // 3. Draw among {x > threshold}: the CTA whose cumulative mass crosses u * mass (float rounding past
        // the end: the last CTA with mass), then its warp, lane and token.
        const float target = uniform(key, (uint32_t)round) * mass;
        int chosen = 0;
        float before = 0.f, cumulative = 0.f;
        bool crossed = false;
#pragma unroll
        for (int c = 0; c < kClusterCtas; ++c) {
            if (!crossed && cta_mass[c] > 0.f) {
                chosen = c;
                before = cumulative;
                crossed = cumulative + cta_mass[c] > target;
            }
            cumulative += cta_mass[c];
        }
        if ((int)rank == chosen) {  // block-uniform
            // every warp finds the same warp from the warp masses (lane v holds warp v's)
            float warp_mass = 0.f;
            if (lane < kClusterWarps) {
                if (round == 0) {
                    const SoftmaxStats st = sh.warp_stats[lane];
                    warp_mass = st.m == -INFINITY ? 0.f : st.s * __expf(st.m - max_x);
                } else {
                    warp_mass = sh.warp_above[parity ^ 1][rank][lane];
                }
            }
            float warp_before, lane_before;
            const int chosen_warp = crossing_lane(warp_mass, target - before, lane, warp_before);
            if (warp == chosen_warp) {
                const float lane_target = target - before - warp_before;
                const int chosen_lane = crossing_lane(own, lane_target, lane, lane_before);
                if (lane == chosen_lane) {
                    float running = lane_before, found_x = 0.f, last_x = 0.f;
                    int found = -1, last = -1;
#pragma unroll
                    for (int i = 0; i < kMaxPieces; ++i) {
                        if (i >= count) break;
                        float x[kVec];
                        piece_x(i, x);
#pragma unroll
                        for (int e = 0; e < kVec; ++e) {
                            const float weight = x[e] > threshold ? w[i * kVec + e] * scale : 0.f;
                            if (weight > 0.f && found < 0) {
                                running += weight;
                                last = (p0 + i) * kVec + e;
                                last_x = x[e];
                                if (running > lane_target) {
                                    found = last;
                                    found_x = last_x;
                                }
                            }
                        }
                    }
                    if (found < 0) {  // float rounding left the crossing short: the last token with mass
                        found = last;
                        found_x = last_x;
                    }
                    if (found < 0) {  // (masses underflowed to 0 here; the argmax is always in the nucleus)
                        found = token;
                        found_x = max_x;
                    }
#pragma unroll
                    for (int c = 0; c < kClusterCtas; ++c) {
                        ClusterShared* other = mbarrier::cluster_map(&sh, c);
                        other->token[parity] = found;
                        other->token_x[parity] = found_x;
                    }
                }
            }
            __syncwarp();
        }
        SAMPLING_TRACE_POINT(6);
        mbarrier::cluster_arrive();
        mbarrier::cluster_wait();
        SAMPLING_TRACE_POINT(7);
        const int drawn = sh.token[parity];
        const float drawn_x = sh.token_x[parity];
        if (top_p >= 1.f) {
            token = drawn;
            break;
        }
        // 4. Check: the mass of the tokens more likely than the drawn one, over the whole row.
        float above = 0.f;
#pragma unroll
        for (int i = 0; i < kMaxPieces; ++i) {
            if (i >= count) break;
            float x[kVec];
            piece_x(i, x);
#pragma unroll
            for (int e = 0; e < kVec; ++e)
                if (x[e] > drawn_x) above += w[i * kVec + e];
        }
        above *= scale;
        SAMPLING_TRACE_POINT(8);
        const float warp_above = warp_sum(above);
        if (lane < kClusterCtas) *mbarrier::cluster_map(&sh.warp_above[parity][rank][warp], lane) = warp_above;
        __syncwarp();
        mbarrier::cluster_arrive();
        mbarrier::cluster_wait();
        SAMPLING_TRACE_POINT(9);
        float all_above = 0.f;
#pragma unroll
        for (int c = 0; c < kClusterCtas; ++c) {
            const float4* sums = reinterpret_cast<const float4*>(sh.warp_above[parity][c]);
            float cta = 0.f;
#pragma unroll
            for (int v = 0; v < kClusterWarps / 4; ++v) {
                const float4 q = sums[v];
                cta += (q.x + q.y) + (q.z + q.w);
            }
            cta_mass[c] = cta;  // the next draw's, if there is one
            all_above += cta;
        }
        if (accept_draw(all_above, top_p, total, drawn, drawn_x, token, threshold, mass)) break;
        own = above;
    }
    SAMPLING_TRACE_POINT(10);
    if (rank == 0 && threadIdx.x == 0) finish_row(out, state, row_index, token);
#else
    __trap();  // launched only on sm_90+ (launch below)
#endif
}

template <typename T>
cudaError_t launch(const T* logits, int64_t* out, int rows, int vocab, float temperature, float top_p,
                   const int64_t* rng_state, int ctas_per_row, cudaStream_t stream, const DecodeState& state) {
    if (ctas_per_row == kClusterCtas)
        return programmatic_launch::launch_clustered(sample_cluster_kernel<T>, dim3(kClusterCtas * rows),
                                                     dim3(kClusterThreads), 0, stream, kClusterCtas, logits, out,
                                                     vocab, temperature, top_p, rng_state, state);
    return programmatic_launch::launch(sample_kernel<T>, dim3(rows), dim3(kThreads), 0, stream, logits, out, vocab,
                                       temperature, top_p, rng_state, state);
}

}  // namespace

int max_ctas_per_row(int vocab) {
    const int64_t capacity = (int64_t)kClusterCtas * kClusterThreads * kMaxTokensPerThread;
    // (thread-block clusters need sm_90+, as programmatic launch does)
    return programmatic_launch::current_device_supports() && vocab <= capacity ? kClusterCtas : 1;
}

int default_ctas_per_row(int rows, int vocab) {
    return rows <= kClusterMaxRows ? max_ctas_per_row(vocab) : 1;
}

cudaError_t sample(const void* logits, LogitsType type, int64_t* out, int rows, int vocab, float temperature,
                   float top_p, const int64_t* rng_state, int ctas_per_row, cudaStream_t stream,
                   const DecodeState& state) {
    if (rows == 0) return cudaSuccess;
    if (ctas_per_row == 0) ctas_per_row = default_ctas_per_row(rows, vocab);
    if (ctas_per_row != 1 && ctas_per_row != max_ctas_per_row(vocab)) return cudaErrorInvalidValue;
    switch (type) {
        case LogitsType::kFloat32:
            return launch(static_cast<const float*>(logits), out, rows, vocab, temperature, top_p, rng_state,
                          ctas_per_row, stream, state);
        case LogitsType::kBFloat16:
            return launch(static_cast<const __nv_bfloat16*>(logits), out, rows, vocab, temperature, top_p, rng_state,
                          ctas_per_row, stream, state);
        case LogitsType::kFloat16:
            return launch(static_cast<const __half*>(logits), out, rows, vocab, temperature, top_p, rng_state,
                          ctas_per_row, stream, state);
    }
    return cudaErrorInvalidValue;
}

}  // namespace sampling
