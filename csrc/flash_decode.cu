// Host side of the flash-decode kernel: template dispatch (dtype x head_dim, like
// FlashAttention's head-dim switch), the split heuristic and the launch.
#include <algorithm>
#include <initializer_list>
#include <mutex>
#include <unordered_map>

#include "flash_decode.h"
#include "flash_decode_kernel.cuh"
#include "flash_decode_short.cuh"
#include "programmatic_launch.cuh"

namespace flash_decode {

// One compiled variant of the kernel.
struct Variant {
    int rows_per_block_tile;  // the split granularity
    // one_tile: every warp group has at most one tile (plain launches only)
    cudaError_t (*launch)(const Params&, dim3, bool cluster_merge, bool warp_groups, bool one_tile, cudaStream_t);
    // narrow tiles (narrow_tiles_for), one split or a cluster merge
    cudaError_t (*launch_narrow)(const Params&, dim3, cudaStream_t);
    // cudaErrorNotSupported: no tensor maps
    cudaError_t (*launch_bulk)(const Params&, dim3, int num_sms, bool warp_groups, cudaStream_t);
    // the same in blocks of a KV-head pair (grid: splits x half the units), and how many such blocks an SM of the
    // current device holds; null where not instantiated (head 128)
    cudaError_t (*launch_bulk_pairs)(const Params&, dim3, cudaStream_t);
    cudaError_t (*pair_blocks_an_sm)(int*);
};

// The driver's cuTensorMapEncodeTiled, reached through the runtime (the extension does not link libcuda); null
// where the driver has none.
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeTiled encode_tiled() {
    static const EncodeTiled fn = []() -> EncodeTiled {
        void* entry = nullptr;
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
        const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000,
                                                                 cudaEnableDefault, &found);
#else
        const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &entry, cudaEnableDefault, &found);
#endif
        return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiled>(entry)
                                                                         : nullptr;
    }();
    return fn;
}

// A cache [batch][seq][kv_heads][head_dim] (element strides) as the bulk variant's tensor map: dimensions (head_dim,
// kv_heads, seq, batch) from the innermost, boxes of 64 head_dim elements x box_heads adjacent heads x box_rows rows,
// 128-byte swizzle. False where the driver refuses it (strides or address not on 16 bytes, ...).
static bool encode_cache_map(CUtensorMap* map, const void* base, const Params& p, int64_t seq_stride, int64_t head_stride,
                             int64_t batch_stride, int box_heads, int box_rows) {
    const EncodeTiled encode = encode_tiled();
    if (encode == nullptr) return false;
    const cuuint64_t dims[4] = {(cuuint64_t)p.head_dim, (cuuint64_t)p.kv_heads, (cuuint64_t)p.seq_capacity,
                                (cuuint64_t)p.batch};
    const cuuint64_t strides[3] = {(cuuint64_t)head_stride * 2, (cuuint64_t)seq_stride * 2, (cuuint64_t)batch_stride * 2};
    const cuuint32_t box[4] = {64, (cuuint32_t)box_heads, (cuuint32_t)box_rows, 1};
    const cuuint32_t element_strides[4] = {1, 1, 1, 1};
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Both caches' maps (false: the driver refused one).
static bool encode_cache_maps(CacheMaps* maps, const Params& p, int box_heads, int box_rows) {
    return encode_cache_map(&maps->k, p.k, p, p.k_seq_stride, p.k_head_stride, p.k_batch_stride, box_heads, box_rows) &&
           encode_cache_map(&maps->v, p.v, p, p.v_seq_stride, p.v_head_stride, p.v_batch_stride, box_heads, box_rows);
}

template <typename Element, int kHeadDim, bool kEarlyReads, bool kClusterMerge, int kWarpGroups, bool kOneTile = false,
          bool kNarrow = false>
static cudaError_t launch_instance(const Params& params, dim3 grid, cudaStream_t stream) {
    using Traits = KernelTraits<Element, kHeadDim, kWarpGroups>;
    auto* kernel = flash_decode_kernel<Element, kHeadDim, kEarlyReads, kClusterMerge, false, kWarpGroups, kOneTile, kNarrow>;
    const unsigned cluster = kClusterMerge ? (unsigned)params.num_splits : 1u;
    if (cluster > 8) {  // beyond the portable cluster size: an opt-in per kernel (H100: up to 16)
        static const cudaError_t opt_in = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        if (opt_in != cudaSuccess) return opt_in;
    }
    size_t merge_bytes = 0;
    if (kClusterMerge) {
        // up to the largest cluster (head 128: 49.5 KB, past the 48 KB that needs no opt-in)
        static const cudaError_t opt_in = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Traits::cluster_merge_bytes(kMaxDecodeClusterSplits));
        if (opt_in != cudaSuccess) return opt_in;
        merge_bytes = Traits::cluster_merge_bytes(params.num_splits);
    }
    return programmatic_launch::launch_clustered(kernel, grid, dim3(Traits::kThreads), merge_bytes, stream, cluster,
                                                 params, NoCacheMaps{});
}

// The most tiles one of `num_splits` splits of a `seq_capacity`-row cache has (splits take interleaved tiles).
static int64_t split_tiles_of(int seq_capacity, int rows_per_tile, int num_splits) {
    const int64_t tiles = ((int64_t)seq_capacity + rows_per_tile - 1) / rows_per_tile;
    return (tiles + num_splits - 1) / std::max(num_splits, 1);
}

// The bulk variant in blocks of two warp groups (grids of at most one block an SM: uses_warp_groups), each group with
// one tile in flight (a ring of one stage until the twenty-ninth session, now the staggered ring below): the same
// bytes in flight as one group's two stages, and each group computes while the other's tile lands. Measured on an
// H100 (2026-11-27, 21:13 UTC, the best of three rounds), one group with two stages -> two groups with one: batch 1
// head 64 S = 16384 / 32768 / 65536 / 131072 20.1 / 30.7 / 52.1 / 96.1 -> 19.4 / 30.1 / 51.8 / 94.9 us, head 128
// S = 8192 / 65536 20.1 / 95.0 -> 19.9 / 94.2; batch 16 (one split) level: head 64 S = 2048 / 4096 28.6 / 51.2 ->
// 28.7 / 51.5, head 128 50.5 / 92.3 -> 50.5 / 91.8.
//
// A group of at most kShortGroupTiles tiles takes a ring of two stages instead: half its tiles or more are requested
// before the length is read, where one stage waits a round trip for each. Two stages a group on H100s (2026-11-28,
// a standalone probe, medians of four rounds, us): batch 1 head 64 S = 16384 (4 tiles a group) 18.46-18.59 ->
// 17.86-17.98, head 128 S = 8192 (4) 18.21-18.50 -> 17.98-18.27; level at 8 tiles a group (head 64 S = 32768, head 128
// S = 16384, batch 16 head 64 S = 2048); slower with more (batch 1 head 64 S = 131072 94.0 -> 95.7, head 128 S = 65536
// 92.2 -> 94.0, batch 16 head 128 S = 4096 91.0-91.4 -> 92.0-92.7). Three stages were slower everywhere (S = 16384:
// 19.6).
//
// A longer group keeps one tile in flight, but in a staggered ring of two stages (CacheMaps::staggered): with one stage
// every group's first tile landed together, 8 MB at batch 1, and the DRAM then waited a round trip for the refills that
// reading them requested (in-kernel stamps, an H200, 2026-11-29: our last tiles landed about 3 us after those of a kernel
// that only reads the bytes, which streams no faster once running). The second tile, requested once the length has
// arrived, is on its way when the first lands. Measured on an H200 (2026-11-29, alternating rounds, medians, us; both
// tiles at the start, then one in flight, was 0.7-1.5 us slower): batch 1 head 64 S = 32768 / 65536 / 131072 23.71 /
// 38.64 / 69.01 -> 23.49 / 38.35 / 68.82, head 128 S = 65536 67.81 -> 67.55, batch 4 head 64 S = 16384 38.18 -> 37.66,
// batch 16 head 128 S = 4096 66.27 -> 66.10 (docs/perf-notes.md, twenty-eighth session; as landed, the twenty-ninth
// session: 0.1-0.6 us faster at the same shapes on three machines, level at S = 256).
constexpr int kShortGroupTiles = 4;
template <typename Element, int kHeadDim>
static cudaError_t launch_bulk_groups(const Params& params, dim3 grid, CacheMaps maps, cudaStream_t stream) {
    using Traits = KernelTraits<Element, kHeadDim, 2>;
    static_assert(Traits::kMaxBulkStages >= 2, "two stages a group");
    auto* kernel = flash_decode_bulk_groups_kernel<Element, kHeadDim>;
    const int64_t split_tiles = split_tiles_of(params.seq_capacity, Traits::kRowsPerBlockTile, params.num_splits);
    maps.stages = 2;
    maps.staggered = (split_tiles + 1) / 2 > kShortGroupTiles;
    const size_t shared_bytes = Traits::bulk_shared_bytes(2 * maps.stages);  // (two rings)
    static const cudaError_t setup =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes);
    if (setup != cudaSuccess) return setup;
    return programmatic_launch::launch(kernel, grid, dim3(Traits::kThreads), shared_bytes, stream, params, maps);
}

// The bulk variant in blocks of a KV-head pair (kv_head_pairs_for), a warp group a head, with a ring of one stage that
// holds both heads' tiles (64 KB), two blocks an SM (both dtypes: 128 registers a thread at most). Measured on an H100
// (2026-11-27, 22:42 UTC, batch 64 head 64 bf16, best of three rounds), one head a block (two an SM, a stage of one
// head's tile each) -> pairs with one stage: S = 2048 94.4 -> 93.7 us, S = 4096 181.9 -> 179.5, batch 128 S = 1024
// 94.5 -> 93.8; pairs with two stages (one block an SM): 94.5, 181.6, 94.7.
//
// (Free `static` functions, as for the other instances: a static inside a class template's member function has vague
// linkage, and g++ makes it one object for the whole process, across shared libraries. Two builds loaded into one
// process, as the A/B scripts of docs/perf-notes.md do, then shared the flag of the setup below: the second build's
// pair kernels never got their shared-memory limit raised, its occupancy query found no room for them, and it served
// the pair shapes with one head a block.)
template <typename Element, int kHeadDim>  // (a stage of two heads' tiles)
constexpr size_t kPairSharedBytes = KernelTraits<Element, kHeadDim, 2>::bulk_shared_bytes(2);
template <typename Element, int kHeadDim>
static cudaError_t setup_pairs() {
    static const cudaError_t err = cudaFuncSetAttribute(flash_decode_pairs_kernel<Element, kHeadDim>,
                                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                        (int)kPairSharedBytes<Element, kHeadDim>);
    return err;
}
template <typename Element, int kHeadDim>
static cudaError_t launch_bulk_pairs(const Params& params, dim3 grid, cudaStream_t stream) {
    using Traits = KernelTraits<Element, kHeadDim, 2>;
    CacheMaps maps;
    if (!encode_cache_maps(&maps, params, 2, Traits::kRowsPerBlockTile)) return cudaErrorNotSupported;
    maps.stages = 1;
    const cudaError_t err = setup_pairs<Element, kHeadDim>();
    if (err != cudaSuccess) return err;
    return programmatic_launch::launch(flash_decode_pairs_kernel<Element, kHeadDim>, grid, dim3(Traits::kThreads),
                                       kPairSharedBytes<Element, kHeadDim>, stream, params, maps);
}
template <typename Element, int kHeadDim>
static cudaError_t pair_blocks_an_sm(int* blocks) {
    using Traits = KernelTraits<Element, kHeadDim, 2>;
    const cudaError_t err = setup_pairs<Element, kHeadDim>();
    if (err != cudaSuccess) return err;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, flash_decode_pairs_kernel<Element, kHeadDim>,
                                                         Traits::kThreads, kPairSharedBytes<Element, kHeadDim>);
}

template <typename Element, int kHeadDim>
static cudaError_t launch_bulk_instance(const Params& params, dim3 grid, int num_sms, bool warp_groups,
                                        cudaStream_t stream) {
    using Traits = KernelTraits<Element, kHeadDim>;
    auto* kernel = flash_decode_kernel<Element, kHeadDim, false, false, true, 1>;
    CacheMaps maps;
    if (!encode_cache_maps(&maps, params, 1, Traits::kRowsPerBlockTile)) return cudaErrorNotSupported;
    if (warp_groups) return launch_bulk_groups<Element, kHeadDim>(params, grid, maps, stream);
    // The bytes in flight an SM should have: two tiles (64 KB). A grid of at most about one block an SM runs one block
    // an SM with a ring of two stages (where warp groups are off: else launch_bulk_groups); a larger one (batch 64) two
    // blocks an SM with one stage each, so that two blocks compute at once. Measured on an H100 (2026-11-27, 32 query /
    // 8 KV heads): two blocks an SM with two stages each were slower everywhere (batch 64 S = 4096 head 64 / 128
    // 194.2-194.6 / 360.0-360.1 us with one block, 197.8-197.9 / 363.4-363.9 with two), as were three or four stages;
    // at batch 64 one stage and two blocks an SM beat one block with two stages (S = 2048 / 4096, head 64: 105.8-106.0
    // / 192.8-192.9 against 106.8-107.0 / 194.1-194.4; head 128: 189.9-190.3 / 358.5-359.4 against 192.0-192.1 /
    // 361.6-362.3), while at batch 16 and batch 1 (one block an SM at most) one stage was 4-7% slower. The blocks an SM
    // are set by padding the shared memory (for the device of the first launch: one kind of GPU a process is assumed).
    const bool two_a_sm = (int64_t)grid.x * grid.y >= 2 * (int64_t)num_sms;
    maps.stages = two_a_sm ? 1 : 2;
    static size_t padded_bytes[2] = {0, 0};  // [two_a_sm]
    static const cudaError_t setup = [&]() {
        int device = 0, per_sm = 0;
        cudaFuncAttributes attributes;
        cudaError_t err = cudaGetDevice(&device);
        if (err == cudaSuccess) err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
        if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
        if (err != cudaSuccess) return err;
        padded_bytes[0] = std::max<size_t>(Traits::bulk_shared_bytes(2), per_sm / 2 + 1 - attributes.sharedSizeBytes);
        padded_bytes[1] = std::max<size_t>(Traits::bulk_shared_bytes(1), per_sm / 3 + 1 - attributes.sharedSizeBytes);
        return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)std::max(padded_bytes[0], padded_bytes[1]));
    }();
    if (setup != cudaSuccess) return setup;
    const size_t shared_bytes = padded_bytes[two_a_sm];
    return programmatic_launch::launch(kernel, grid, dim3(Traits::kThreads), shared_bytes, stream, params, maps);
}

template <typename Element, int kHeadDim>
static cudaError_t launch_variant(const Params& params, dim3 grid, bool cluster_merge, bool warp_groups, bool one_tile,
                                  cudaStream_t stream) {
    if (params.early_cache_reads)
        return cluster_merge ? launch_instance<Element, kHeadDim, true, true, 1>(params, grid, stream)
                             : launch_instance<Element, kHeadDim, true, false, 1>(params, grid, stream);
    // Warp groups of one tile at most: the one-tile instances (flash_decode_kernel.cuh), but for head 128 in two groups
    // merged through the workspace (one split of two tiles, S <= 128 at batch 1), whose bf16 one-tile instance spilled
    // 16-20 bytes (sm_80 and sm_90); the general instance serves it.
    if (one_tile) {
        if (!warp_groups)
            return cluster_merge ? launch_instance<Element, kHeadDim, false, true, 1, true>(params, grid, stream)
                                 : launch_instance<Element, kHeadDim, false, false, 1, true>(params, grid, stream);
        if (cluster_merge) return launch_instance<Element, kHeadDim, false, true, 2, true>(params, grid, stream);
        if constexpr (kHeadDim != 128)
            return launch_instance<Element, kHeadDim, false, false, 2, true>(params, grid, stream);
    }
    if (warp_groups)
        return cluster_merge ? launch_instance<Element, kHeadDim, false, true, 2>(params, grid, stream)
                             : launch_instance<Element, kHeadDim, false, false, 2>(params, grid, stream);
    return cluster_merge ? launch_instance<Element, kHeadDim, false, true, 1>(params, grid, stream)
                         : launch_instance<Element, kHeadDim, false, false, 1>(params, grid, stream);
}

// The short-launch kernel (flash_decode_short.cuh): one split, or 2 to 8 merged in a cluster.
template <typename Element, int kGroup>
static cudaError_t launch_short_group(const Params& caller_params, dim3 grid, cudaStream_t stream) {
    const ShortParams params = short_params(caller_params);
    using Traits = ShortTraits;
    if (params.num_splits == 1)
        return programmatic_launch::launch(flash_decode_short_kernel<Element, kGroup>, grid, dim3(Traits::kThreads),
                                           0, stream, params);
    auto* kernel = flash_decode_short_cluster_kernel<Element, kGroup>;
    // (static shared memory and the merge buffer: past the 48 KB that needs no opt-in for kGroup 0)
    const size_t merge_bytes = Traits::merge_bytes(kGroup);
    static const cudaError_t opt_in =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)merge_bytes);
    if (opt_in != cudaSuccess) return opt_in;
    return programmatic_launch::launch_clustered(kernel, grid, dim3(Traits::kThreads), merge_bytes, stream,
                                                 (unsigned)params.num_splits, params);
}

// Whether the short-launch kernel takes a narrow-tile launch of this head_dim and split count (the one rule for the
// launch, default_num_splits and uses_short_kernel).
static bool short_kernel_serves(int head_dim, int num_splits) {
    return head_dim == ShortTraits::kHeadDim && short_kernel_enabled() && num_splits <= ShortTraits::kMaxSplits;
}

template <typename Element>
static cudaError_t launch_short(const Params& params, dim3 grid, cudaStream_t stream) {
    return params.group_size == 4 ? launch_short_group<Element, 4>(params, grid, stream)
                                  : launch_short_group<Element, 0>(params, grid, stream);
}

template <typename Element, int kHeadDim>
static cudaError_t launch_narrow(const Params& params, dim3 grid, cudaStream_t stream) {
    if constexpr (kHeadDim == ShortTraits::kHeadDim)
        if (short_kernel_serves(kHeadDim, params.num_splits)) return launch_short<Element>(params, grid, stream);
    return params.num_splits > 1 ? launch_instance<Element, kHeadDim, false, true, 1, true, true>(params, grid, stream)
                                 : launch_instance<Element, kHeadDim, false, false, 1, true, true>(params, grid, stream);
}

template <typename Element, int kHeadDim>
static Variant make_variant() {
    // KV-head pairs at head 64 only: at head 128 (one head's row is 256 bytes already) the probe read pairs no faster
    // (batch 16 S = 2048: 47.7-48.0 us against 47.4-48.5)
    static_assert(KernelTraits<Element, kHeadDim, 1, true>::kRowsPerBlockTile == kNarrowRowsPerBlockTile, "narrow tile");
    Variant variant = {KernelTraits<Element, kHeadDim>::kRowsPerBlockTile, &launch_variant<Element, kHeadDim>,
                       &launch_narrow<Element, kHeadDim>, &launch_bulk_instance<Element, kHeadDim>, nullptr, nullptr};
    if constexpr (kHeadDim == 64) {
        variant.launch_bulk_pairs = &launch_bulk_pairs<Element, kHeadDim>;
        variant.pair_blocks_an_sm = &pair_blocks_an_sm<Element, kHeadDim>;
    }
    return variant;
}

// The runtime choice of dtype and head_dim -> the template instance (false: unsupported).
template <typename Element>
static bool select_head_dim(int head_dim, Variant* out) {
    switch (head_dim) {
        case 64: *out = make_variant<Element, 64>(); return true;
        case 128: *out = make_variant<Element, 128>(); return true;
        default: return false;
    }
}

static bool select_variant(DType dtype, int head_dim, Variant* out) {
    return dtype == DType::kBFloat16 ? select_head_dim<__nv_bfloat16>(head_dim, out)
                                     : select_head_dim<__half>(head_dim, out);
}

struct DeviceInfo {
    int num_sms = 0;
    int rows_per_block_tile = 1;
    int pair_blocks_an_sm = 0;  // (0: no KV-head pair instance)
};

// The SM count and the split granularity for one kernel variant on one device (asked once, then cached).
static cudaError_t device_info(int device, DType dtype, int head_dim, DeviceInfo* out) {
    static std::mutex mutex;
    static std::unordered_map<int64_t, DeviceInfo> cache;
    const int64_t key = ((int64_t)device << 16) | ((int)dtype << 12) | head_dim;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) {
        *out = it->second;
        return cudaSuccess;
    }
    DeviceInfo info;
    Variant variant;
    if (!select_variant(dtype, head_dim, &variant)) return cudaErrorInvalidValue;
    cudaError_t err = cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    info.rows_per_block_tile = variant.rows_per_block_tile;
    info.num_sms = std::max(info.num_sms, 1);
    if (variant.pair_blocks_an_sm != nullptr && programmatic_launch::current_device_supports()) {  // (sm_90+)
        // A failed query means no KV-head pairs (one head a block serves those launches), not a failed launch; it
        // clears only its own error, not one still to be reported.
        const cudaError_t pending = cudaPeekAtLastError();
        if (variant.pair_blocks_an_sm(&info.pair_blocks_an_sm) != cudaSuccess) {
            if (pending == cudaSuccess) cudaGetLastError();
            info.pair_blocks_an_sm = 0;
        }
    }
    cache[key] = info;
    *out = info;
    return cudaSuccess;
}

// device_info for the current device, which it also returns.
static cudaError_t current_device_info(DType dtype, int head_dim, int* device, DeviceInfo* out) {
    const cudaError_t err = cudaGetDevice(device);
    return err != cudaSuccess ? err : device_info(*device, dtype, head_dim, out);
}

bool& cluster_merge_enabled() {
    static bool on = true;
    return on;
}

BulkPipeline& bulk_pipeline_mode() {
    static BulkPipeline mode = BulkPipeline::kAuto;
    return mode;
}

bool uses_bulk_pipeline(int units, int head_dim, int seq_capacity, bool early_cache_reads) {
    const BulkPipeline mode = bulk_pipeline_mode();
    if (mode == BulkPipeline::kOff || early_cache_reads || (head_dim != 64 && head_dim != 128) ||
        !programmatic_launch::current_device_supports())  // (the tensor copies: sm_90+, as programmatic launch)
        return false;
    if (mode == BulkPipeline::kAlways) return true;
    Variant variant;
    select_variant(DType::kBFloat16, head_dim, &variant);  // (the tile rows are the same for both dtypes)
    const int64_t rows = variant.rows_per_block_tile;
    const int64_t work = (int64_t)units * ((seq_capacity + rows - 1) / rows);
    return work >= kBulkMinWorkTiles;
}

WarpGroups& warp_groups_mode() {
    static WarpGroups mode = WarpGroups::kAuto;
    return mode;
}

// Thread-block clusters of `size` blocks of two warp groups (one block an SM: their registers) that the device runs at
// once; fewer than its SMs / size where the SMs of a GPC are not a multiple of the size (H100: 30 clusters of 4, 15 of
// 8). Asked once per device and size (0, no two groups with a cluster merge, where the device cannot say).
static int warp_group_clusters_at_once(int device, int size) {
    static std::mutex mutex;
    static std::unordered_map<int64_t, int> cache;
    const int64_t key = ((int64_t)device << 16) | size;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    using Traits = KernelTraits<__nv_bfloat16, 64, 2>;  // (every two-group instance: one block an SM)
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(size, 1);
    config.blockDim = dim3(Traits::kThreads);
    config.dynamicSmemBytes = Traits::cluster_merge_bytes(size);
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = size;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    int clusters = 0;
    const cudaError_t pending = cudaPeekAtLastError();
    if (cudaOccupancyMaxActiveClusters(&clusters, flash_decode_kernel<__nv_bfloat16, 64, false, true, false, 2>,
                                       &config) != cudaSuccess) {
        if (pending == cudaSuccess) cudaGetLastError();  // the query's own error only, not one still to be reported
        clusters = 0;
    }
    cache[key] = clusters;
    return clusters;
}

// uses_warp_groups for a plain launch whose pipeline is known (bulk: uses_bulk_pipeline's answer), on `device` with
// `num_sms` SMs, whose splits have at most `split_tiles` tiles: the rule itself, shared by uses_warp_groups and launch
// (which has asked for both already).
static bool warp_groups_for(int units, int num_splits, int64_t split_tiles, bool bulk, int device, int num_sms) {
    const WarpGroups mode = warp_groups_mode();
    if (mode != WarpGroups::kAuto) return mode == WarpGroups::kAlways;
    if ((int64_t)units * num_splits > num_sms) return false;
    if (bulk) return true;  // (a workspace merge)
    // The second group takes a split's second, fourth, ... tiles: with one tile a split it has nothing to do, and its
    // warps only cost the block issue slots (their prologue and loads) and the warps' merge four more rows to read. On
    // an H200 (2026-11-29, alternating rounds, us), two groups -> four warps where a split has one tile: head 128 S =
    // 256 / 512 / 1024 7.17 / 7.12 / 8.86 -> 6.86 / 6.75 / 8.61, head 64 S = 512 / 1024 6.88 / 7.20 -> 6.66 / 6.85, fp16
    // head 128 S = 256 6.72 -> 6.46; with two tiles a split level (head 64 S = 256 6.59 / 6.50, S = 2048 7.71 / 7.68),
    // with four much slower (head 128 S = 2048 8.93 / 10.18).
    if (split_tiles < 2) return false;
    // A cluster merge's grid must fit at once, or its last clusters wait for a second wave (H100, 2026-11-27: batch 4
    // head 64 S = 2048 in 32 clusters of 4, 17.1-18.2 us against 14.6-15.8 with four warps, two blocks an SM).
    return !uses_cluster_merge(num_splits) || units <= warp_group_clusters_at_once(device, num_splits);
}

bool uses_warp_groups(int units, int num_splits, int head_dim, int seq_capacity, bool early_cache_reads) {
    const WarpGroups mode = warp_groups_mode();
    if (mode == WarpGroups::kOff || early_cache_reads) return false;
    if (mode == WarpGroups::kAlways) return true;
    int device = 0;
    DeviceInfo info;  // (the tile rows are the same for both dtypes; an unsupported head_dim fails here)
    if (current_device_info(DType::kBFloat16, head_dim, &device, &info) != cudaSuccess) return false;
    return warp_groups_for(units, num_splits, split_tiles_of(seq_capacity, info.rows_per_block_tile, num_splits),
                           uses_bulk_pipeline(units, head_dim, seq_capacity), device, info.num_sms);
}

KvHeadPairs& kv_head_pairs_mode() {
    static KvHeadPairs mode = KvHeadPairs::kAuto;
    return mode;
}

// uses_kv_head_pairs for a launch whose pipeline is known (bulk), with the device_info of its dtype and head_dim:
// shared with launch.
static bool kv_head_pairs_for(int batch, int kv_heads, int head_groups, int num_splits, bool bulk, const DeviceInfo& info) {
    const KvHeadPairs mode = kv_head_pairs_mode();
    if (mode == KvHeadPairs::kOff || !bulk || info.pair_blocks_an_sm == 0 || head_groups != 1 || kv_heads % 2 != 0)
        return false;
    if (mode == KvHeadPairs::kAlways) return true;
    // Two pair blocks an SM (one, with its one stage, would hold half the bytes in flight that the per-head layout
    // does), in a grid of one split whose waves of two an SM are at least 15/16 full: a pair block is two per-head
    // blocks' work, and a last wave half empty costs more than the pairs save (an H100, 2026-11-27, batch 96 head 64
    // S = 2048, 384 pair blocks in 1.45 waves: 141.3 us against 139.3 with one head a block; batch 64, 256 blocks in
    // 264 places, and batch 128 S = 1024, 512 blocks, above).
    const int64_t blocks = (int64_t)batch * (kv_heads / 2), places = 2 * (int64_t)info.num_sms;
    const int64_t waves = (blocks + places - 1) / places;
    return num_splits == 1 && info.pair_blocks_an_sm >= 2 && 16 * blocks >= 15 * waves * places;
}

bool uses_kv_head_pairs(int batch, int q_heads, int kv_heads, int head_dim, int seq_capacity, int num_splits,
                        DType dtype) {
    if (kv_heads <= 0 || q_heads % kv_heads != 0) return false;
    const int head_groups = head_groups_for(q_heads / kv_heads);
    int device = 0;
    DeviceInfo info;
    if (current_device_info(dtype, head_dim, &device, &info) != cudaSuccess) return false;
    const bool bulk = uses_bulk_pipeline(batch * kv_heads * head_groups, head_dim, seq_capacity);
    return kv_head_pairs_for(batch, kv_heads, head_groups, num_splits, bulk, info);
}

bool& narrow_tiles_enabled() {
    static bool on = true;
    return on;
}

bool& short_kernel_enabled() {
    static bool on = true;
    return on;
}

// uses_narrow_tiles for a plain launch whose pipeline and warp groups are known: every split at most one narrow tile,
// in one block or merged in a cluster, blocks of four warps (two groups keep the standard tile)
static bool narrow_tiles_for(int num_splits, int seq_capacity, bool bulk, bool warp_groups) {
    return narrow_tiles_enabled() && !bulk && !warp_groups &&
           (int64_t)num_splits * kNarrowRowsPerBlockTile >= seq_capacity &&
           (num_splits == 1 || uses_cluster_merge(num_splits));
}

bool uses_narrow_tiles(int units, int num_splits, int head_dim, int seq_capacity, bool early_cache_reads) {
    if (early_cache_reads || !narrow_tiles_enabled()) return false;
    const bool bulk = uses_bulk_pipeline(units, head_dim, seq_capacity);
    return narrow_tiles_for(num_splits, seq_capacity, bulk,
                            uses_warp_groups(units, num_splits, head_dim, seq_capacity));
}

bool uses_short_kernel(int units, int num_splits, int head_dim, int seq_capacity, bool early_cache_reads) {
    return short_kernel_serves(head_dim, num_splits) &&
           uses_narrow_tiles(units, num_splits, head_dim, seq_capacity, early_cache_reads);
}

bool uses_cluster_merge(int num_splits, bool early_cache_reads) {
    return cluster_merge_enabled() && num_splits >= 2 &&
           num_splits <= (early_cache_reads ? kMaxDecodeClusterSplits : kMaxClusterSplits) &&
           programmatic_launch::current_device_supports();  // (thread-block clusters: sm_90+ too)
}

int default_num_splits(int batch, int q_heads, int kv_heads, int head_dim, int max_seqlen, bool early_cache_reads,
                       int device, cudaError_t* error) {
    *error = cudaSuccess;
    if (batch <= 0 || kv_heads <= 0 || max_seqlen <= 0) return 1;
    const int head_groups = head_groups_for(q_heads / kv_heads);
    DeviceInfo info;
    *error = device_info(device, DType::kBFloat16, head_dim, &info);
    if (*error != cudaSuccess) return 1;
    const int rows_per_tile = info.rows_per_block_tile;

    const int base_blocks = batch * kv_heads * head_groups;
    // Splits take interleaved tiles, so one tile per split is enough; but a sequence of one or two tiles
    // is faster in one block than with the merge's extra memory round trips (8.2 vs 9.5 us at 256 rows).
    // (Two splits merged in a cluster, each in four warps, on an H200, 2026-11-29: batch 1 head 64 S = 256 6.66-6.69
    // against 6.74-6.85 us, fp16 level to 0.2 faster, but batch 4 0.2 slower; not taken.)
    const int tiles = (max_seqlen + rows_per_tile - 1) / rows_per_tile;
    // Narrow tiles (flash_decode_kernel.cuh) for a plain launch of one split either way (at most 32 rows), or where the
    // standard tile would give one split of two tiles in two warp groups (head 64: 129-256 rows, head 128: 65-128): a
    // split a narrow tile then, merged in a cluster, while the grid is one wave. Two H200s (2026-11-29, alternating
    // rounds, us, standard -> narrow): batch 1 head 64 S = 256 6.27 -> 5.98 and 6.53 -> 6.18 (fp16 6.32 -> 5.92, 6.50
    // -> 6.06), S = 32 5.58 -> 5.18 and 5.66 -> 5.36, head 128 S = 128 6.69 -> 6.27 and 6.80 -> 6.45, batch 2 head 64 S
    // = 256 6.03 -> 5.86 and 6.27 -> 6.14. Where the standard launch is one block of four warps (head 64 S = 128, head
    // 128 S = 64) narrow clusters were 0.2 us slower, where it is four splits already (head 128 S = 200-256) level, and
    // at batch 2 head 128 S = 256 (128 blocks in clusters of 8 instead of 64 in clusters of 4) 0.5-0.6 slower.
    // (Those splits run narrow tiles in launch() by the same narrow_tiles_for; the warp groups' automatic rule gives them
    // four warps, a split having at most one standard tile.)
    // The short-launch kernel at head 128 (flash_decode_short.cuh) takes narrow splits up to a full cluster where they
    // make at most half an SM count of blocks: a probe of it at batch 1 S = 256 (8 splits, 64 blocks; an H200,
    // 2026-11-29) was 0.5 us faster than the standard tile's 4 splits. (Batch 2 S = 256, 128 blocks, was not measured
    // with it: the narrow one-tile instance lost 0.5 us there.)
    const int narrow_tiles = (max_seqlen + kNarrowRowsPerBlockTile - 1) / kNarrowRowsPerBlockTile;
    const bool short_kernel =
        short_kernel_serves(head_dim, narrow_tiles) && 2 * base_blocks * narrow_tiles <= info.num_sms;
    if (!early_cache_reads && (narrow_tiles == 1 || tiles == 2 || (short_kernel && tiles >= 3)) &&
        base_blocks * narrow_tiles <= info.num_sms &&
        narrow_tiles_for(narrow_tiles, max_seqlen, uses_bulk_pipeline(base_blocks, head_dim, max_seqlen),
                         warp_groups_mode() == WarpGroups::kAlways))
        return narrow_tiles;
    if (tiles <= 2) return 1;
    // Inside a decode step each block reads its first two tiles before the programmatic-launch wait: with
    // splits of at most two tiles, everything the sequence needs is in flight before the previous kernel ends,
    // while that is at most two blocks per SM (merged in a cluster up to kMaxDecodeClusterSplits, else through
    // the workspace). Measured on an H100 (2026-11-27, batch 1, head 64): a 17-tile cache in 8 splits gave 953
    // -> 960 tokens/s end to end with 128-token prompts but 897 -> 889 with 2048-token ones (one split's third
    // tile read after the wait at every step); 9 splits of two tiles (a cluster) 951 -> 960 and 892 -> 899
    // against 17 splits of one tile; a batch-1 decode step of a 32-tile cache took 1,022 / 1,038 / 1,052 us at
    // 2,048 / 3,072 / 4,096 positions in 16 such splits (workspace merge), against 1,019 / 1,040 / 1,065 in 32
    // splits of one tile and 1,024 / 1,049 / 1,074 in 8 (more tiles after the wait).
    //
    // With the one-way cluster merge (a split pushes its partial result into the first block's shared memory and
    // leaves, flash_decode_kernel.cuh) a merge became cheap, and more, shorter splits pay: the same step with a
    // 4,096-row cache (2026-11-27, 11:02 UTC) took 968.6 us after 512 positions in 4 splits of one tile against
    // 978.1 in 2 of two; 985 after 2,176 positions in 12 splits against 993 in 9; 997 / 1,021 after 3,072 /
    // 4,096 in 12 (up to three tiles, the third after the wait) against 1,039 / 1,047 in 16 of two tiles merged
    // through the workspace and 1,013 / 1,028 in a 16-block cluster. So a decode step takes one split per tile, up
    // to the largest cluster, while a split has at most three tiles and the blocks fit two an SM.
    const int cluster_splits = std::min(tiles, kMaxDecodeClusterSplits);
    if (early_cache_reads && uses_cluster_merge(cluster_splits, true) && tiles <= 3 * cluster_splits &&
        base_blocks * cluster_splits <= 2 * info.num_sms)
        return cluster_splits;
    const int pairs = (tiles + 1) / 2;
    if (early_cache_reads && base_blocks * pairs <= 2 * info.num_sms) return pairs;
    // Measured on an H100 (2026-11-26, split counts 1..128 at batch 1, 16 and 64): once the batch alone
    // gives a block to every other SM (batch 16 x 8 KV heads), one split is fastest for a plain launch
    // (5-12% ahead of 2-4). Inside a decode step, where each block reads its first tile before the
    // programmatic-launch wait, two splits (twice that head start) were faster while the blocks are
    // fewer than the SMs: 16x2048+2048 end to end 8,163 -> 8,316 tokens/s (4 and 8 splits: 8,071, 8,129).
    if (2 * base_blocks >= info.num_sms) return early_cache_reads && base_blocks < info.num_sms && tiles >= 4 ? 2 : 1;
    // The bulk variant's plain launches: one wave of its blocks, one an SM (launch_bulk_instance; batch 1 head 64
    // S = 131072: 105.1 us in 16 splits, 107.4 in 12, 118.4 in 24; head 128: 189.3 / 193.2 / 205.9; H100, 2026-11-27).
    if (uses_bulk_pipeline(base_blocks, head_dim, max_seqlen, early_cache_reads) &&
        bulk_pipeline_mode() == BulkPipeline::kAuto)
        return std::max(1, std::min(tiles, info.num_sms / base_blocks));
    int splits;
    if (early_cache_reads) {
        // about two blocks per SM (the decode step's rule, measured end to end)
        splits = (2 * info.num_sms + base_blocks - 1) / base_blocks;
    } else {
        // Plain launches, measured on an H100 (2026-11-27, batch 1-8, explicit splits): one wave of one block
        // per SM while a split has at most 16 tiles (batch 1 head 64 S = 8192: 16 splits 17.4 us against 18.8
        // with 33), else about 1.5 blocks per SM (batch 4 head 64 S = 16384: 6 splits 62.9 us; 8, two blocks
        // per SM, 79.5; the former ceil(2 SMs / blocks) = 9, a partial second wave, 75.7).
        const int one_wave = std::max(1, info.num_sms / base_blocks);
        // First, though, up to kMaxClusterSplits splits merged in a cluster while a split has at most 4 tiles (batch 1:
        // head 64 S = 2048 / 4096 10.4 / 13.0 us in 8 splits against 11.4 / 13.4 in 16 through the workspace, head
        // 128 S = 1024 / 2048 10.4 / 13.2 against 11.7 / 13.5; but S = 16384 23.0 / 34.9 in 16 against 26.3 / 41.7 in
        // 8; H100, 2026-11-27, 16:02 UTC).
        const int cluster_splits = std::min({tiles, kMaxClusterSplits, one_wave});
        if (uses_cluster_merge(cluster_splits) && (tiles + cluster_splits - 1) / cluster_splits <= 4) return cluster_splits;
        splits = (tiles + one_wave - 1) / one_wave <= 16 ? one_wave : 3 * info.num_sms / (2 * base_blocks);
    }
    return std::max(1, std::min({kMaxSplits, tiles, splits}));
}

// The divisors of a block's decode of its unit (Params::head_groups_magic ...): units of unit_heads heads a sequence.
static void set_unit_divisors(Params* params, int unit_heads) {
    const FastDivisor head_groups = fast_divisor(params->head_groups), heads = fast_divisor(unit_heads);
    params->head_groups_magic = head_groups.magic;
    params->unit_heads_magic = heads.magic;
    params->divisor_shifts = head_groups.shift | heads.shift << 8;
}

cudaError_t launch(const Params& caller_params, DType dtype, cudaStream_t stream) {
    if (caller_params.head_groups < 1 || caller_params.kv_heads < 1) return cudaErrorInvalidValue;
    Params params = caller_params;  // (with the divisors filled in)
    set_unit_divisors(&params, params.kv_heads);
    if (params.num_splits < 1 || params.num_splits > kMaxSplits) return cudaErrorInvalidValue;
    // (a plain launch reads its first tile's rows before the length, clamped to the capacity's last row: there must be
    // one; a cache without rows holds only empty sequences, which the caller answers without a launch)
    if (params.seq_capacity < 1) return cudaErrorInvalidValue;
    // (rows below 4 GB apart: the register pipeline's plain launches address them with 32-bit offsets)
    if (params.k_seq_stride < 0 || params.v_seq_stride < 0 || (uint64_t)params.k_seq_stride * 2 > UINT32_MAX ||
        (uint64_t)params.v_seq_stride * 2 > UINT32_MAX)
        return cudaErrorInvalidValue;
    Variant variant;
    if (!select_variant(dtype, params.head_dim, &variant)) return cudaErrorInvalidValue;
    const int units = params.batch * params.kv_heads * params.head_groups;
    const dim3 grid(params.num_splits, units);
    if (params.early_cache_reads)  // (a decode step: the register pipeline in four warps)
        return variant.launch(params, grid, uses_cluster_merge(params.num_splits, true), false, false, stream);
    // A plain launch: the pipeline, and the SM count that the bulk variant's layout and the warp groups' rule need
    const bool bulk = uses_bulk_pipeline(units, params.head_dim, params.seq_capacity);
    int device = 0;
    DeviceInfo info;
    cudaError_t err = current_device_info(dtype, params.head_dim, &device, &info);
    if (err != cudaSuccess) return err;
    const int64_t split_tiles = split_tiles_of(params.seq_capacity, variant.rows_per_block_tile, params.num_splits);
    const bool warp_groups = warp_groups_for(units, params.num_splits, split_tiles, bulk, device, info.num_sms);
    // (the register pipeline: a warp group takes every second of its split's tiles with two groups, every one with one)
    const bool one_tile = split_tiles <= (warp_groups ? 2 : 1);
    if (narrow_tiles_for(params.num_splits, params.seq_capacity, bulk, warp_groups))
        return variant.launch_narrow(params, grid, stream);
    if (bulk) {
        if (variant.launch_bulk_pairs != nullptr &&
            kv_head_pairs_for(params.batch, params.kv_heads, params.head_groups, params.num_splits, true, info)) {
            Params pair_params = params;  // (a unit of two KV heads)
            set_unit_divisors(&pair_params, params.kv_heads / 2);
            err = variant.launch_bulk_pairs(pair_params, dim3(params.num_splits, units / 2), stream);
            if (err != cudaErrorNotSupported) return err;  // (else one head a block, below)
        }
        err = variant.launch_bulk(params, grid, info.num_sms, warp_groups, stream);
        // no tensor map for these tensors: the register pipeline, which then merges through the workspace as well
        // (the caller allocated it for the bulk variant), in as many warp groups (no cluster to fit)
        if (err != cudaErrorNotSupported) return err;
        return variant.launch(params, grid, false, warp_groups, one_tile, stream);
    }
    return variant.launch(params, grid, uses_cluster_merge(params.num_splits), warp_groups, one_tile, stream);
}

}  // namespace flash_decode
