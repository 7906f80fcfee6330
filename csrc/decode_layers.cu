// Every transformer layer of a batch-1 decode step in one persistent kernel (sm_90+).
//
// Why: at batch 1 a decode step is a stream of weights (2.47 GB for Llama-3.2-1B), and the kernel-per-
// projection path (gemv.cu + flash_decode) loses about 12 us a layer at its five kernel boundaries: each
// kernel's DRAM stream drains while the dependency chain qkv -> attention -> o -> gate_up -> down crosses into
// the next kernel, and the early start of programmatic launch only overlaps a kernel's tail (docs/perf-notes.md).
//
// How: one block per SM runs all layers. Its producer warp streams the block's share of every weight matrix,
// layer after layer, into a ring of 32 KB shared-memory stages with bulk asynchronous copies
// (cp.async.bulk, completion counted in bytes on an mbarrier per stage). Weights depend on nothing the step
// computes, so the stream never waits for activations, only for a free stage. Eight consumer warps do the
// arithmetic and, where a phase needs every block's output of the one before, meet the other blocks at a
// grid barrier (an atomic counter); while they wait there, the next phase's weights keep arriving.
//
// Phases of a layer (numerics as in the GEMV path it replaces: same roundings, same summation order within a
// dot product as gemv.cu's one-row kernel):
//   qkv        each block: stream = h + delta (the residual stream; every block keeps its own copy in shared
//              memory, computed identically), x = rmsnorm(stream) * attention_norm; the block's pairs of
//              wqkv rows (d, d + head_dim/2) -> RoPE -> q to a buffer, k and v into the cache   | grid barrier
//   attention  (KV head, split of the positions) items, one per block: online softmax on CUDA cores (the
//              work is ~1 MB a layer); several splits are merged by the last one to finish (an atomic ticket
//              after a memory fence)                                                            | grid barrier
//   o          x = the attention output; the block's rows of wo -> delta                        | grid barrier
//   gate_up    stream = h + delta, x = rmsnorm(stream) * ffn_norm; (gate, up) row pairs -> silu(gate) * up
//                                                                                               | grid barrier
//   down       the block's rows of w_down -> delta                           | grid barrier (the next layer)
// A phase's units (rows or row pairs) are cut into one contiguous range per block. The lm_head (with the
// final RMSNorm) and the sampler stay separate kernels (gemv.cu, sampling.cu).
//
// All blocks must be resident at once (the grid barrier): the launch uses one block per SM and checks the
// occupancy. With programmatic launch, blocks start while the previous kernel (the sampler) finishes; the
// producer starts streaming at once, the consumers wait for that kernel before reading the token.
// Reference: the PyTorch decode path (llama3.Transformer.forward_decode with the fused ops off), and the
// GEMV path, which tests/test_decode_fast_path.py compares it with.
//
// Status: experimental, off by default (llama3.USE_PERSISTENT_DECODE). On an H100 (2026-11-27) a decode step
// with it is about 1% faster than with the kernel-per-projection path after a 128-token prompt and 2-5% slower
// after 2048 tokens. Its phase trace (Params::trace, benchmark_model.py --profile --persistent_decode) says
// why: the five grid barriers of a layer take 2-3 us each under the weight stream and the attention items
// 4-12 us, so a block consumes nothing for 8-18 us around the attention and after gate_up, while its ring
// (6 stages, 192 KB) holds 8 us of its share of the DRAM bandwidth. Tried and slower: L2 prefetch of the
// stages beyond the ring and of the attention's cache rows, the attention's cache rows loaded before the qkv
// phase, smaller attention splits, other barrier schemes (see grid_barrier). docs/perf-notes.md has the numbers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "decode_layers.h"
#include "element_convert.cuh"
#include "mbarrier.cuh"
#include "programmatic_launch.cuh"
#include "rounded_ops.cuh"

namespace decode_layers {
namespace {

using element::from_float;
using element::round_to;
using element::to_float;
using element::unpack8;

constexpr int kConsumerWarps = 8;
constexpr int kConsumerThreads = kConsumerWarps * 32;
constexpr int kThreads = kConsumerThreads + 32;  // + the producer warp
constexpr int kStageBytes = 32 * 1024;
constexpr int kMaxStages = 8;
// The producer keeps at most this many stages requested and not yet arrived, however many are free: with all
// six in flight (25 MB over the GPU) every dependent access (the barriers' atomics, the attention's loads)
// queued behind them. 2 made the layers 3% faster than 6 (1, 3 and 4 slower; H100, 2026-11-27), and the free
// stages still fill with arrived data while the consumers wait at a barrier.
constexpr int kStagesInFlight = 2;
constexpr int kPositionsPerSplit = 128;  // attention: below this many positions a KV head is one item

enum class Phase { kQkv, kO, kGateUp, kDown };
constexpr int kPhases = 4;

// Shared memory after the ring: x (a phase's input, or the attention's per-warp partial results), the block's
// copy of the residual stream h, and the stages' mbarriers.
__host__ __device__ constexpr int larger(int a, int b) { return a > b ? a : b; }

struct Layout {
    int x_bytes, h_bytes, fixed_bytes;
    __host__ __device__ explicit Layout(const Params& p) {
        const int group = p.q_heads / p.kv_heads;
        const int x_elements = larger(larger(p.dim, p.hidden), p.q_heads * p.head_dim);
        const int attention_scratch = kConsumerWarps * group * (p.head_dim + 2) * (int)sizeof(float);
        x_bytes = (larger(x_elements * 2, attention_scratch) + 127) / 128 * 128;
        h_bytes = (p.dim * 2 + 127) / 128 * 128;
        fixed_bytes = x_bytes + h_bytes + 2 * kMaxStages * (int)sizeof(uint64_t);
    }
};

// ---------------------------------------------------------------------------------------------------
// mbarrier and bulk-copy helpers (sm_90)
// ---------------------------------------------------------------------------------------------------

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
using mbarrier::shared_address;
#endif

// bytes (a multiple of 16, both addresses 16-byte aligned) from global to this block's shared memory; their
// arrival completes that many bytes of `bar`'s current phase. Weights are read once a step, so their lines go
// first when L2 needs room (the cache rows and activations stay): 1% faster on an H100.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
            "r"(shared_address(dst)),
        "l"(src), "r"(bytes), "r"(shared_address(bar)), "l"(mbarrier::evict_first_policy())
        : "memory");
#endif
}

// The consumer warps' own barrier (the producer warp never joins one after the start).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory"); }

__device__ __forceinline__ unsigned load_acquire(const unsigned* ptr) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
}

__device__ __forceinline__ float safe_ref(float m) { return m == -INFINITY ? 0.f : m; }

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// ---------------------------------------------------------------------------------------------------
// The GEMV phases' geometry, computed the same way by the producer and the consumers
// ---------------------------------------------------------------------------------------------------

struct Matrix {
    const unsigned char* weight;
    int k;              // row length (elements)
    int units;          // outputs: rows, or row pairs (qkv: RoPE pairs; gate_up: gate and up rows)
    int rows_per_unit;  // 1 or 2
    int units_per_stage;
};

__device__ __forceinline__ Matrix matrix_of(const Params& p, const int64_t* layer, Phase phase) {
    Matrix m;
    switch (phase) {
        case Phase::kQkv:
            m = {reinterpret_cast<const unsigned char*>(layer[kWqkv]), p.dim,
                 (p.q_heads + 2 * p.kv_heads) * p.head_dim / 2, 2, 0};
            break;
        case Phase::kO:
            m = {reinterpret_cast<const unsigned char*>(layer[kWo]), p.q_heads * p.head_dim, p.dim, 1, 0};
            break;
        case Phase::kGateUp:
            m = {reinterpret_cast<const unsigned char*>(layer[kWGateUp]), p.dim, p.hidden, 2, 0};
            break;
        default:
            m = {reinterpret_cast<const unsigned char*>(layer[kWDown]), p.hidden, p.dim, 1, 0};
            break;
    }
    m.units_per_stage = kStageBytes / (m.rows_per_unit * m.k * 2);
    return m;
}

// Row r (0 or 1) of unit u.
__device__ __forceinline__ int64_t row_of(const Params& p, Phase phase, const Matrix& m, int u, int r) {
    if (phase == Phase::kQkv) {
        const int half = p.head_dim / 2;
        return (int64_t)(u / half) * p.head_dim + u % half + r * half;
    }
    return u + (int64_t)r * m.units;  // gate_up: row u of gate, row u of up
}

struct Range {
    int begin, end;
};
__device__ __forceinline__ Range block_range(int units) {
    return {(int)((int64_t)units * blockIdx.x / gridDim.x), (int)((int64_t)units * (blockIdx.x + 1) / gridDim.x)};
}

// The block's stages in ring order: layer by layer, phase by phase, units_per_stage units at a time (phases in
// which the block has no units have no stage).
struct StageCursor {
    const Params& p;
    int layer = 0, phase = 0, u = 0;
    Matrix m;
    Range range;
    bool done = false;

    __device__ explicit StageCursor(const Params& params) : p(params) { enter(); }
    __device__ void enter() {  // the first stage of the first phase from (layer, phase) on that has units
        for (; layer < p.n_layers; phase = 0, ++layer) {
            for (; phase < kPhases; ++phase) {
                m = matrix_of(p, p.layers + (int64_t)layer * kLayerPointers, static_cast<Phase>(phase));
                range = block_range(m.units);
                u = range.begin;
                if (u < range.end) return;
            }
        }
        done = true;
    }
    __device__ void next() {
        u += m.units_per_stage;
        if (u < range.end) return;
        ++phase;
        enter();
    }
    __device__ int units() const { return min(m.units_per_stage, range.end - u); }
    __device__ unsigned row_bytes() const { return (unsigned)m.k * 2; }
    // row r of the stage's j-th unit
    __device__ const unsigned char* row(int j, int r) const {
        return m.weight + row_of(p, static_cast<Phase>(phase), m, u + j, r) * row_bytes();
    }
};

// The producer: lane 0 of the last warp fills the ring, in the order the consumers read it.
__device__ void produce(const Params& p, unsigned char* ring, uint64_t* full, uint64_t* empty, int stages) {
    long long waited = 0;
    int n = 0;  // stages filled so far
    for (StageCursor copy(p); !copy.done; ++n, copy.next()) {
        const int slot = n % stages;
        const long long t0 = clock64();
        mbarrier::wait(&empty[slot], ((n / stages) & 1) ^ 1);
        if (n >= kStagesInFlight) {  // pacing: no more than kStagesInFlight stages requested and not arrived
            const int older = n - kStagesInFlight;
            mbarrier::wait(&full[older % stages], (older / stages) & 1);
        }
        waited += clock64() - t0;
        const int count = copy.units();
        const unsigned row_bytes = copy.row_bytes();
        mbarrier::arrive_expect_bytes(&full[slot], count * copy.m.rows_per_unit * row_bytes);
        unsigned char* dst = ring + (size_t)slot * kStageBytes;
        for (int j = 0; j < count; ++j)
            for (int r = 0; r < copy.m.rows_per_unit; ++r, dst += row_bytes)
                bulk_copy_to_shared(dst, copy.row(j, r), row_bytes, &full[slot]);
    }
    if (p.trace != nullptr)
        p.trace[(int64_t)blockIdx.x * trace_slots_per_block(p.n_layers) + p.n_layers * kTraceEventsPerLayer] = waited;
}

// Dot products of kRows shared-memory rows with x (k8 16-byte pieces each): lane l takes pieces l, l + 32,
// ... in order, then the lanes are summed (gemv.cu's order).
template <typename T, int kRows>
__device__ __forceinline__ void dot_rows(const uint4* rows, const uint4* x, int k8, int lane, float (&acc)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
#pragma unroll 4
    for (int i = lane; i < k8; i += 32) {
        float xf[8];
        unpack8<T>(x[i], xf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            float wf[8];
            unpack8<T>(rows[r * k8 + i], wf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r] = fmaf(wf[e], xf[e], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
}

// ---------------------------------------------------------------------------------------------------
// Attention of the step's query over one KV head's positions [begin, end) (one item), CUDA cores.
// Lanes: kLanesPerPos lanes hold one cache row (8 elements each), so a warp covers kSlots positions at once;
// every slot runs its own online softmax (log2 domain) over its positions, and the slots, then the warps, are
// merged with exp2(m_i - m) weights. Output: the normalized result and its log2-sum-exp for each query head.
// ---------------------------------------------------------------------------------------------------
template <typename T, int kHeadDim, int kGroup>
__device__ void attend(const Params& p, const int64_t* layer, int kv_head, int begin, int end, float* scratch,
                       int warp, int lane) {
    constexpr int kLanesPerPos = kHeadDim / 8;
    constexpr int kSlots = 32 / kLanesPerPos;
    constexpr int kRounds = 4;  // positions per slot whose loads are in flight together
    const int slot = lane / kLanesPerPos, piece = lane % kLanesPerPos;

    float qf[kGroup][8];
    const uint4* q = static_cast<const uint4*>(p.q);
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        unpack8<T>(__ldcg(q + ((kv_head * kGroup + h) * kHeadDim) / 8 + piece), qf[h]);
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[h][e] *= p.scale_log2;
    }
    float m[kGroup], l[kGroup], acc[kGroup][8];
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    }

    const int64_t row_pieces = (int64_t)p.kv_heads * kHeadDim / 8;  // 16-byte pieces per cache position
    const uint4* k_cache = reinterpret_cast<const uint4*>(layer[kKCache]) + kv_head * kHeadDim / 8 + piece;
    const uint4* v_cache = reinterpret_cast<const uint4*>(layer[kVCache]) + kv_head * kHeadDim / 8 + piece;
    constexpr int kStride = kConsumerWarps * kSlots;  // positions between a slot's consecutive rounds
    for (int base = begin + warp * kSlots + slot; base < end + slot; base += kStride * kRounds) {
        uint4 kv[kRounds], vv[kRounds];
#pragma unroll
        for (int r = 0; r < kRounds; ++r) {
            const int pos = base + r * kStride;
            if (pos < end) {
                kv[r] = __ldcg(k_cache + pos * row_pieces);
                vv[r] = __ldcg(v_cache + pos * row_pieces);
            }
        }
#pragma unroll
        for (int r = 0; r < kRounds; ++r) {
            const bool valid = base + r * kStride < end;  // the same for the lanes of a slot
            float kf[8], vf[8];
            unpack8<T>(valid ? kv[r] : make_uint4(0, 0, 0, 0), kf);
            unpack8<T>(valid ? vv[r] : make_uint4(0, 0, 0, 0), vf);
#pragma unroll
            for (int h = 0; h < kGroup; ++h) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) s = fmaf(qf[h][e], kf[e], s);
#pragma unroll
                for (int offset = 1; offset < kLanesPerPos; offset *= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
                if (valid) {
                    const float m_new = fmaxf(m[h], s);
                    const float c = exp2f(m[h] - m_new), w = exp2f(s - m_new);
                    l[h] = l[h] * c + w;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(acc[h][e], c, w * vf[e]);
                    m[h] = m_new;
                }
            }
        }
    }

    // The slots of the warp, then the warps (through scratch: [warp][head][kHeadDim], then m, then l).
#pragma unroll
    for (int offset = kLanesPerPos; offset < 32; offset *= 2) {
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
            const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
            const float l_other = __shfl_xor_sync(0xffffffffu, l[h], offset);
            const float ref = safe_ref(fmaxf(m[h], m_other));
            const float a = exp2f(m[h] - ref), b = exp2f(m_other - ref);
            l[h] = l[h] * a + l_other * b;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] = acc[h][e] * a + __shfl_xor_sync(0xffffffffu, acc[h][e], offset) * b;
            m[h] = fmaxf(m[h], m_other);
        }
    }
    float* scratch_m = scratch + kConsumerWarps * kGroup * kHeadDim;
    float* scratch_l = scratch_m + kConsumerWarps * kGroup;
    if (slot == 0) {
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
#pragma unroll
            for (int e = 0; e < 8; ++e) scratch[(warp * kGroup + h) * kHeadDim + piece * 8 + e] = acc[h][e];
            if (piece == 0) {
                scratch_m[warp * kGroup + h] = m[h];
                scratch_l[warp * kGroup + h] = l[h];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------

template <typename T, int kHeadDim>
struct Consumer {
    const Params& p;
    unsigned char* ring;
    T* x;                // shared: the phase's input
    T* h;                // shared: the residual stream
    uint64_t* full;
    uint64_t* empty;
    float* warp_sums;    // shared [kConsumerWarps]
    int* flag;           // shared
    long long* wait_totals;  // shared [2]: the first warp's waits for data, thread 0's barrier waits (trace)
    int stages;
    int warp, lane;
    int n = 0;           // stages consumed so far (mirrors the producer)
    unsigned barrier_target = 0;

    __device__ void stamp(int layer, int event) {
        if (p.trace != nullptr && threadIdx.x == 0)
            p.trace[(int64_t)blockIdx.x * trace_slots_per_block(p.n_layers) + layer * kTraceEventsPerLayer + event] =
                global_ns();
    }

    // All blocks meet: thread 0 publishes the block's writes (the consumer barrier orders the other threads'
    // before its fence) and adds one to the counter, then waits for every block's. Measured alternatives were
    // slower (H100, 2026-11-27): every thread fencing (+7%), red.release with relaxed polling (+1-3%), one
    // epoch word per block read by a warp instead of the shared counter (+20%).
    __device__ void grid_barrier() {
        barrier_target += gridDim.x;
        consumer_sync();
        if (threadIdx.x == 0) {
            const long long t0 = clock64();
            __threadfence();
            atomicAdd(p.counters, 1u);
            while (load_acquire(p.counters) < barrier_target) {
            }
            wait_totals[1] += clock64() - t0;
        }
        consumer_sync();
    }

    // h <- the embedding row of token (first) or h + delta, rounded; x <- rmsnorm(h) * norm_weight (gemv.cu's
    // prologue, same thread partition: the same sum).
    __device__ void stream_and_norm(const T* norm_weight, int64_t token, bool first) {
        const int pieces = p.dim / 8;
        uint4* h4 = reinterpret_cast<uint4*>(h);
        uint4* x4 = reinterpret_cast<uint4*>(x);
        const uint4* delta4 = static_cast<const uint4*>(p.delta);
        const uint4* embedding4 = static_cast<const uint4*>(p.embedding) + token * pieces;
        float sum_sq = 0.f;
        for (int i = threadIdx.x; i < pieces; i += kConsumerThreads) {
            uint4 hv;
            if (first) {
                hv = __ldg(embedding4 + i);
            } else {
                hv = __ldcg(delta4 + i);
                const uint4 rv = h4[i];
                T* he = reinterpret_cast<T*>(&hv);
                const T* re = reinterpret_cast<const T*>(&rv);
#pragma unroll
                for (int e = 0; e < 8; ++e) he[e] = from_float<T>(to_float(he[e]) + to_float(re[e]));
            }
            h4[i] = hv;
            float f[8];
            unpack8<T>(hv, f);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s += f[e] * f[e];
            sum_sq += s;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
        if (lane == 0) warp_sums[warp] = sum_sq;
        consumer_sync();
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kConsumerWarps; ++w) total += warp_sums[w];
        const float inv_rms = rounded::inverse_rms(total, p.dim, p.eps);
        const uint4* g4 = reinterpret_cast<const uint4*>(norm_weight);
        for (int i = threadIdx.x; i < pieces; i += kConsumerThreads) {
            float hf[8], gf[8];
            unpack8<T>(h4[i], hf);
            unpack8<T>(__ldg(g4 + i), gf);
            uint4 ov;
            T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
            for (int e = 0; e < 8; ++e) oe[e] = rounded::rms_normalize<T>(hf[e], gf[e], inv_rms);
            x4[i] = ov;
        }
        consumer_sync();
    }

    // x <- a buffer another phase wrote (elements, a multiple of 8)
    __device__ void load_x(const void* src, int elements) {
        const uint4* s4 = static_cast<const uint4*>(src);
        uint4* x4 = reinterpret_cast<uint4*>(x);
        for (int i = threadIdx.x; i < elements / 8; i += kConsumerThreads) x4[i] = __ldcg(s4 + i);
        consumer_sync();
    }

    // The block's units of a GEMV phase from the ring; epilogue(unit, acc) on lane 0 of the warp that did it.
    // The block's i-th unit goes to warp i % 8 whichever stage holds it, so with few units a stage (down_proj:
    // two) the warps work on consecutive stages at once. Every warp waits for every stage before it marks it
    // consumed: a warp with nothing in a stage may not run a lap ahead and mark the stage's next fill.
    template <int kRowsPerUnit, typename Epilogue>
    __device__ void gemv(const Matrix& m, Epilogue epilogue) {
        const Range range = block_range(m.units);
        const int k8 = m.k / 8;
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        for (int u = range.begin; u < range.end; u += m.units_per_stage, ++n) {
            const int slot = n % stages;
            const long long t0 = clock64();
            mbarrier::wait(&full[slot], (n / stages) & 1);
            if (warp == 0 && lane == 0) wait_totals[0] += clock64() - t0;
            const int count = min(m.units_per_stage, range.end - u);
            const uint4* stage = reinterpret_cast<const uint4*>(ring + (size_t)slot * kStageBytes);
            const int first = (warp - (u - range.begin) % kConsumerWarps + kConsumerWarps) % kConsumerWarps;
            for (int j = first; j < count; j += kConsumerWarps) {
                float acc[kRowsPerUnit];
                dot_rows<T, kRowsPerUnit>(stage + (int64_t)j * kRowsPerUnit * k8, x4, k8, lane, acc);
                if (lane == 0) epilogue(u + j, acc);
            }
            __syncwarp();
            if (lane == 0) mbarrier::arrive(&empty[slot]);
        }
    }

    // This block's attention item, if it has one: KV head kv_head, split `split` of num_splits.
    // This block's attention item for a sequence of seqlen positions: KV head, split of num_splits, positions
    // [begin, end); false when it has none.
    struct Item {
        int kv_head, split, num_splits, begin, end;
    };
    __device__ bool attention_item(int seqlen, Item& it) const {
        it.num_splits = (seqlen + kPositionsPerSplit - 1) / kPositionsPerSplit;
        it.num_splits = max(1, min(it.num_splits, min(kMaxSplits, (int)gridDim.x / p.kv_heads)));
        if ((int)blockIdx.x >= p.kv_heads * it.num_splits) return false;
        it.kv_head = blockIdx.x / it.num_splits, it.split = blockIdx.x % it.num_splits;
        const int chunk = (seqlen + it.num_splits - 1) / it.num_splits;
        it.begin = min(seqlen, it.split * chunk), it.end = min(seqlen, it.begin + chunk);
        return true;
    }

    template <int kGroup>
    __device__ void attention(const int64_t* layer, int seqlen) {
        Item it;
        if (!attention_item(seqlen, it)) return;
        const int kv_head = it.kv_head, split = it.split, num_splits = it.num_splits, begin = it.begin, end = it.end;
        float* scratch = reinterpret_cast<float*>(x);
        attend<T, kHeadDim, kGroup>(p, layer, kv_head, begin, end, scratch, warp, lane);
        consumer_sync();

        const float* scratch_m = scratch + kConsumerWarps * kGroup * kHeadDim;
        const float* scratch_l = scratch_m + kConsumerWarps * kGroup;
        T* out = static_cast<T*>(p.attention);
        for (int i = threadIdx.x; i < kGroup * kHeadDim; i += kConsumerThreads) {
            const int hh = i / kHeadDim, d = i % kHeadDim;
            float m_max = -INFINITY;
#pragma unroll
            for (int w = 0; w < kConsumerWarps; ++w) m_max = fmaxf(m_max, scratch_m[w * kGroup + hh]);
            const float ref = safe_ref(m_max);
            float sum = 0.f, o = 0.f;
#pragma unroll
            for (int w = 0; w < kConsumerWarps; ++w) {
                const float c = exp2f(scratch_m[w * kGroup + hh] - ref);
                sum += scratch_l[w * kGroup + hh] * c;
                o += scratch[(w * kGroup + hh) * kHeadDim + d] * c;
            }
            const int q_head = kv_head * kGroup + hh;
            if (num_splits == 1) {
                out[q_head * kHeadDim + d] = from_float<T>(sum > 0.f ? o / sum : 0.f);
            } else {
                const int row = q_head * kMaxSplits + split;
                p.partial_out[row * kHeadDim + d] = sum > 0.f ? o / sum : 0.f;
                if (d == 0) p.partial_lse[row] = sum > 0.f ? m_max + log2f(sum) : -INFINITY;
            }
        }
        if (num_splits == 1) return;

        // The last split of this KV head to finish merges them all.
        consumer_sync();
        unsigned* ticket = p.counters + 2 + kv_head;
        if (threadIdx.x == 0) {
            __threadfence();  // the block's partial results (ordered before by the barrier), then the ticket
            *flag = atomicAdd(ticket, 1u) == (unsigned)num_splits - 1;
            __threadfence();
        }
        consumer_sync();
        if (!*flag) return;
        for (int i = threadIdx.x; i < kGroup * kHeadDim; i += kConsumerThreads) {
            const int hh = i / kHeadDim, d = i % kHeadDim;
            const int row0 = (kv_head * kGroup + hh) * kMaxSplits;
            float m_max = -INFINITY;
            for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, __ldcg(p.partial_lse + row0 + s));
            const float ref = safe_ref(m_max);
            float sum = 0.f, o = 0.f;
            for (int s = 0; s < num_splits; ++s) {
                const float w = exp2f(__ldcg(p.partial_lse + row0 + s) - ref);
                sum += w;
                o += w * __ldcg(p.partial_out + (row0 + s) * kHeadDim + d);
            }
            out[(kv_head * kGroup + hh) * kHeadDim + d] = from_float<T>(sum > 0.f ? o / sum : 0.f);
        }
        if (threadIdx.x == 0) *ticket = 0;  // every split of this launch has taken its ticket
    }

    template <int kGroup>
    __device__ void run() {
        const int half = kHeadDim / 2;
        programmatic_launch::wait_for_previous_kernel();  // the token, position and length: the sampler's
        const int64_t token = __ldcg(p.tokens);
        const int64_t pos = __ldcg(p.positions);
        const int seqlen = max(0, min(__ldcg(p.cache_seqlens), p.max_seq));
        if (token < 0 || token >= p.vocab) __trap();   // a token id outside the embedding table
        if (pos < 0 || pos >= p.max_seq) __trap();     // never write outside the cache
        const T* cos_row = static_cast<const T*>(p.cos) + pos * kHeadDim;
        const T* sin_row = static_cast<const T*>(p.sin) + pos * kHeadDim;

        for (int l = 0; l < p.n_layers; ++l) {
            const int64_t* layer = p.layers + (int64_t)l * kLayerPointers;
            T* k_cache = reinterpret_cast<T*>(layer[kKCache]) + pos * p.kv_heads * kHeadDim;
            T* v_cache = reinterpret_cast<T*>(layer[kVCache]) + pos * p.kv_heads * kHeadDim;

            if (l > 0) grid_barrier();  // the previous layer's down_proj (delta)
            stamp(l, 0);
            stream_and_norm(reinterpret_cast<const T*>(layer[kAttentionNorm]), token, l == 0);
            T* q = static_cast<T*>(p.q);
            gemv<2>(matrix_of(p, layer, Phase::kQkv), [&](int u, const float (&acc)[2]) {
                const int head = u / half, d = u % half;
                float out1 = round_to<T>(acc[0]), out2 = round_to<T>(acc[1]);
                T* dst;
                if (head < p.q_heads + p.kv_heads) {
                    rounded::rope_pair(out1, out2, cos_row, sin_row, d, half, out1, out2);
                    dst = head < p.q_heads ? q + head * kHeadDim : k_cache + (head - p.q_heads) * kHeadDim;
                } else {
                    dst = v_cache + (head - p.q_heads - p.kv_heads) * kHeadDim;
                }
                dst[d] = from_float<T>(out1);
                dst[d + half] = from_float<T>(out2);
            });
            stamp(l, 1);
            grid_barrier();  // q, and the new cache rows
            stamp(l, 2);

            attention<kGroup>(layer, seqlen);
            stamp(l, 3);
            grid_barrier();  // the attention output
            stamp(l, 4);

            T* delta = static_cast<T*>(p.delta);
            load_x(p.attention, p.q_heads * kHeadDim);
            gemv<1>(matrix_of(p, layer, Phase::kO),
                    [&](int u, const float (&acc)[1]) { delta[u] = from_float<T>(acc[0]); });
            stamp(l, 5);
            grid_barrier();  // delta
            stamp(l, 6);

            stream_and_norm(reinterpret_cast<const T*>(layer[kFfnNorm]), token, false);
            if (l == p.n_layers - 1 && blockIdx.x == 0) {  // the stream the lm_head prologue adds delta to
                for (int i = threadIdx.x; i < p.dim / 8; i += kConsumerThreads)
                    static_cast<uint4*>(p.stream)[i] = reinterpret_cast<const uint4*>(h)[i];
            }
            T* act = static_cast<T*>(p.act);
            gemv<2>(matrix_of(p, layer, Phase::kGateUp), [&](int u, const float (&acc)[2]) {
                act[u] = rounded::silu_mul<T>(round_to<T>(acc[0]), round_to<T>(acc[1]));
            });
            stamp(l, 7);
            grid_barrier();  // act
            stamp(l, 8);

            load_x(p.act, p.hidden);
            gemv<1>(matrix_of(p, layer, Phase::kDown),
                    [&](int u, const float (&acc)[1]) { delta[u] = from_float<T>(acc[0]); });
            stamp(l, 9);
        }
        if (p.trace != nullptr && threadIdx.x == 0) {
            unsigned long long* totals =
                p.trace + (int64_t)blockIdx.x * trace_slots_per_block(p.n_layers) + p.n_layers * kTraceEventsPerLayer;
            totals[1] = wait_totals[0];
            totals[2] = wait_totals[1];
        }

        // Leave the counters at zero for the next launch: the last block out resets the barrier (every block
        // is past its last barrier then).
        if (threadIdx.x == 0 && atomicAdd(p.counters + 1, 1u) == gridDim.x - 1) {
            p.counters[0] = 0;
            p.counters[1] = 0;
        }
    }
};

template <typename T, int kHeadDim, int kGroup>
__global__ void __launch_bounds__(kThreads, 1) decode_layers_kernel(const __grid_constant__ Params p, int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap();  // launched only on sm_90+ (unsupported_reason); compiled everywhere, without the bulk copies
#endif
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ float warp_sums[kConsumerWarps];
    __shared__ int flag;
    __shared__ long long wait_totals[2];
    const Layout layout(p);
    unsigned char* ring = smem;
    T* x = reinterpret_cast<T*>(smem + (size_t)stages * kStageBytes);
    T* h = reinterpret_cast<T*>(smem + (size_t)stages * kStageBytes + layout.x_bytes);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + (size_t)stages * kStageBytes + layout.x_bytes + layout.h_bytes);
    uint64_t* empty = full + kMaxStages;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        wait_totals[0] = wait_totals[1] = 0;
        for (int s = 0; s < stages; ++s) {
            mbarrier::init(&full[s], 1);                // the producer's arrival, plus the stage's bytes
            mbarrier::init(&empty[s], kConsumerWarps);  // every consumer warp is done with the stage
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        mbarrier::fence_init_for_cluster();
#endif
    }
    __syncthreads();
    programmatic_launch::allow_next_kernel();

    if (warp == kConsumerWarps) {
        if (lane == 0) produce(p, ring, full, empty, stages);  // weights depend on no earlier kernel
        return;
    }
    Consumer<T, kHeadDim> consumer{p, ring, x, h, full, empty, warp_sums, &flag, wait_totals, stages, warp, lane};
    consumer.template run<kGroup>();
}

template <typename T, int kHeadDim, int kGroup>
cudaError_t launch_group(const Params& p, cudaStream_t stream) {
    auto kernel = decode_layers_kernel<T, kHeadDim, kGroup>;
    int device = 0, sms = 0, max_shared = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaFuncAttributes attributes;
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess) return err;
    const Layout layout(p);
    const int stages = std::min<int>(
        kMaxStages, (max_shared - (int)attributes.sharedSizeBytes - layout.fixed_bytes) / kStageBytes);
    if (stages < 2 || p.kv_heads > sms) return cudaErrorInvalidValue;
    const size_t shared = (size_t)stages * kStageBytes + layout.fixed_bytes;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
    if (err != cudaSuccess) return err;
    int resident = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreads, shared);
    if (err != cudaSuccess) return err;
    if (resident < 1) return cudaErrorInvalidConfiguration;  // the grid barrier needs every block resident
    return programmatic_launch::launch(kernel, dim3(sms), dim3(kThreads), shared, stream, p, stages);
}

template <typename T, int kHeadDim>
cudaError_t launch_head_dim(const Params& p, cudaStream_t stream) {
    switch (p.q_heads / p.kv_heads) {
        case 1: return launch_group<T, kHeadDim, 1>(p, stream);
        case 2: return launch_group<T, kHeadDim, 2>(p, stream);
        case 3: return launch_group<T, kHeadDim, 3>(p, stream);
        case 4: return launch_group<T, kHeadDim, 4>(p, stream);
    }
    return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_typed(const Params& p, cudaStream_t stream) {
    return p.head_dim == 64 ? launch_head_dim<T, 64>(p, stream) : launch_head_dim<T, 128>(p, stream);
}

}  // namespace

const char* unsupported_reason(int dim, int hidden, int q_heads, int kv_heads, int head_dim, int device,
                               cudaError_t* error) {
    *error = cudaSuccess;
    if (head_dim != 64 && head_dim != 128) return "head_dim must be 64 or 128";
    if (kv_heads <= 0 || q_heads % kv_heads != 0) return "q_heads must be a multiple of kv_heads";
    const int group = q_heads / kv_heads;
    // (the attention's per-lane state of more heads spills at the 168 registers of 9 warps a block; Llama 3.x
    // models that fit one GPU have groups of 3 and 4)
    if (group > kMaxGroup) return "query heads per KV head must be 1, 2, 3 or 4";
    if (dim % 8 != 0 || hidden % 8 != 0) return "dim and hidden must be multiples of 8";
    // a stage holds at least one unit (two rows of length dim, or a row of length hidden or q_heads * head_dim)
    if (2 * dim * 2 > kStageBytes || hidden * 2 > kStageBytes || q_heads * head_dim * 2 > kStageBytes)
        return "dim > 8192 or hidden > 16384 or q_heads * head_dim > 16384";
    int major = 0, sms = 0, max_shared = 0;
    *error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (*error == cudaSuccess) *error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (*error == cudaSuccess)
        *error = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (*error != cudaSuccess) return "device query failed";
    if (major < 9) return "needs sm_90 or newer (bulk copies)";
    if (kv_heads > sms) return "more KV heads than SMs";
    Params p = {};
    p.dim = dim, p.hidden = hidden, p.q_heads = q_heads, p.kv_heads = kv_heads, p.head_dim = head_dim;
    // (+2 KB: the kernel's static shared memory)
    if (max_shared - 2048 - Layout(p).fixed_bytes < 2 * kStageBytes) return "not enough shared memory";
    return nullptr;
}

cudaError_t launch(const Params& p, DType dtype, cudaStream_t stream) {
    return dtype == DType::kBFloat16 ? launch_typed<__nv_bfloat16>(p, stream) : launch_typed<__half>(p, stream);
}

}  // namespace decode_layers
