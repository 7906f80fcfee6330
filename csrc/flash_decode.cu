// Host side of the flash-decode kernel: template dispatch (dtype x head_dim x group tile, like
// FlashAttention's head-dim switch), the split heuristic and the launch.
#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "flash_decode.h"
#include "flash_decode_kernel.cuh"
#include "programmatic_launch.cuh"

namespace flash_decode {

int group_tile_for(int group_size) {
    // The smallest power of two that holds the group: a GQA ratio of 3 (Llama 3.2 3B, SmolLM2) runs the
    // 4-head kernel with one idle head slot rather than a kernel per ratio.
    int tile = 1;
    while (tile < group_size && tile < kMaxGroupTile) tile *= 2;
    return tile;
}

// One compiled variant of the kernel.
struct Variant {
    const void* kernel;  // for the occupancy query
    int threads;
    int rows_per_block_tile;  // the split granularity
    cudaError_t (*launch)(const Params&, dim3, cudaStream_t);
};

template <typename Element, int kHeadDim, int kGroupTile>
static cudaError_t launch_variant(const Params& params, dim3 grid, cudaStream_t stream) {
    using Traits = KernelTraits<Element, kHeadDim, kGroupTile>;
    if (params.early_cache_reads)
        return programmatic_launch::launch(flash_decode_kernel<Element, kHeadDim, kGroupTile, true>, grid,
                                           dim3(Traits::kThreads), 0, stream, params);
    return programmatic_launch::launch(flash_decode_kernel<Element, kHeadDim, kGroupTile, false>, grid,
                                       dim3(Traits::kThreads), 0, stream, params);
}

template <typename Element, int kHeadDim, int kGroupTile>
static Variant make_variant() {
    return {reinterpret_cast<const void*>(&flash_decode_kernel<Element, kHeadDim, kGroupTile, false>),
            KernelTraits<Element, kHeadDim, kGroupTile>::kThreads,
            KernelTraits<Element, kHeadDim, kGroupTile>::kRowsPerBlockTile,
            &launch_variant<Element, kHeadDim, kGroupTile>};
}

// The runtime choice of dtype, head_dim and group tile -> the template instance (false: unsupported).
template <typename Element, int kHeadDim>
static bool select_group_tile(int group_tile, Variant* out) {
    switch (group_tile) {
        case 1: *out = make_variant<Element, kHeadDim, 1>(); return true;
        case 2: *out = make_variant<Element, kHeadDim, 2>(); return true;
        case 4: *out = make_variant<Element, kHeadDim, 4>(); return true;
        case 8: *out = make_variant<Element, kHeadDim, 8>(); return true;
        default: return false;
    }
}

template <typename Element>
static bool select_head_dim(int head_dim, int group_tile, Variant* out) {
    switch (head_dim) {
        case 64: return select_group_tile<Element, 64>(group_tile, out);
        case 128: return select_group_tile<Element, 128>(group_tile, out);
        default: return false;
    }
}

static bool select_variant(DType dtype, int head_dim, int group_tile, Variant* out) {
    return dtype == DType::kBFloat16 ? select_head_dim<__nv_bfloat16>(head_dim, group_tile, out)
                                     : select_head_dim<__half>(head_dim, group_tile, out);
}

struct DeviceInfo {
    int num_sms = 0;
    int blocks_per_sm = 0;
    int rows_per_block_tile = 1;
};

// Resident blocks per SM for one kernel variant on one device (asked once, then cached).
static cudaError_t device_info(int device, DType dtype, int head_dim, int group_tile, DeviceInfo* out) {
    static std::mutex mutex;
    static std::unordered_map<int64_t, DeviceInfo> cache;
    const int64_t key = ((int64_t)device << 16) | ((int)dtype << 12) | (head_dim << 4) | group_tile;
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) {
        *out = it->second;
        return cudaSuccess;
    }
    DeviceInfo info;
    Variant variant;
    if (!select_variant(dtype, head_dim, group_tile, &variant)) return cudaErrorInvalidValue;
    cudaError_t err = cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
        err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, variant.kernel, variant.threads, 0);
    if (err != cudaSuccess) return err;
    info.rows_per_block_tile = variant.rows_per_block_tile;
    info.num_sms = std::max(info.num_sms, 1);
    info.blocks_per_sm = std::max(info.blocks_per_sm, 1);
    cache[key] = info;
    *out = info;
    return cudaSuccess;
}

int default_num_splits(int batch, int q_heads, int kv_heads, int head_dim, int max_seqlen, int device,
                       cudaError_t* error) {
    *error = cudaSuccess;
    if (batch <= 0 || kv_heads <= 0 || max_seqlen <= 0) return 1;
    const int group_size = q_heads / kv_heads;
    const int group_tile = group_tile_for(group_size);
    const int head_groups = (group_size + group_tile - 1) / group_tile;
    DeviceInfo info;
    *error = device_info(device, DType::kBFloat16, head_dim, group_tile, &info);
    if (*error != cudaSuccess) return 1;
    const int rows_per_tile = info.rows_per_block_tile;

    const int base_blocks = batch * kv_heads * head_groups;
    const int wave = info.num_sms * info.blocks_per_sm;
    if (base_blocks >= 4 * wave) return 1;  // many waves already: splitting only adds combine work

    // A split costs about as much as a couple of tiles' memory round trips (partial write, fence, ticket,
    // merge), so each split gets at least two tiles of rows; measured on an H100 (2026-11-26), two blocks
    // per SM were enough to reach full bandwidth, more only added combine work.
    const int max_splits = std::min(kMaxSplits, std::max(1, max_seqlen / (2 * rows_per_tile)));
    int splits = std::min(max_splits, (2 * info.num_sms + base_blocks - 1) / base_blocks);
    // Past one wave, every block of a split-KV launch does the same work, so a half-empty last wave is
    // wasted time: add splits until the last wave is at least 85% full.
    auto last_wave_short = [&](int s) {
        const int blocks = base_blocks * s;
        const int waves = (blocks + wave - 1) / wave;
        return waves > 1 && (float)blocks / (float)(waves * wave) < 0.85f;
    };
    while (splits < max_splits && last_wave_short(splits)) ++splits;
    return std::max(splits, 1);
}

cudaError_t launch(const Params& params, DType dtype, cudaStream_t stream) {
    const int group_tile = group_tile_for(params.group_size);
    if (params.num_splits < 1 || params.num_splits > kMaxSplits) return cudaErrorInvalidValue;
    const dim3 grid(params.num_splits, params.batch * params.kv_heads * params.head_groups);
    Variant variant;
    if (!select_variant(dtype, params.head_dim, group_tile, &variant)) return cudaErrorInvalidValue;
    return variant.launch(params, grid, stream);
}

}  // namespace flash_decode
