// Programmatic dependent launch (Hopper, sm_90+): the decode step is a chain of ~100 short kernels, and at
// batch 1 each one's launch latency and ramp-up is a visible share of its run time. A kernel launched with
// launch_programmatic() may start while the kernel before it in the stream is still finishing: it may do
// work that does not depend on that kernel (the GEMV streams its weights), and must call
// wait_for_previous_kernel() before it reads anything the previous kernel wrote, or writes anything at all.
// Each kernel calls allow_next_kernel() first thing: once every block of this kernel is resident, the
// next kernel's blocks may be scheduled into the room left on the SMs and issue their independent loads
// while this one runs. A kernel that later kernels must not run ahead of calls it after its wait instead (the
// first GEMV of a decode step: gemv.cu). Correctness rests on wait_for_previous_kernel(): it returns once the
// previous kernel has completed and its writes are visible, and that kernel's blocks had waited for their own
// predecessor, so every earlier kernel is complete too. On older GPUs, or with enabled() = false, it is a
// plain launch and the device calls compile to nothing.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace programmatic_launch {

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Process-wide switch, for measuring what it buys (benchmark_model.py --no_programmatic_launch).
inline bool& enabled() {
    static bool on = true;
    return on;
}

inline bool current_device_supports() {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    return major >= 9;
}

// programmatic: with the early start (when enabled() and supported); cluster_x > 1: thread-block clusters of
// cluster_x blocks along x (sm_90+; grid.x a multiple of it).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_with(bool programmatic, void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                        cudaStream_t stream, unsigned cluster_x, Args&&... args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cudaLaunchAttribute attributes[2];
    config.attrs = attributes;
    if (programmatic && enabled() && current_device_supports()) {
        attributes[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attributes[config.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster_x > 1) {
        attributes[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
        attributes[config.numAttrs].val.clusterDim.x = cluster_x;
        attributes[config.numAttrs].val.clusterDim.y = 1;
        attributes[config.numAttrs++].val.clusterDim.z = 1;
    }
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_clustered(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                             cudaStream_t stream, unsigned cluster_x, Args&&... args) {
    return launch_with(true, kernel, grid, block, shared_bytes, stream, cluster_x, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
    return launch_clustered(kernel, grid, block, shared_bytes, stream, 1u, std::forward<Args>(args)...);
}

}  // namespace programmatic_launch
