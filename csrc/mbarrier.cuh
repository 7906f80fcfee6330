// Hopper (sm_90) shared-memory barriers (mbarrier), the asynchronous stores and tensor copies that complete them,
// and the thread-block-cluster barrier and addressing, shared by the kernels that use them. On older GPUs they compile to
// nothing; their callers never run there.
#pragma once

#include <cstdint>

namespace mbarrier {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
#endif

__device__ __forceinline__ void init(uint64_t* bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count) : "memory");
#endif
}

// Makes this thread's init() calls visible to the other blocks of the cluster (then a cluster barrier).
__device__ __forceinline__ void fence_init_for_cluster() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Spins on try_wait until the phase of `bar` with parity `parity` has completed; QUALIFIERS: its semantics
// and scope (empty: acquire at the block's scope).
#define MBARRIER_WAIT_LOOP(QUALIFIERS)                                                          \
    asm volatile(                                                                               \
        "{\n"                                                                                   \
        ".reg .pred done;\n"                                                                    \
        "WAIT_%=:\n"                                                                            \
        "mbarrier.try_wait.parity" QUALIFIERS ".shared::cta.b64 done, [%0], %1;\n"              \
        "@!done bra WAIT_%=;\n"                                                                 \
        "}\n" ::"r"(shared_address(bar)),                                                       \
        "r"(parity)                                                                             \
        : "memory")

// Returns once the phase of `bar` with this parity has completed (a fresh barrier counts its phase before
// the first, parity 1, as completed).
__device__ __forceinline__ void wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    MBARRIER_WAIT_LOOP("");
#endif
}

// wait(), and what other blocks of the cluster released to `bar` (store_async's completions are releases at
// cluster scope) is visible afterwards: the wait acquires at cluster scope, not only the block's.
__device__ __forceinline__ void wait_for_cluster(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    MBARRIER_WAIT_LOOP(".acquire.cluster");
#endif
}
#undef MBARRIER_WAIT_LOOP

__device__ __forceinline__ void arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
#endif
}

// Arrives and adds `bytes` to what the current phase waits for (asynchronous copies or stores complete them).
__device__ __forceinline__ void arrive_expect_bytes(uint64_t* bar, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
                 : "memory");
#endif
}

// An L2 eviction policy for data read once (a copy's `.L2::cache_hint` operand): its lines go first when L2 needs
// room, ahead of the lines other work will read again.
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t policy = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
    return policy;
}

// The tensor memory accelerator (TMA): copies the box at coordinates (c0, c1, c2, c3) of the 4-d tensor that
// `map` describes (a CUtensorMap in kernel-parameter or global memory, built on the host) into this block's
// shared memory at `dst` (aligned as the map's swizzle needs: 1024 bytes for 128-byte swizzle), and completes the
// box's bytes on `bar` once they have landed. Elements outside the tensor arrive as zeros. The copied lines are
// marked evict-first in L2: a launch reads each cache row once. With the plain policy the long and batch launches were
// up to 0.7 us slower (two H200s, 2026-11-30, alternating rounds: 0.1-0.7 us in 15 of 21 pairs, level in the rest;
// batch 1 head 64 S = 65536 38.40 -> 38.22 and 38.02 -> 37.76, head 128 S = 65536 68.32 -> 67.65 and 67.66 -> 67.28,
// batch 64 head 128 S = 2048 125.95 -> 125.42 us; README.md, "Decode kernel on an H200").
__device__ __forceinline__ void tensor_copy_4d(void* dst, const void* map, int c0, int c1, int c2, int c3, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint "
        "[%0], [%1, {%2, %3, %4, %5}], [%6], %7;" ::"r"(shared_address(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(shared_address(bar)), "l"(evict_first_policy())
        : "memory");
#endif
}

// The shared::cluster address of `ptr` (in this block's shared memory) in the block of cluster rank `rank`.
__device__ __forceinline__ uint32_t cluster_address(const void* ptr, unsigned rank) {
    uint32_t remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_address(ptr)), "r"(rank));
#endif
    return remote;
}

// Stores `value` at `address` (shared::cluster, cluster_address()) and, once it has landed, completes 4 bytes of
// the barrier at `bar` (the same block's, cluster_address() too): that block sees the value once its wait()
// returns, with no fence or arrival by the sender, which may exit at once.
__device__ __forceinline__ void store_async(uint32_t address, float value, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(address),
                 "r"(__float_as_uint(value)), "r"(bar)
                 : "memory");
#endif
}

// store_async of v[0 .. kVec) (kVec 1, 2 or 4) at `address`, aligned to 4 * kVec bytes: one store, 4 * kVec bytes of
// the barrier.
template <int kVec>
__device__ __forceinline__ void store_async_vec(uint32_t address, const float (&v)[4], uint32_t bar) {
    static_assert(kVec == 1 || kVec == 2 || kVec == 4, "1, 2 or 4 floats");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kVec == 1) {
        store_async(address, v[0], bar);
    } else if constexpr (kVec == 2) {
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" ::"r"(address),
                     "r"(__float_as_uint(v[0])), "r"(__float_as_uint(v[1])), "r"(bar)
                     : "memory");
    } else {
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
                         address),
                     "r"(__float_as_uint(v[0])), "r"(__float_as_uint(v[1])), "r"(__float_as_uint(v[2])),
                     "r"(__float_as_uint(v[3])), "r"(bar)
                     : "memory");
    }
#endif
}

// A kernel declared for cluster launches only (.explicitcluster in its PTX). Without it the compiler tests at run time
// whether the launch has a cluster before every cluster barrier, and that test reads a word of the parameter bank's
// driver part (c[0x0][0x140] on sm_90): one more cold constant-cache line before a block's first load, after the
// timing's L2 flush. Such a kernel must be launched with a cluster dimension (programmatic_launch::launch_clustered).
// The short-launch kernel's cluster instances (flash_decode_short.cuh) on an H200 (2026-11-30, nine alternating rounds,
// us): batch 1 S = 97-256 0.03-0.08 faster, batch 2 S = 128 5.54 -> 5.47. The general kernel's cluster instances were
// level with it (within 0.1 us either way at head 64 S = 256-2048, head 128 S = 512-1024: its code was rescheduled),
// and keep the plain declaration.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define CLUSTER_LAUNCHES_ONLY __cluster_dims__()
#else
#define CLUSTER_LAUNCHES_ONLY  // (sm_80 has no clusters: such kernels are launched only on sm_90+)
#endif

// The cluster barrier: every thread of every block of the cluster arrives, then waits for all the others'
// arrivals (.aligned: a warp executes these together, so a warp that branched reconverges first). Stores before
// cluster_arrive(), to this block's or another's shared memory, are visible to every thread after its
// cluster_wait(). cluster_arrive_relaxed() orders nothing: it only says "this block has started", after which
// the other blocks may write to its shared memory (once their matching cluster_wait() has returned).
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// Where a cluster's blocks push their partial results (store_async): the shared::cluster addresses of the first block's
// output rows, log-sum-exps and barrier. Waits at the cluster barrier first, which the first block reaches only after
// initializing that barrier (fence_init_for_cluster, then cluster_arrive_relaxed).
struct FirstBlockTargets {
    uint32_t o = 0, lse = 0, bar = 0;
};
__device__ __forceinline__ FirstBlockTargets wait_for_first_block(const void* o, const void* lse, const uint64_t* bar) {
    cluster_wait();
    FirstBlockTargets targets;
    targets.o = cluster_address(o, 0);
    targets.lse = cluster_address(lse, 0);
    targets.bar = cluster_address(bar, 0);
    return targets;
}

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
#endif
    return rank;
}

// The generic address of `ptr` (in this block's shared memory) in the block of cluster rank `rank`: plain loads
// and stores through it reach that block's shared memory.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* ptr, unsigned rank) {
    uint64_t remote = reinterpret_cast<uint64_t>(ptr);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(remote) : "l"(remote), "r"(rank));
#endif
    return reinterpret_cast<T*>(remote);
}

}  // namespace mbarrier
