#!/usr/bin/env python3
"""What a split-KV decode kernel can reach at most: pure reads of the K/V bytes, with and without a split merge.

Issue 3 asks for 90% of the copy bandwidth at S >= 65536; at batch 1 head 64 S = 65536 on an H200 (134 MB) that is
34.8 us. This probe times, beside our kernel, kv_read (the benchmarks' bound), the one-element floor and cuDNN, kernels
that compute nothing but read exactly the same bytes, and the same kernels followed by the cheapest split merge:

  pL_B   kv_read's loop: 256 threads, L 16-byte loads a thread a step (L = 4, 8, 16), __launch_bounds__(256, B) and B
         blocks an SM (at B = 8, 32 registers a thread, ptxas interleaves the loads with their XORs: 3-4 in flight)
  bS_B   one warp a block, lane 0 keeps S 1-d bulk copies (cp.async.bulk) of 16 KB in flight, B blocks an SM
  cS_C   bS_B's ring in 8 clusters of C blocks (one per KV head at batch 1), merged through distributed shared memory:
         each block stores its word into the first block's shared memory, then a cluster barrier (release / acquire)
  ...m   the variant, then the cheapest workspace merge: each block stores one word, takes an acquire-release ticket,
         and the last block reads every block's word and writes their XOR (and resets the ticket)

The p variants' checksum (XOR of every word) is checked against PyTorch's; the bulk variants sample one word a lane of
each chunk (the copy engine reads every byte either way). Timing: benchmark_kernel.py's Timer (L2 flushed by a read,
a spin, CUDA events), every implementation in alternating rounds of --iters launches, the median of the rounds' medians.

  python3 docs/probes/split_merge_bound.py                       # the README's table (forty-third session)
  python3 docs/probes/split_merge_bound.py --shapes 1:64:65536 --variants p8_8,p8_8m,b6_2,b6_2m --rounds 5
"""
import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

CUDA = r"""
#include <cstdint>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// The last block (a release / acquire ticket) XORs every block's word into *out and resets the ticket.
template <int kThreads>
__device__ __forceinline__ void ticket_merge(uint32_t block_word, uint32_t* words, unsigned* ticket, uint32_t* out) {
    __shared__ int last;
    const unsigned nblocks = gridDim.x * gridDim.y;
    const unsigned id = blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) {
        words[id] = block_word;
        unsigned old;
        asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(ticket) : "memory");
        last = old == nblocks - 1;
    }
    __syncthreads();
    if (!last) return;
    uint32_t acc = 0;
    for (unsigned i = threadIdx.x; i < nblocks; i += kThreads) acc ^= __ldcg(words + i);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    __shared__ uint32_t wx[kThreads / 32];
    if (threadIdx.x % 32 == 0) wx[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t t = 0;
        for (int w = 0; w < kThreads / 32; ++w) t ^= wx[w];
        *out = t;
        *ticket = 0;
    }
}

template <int kLoads, int kMinBlocks, bool kMerge>
__global__ void __launch_bounds__(256, kMinBlocks)
    read_plain(const char* k, const char* v, int64_t seg, uint32_t* words, unsigned* ticket, uint32_t* out) {
    constexpr int64_t kStep = 256 * kLoads * 16;
    const char* base = blockIdx.y == 0 ? k : v;
    uint32_t acc = 0;
    for (int64_t step = (int64_t)blockIdx.x * kStep; step < seg; step += gridDim.x * kStep) {
        uint4 piece[kLoads];
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
            const int64_t off = step + ((int64_t)i * 256 + threadIdx.x) * 16;
            piece[i] = off < seg ? ld_stream(base + off) : make_uint4(0u, 0u, 0u, 0u);
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
    if constexpr (kMerge) {
        ticket_merge<256>(block, words, ticket, out);
    } else if (threadIdx.x == 0) {
        words[blockIdx.y * gridDim.x + blockIdx.x] = block;
    }
}

// One warp a block; lane 0 keeps `stages` 16 KB bulk copies in flight; chunk c of the concatenated K | V, blocks
// taking chunks blockIdx.x, + gridDim.x, ...; every lane XORs one word of each landed chunk. Returns the warp's XOR.
constexpr int kChunk = 16384;
__device__ __forceinline__ uint32_t stream_bulk(const char* k, const char* v, int64_t seg, int stages) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) uint64_t full[16];
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
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(slot, next);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

template <bool kMerge>
__global__ void __launch_bounds__(32) read_bulk(const char* k, const char* v, int64_t seg, int stages, uint32_t* words,
                                                unsigned* ticket, uint32_t* out) {
    const uint32_t acc = stream_bulk(k, v, seg, stages);
    if constexpr (kMerge) {
        ticket_merge<32>(acc, words, ticket, out);
    } else if (threadIdx.x == 0) {
        words[blockIdx.x] = acc;
    }
}

// read_bulk's stream in clusters of `cluster` blocks (8 units x cluster blocks: a split-KV grid at batch 1 with 8 KV
// heads), merged inside each cluster through distributed shared memory: every block stores its word into the first
// block's shared memory, a cluster barrier (release / acquire), and the first block writes the cluster's XOR.
__global__ void __launch_bounds__(32) read_bulk_cluster(const char* k, const char* v, int64_t seg, int stages,
                                                         uint32_t* out) {
    __shared__ uint32_t slots[16];
    const uint32_t acc = stream_bulk(k, v, seg, stages);
    auto addr = [](const void* p) { return (uint32_t)__cvta_generic_to_shared(p); };
    unsigned rank, size;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
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
           bool merge, torch::Tensor words, torch::Tensor ticket, torch::Tensor out) {
    auto s = c10::cuda::getCurrentCUDAStream();
    dim3 grid(blocks_per_seg, 2);
    auto w = (uint32_t*)words.data_ptr(); auto t = (unsigned*)ticket.data_ptr(); auto o = (uint32_t*)out.data_ptr();
    auto kp = (const char*)k.data_ptr(), vp = (const char*)v.data_ptr();
    bool launched = false;
#define P(L, M) \
    if (loads == L && min_blocks == M) { \
        if (merge) read_plain<L, M, true><<<grid, 256, 0, s>>>(kp, vp, seg, w, t, o); \
        else read_plain<L, M, false><<<grid, 256, 0, s>>>(kp, vp, seg, w, t, o); \
        launched = true; }
    P(8, 8) P(8, 4) P(16, 2) P(16, 4) P(4, 8)
#undef P
    TORCH_CHECK(launched, "plain: (loads, blocks an SM) must be one of (8, 8), (8, 4), (16, 2), (16, 4), (4, 8)");
    check(cudaGetLastError());
}

void bulk(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t blocks, bool merge,
          torch::Tensor words, torch::Tensor ticket, torch::Tensor out) {
    TORCH_CHECK(stages >= 1 && stages <= 13 && seg % kChunk == 0, "bulk: stages 1..13, seg a multiple of 16 KB");
    auto s = c10::cuda::getCurrentCUDAStream();
    const int smem = (int)stages * kChunk;
    auto w = (uint32_t*)words.data_ptr(); auto t = (unsigned*)ticket.data_ptr(); auto o = (uint32_t*)out.data_ptr();
    auto kp = (const char*)k.data_ptr(), vp = (const char*)v.data_ptr();
    if (merge) {
        check(cudaFuncSetAttribute(read_bulk<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        read_bulk<true><<<blocks, 32, smem, s>>>(kp, vp, seg, (int)stages, w, t, o);
    } else {
        check(cudaFuncSetAttribute(read_bulk<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        read_bulk<false><<<blocks, 32, smem, s>>>(kp, vp, seg, (int)stages, w, t, o);
    }
    check(cudaGetLastError());
}

int64_t bulk_cluster(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t cluster, int64_t units,
                     torch::Tensor out) {
    TORCH_CHECK(stages >= 1 && stages <= 13 && seg % kChunk == 0 && cluster <= 16, "bulk_cluster: bad arguments");
    auto s = c10::cuda::getCurrentCUDAStream();
    const int smem = (int)stages * kChunk;
    check(cudaFuncSetAttribute(read_bulk_cluster, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    check(cudaFuncSetAttribute(read_bulk_cluster, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)(units * cluster));
    cfg.blockDim = dim3(32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute a;
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = (unsigned)cluster;
    a.val.clusterDim.y = 1;
    a.val.clusterDim.z = 1;
    cfg.attrs = &a;
    cfg.numAttrs = 1;
    int fit = 0;
    check(cudaOccupancyMaxActiveClusters(&fit, read_bulk_cluster, &cfg));
    check(cudaLaunchKernelEx(&cfg, read_bulk_cluster, (const char*)k.data_ptr(), (const char*)v.data_ptr(), seg,
                             (int)stages, (uint32_t*)out.data_ptr()));
    check(cudaGetLastError());
    return fit;
}
"""

CPP = """
void plain(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t loads, int64_t min_blocks, int64_t blocks_per_seg,
           bool merge, torch::Tensor words, torch::Tensor ticket, torch::Tensor out);
void bulk(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t blocks, bool merge,
          torch::Tensor words, torch::Tensor ticket, torch::Tensor out);
int64_t bulk_cluster(torch::Tensor k, torch::Tensor v, int64_t seg, int64_t stages, int64_t cluster, int64_t units,
                     torch::Tensor out);
"""

DEFAULT_VARIANTS = "p8_8,p8_4,p8_4m,b4_2,b4_2m,c4_16"
DEFAULT_SHAPES = "1:64:65536,1:64:131072,1:128:65536,1:64:32768"
PLAIN_INSTANCES = {(8, 8), (8, 4), (16, 2), (16, 4), (4, 8)}  # (compiled by `plain` in CUDA above)


def build():
    from torch.utils import cpp_extension
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    build_dir = os.path.join(REPO, "build", "split_merge_bound")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load_inline("split_merge_bound", CPP, cuda_sources=CUDA,
                                     functions=["plain", "bulk", "bulk_cluster"],
                                     extra_cuda_cflags=["-O3", "-std=c++17"], build_directory=build_dir, verbose=False)


def xor_of_words(*tensors):
    """XOR of every 32-bit word of the tensors (the p variants' reference), by halving on the device."""
    x = torch.cat([t.reshape(-1).view(torch.int32) for t in tensors])
    while x.numel() > 1:
        if x.numel() % 2:
            x = torch.cat([x, torch.zeros(1, dtype=x.dtype, device=x.device)])
        x = torch.bitwise_xor(x[: x.numel() // 2], x[x.numel() // 2:])
    return int(x.item()) & 0xFFFFFFFF


def parse_variant(name):
    """'p8_4m' -> ('p', 8, 4, True)."""
    kind, merge = name[0], name.endswith("m")
    a, b = (int(t) for t in name[1:].rstrip("m").split("_"))
    known = {"p": (a, b) in PLAIN_INSTANCES, "b": 1 <= a <= 13 and b >= 1,
             "c": 1 <= a <= 13 and 1 <= b <= 16 and not merge}
    if not known.get(kind, False):
        raise ValueError(f"unknown variant {name!r}: pL_B with (L, B) in {sorted(PLAIN_INSTANCES)}, bS_B or cS_C with "
                         f"S <= 13 stages and C <= 16 blocks a cluster, m for the merge (not for cS_C)")
    return kind, a, b, merge


def make_variant(lb, name, k, v, seg, sms, ticket, out):
    """A zero-argument launch of one variant, and whether its result is to be checked against the full XOR."""
    kind, a, b, merge = parse_variant(name)
    if kind == "p":
        step = 256 * a * 16
        per_segment = max(1, min((seg + step - 1) // step, b * sms // 2))
        words = torch.zeros(2 * per_segment, dtype=torch.int32, device="cuda")
        return (lambda: lb.plain(k, v, seg, a, b, per_segment, merge, words, ticket, out)), words, merge, True
    if kind == "b":
        words = torch.zeros(b * sms, dtype=torch.int32, device="cuda")
        return (lambda: lb.bulk(k, v, seg, a, b * sms, merge, words, ticket, out)), words, merge, False
    cluster_out = torch.zeros(8, dtype=torch.int32, device="cuda")
    return (lambda: lb.bulk_cluster(k, v, seg, a, b, 8, cluster_out)), None, False, False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="batch:head_dim:S,... (32 query / 8 KV heads, bf16)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    try:
        for v in variants:
            parse_variant(v)
    except ValueError as exc:
        parser.error(str(exc))
    if not torch.cuda.is_available():
        sys.exit("split_merge_bound.py: needs a CUDA GPU (sm_90: the bulk copies and clusters)")
    lb = build()
    import benchmark_kernel as bk
    ours = bk.load_custom_module()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = bk.Timer("cuda", args.iters, 3, flush=True)
    timer.measure_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {timer.copy_gbps / 1e3:.3f} TB/s, floor {timer.floor_us:.2f} us",
          flush=True)
    table = []
    for spec in args.shapes.split(","):
        batch, head_dim, seq = (int(x) for x in spec.split(":"))
        inp = bk.build_inputs(batch, 32, 8, head_dim, seq, torch.bfloat16, "cuda", 0, False)
        k, v = inp.k_cache, inp.v_cache
        seg = k.numel() * k.element_size()  # (every sequence full: all of K, and of V, is one contiguous segment)
        expect = xor_of_words(k, v)
        ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
        out = torch.zeros(1, dtype=torch.int32, device="cuda")
        tiny = torch.zeros(1, device="cuda")
        o = torch.empty_like(inp.q)
        block_xor = torch.empty(ours.kv_read_blocks(k, v, seq), dtype=torch.int32, device="cuda")
        fns = {
            "floor": lambda: tiny.add_(1),
            "ours": lambda: ours.flash_decode(inp.q, k, v, inp.cache_seqlens, inp.scale, num_splits=0, out=o),
            "kv_read": lambda: ours.kv_read(k, v, seq, block_xor=block_xor),
        }
        fns["cudnn"], _ = bk.sdpa_factory("CUDNN_ATTENTION")(inp, None)
        for name in variants:
            fn, words, merge, exact = make_variant(lb, name, k, v, seg, sms, ticket, out)
            out.zero_()
            result = fn()
            torch.cuda.synchronize()
            if name[0] == "c":
                print(f"{spec} {name}: {result} clusters of {parse_variant(name)[2]} fit at once", flush=True)
            got = int(out.item()) if merge else 0
            if not merge and words is not None:
                for w in words.tolist():
                    got ^= w
            if exact and (got & 0xFFFFFFFF) != expect:
                sys.exit(f"{name} at {spec}: checksum {got & 0xFFFFFFFF:08x}, expected {expect:08x}")
            if merge and int(ticket.item()) != 0:
                sys.exit(f"{name} at {spec}: the ticket was not reset")
            fns[name] = fn
        names = list(fns)
        for name in names:
            for _ in range(3):
                fns[name]()
        torch.cuda.synchronize()
        medians = {name: [] for name in names}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                medians[name].append(statistics.median(timer.time_us(fns[name])))
        row = {name: statistics.median(m) for name, m in medians.items()}
        need90 = 2 * seg / (0.9 * timer.copy_gbps * 1e3)
        table.append((spec, need90, row))
        print(f"{spec}: 90% needs {need90:.2f} us; " + " ".join(f"{n} {t:.2f}" for n, t in row.items()), flush=True)
        del inp, fns, k, v
        torch.cuda.empty_cache()
    names = list(table[0][2])
    print("\n| shape | 90% needs | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for spec, need90, row in table:
        print(f"| {spec} | {need90:.2f} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
