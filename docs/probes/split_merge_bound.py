#!/usr/bin/env python3
"""What a split-KV decode kernel can reach at most: pure reads of the K/V bytes, with and without a split merge.

Issue 3 asks for 90% of the copy bandwidth at S >= 65536; at batch 1 head 64 S = 65536 on an H200 (134 MB) that is
34.8 us. A kernel that splits the sequence must read those bytes and then merge the splits; this probe times, beside
our kernel, kv_read (the benchmarks' bound), the one-element floor and cuDNN, kernels that compute nothing but read
exactly the same bytes, alone and followed by a split merge stripped to its memory traffic:

  pL_B   kv_read's loop and load (element::load_stream_16B, csrc/): 256 threads, L 16-byte loads a thread a step (L =
         4, 8, 16), __launch_bounds__(256, B) and B blocks an SM (at B = 8, 32 registers a thread, ptxas interleaves the
         loads with their XORs: 3-4 in flight)
  bS_B   one warp a block, lane 0 keeps S 1-d bulk copies (cp.async.bulk) of 16 KB in flight, B blocks an SM
  cS_C   bS_B's ring in 8 clusters of C blocks (one per KV head at batch 1), merged through distributed shared memory:
         each block stores its word into the first block's shared memory, then a cluster barrier (release / acquire)
  ...u   the variant, then the workspace merge of a split-KV kernel with one word a split: the blocks form 8 units
         (block i in unit i % 8, as the 8 KV heads of batch 1); each block stores its word and takes its unit's ticket
         (an acquire-release atomic: the release makes the word visible to whoever draws the last ticket), and the
         unit's last block reads its unit's words, all loads at once, and writes their XOR (and resets the ticket).
         Our kernel's merge does the same with each split's rows and log-sum-exps instead of one word.
  ...m   the same with one unit for the whole grid (its last block reads every block's word)

The p variants' checksum (XOR of every word) is checked against PyTorch's; the bulk variants sample one word a lane of
each chunk (the copy engine reads every byte either way). Timing: benchmark_kernel.py's Timer (L2 flushed by a read,
a spin, CUDA events), every implementation in alternating rounds of --iters launches, the median of the rounds' medians.

  python3 docs/probes/split_merge_bound.py        # README "What a split-KV kernel can reach" (forty-third session)
  python3 docs/probes/split_merge_bound.py --shapes 1:64:65536 --variants p8_8,p8_8u,b6_2,b6_2u --rounds 5
"""
import argparse
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

CUDA = r"""
#include <cstdint>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "element_convert.cuh"  // (csrc/: kv_read's 16-byte streaming load)

// The split merge's memory traffic with one word a split (see the module's docstring, "...u" / "...m"). The unit's
// words are loaded all at once (a thread's loads into registers before the first XOR), so that the last block pays one
// L2 round trip for them, as a merge of 16 splits' rows does.
template <int kThreads, int kUnits>
__device__ __forceinline__ void ticket_merge(uint32_t block_word, uint32_t* words, unsigned* tickets, uint32_t* out) {
    constexpr int kLoads = (kThreads == 32 ? 512 : 2048) / kThreads;  // (the host checks that a unit's words fit)
    __shared__ int last;
    const unsigned nblocks = gridDim.x * gridDim.y, id = blockIdx.y * gridDim.x + blockIdx.x;
    const unsigned unit = id % kUnits, unit_blocks = nblocks / kUnits + (unit < nblocks % kUnits ? 1u : 0u);
    if (threadIdx.x == 0) {
        words[id] = block_word;
        unsigned old;
        asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(tickets + unit) : "memory");
        last = old == unit_blocks - 1;
    }
    __syncthreads();
    if (!last) return;
    uint32_t piece[kLoads];
#pragma unroll
    for (int r = 0; r < kLoads; ++r) {
        const unsigned j = threadIdx.x + r * kThreads;
        piece[r] = j < unit_blocks ? __ldcg(words + unit + j * kUnits) : 0u;
    }
    uint32_t acc = 0;
#pragma unroll
    for (int r = 0; r < kLoads; ++r) acc ^= piece[r];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ uint32_t wx[kThreads / 32];
    if (threadIdx.x % 32 == 0) wx[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t t = 0;
        for (int w = 0; w < kThreads / 32; ++w) t ^= wx[w];
        out[unit] = t;
        tickets[unit] = 0;
    }
}

// kMerge: 0 none (each block's word stored), 1 one unit, 8 eight units.
template <int kLoads, int kMinBlocks, int kMerge>
__global__ void __launch_bounds__(256, kMinBlocks)
    read_plain(const char* k, const char* v, int64_t seg, uint32_t* words, unsigned* tickets, uint32_t* out) {
    constexpr int64_t kStep = 256 * kLoads * 16;
    const char* base = blockIdx.y == 0 ? k : v;
    uint32_t acc = 0;
    for (int64_t step = (int64_t)blockIdx.x * kStep; step < seg; step += gridDim.x * kStep) {
        uint4 piece[kLoads];
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
            const int64_t off = step + ((int64_t)i * 256 + threadIdx.x) * 16;
            piece[i] = off < seg ? element::load_stream_16B(base + off) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int i = 0; i < kLoads; ++i) acc ^= piece[i].x ^ piece[i].y ^ piece[i].z ^ piece[i].w;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ uint32_t wx[8];
    if (threadIdx.x % 32 == 0) wx[threadIdx.x / 32] = acc;
    __syncthreads();
    uint32_t block = 0;
#pragma unroll
    for (int w = 0; w < 8; ++w) block ^= wx[w];
    if constexpr (kMerge > 0) {
        ticket_merge<256, kMerge>(block, words, tickets, out);
    } else if (threadIdx.x == 0) {
        words[blockIdx.y * gridDim.x + blockIdx.x] = block;
    }
}

// One warp a block, lane 0 the ring's only filler (the copy engine needs no more threads to keep bytes in flight);
// chunk c of the concatenated K | V, blocks taking chunks blockIdx.x, + gridDim.x, ...; every lane XORs one word of
// each landed chunk. Returns the warp's XOR.
constexpr int kChunk = 16384;
constexpr int kMaxStages = 13;  // (13 x 16 KB: the most dynamic shared memory a block may have)
__device__ __forceinline__ uint32_t stream_bulk(const char* k, const char* v, int64_t seg, int stages) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) uint64_t full[kMaxStages];
    const int64_t chunks_per_seg = seg / kChunk, chunks = 2 * chunks_per_seg;
    auto addr = [](const void* p) { return (uint32_t)__cvta_generic_to_shared(p); };
    auto issue = [&](int slot, int64_t c) {
        const char* src = (c < chunks_per_seg ? k : v) + (c % chunks_per_seg) * kChunk;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(addr(&full[slot])), "r"(kChunk)
                     : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(addr(ring + (size_t)slot * kChunk)), "l"(src), "r"(kChunk), "r"(addr(&full[slot]))
                     : "memory");
    };
    if (threadIdx.x == 0) {
        for (int i = 0; i < stages; ++i)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(addr(&full[i])) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int i = 0; i < stages; ++i) {
            const int64_t c = blockIdx.x + (int64_t)i * gridDim.x;
            if (c < chunks) issue(i, c);
        }
    }
    __syncwarp();
    uint32_t acc = 0;
    int n = 0;
    for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x, ++n) {
        const int slot = n % stages;
        const unsigned parity = (n / stages) & 1;
        asm volatile(
            "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}"
            ::"r"(addr(&full[slot])), "r"(parity) : "memory");
        acc ^= reinterpret_cast<const uint32_t*>(ring + (size_t)slot * kChunk)[threadIdx.x * 97];
        __syncwarp();
        const int64_t next = c + (int64_t)stages * gridDim.x;
        if (threadIdx.x == 0 && next < chunks) {
            // (the lanes' reads of the stage, generic proxy, before the copy engine's write into it)
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(slot, next);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

template <int kMerge>
__global__ void __launch_bounds__(32) read_bulk(const char* k, const char* v, int64_t seg, int stages, uint32_t* words,
                                                unsigned* tickets, uint32_t* out) {
    const uint32_t acc = stream_bulk(k, v, seg, stages);
    if constexpr (kMerge > 0) {
        ticket_merge<32, kMerge>(acc, words, tickets, out);
    } else if (threadIdx.x == 0) {
        words[blockIdx.x] = acc;
    }
}

// read_bulk's stream in clusters of `cluster` blocks (8 units x cluster blocks: a split-KV grid at batch 1 with 8 KV
// heads), merged inside each cluster through distributed shared memory. A block may write another's shared memory only
// once that block runs: the cluster barrier's arrival at the start, its wait before the store (then a second barrier
// makes the stores visible to the first block).
__global__ void __launch_bounds__(32) read_bulk_cluster(const char* k, const char* v, int64_t seg, int stages,
                                                         uint32_t* out) {
    __shared__ uint32_t slots[16];
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    const uint32_t acc = stream_bulk(k, v, seg, stages);
    auto addr = [](const void* p) { return (uint32_t)__cvta_generic_to_shared(p); };
    unsigned rank, size;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (threadIdx.x == 0) {
        uint32_t remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, 0;" : "=r"(remote) : "r"(addr(&slots[rank])));
        asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(remote), "r"(acc) : "memory");
    }
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
    if (rank == 0 && threadIdx.x == 0) {
        uint32_t t = 0;
        for (unsigned r = 0; r < size; ++r) t ^= slots[r];
        out[blockIdx.x / size] = t;
    }
}

static void check(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, cudaGetErrorString(e)); }

void plain(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t loads, int64_t min_blocks, int64_t blocks_per_seg,
           int64_t merge, torch::Tensor words, torch::Tensor tickets, torch::Tensor out) {
    auto s = c10::cuda::getCurrentCUDAStream();
    dim3 grid(blocks_per_seg, 2);
    auto w = (uint32_t*)words.data_ptr(); auto t = (unsigned*)tickets.data_ptr(); auto o = (uint32_t*)out.data_ptr();
    auto kp = (const char*)k.data_ptr(), vp = (const char*)v.data_ptr();
    bool launched = false;
#define P(L, B, M) \
    if (loads == L && min_blocks == B && merge == M) { \
        read_plain<L, B, M><<<grid, 256, 0, s>>>(kp, vp, seg, w, t, o); \
        launched = true; }
#define PM(L, B) P(L, B, 0) P(L, B, 1) P(L, B, 8)
    PM(8, 8) PM(8, 4) PM(16, 2) PM(16, 4) PM(4, 8)
#undef PM
#undef P
    TORCH_CHECK(launched, "plain: (loads, blocks an SM) must be one of (8, 8), (8, 4), (16, 2), (16, 4), (4, 8)");
    check(cudaGetLastError());
}

// The ring's largest size allowed for every bulk kernel, once: a launch or an occupancy query then needs no attribute
// of its own (a query that set a smaller limit would fail a later launch with a larger ring).
static void allow_largest_ring() {
    static const bool done = [] {
        const int smem = kMaxStages * kChunk;
        check(cudaFuncSetAttribute(read_bulk<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        check(cudaFuncSetAttribute(read_bulk<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        check(cudaFuncSetAttribute(read_bulk<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        check(cudaFuncSetAttribute(read_bulk_cluster, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        check(cudaFuncSetAttribute(read_bulk_cluster, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        return true;
    }();
    (void)done;
}

template <int kMerge>
static void launch_bulk(const char* kp, const char* vp, int64_t seg, int stages, int blocks, uint32_t* w, unsigned* t,
                        uint32_t* o, cudaStream_t s) {
    allow_largest_ring();
    read_bulk<kMerge><<<blocks, 32, stages * kChunk, s>>>(kp, vp, seg, stages, w, t, o);
}

// Blocks of read_bulk with `stages` stages that an SM holds at once.
int64_t bulk_blocks_an_sm(int64_t stages) {
    allow_largest_ring();
    int blocks = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, read_bulk<0>, 32, (int)stages * kChunk));
    return blocks;
}

void bulk(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t blocks, int64_t merge,
          torch::Tensor words, torch::Tensor tickets, torch::Tensor out) {
    TORCH_CHECK(stages >= 1 && stages <= kMaxStages && seg % kChunk == 0,
                "bulk: 1..13 stages, seg a multiple of 16 KB");
    auto s = c10::cuda::getCurrentCUDAStream();
    auto w = (uint32_t*)words.data_ptr(); auto t = (unsigned*)tickets.data_ptr(); auto o = (uint32_t*)out.data_ptr();
    auto kp = (const char*)k.data_ptr(), vp = (const char*)v.data_ptr();
    if (merge == 0) launch_bulk<0>(kp, vp, seg, (int)stages, (int)blocks, w, t, o, s);
    else if (merge == 1) launch_bulk<1>(kp, vp, seg, (int)stages, (int)blocks, w, t, o, s);
    else if (merge == 8) launch_bulk<8>(kp, vp, seg, (int)stages, (int)blocks, w, t, o, s);
    else TORCH_CHECK(false, "bulk: merge must be 0, 1 or 8");
    check(cudaGetLastError());
}

// read_bulk_cluster's grid (8 clusters of `cluster` blocks) as a launch configuration; `attr` holds its cluster size.
static cudaLaunchConfig_t cluster_config(int64_t stages, int64_t cluster, cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)(8 * cluster));
    cfg.blockDim = dim3(32);
    cfg.dynamicSmemBytes = (int)stages * kChunk;
    cfg.stream = stream;
    attr->id = cudaLaunchAttributeClusterDimension;
    attr->val.clusterDim.x = (unsigned)cluster;
    attr->val.clusterDim.y = 1;
    attr->val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cfg;
}

// Clusters of `cluster` blocks with `stages` stages that the device runs at once.
int64_t bulk_cluster_setup(int64_t stages, int64_t cluster) {
    allow_largest_ring();
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(stages, cluster, nullptr, &attr);
    int fit = 0;
    check(cudaOccupancyMaxActiveClusters(&fit, read_bulk_cluster, &cfg));
    return fit;
}

void bulk_cluster(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t cluster, torch::Tensor out) {
    TORCH_CHECK(stages >= 1 && stages <= kMaxStages && seg % kChunk == 0 && cluster >= 1 && cluster <= 16,
                "bulk_cluster: 1..13 stages, 1..16 blocks a cluster, seg a multiple of 16 KB");
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(stages, cluster, c10::cuda::getCurrentCUDAStream(), &attr);
    check(cudaLaunchKernelEx(&cfg, read_bulk_cluster, (const char*)k.data_ptr(), (const char*)v.data_ptr(), seg,
                             (int)stages, (uint32_t*)out.data_ptr()));
    check(cudaGetLastError());
}
"""

CPP = """
void plain(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t loads, int64_t min_blocks, int64_t blocks_per_seg,
           int64_t merge, torch::Tensor words, torch::Tensor tickets, torch::Tensor out);
int64_t bulk_blocks_an_sm(int64_t stages);
void bulk(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t blocks, int64_t merge,
          torch::Tensor words, torch::Tensor tickets, torch::Tensor out);
int64_t bulk_cluster_setup(int64_t stages, int64_t cluster);
void bulk_cluster(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t cluster, torch::Tensor out);
"""

DEFAULT_VARIANTS = "p8_8,p8_4,p8_4m,p8_4u,p16_2u,b4_2,b4_2m,b4_2u,b6_2u,c4_16"
DEFAULT_SHAPES = "1:64:65536,1:128:65536,1:64:131072"
PLAIN_INSTANCES = {(8, 8), (8, 4), (16, 2), (16, 4), (4, 8)}  # (compiled by `plain` in CUDA above)
MAX_STAGES = 13
CHUNK = 16384
UNITS = 8  # (the 8 KV heads of a batch-1 grid: the "u" merge's tickets)


def build():
    from torch.utils import cpp_extension
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    build_dir = os.path.join(REPO, "build", "split_merge_bound")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load_inline("split_merge_bound", CPP, cuda_sources=CUDA,
                                     functions=["plain", "bulk_blocks_an_sm", "bulk", "bulk_cluster_setup",
                                                "bulk_cluster"],
                                     extra_cuda_cflags=["-O3", "-std=c++17"],
                                     extra_include_paths=[os.path.join(REPO, "csrc")], build_directory=build_dir,
                                     verbose=False)


def xor_of_words(*tensors):
    """XOR of every 32-bit word of the tensors (the p variants' reference), by halving on the device."""
    x = torch.cat([t.reshape(-1).view(torch.int32) for t in tensors])
    while x.numel() > 1:
        if x.numel() % 2:
            x = torch.cat([x, torch.zeros(1, dtype=x.dtype, device=x.device)])
        x = torch.bitwise_xor(x[: x.numel() // 2], x[x.numel() // 2:])
    return int(x.item()) & 0xFFFFFFFF


def parse_variant(name):
    """'p8_4u' -> ('p', 8, 4, 8): kind, loads or stages, blocks an SM or a cluster, merge units (0: no merge)."""
    match = re.fullmatch(r"([pbc])(\d+)_(\d+)([mu]?)", name)
    if match:
        kind, a, b, suffix = match[1], int(match[2]), int(match[3]), match[4]
        merge = {"": 0, "m": 1, "u": UNITS}[suffix]
        if {"p": (a, b) in PLAIN_INSTANCES, "b": 1 <= a <= MAX_STAGES and b >= 1,
                "c": 1 <= a <= MAX_STAGES and 1 <= b <= 16 and merge == 0}[kind]:
            return kind, a, b, merge
    raise ValueError(f"unknown variant {name!r}: pL_B with (L, B) in {sorted(PLAIN_INSTANCES)}, bS_B or cS_C with S <= "
                     f"{MAX_STAGES} stages and C <= 16 blocks a cluster; m or u after p and b for the merges")


def parse_shape(spec):
    """'1:64:65536' -> (1, 64, 65536)."""
    match = re.fullmatch(r"(\d+):(64|128):(\d+)", spec)
    if not match or int(match[1]) < 1 or int(match[3]) < 1 or int(match[3]) * 8 * int(match[2]) * 2 % CHUNK:
        raise ValueError(f"bad shape {spec!r}: batch:head_dim:S with head_dim 64 or 128, S >= 1, and one sequence's K "
                         f"(S x 8 heads x head_dim x 2 bytes) a multiple of 16 KB")
    return int(match[1]), int(match[2]), int(match[3])


def make_variant(lb, name, k, v, seg, sms):
    """A zero-argument launch of one variant and a function returning its checksum, or None where it has none."""
    kind, a, b, merge = parse_variant(name)
    tickets = torch.zeros(UNITS, dtype=torch.int32, device="cuda")
    out = torch.zeros(UNITS, dtype=torch.int32, device="cuda")

    def merged():
        if int(tickets.abs().sum().item()) != 0:
            raise RuntimeError(f"{name}: a ticket was not reset")
        value = 0
        for w in out[: merge].tolist():
            value ^= w
        return value & 0xFFFFFFFF

    def stored(words):
        value = 0
        for w in words.tolist():
            value ^= w
        return value & 0xFFFFFFFF

    if kind == "p":
        step = 256 * a * 16
        per_segment = max(1, min((seg + step - 1) // step, b * sms // 2))
        if merge and (2 * per_segment + merge - 1) // merge > 2048:
            raise ValueError(f"{name}: {2 * per_segment} blocks, more words than a merge block loads")
        words = torch.zeros(2 * per_segment, dtype=torch.int32, device="cuda")
        launch = lambda: lb.plain(k, v, seg, a, b, per_segment, merge, words, tickets, out)  # noqa: E731
        return launch, (merged if merge else lambda: stored(words))
    if kind == "b":
        held = lb.bulk_blocks_an_sm(a)
        if held < b:
            raise ValueError(f"{name}: an SM holds {held} blocks of {a} x 16 KB, not {b}")
        words = torch.zeros(b * sms, dtype=torch.int32, device="cuda")
        if merge and (b * sms + merge - 1) // merge > 512:
            raise ValueError(f"{name}: {b * sms} blocks, more words than a merge block loads")
        return (lambda: lb.bulk(k, v, seg, a, b * sms, merge, words, tickets, out)), None
    fit = lb.bulk_cluster_setup(a, b)
    print(f"  {name}: {fit} clusters of {b} fit at once (the grid has 8)", flush=True)
    return (lambda: lb.bulk_cluster(k, v, seg, a, b, out)), None


def flushed_timer(iters):
    """benchmark_kernel.py's Timer (L2 flushed by a read before every timed launch) with the copy bandwidth and the
    one-element floor measured; prints them."""
    import benchmark_kernel as bk
    timer = bk.Timer("cuda", iters, 3, flush=True)
    timer.measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {timer.copy_gbps / 1e3:.3f} TB/s, floor {timer.floor_us:.2f} us",
          flush=True)
    return timer


def time_shape(timer, fns, rounds, spec, need90):
    """The row (spec, need90, {name: us}) of one shape, printed: every zero-argument launch of `fns` warmed up, then
    timed in alternating rounds (Timer.alternating_medians). need90: the time 90% of the copy bandwidth allows."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    row = timer.alternating_medians(fns, rounds)
    print(f"  90% needs {need90:.2f} us; " + " ".join(f"{n} {t:.2f}" for n, t in row.items()), flush=True)
    return spec, need90, row


def print_table(table):
    """time_shape's rows as a markdown table."""
    names = list(table[0][2])
    print("\n| shape | 90% needs | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for spec, need90, row in table:
        print(f"| {spec} | {need90:.2f} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="batch:head_dim:S,... (32 query / 8 KV heads, bf16)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--iters", type=positive_int, default=100)
    args = parser.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
        variants = [v for v in args.variants.split(",") if v]
        for v in variants:
            parse_variant(v)
    except ValueError as exc:
        parser.error(str(exc))
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("split_merge_bound.py: needs a CUDA GPU of compute capability 9.0 or newer (bulk copies, clusters)")
    lb = build()
    import benchmark_kernel as bk
    ours = bk.load_custom_module()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = flushed_timer(args.iters)
    table = []
    for batch, head_dim, seq in shapes:
        spec = f"{batch}:{head_dim}:{seq}"
        inp = bk.build_inputs(batch, 32, 8, head_dim, seq, torch.bfloat16, "cuda", 0, False)
        k, v = inp.k_cache, inp.v_cache
        seg = k.numel() * k.element_size()  # (every sequence full: all of K, and of V, is one contiguous segment)
        expect = xor_of_words(k, v)
        tiny = torch.zeros(1, device="cuda")
        o = torch.empty_like(inp.q)
        block_xor = torch.empty(ours.kv_read_blocks(k, v, seq), dtype=torch.int32, device="cuda")
        fns = {
            "floor": lambda: tiny.add_(1),
            "ours": lambda: ours.flash_decode(inp.q, k, v, inp.cache_seqlens, inp.scale, num_splits=0, out=o),
            "kv_read": lambda: ours.kv_read(k, v, seq, block_xor=block_xor),
        }
        fns["cudnn"], _ = bk.sdpa_factory("CUDNN_ATTENTION")(inp, None)
        print(spec, flush=True)
        try:
            for name in variants:
                fn, checksum = make_variant(lb, name, k, v, seg, sms)
                fn()
                torch.cuda.synchronize()
                if checksum is not None and checksum() != expect:
                    sys.exit(f"{name} at {spec}: checksum {checksum():08x}, expected {expect:08x}")
                fns[name] = fn
        except (ValueError, RuntimeError) as exc:
            sys.exit(f"split_merge_bound.py: {exc}")
        table.append(time_shape(timer, fns, args.rounds, spec, 2 * seg / (0.9 * timer.copy_gbps * 1e3)))
        del inp, fns, k, v
        torch.cuda.empty_cache()
    print_table(table)


if __name__ == "__main__":
    main()
