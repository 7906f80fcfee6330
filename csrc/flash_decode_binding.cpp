// Torch binding of the flash-decode kernel and the fused decode-step ops: argument checks with errors that say what to fix, the split
// workspace, and the launch on the current stream. Graph-safe: no host sync, no data-dependent shapes;
// lengths are read by the kernel from the device.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "decode_layers.h"
#include "flash_decode.h"
#include "fused_ops.h"
#include "gemv.h"
#include "kv_read.h"
#include "programmatic_launch.cuh"
#include "sampling.h"

namespace {

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y: (sequence, KV head, head group) blocks

// Error messages are built without iostreams: c10::str (and so TORCH_CHECK) formats through an
// std::ostringstream instantiated in this library, which crashed (SIGSEGV in the locale's codecvt) when
// this extension was built by the GPU machine's newer g++ against the older libstdc++ that the process had
// loaded (H100 machine, torch 2.11, 2026-11-26). std::to_string has no locale and no such mismatch.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, at::IntArrayRef v) {
    s += "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    s += "]";
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) { s += v.str(); }
template <typename... Args>
std::string message(const Args&... args) {
    std::string s;
    (append(s, args), ...);
    return s;
}

// Bad arguments raise ValueError in Python (pybind11 maps std::invalid_argument to it), with a message
// that names the problem and the fix; a failed launch raises RuntimeError.
#define FD_CHECK(cond, ...) \
    do { if (!(cond)) throw std::invalid_argument(message(__VA_ARGS__)); } while (0)

void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(message("flash_decode: ", what, " failed: ", cudaGetErrorString(err)));
}

void check_rows_aligned(const at::Tensor& t, const char* name) {
    FD_CHECK(t.stride(-1) == 1, "flash_decode: ", name, " must be contiguous in its last (head_dim) dimension, "
                "got strides ", t.strides(), "; call .contiguous() on it");
    FD_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                "flash_decode: ", name, " must start on a 16-byte boundary (the kernel moves its rows in aligned pieces "
                "of up to 16 bytes)");
    for (int d = 0; d < t.dim() - 1; ++d)
        FD_CHECK(t.stride(d) % 8 == 0, "flash_decode: ", name, " stride ", t.stride(d), " of dimension ", d,
                    " is not a multiple of 8 elements (16 bytes); make the tensor contiguous");
}

// Split tickets: zero between launches (the last block of each group resets its own). One buffer per
// device, sized once for the largest grid (grid.y <= 65535) and never reallocated, because captured CUDA
// graphs keep its address. It is shared by every launch on the device: flash_decode launches must not run
// concurrently on two streams of one device (one decode loop per GPU, as in this repo).
at::Tensor split_counters(const at::Device& device) {
    static std::mutex mutex;
    static auto* per_device = new std::vector<at::Tensor>();  // leaked: no teardown-order issues at exit
    std::lock_guard<std::mutex> lock(mutex);
    const int index = device.index();
    if ((int)per_device->size() <= index) per_device->resize(index + 1);
    at::Tensor& counters = (*per_device)[index];
    if (!counters.defined()) {
        FD_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                 "flash_decode: the split workspace is allocated on first use, which cannot happen while a CUDA "
                 "graph is being captured; run one decode step before capturing");
        counters = at::zeros({kMaxGridY}, at::TensorOptions().dtype(at::kInt).device(device));
    }
    return counters;
}

int64_t default_num_splits(int64_t batch_size, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t max_seqlen, bool early_cache_reads) {
    FD_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0,
                "flash_decode: num_q_heads (", num_q_heads, ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
    FD_CHECK(head_dim == 64 || head_dim == 128, "flash_decode: head_dim ", head_dim,
                " is not supported; the kernel is built for head_dim 64 and 128");
    cudaError_t err = cudaSuccess;
    const int splits = flash_decode::default_num_splits((int)batch_size, (int)num_q_heads, (int)num_kv_heads,
                                                        (int)head_dim, (int)max_seqlen, early_cache_reads,
                                                        c10::cuda::current_device(), &err);
    check_cuda(err, "querying the device for the split heuristic");
    return splits;
}

at::Tensor flash_decode_forward(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, double softmax_scale, int64_t num_splits,
                                c10::optional<at::Tensor> out_, c10::optional<at::Tensor> lse_,
                                bool early_cache_reads) {
    FD_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && cache_seqlens.is_cuda(),
                "flash_decode: q, k_cache, v_cache and cache_seqlens must all be CUDA tensors; on the CPU use "
                "llama3.decode_attention_reference");
    FD_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() &&
                    cache_seqlens.device() == q.device(),
                "flash_decode: all tensors must be on the same device as q (", q.device(), ")");
    FD_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "flash_decode: dtype ", q.scalar_type(), " is not supported; use bfloat16 or float16");
    FD_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                "flash_decode: q, k_cache and v_cache must have the same dtype, got ", q.scalar_type(), ", ",
                k_cache.scalar_type(), ", ", v_cache.scalar_type());
    FD_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1,
                "flash_decode: cache_seqlens must be a 1-D int32 tensor, got ", cache_seqlens.scalar_type(),
                " with shape ", cache_seqlens.sizes());
    FD_CHECK(q.dim() == 3, "flash_decode: q must be [batch, q_heads, head_dim], got shape ", q.sizes());
    FD_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                "flash_decode: k_cache and v_cache must both be [batch, seq, kv_heads, head_dim], got ",
                k_cache.sizes(), " and ", v_cache.sizes());

    const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2);
    const int64_t seq_capacity = k_cache.size(1), kv_heads = k_cache.size(2);
    FD_CHECK(head_dim == 64 || head_dim == 128, "flash_decode: head_dim ", head_dim,
                " is not supported; the kernel is built for head_dim 64 and 128");
    FD_CHECK(k_cache.size(3) == head_dim, "flash_decode: k_cache head_dim ", k_cache.size(3),
                " does not match q head_dim ", head_dim);
    FD_CHECK(k_cache.size(0) == batch && cache_seqlens.size(0) == batch,
                "flash_decode: batch mismatch: q has ", batch, ", k_cache ", k_cache.size(0), ", cache_seqlens ",
                cache_seqlens.size(0), "; slice the cache to the active batch (k_cache[:batch])");
    FD_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "flash_decode: q_heads (", q_heads,
                ") must be a multiple of kv_heads (", kv_heads, ")");
    FD_CHECK(cache_seqlens.is_contiguous(), "flash_decode: cache_seqlens must be contiguous");
    check_rows_aligned(q, "q");
    check_rows_aligned(k_cache, "k_cache");
    check_rows_aligned(v_cache, "v_cache");
    for (const at::Tensor* cache : {&k_cache, &v_cache})
        FD_CHECK(cache->stride(1) * cache->element_size() < (int64_t(1) << 32), "flash_decode: the cache's rows are ",
                 cache->stride(1) * cache->element_size(), " bytes apart (stride(1) = ", cache->stride(1),
                 "); the kernel supports row strides below 4 GiB: store the cache [batch, seq, kv_heads, head_dim]");

    at::Tensor out;
    if (out_.has_value()) {
        out = out_.value();
        FD_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
                    "flash_decode: out must match q in shape, dtype and device");
        check_rows_aligned(out, "out");
    } else {
        out = at::empty_like(q, at::MemoryFormat::Contiguous);
    }
    float* lse_ptr = nullptr;
    if (lse_.has_value()) {
        const at::Tensor& lse = lse_.value();
        FD_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                        lse.dim() == 2 && lse.size(0) == batch && lse.size(1) == q_heads,
                    "flash_decode: lse must be a contiguous float32 [batch, q_heads] tensor on q's device");
        lse_ptr = lse.data_ptr<float>();
    }
    if (batch == 0) return out;

    const c10::cuda::CUDAGuard guard(q.device());
    if (seq_capacity == 0) {  // every length is clamped to 0: the attention of nothing, as the kernel writes it
        out.zero_();
        if (lse_.has_value()) lse_.value().fill_(-std::numeric_limits<float>::infinity());
        return out;
    }
    const int group_size = (int)(q_heads / kv_heads);
    const int head_groups = flash_decode::head_groups_for(group_size);
    FD_CHECK(batch * kv_heads * head_groups <= kMaxGridY, "flash_decode: batch ", batch, " x ", kv_heads,
             " KV heads x ", head_groups, " head groups = ", batch * kv_heads * head_groups,
             " blocks exceed CUDA's grid limit of ", kMaxGridY, "; decode in smaller batches");
    if (num_splits <= 0)
        num_splits = default_num_splits(batch, q_heads, kv_heads, head_dim, seq_capacity, early_cache_reads);
    FD_CHECK(num_splits <= flash_decode::kMaxSplits, "flash_decode: num_splits ", num_splits,
                " is larger than the supported maximum ", flash_decode::kMaxSplits);

    flash_decode::Params p{};
    p.q = q.data_ptr();
    p.k = k_cache.data_ptr();
    p.v = v_cache.data_ptr();
    p.out = out.data_ptr();
    p.lse = lse_ptr;
    p.seqlens = cache_seqlens.data_ptr<int>();
    p.q_batch_stride = q.stride(0);
    p.q_head_stride = q.stride(1);
    p.k_batch_stride = k_cache.stride(0);
    p.k_seq_stride = k_cache.stride(1);
    p.k_head_stride = k_cache.stride(2);
    p.v_batch_stride = v_cache.stride(0);
    p.v_seq_stride = v_cache.stride(1);
    p.v_head_stride = v_cache.stride(2);
    p.out_batch_stride = out.stride(0);
    p.out_head_stride = out.stride(1);
    p.batch = (int)batch;
    p.q_heads = (int)q_heads;
    p.kv_heads = (int)kv_heads;
    p.head_dim = (int)head_dim;
    p.seq_capacity = (int)seq_capacity;
    p.group_size = group_size;
    p.head_groups = head_groups;
    p.num_splits = (int)num_splits;
    p.scale_log2 = (float)(softmax_scale * 1.4426950408889634);
    p.early_cache_reads = early_cache_reads;

    at::Tensor partial_out, partial_lse, counters;
    // (the bulk variant merges through the workspace, the cluster merge where it does not serve)
    const bool bulk = flash_decode::uses_bulk_pipeline((int)(batch * kv_heads * head_groups), (int)head_dim,
                                                       (int)seq_capacity, early_cache_reads);
    if (num_splits > 1 && (bulk || !flash_decode::uses_cluster_merge((int)num_splits, early_cache_reads))) {
        const auto f32 = q.options().dtype(at::kFloat);
        partial_out = at::empty({batch, q_heads, num_splits, head_dim}, f32);
        partial_lse = at::empty({batch, q_heads, num_splits}, f32);
        counters = split_counters(q.device());
        p.partial_out = partial_out.data_ptr<float>();
        p.partial_lse = partial_lse.data_ptr<float>();
        p.split_counters = counters.data_ptr<int>();
    }
    const flash_decode::DType dtype =
        q.scalar_type() == at::kBFloat16 ? flash_decode::DType::kBFloat16 : flash_decode::DType::kFloat16;
    check_cuda(flash_decode::launch(p, dtype, c10::cuda::getCurrentCUDAStream().stream()), "kernel launch");
    return out;
}

flash_decode::DType kernel_dtype(at::ScalarType type, const char* op) {
    FD_CHECK(type == at::kBFloat16 || type == at::kHalf, op, ": dtype ", type,
             " is not supported; use bfloat16 or float16");
    return type == at::kBFloat16 ? flash_decode::DType::kBFloat16 : flash_decode::DType::kFloat16;
}

flash_decode::DType model_dtype(const at::Tensor& t, const char* op) { return kernel_dtype(t.scalar_type(), op); }

void check_fused_input(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
    FD_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be a CUDA tensor on ", like.device());
    FD_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
             like.scalar_type());
    FD_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Returns (weight * norm(h), h) with h = x + residual, or h = x when residual is None.
std::tuple<at::Tensor, at::Tensor> add_rmsnorm(const at::Tensor& x, c10::optional<at::Tensor> residual,
                                               const at::Tensor& weight, double eps) {
    const flash_decode::DType dtype = model_dtype(x, "add_rmsnorm");
    check_fused_input(x, x, "add_rmsnorm", "x");
    check_fused_input(weight, x, "add_rmsnorm", "weight");
    const int64_t dim = x.size(-1);
    FD_CHECK(weight.dim() == 1 && weight.size(0) == dim, "add_rmsnorm: weight must be [", dim, "]");
    at::Tensor h = x;
    const void* residual_ptr = nullptr;
    if (residual.has_value()) {
        check_fused_input(*residual, x, "add_rmsnorm", "residual");
        FD_CHECK(residual->sizes() == x.sizes(), "add_rmsnorm: residual shape ", residual->sizes(),
                 " differs from x shape ", x.sizes());
        residual_ptr = residual->data_ptr();
        h = at::empty_like(x);
    }
    at::Tensor out = at::empty_like(x);
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(fused_ops::add_rmsnorm(x.data_ptr(), residual_ptr, residual_ptr ? h.data_ptr() : nullptr,
                                      weight.data_ptr(), out.data_ptr(), (int)(x.numel() / dim), (int)dim,
                                      (float)eps, dtype, c10::cuda::getCurrentCUDAStream().stream()),
               "add_rmsnorm launch");
    return {out, h};
}

// The RoPE tables, positions and caches of a qkv projection of `batch` rows and `qkv_width` columns (the
// checks of rope_kv_write and gemv_rope_kv_write). Returns {max_seq, kv_heads, head_dim}.
std::tuple<int64_t, int64_t, int64_t> check_rope_args(const char* op, int64_t batch, int64_t qkv_width,
                                                      const at::Tensor& like, const at::Tensor& cos,
                                                      const at::Tensor& sin, const at::Tensor& positions,
                                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                      int64_t q_heads) {
    for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"},
                           {k_cache, "k_cache"}, {v_cache, "v_cache"}})
        check_fused_input(t, like, op, name);
    FD_CHECK(positions.is_cuda() && positions.device() == like.device() && positions.scalar_type() == at::kLong &&
                 positions.is_contiguous(),
             op, ": positions must be a contiguous int64 tensor on ", like.device());
    FD_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
             op, ": caches must be [max_batch, max_seq, kv_heads, head_dim]");
    const int64_t max_seq = k_cache.size(1), kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
    FD_CHECK(q_heads >= 1 && head_dim % 2 == 0 && qkv_width == (q_heads + 2 * kv_heads) * head_dim, op,
             ": the qkv projection must have (q_heads + 2 kv_heads) head_dim = ", (q_heads + 2 * kv_heads) * head_dim,
             " columns, got ", qkv_width);
    FD_CHECK(positions.numel() == batch && batch <= k_cache.size(0), op, ": batch mismatch");
    FD_CHECK(cos.dim() == 2 && cos.size(0) == max_seq && cos.size(1) == head_dim && sin.sizes() == cos.sizes(),
             op, ": cos/sin must be [max_seq, head_dim] = [", max_seq, ", ", head_dim, "]");
    return {max_seq, kv_heads, head_dim};
}

// Rotates q and k of the fused projection qkv [B * T, (Hq + 2 Hkv) D] (T tokens of each of B sequences),
// writes k and v into the caches at positions[b] + t (positions [B] int64) and returns q [B * T, Hq, D].
at::Tensor rope_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         int64_t q_heads, int64_t tokens) {
    const flash_decode::DType dtype = model_dtype(qkv, "rope_kv_write");
    check_fused_input(qkv, qkv, "rope_kv_write", "qkv");
    FD_CHECK(qkv.dim() == 2, "rope_kv_write: qkv must be [batch * tokens, (q_heads + 2 kv_heads) head_dim], got ",
             qkv.sizes());
    FD_CHECK(tokens >= 1 && qkv.size(0) % tokens == 0, "rope_kv_write: tokens = ", tokens,
             " must be >= 1 and divide the ", qkv.size(0), " rows of qkv");
    const int64_t batch = qkv.size(0) / tokens;
    const auto [max_seq, kv_heads, head_dim] =
        check_rope_args("rope_kv_write", batch, qkv.size(1), qkv, cos, sin, positions, k_cache, v_cache, q_heads);
    FD_CHECK(tokens <= max_seq, "rope_kv_write: ", tokens, " tokens per sequence do not fit the cache's ", max_seq,
             " positions");  // (the kernel also traps on any position past the cache)
    at::Tensor q = at::empty({batch * tokens, q_heads, head_dim}, qkv.options());
    const c10::cuda::CUDAGuard guard(qkv.device());
    check_cuda(fused_ops::rope_kv_write(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr<int64_t>(),
                                        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), (int)batch, (int)tokens,
                                        (int)q_heads, (int)kv_heads, (int)head_dim, (int)max_seq, dtype,
                                        c10::cuda::getCurrentCUDAStream().stream()),
               "rope_kv_write launch");
    return q;
}

// silu(gate) * up for gate_up [..., 2 F] -> [..., F]
at::Tensor silu_mul(const at::Tensor& gate_up) {
    const flash_decode::DType dtype = model_dtype(gate_up, "silu_mul");
    check_fused_input(gate_up, gate_up, "silu_mul", "gate_up");
    const int64_t width2 = gate_up.size(-1);
    FD_CHECK(width2 % 2 == 0, "silu_mul: last dimension ", width2, " is not even");
    std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
    shape.back() = width2 / 2;
    at::Tensor out = at::empty(shape, gate_up.options());
    const c10::cuda::CUDAGuard guard(gate_up.device());
    check_cuda(fused_ops::silu_mul(gate_up.data_ptr(), out.data_ptr(), (int)(gate_up.numel() / width2),
                                   (int)(width2 / 2), dtype, c10::cuda::getCurrentCUDAStream().stream()),
               "silu_mul launch");
    return out;
}

void check_aligned(const at::Tensor& t, const char* op, const char* name) {
    FD_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
             " must start on a 16-byte boundary (16-byte loads); make a fresh contiguous copy");
}

// Checks the GEMV's inputs and fills the parameters that gemv and gemv_rope_kv_write share; returns h (the
// residual stream: x + residual, or x). With token_ids (int64 [rows]) x is an embedding table [V, k] and the
// input rows are x[token_ids] (needs the RMSNorm prologue and no residual; h is then a copy of those rows).
at::Tensor prepare_gemv(gemv::Params& p, const at::Tensor& x, const at::Tensor& weight,
                        c10::optional<at::Tensor> residual, c10::optional<at::Tensor> norm_weight, double eps,
                        bool silu_mul, const c10::optional<at::Tensor>& token_ids = c10::nullopt) {
    model_dtype(x, "gemv");  // only checks the dtype
    check_fused_input(x, x, "gemv", "x");
    check_fused_input(weight, x, "gemv", "weight");
    int64_t rows = x.size(0);
    if (token_ids.has_value()) {
        FD_CHECK(token_ids->is_cuda() && token_ids->device() == x.device() && token_ids->scalar_type() == at::kLong &&
                     token_ids->dim() == 1 && token_ids->is_contiguous(),
                 "gemv: token_ids must be a contiguous int64 CUDA tensor [rows] on ", x.device());
        FD_CHECK(x.dim() == 2 && x.size(0) >= 1, "gemv: with token_ids, x must be the embedding table [V, k], got ",
                 x.sizes());
        FD_CHECK(norm_weight.has_value() && !residual.has_value(), "gemv: token_ids (the embedding lookup) come with "
                 "the RMSNorm prologue of the first layer: pass norm_weight and no residual");
        rows = token_ids->size(0);
        FD_CHECK(rows >= 1 && rows <= gemv::kMaxNormRows, "gemv: token_ids must have 1 to ", gemv::kMaxNormRows,
                 " entries, got ", rows);
    } else {
        FD_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= gemv::kMaxRows, "gemv: x must be [rows, k] with 1 to ",
                 gemv::kMaxRows, " rows (larger batches: use a GEMM), got ", x.sizes());
    }
    const int64_t k = x.size(1);
    FD_CHECK(rows <= gemv::kMaxNormRows || !norm_weight.has_value(), "gemv: the RMSNorm prologue serves 1 to ",
             gemv::kMaxNormRows, " rows, got ", rows, "; normalize with add_rmsnorm first");
    FD_CHECK(rows <= gemv::kMaxNormRows || k % 32 == 0, "gemv: more than ", gemv::kMaxNormRows,
             " rows need k to be a multiple of 32 (tensor-core chunks), got k = ", k);
    FD_CHECK(weight.dim() == 2 && weight.size(1) == k, "gemv: weight must be [n, ", k, "], got ", weight.sizes());
    FD_CHECK(k % 8 == 0, "gemv: k = ", k, " is not a multiple of 8 (16-byte loads)");
    FD_CHECK(!silu_mul || weight.size(0) % 2 == 0, "gemv: silu_mul needs weight = [gate; up] with an even row count, got ",
             weight.size(0));
    const int64_t n_out = silu_mul ? weight.size(0) / 2 : weight.size(0);
    FD_CHECK(n_out < (1ll << 30), "gemv: ", n_out, " outputs are too many");
    check_aligned(x, "gemv", "x");
    check_aligned(weight, "gemv", "weight");
    p.x = x.data_ptr();
    p.weight = weight.data_ptr();
    p.rows = (int)rows;
    p.k = (int)k;
    p.n_out = (int)n_out;
    p.silu_mul = silu_mul;
    p.eps = (float)eps;
    at::Tensor h = x;
    if (token_ids.has_value()) {
        h = at::empty({rows, k}, x.options());
        p.x_rows = token_ids->data_ptr<int64_t>();
        p.x_table_rows = x.size(0);
        p.residual_out = h.data_ptr();
    }
    if (residual.has_value()) {
        FD_CHECK(norm_weight.has_value(), "gemv: residual is only added by the RMSNorm prologue; pass norm_weight");
        check_fused_input(*residual, x, "gemv", "residual");
        FD_CHECK(residual->sizes() == x.sizes(), "gemv: residual shape ", residual->sizes(), " differs from x shape ",
                 x.sizes());
        check_aligned(*residual, "gemv", "residual");
        h = at::empty_like(x);
        p.residual = residual->data_ptr();
        p.residual_out = h.data_ptr();
    }
    if (norm_weight.has_value()) {
        check_fused_input(*norm_weight, x, "gemv", "norm_weight");
        FD_CHECK(norm_weight->dim() == 1 && norm_weight->size(0) == k, "gemv: norm_weight must be [", k, "]");
        check_aligned(*norm_weight, "gemv", "norm_weight");
        p.norm_weight = norm_weight->data_ptr();
    }
    int smem_limit = 0;
    check_cuda(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()),
               "gemv: shared memory query");
    FD_CHECK(rows > gemv::kMaxNormRows ||
                 gemv::shared_bytes((int)rows, (int)k, norm_weight.has_value()) <= (size_t)smem_limit,
             "gemv: ", rows, " rows of k = ", k, " do not fit in shared memory (", smem_limit,
             " bytes); use fewer rows or a GEMM");
    return h;
}

// (out, h): out (allocated unless given) = x' @ weight^T for x [rows <= 16, k] (the norm prologue: rows <= 4),
// where x' = rmsnorm(h) * norm_weight with h = x + residual (h = x without residual) when norm_weight is given,
// else x' = h = x. silu_mul: weight = [gate; up] [2 n, k] and out = silu(x' gate^T) * (x' up^T) [rows, n].
std::tuple<at::Tensor, at::Tensor> gemv_forward(const at::Tensor& x, const at::Tensor& weight,
                                                c10::optional<at::Tensor> residual,
                                                c10::optional<at::Tensor> norm_weight, double eps, bool silu_mul,
                                                c10::optional<at::Tensor> out_arg) {
    gemv::Params p{};
    const at::Tensor h = prepare_gemv(p, x, weight, residual, norm_weight, eps, silu_mul);
    at::Tensor out;
    if (out_arg.has_value()) {
        out = *out_arg;
        check_fused_input(out, x, "gemv", "out");
        FD_CHECK(out.dim() == 2 && out.size(0) == p.rows && out.size(1) == p.n_out, "gemv: out must be [", p.rows,
                 ", ", p.n_out, "], got ", out.sizes());
    } else {
        out = at::empty({p.rows, p.n_out}, x.options());
    }
    p.out = out.data_ptr();
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(gemv::launch(p, model_dtype(x, "gemv"), c10::cuda::getCurrentCUDAStream().stream()), "gemv launch");
    return {out, h};
}

// (q, h): the qkv projection of gemv with its RMSNorm prologue (1 to 4 rows), and rope_kv_write in its
// epilogue: q [rows, q_heads, head_dim] rotated; the rotated k and the v of row r written to row positions[r]
// of the caches [max_batch, max_seq, kv_heads, head_dim]. One launch instead of two per layer.
std::tuple<at::Tensor, at::Tensor> gemv_rope_kv_write(const at::Tensor& x, const at::Tensor& weight,
                                                      c10::optional<at::Tensor> residual,
                                                      const at::Tensor& norm_weight, double eps, const at::Tensor& cos,
                                                      const at::Tensor& sin, const at::Tensor& positions,
                                                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                      int64_t q_heads, c10::optional<at::Tensor> token_ids) {
    FD_CHECK(token_ids.has_value() || (x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= gemv::kMaxNormRows),
             "gemv_rope_kv_write: x must be [rows, k] with 1 to ", gemv::kMaxNormRows, " rows, got ", x.sizes());
    gemv::Params p{};
    const at::Tensor h = prepare_gemv(p, x, weight, residual, norm_weight, eps, false, token_ids);
    const auto [max_seq, kv_heads, head_dim] = check_rope_args("gemv_rope_kv_write", p.rows, weight.size(0), x,
                                                               cos, sin, positions, k_cache, v_cache, q_heads);
    at::Tensor q = at::empty({p.rows, q_heads, head_dim}, x.options());
    p.out = q.data_ptr();
    p.rope_kv = true;
    p.cos = cos.data_ptr();
    p.sin = sin.data_ptr();
    p.positions = positions.data_ptr<int64_t>();
    p.k_cache = k_cache.data_ptr();
    p.v_cache = v_cache.data_ptr();
    p.q_heads = (int)q_heads;
    p.kv_heads = (int)kv_heads;
    p.head_dim = (int)head_dim;
    p.max_seq = (int)max_seq;
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(gemv::launch(p, model_dtype(x, "gemv"), c10::cuda::getCurrentCUDAStream().stream()),
               "gemv_rope_kv_write launch");
    return {q, h};
}

// Next tokens [B] (int64) from logits [B, V] float32: greedy when temperature <= 0, else top-p sampling
// (top_p >= 1: plain temperature sampling) driven by rng_state = int64 {seed, counter} on the device.
// With positions (int64 [B]) the sampler also advances the decode loop's state in place (sampling.h
// DecodeState): out (int64 [B], e.g. the step's input tokens), positions += 1, cache_seqlens (int32 [B]) =
// positions + 1, history [B, L] (int64) at the new positions.
at::Tensor sample_tokens(const at::Tensor& logits, double temperature, double top_p,
                         c10::optional<at::Tensor> rng_state, int64_t ctas_per_row, c10::optional<at::Tensor> out_arg,
                         c10::optional<at::Tensor> positions, c10::optional<at::Tensor> cache_seqlens,
                         c10::optional<at::Tensor> history) {
    FD_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(),
             "sample_tokens: logits must be a contiguous CUDA tensor [batch, vocab], got ", logits.sizes(), " on ",
             logits.device());
    sampling::LogitsType type;
    switch (logits.scalar_type()) {
        case at::kFloat: type = sampling::LogitsType::kFloat32; break;
        case at::kBFloat16: type = sampling::LogitsType::kBFloat16; break;
        case at::kHalf: type = sampling::LogitsType::kFloat16; break;
        default:
            FD_CHECK(false, "sample_tokens: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
    }
    FD_CHECK(logits.size(1) > 0 && logits.size(1) < (1ll << 30), "sample_tokens: vocabulary of ", logits.size(1),
             " entries is out of range [1, 2^30)");
    FD_CHECK(std::isfinite(temperature) && temperature >= 0.0, "sample_tokens: temperature must be finite and >= 0 "
             "(0 = greedy), got ", temperature);
    FD_CHECK((float)top_p > 0.f && top_p <= 1.0, "sample_tokens: top_p must be in (0, 1], got ", top_p);
    const int64_t* rng_ptr = nullptr;
    if (temperature > 0) {
        FD_CHECK(rng_state.has_value(), "sample_tokens: sampling (temperature > 0) needs rng_state");
        FD_CHECK(rng_state->is_cuda() && rng_state->device() == logits.device() &&
                     rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 && rng_state->is_contiguous(),
                 "sample_tokens: rng_state must be a contiguous int64 CUDA tensor {seed, counter}");
        rng_ptr = rng_state->data_ptr<int64_t>();
    }
    const c10::cuda::CUDAGuard guard(logits.device());
    const int cluster = sampling::max_ctas_per_row((int)logits.size(1));
    FD_CHECK(ctas_per_row == 0 || ctas_per_row == 1 || ctas_per_row == cluster, "sample_tokens: ctas_per_row must be "
             "0 (automatic), 1 (a block per row)", cluster > 1 ? " or " + std::to_string(cluster) + " (a cluster per row)" : "",
             " on this GPU for this vocabulary, got ", ctas_per_row);
    const int64_t rows = logits.size(0);
    auto check_state = [&](const c10::optional<at::Tensor>& t, const char* name, at::ScalarType dtype, int dims) {
        if (!t.has_value()) return;
        FD_CHECK(t->is_cuda() && t->device() == logits.device() && t->scalar_type() == dtype && t->is_contiguous() &&
                     t->dim() == dims && t->size(0) == rows,
                 "sample_tokens: ", name, " must be a contiguous ", dtype, " tensor of shape [", rows,
                 dims == 1 ? "]" : ", L]", " on ", logits.device(), ", got ", t->scalar_type(), " ", t->sizes(),
                 " on ", t->device());
    };
    check_state(out_arg, "out", at::kLong, 1);
    check_state(positions, "positions", at::kLong, 1);
    check_state(cache_seqlens, "cache_seqlens", at::kInt, 1);
    check_state(history, "history", at::kLong, 2);
    FD_CHECK(positions.has_value() || (!cache_seqlens.has_value() && !history.has_value()),
             "sample_tokens: cache_seqlens and history are advanced from positions; pass positions too");
    sampling::DecodeState state;
    if (positions.has_value()) {
        state.positions = positions->data_ptr<int64_t>();
        state.cache_seqlens = cache_seqlens.has_value() ? cache_seqlens->data_ptr<int32_t>() : nullptr;
        state.history = history.has_value() ? history->data_ptr<int64_t>() : nullptr;
        state.history_len = history.has_value() ? history->size(1) : 0;
    }
    at::Tensor out = out_arg.has_value() ? *out_arg : at::empty({rows}, logits.options().dtype(at::kLong));
    check_cuda(sampling::sample(logits.data_ptr(), type, out.data_ptr<int64_t>(), (int)rows, (int)logits.size(1),
                                (float)temperature, (float)top_p, rng_ptr, (int)ctas_per_row,
                                c10::cuda::getCurrentCUDAStream().stream(), state),
               "sample_tokens launch");
    return out;
}

// The batch-1 decode layers as one persistent kernel (decode_layers.h): built once per model and KV cache,
// it checks every layer's tensors, keeps them alive, and holds the device table of their addresses and the
// kernel's workspace (fixed addresses, as captured CUDA graphs need).
class DecodeLayers {
  public:
    DecodeLayers(const std::vector<at::Tensor>& wqkv, const std::vector<at::Tensor>& wo,
                 const std::vector<at::Tensor>& w_gate_up, const std::vector<at::Tensor>& w_down,
                 const std::vector<at::Tensor>& attention_norm, const std::vector<at::Tensor>& ffn_norm,
                 const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache, int64_t q_heads,
                 double eps, double softmax_scale) {
        const size_t layers = wqkv.size();
        FD_CHECK(layers >= 1 && wo.size() == layers && w_gate_up.size() == layers && w_down.size() == layers &&
                     attention_norm.size() == layers && ffn_norm.size() == layers && k_cache.size() == layers &&
                     v_cache.size() == layers,
                 "DecodeLayers: pass one tensor per layer in every list (got ", wqkv.size(), " wqkv, ", wo.size(),
                 " wo, ", w_gate_up.size(), " w_gate_up, ", w_down.size(), " w_down, ", attention_norm.size(), " / ",
                 ffn_norm.size(), " norms, ", k_cache.size(), " / ", v_cache.size(), " caches)");
        const at::Tensor& like = wqkv[0];
        dtype_ = model_dtype(like, "DecodeLayers");
        FD_CHECK(k_cache[0].dim() == 4, "DecodeLayers: k_cache must be [batch, max_seq, kv_heads, head_dim], got ",
                 k_cache[0].sizes());
        const int64_t max_seq = k_cache[0].size(1), kv_heads = k_cache[0].size(2), head_dim = k_cache[0].size(3);
        FD_CHECK(like.dim() == 2, "DecodeLayers: wqkv must be [(q_heads + 2 kv_heads) head_dim, dim], got ",
                 like.sizes());
        const int64_t dim = like.size(1);
        FD_CHECK(w_gate_up[0].dim() == 2 && w_gate_up[0].size(0) % 2 == 0,
                 "DecodeLayers: w_gate_up must be [2 hidden, dim], got ", w_gate_up[0].sizes());
        const int64_t hidden = w_gate_up[0].size(0) / 2;
        FD_CHECK(q_heads >= 1 && q_heads < 4096 && kv_heads < 4096 && dim < (1 << 20) && hidden < (1 << 20),
                 "DecodeLayers: sizes out of range");
        cudaError_t err = cudaSuccess;
        const char* reason = decode_layers::unsupported_reason((int)dim, (int)hidden, (int)q_heads, (int)kv_heads,
                                                               (int)head_dim, like.device().index(), &err);
        check_cuda(err, "DecodeLayers: device query");
        FD_CHECK(reason == nullptr, "DecodeLayers: this model is not served by the persistent decode kernel (",
                 reason ? reason : "", "); use the per-projection decode path");
        auto check = [&](const at::Tensor& t, const char* name, size_t l, std::vector<int64_t> shape) {
            check_fused_input(t, like, "DecodeLayers", name);
            check_aligned(t, "DecodeLayers", name);
            FD_CHECK(t.sizes() == at::IntArrayRef(shape), "DecodeLayers: ", name, " of layer ", l, " must be ",
                     at::IntArrayRef(shape), ", got ", t.sizes());
            tensors_.push_back(t);
            return reinterpret_cast<int64_t>(t.data_ptr());
        };
        const int64_t qkv_rows = (q_heads + 2 * kv_heads) * head_dim;
        std::vector<int64_t> table;
        for (size_t l = 0; l < layers; ++l) {
            int64_t row[decode_layers::kLayerPointers];
            row[decode_layers::kWqkv] = check(wqkv[l], "wqkv", l, {qkv_rows, dim});
            row[decode_layers::kWo] = check(wo[l], "wo", l, {dim, q_heads * head_dim});
            row[decode_layers::kWGateUp] = check(w_gate_up[l], "w_gate_up", l, {2 * hidden, dim});
            row[decode_layers::kWDown] = check(w_down[l], "w_down", l, {dim, hidden});
            row[decode_layers::kAttentionNorm] = check(attention_norm[l], "attention_norm", l, {dim});
            row[decode_layers::kFfnNorm] = check(ffn_norm[l], "ffn_norm", l, {dim});
            row[decode_layers::kKCache] = check(k_cache[l], "k_cache", l, k_cache[0].sizes().vec());
            row[decode_layers::kVCache] = check(v_cache[l], "v_cache", l, k_cache[0].sizes().vec());
            table.insert(table.end(), row, row + decode_layers::kLayerPointers);
        }
        const auto on_device = like.options();
        table_ = at::tensor(table, at::kLong).view({(int64_t)layers, decode_layers::kLayerPointers}).to(like.device());
        p_ = decode_layers::Params{};
        p_.layers = table_.data_ptr<int64_t>();
        p_.n_layers = (int)layers, p_.dim = (int)dim, p_.hidden = (int)hidden, p_.q_heads = (int)q_heads;
        p_.kv_heads = (int)kv_heads, p_.head_dim = (int)head_dim, p_.max_seq = (int)max_seq;
        p_.eps = (float)eps;
        p_.scale_log2 = (float)(softmax_scale * 1.4426950408889634);
        q_ = at::empty({q_heads * head_dim}, on_device);
        attention_ = at::empty({q_heads * head_dim}, on_device);
        act_ = at::empty({hidden}, on_device);
        delta_ = at::empty({1, dim}, on_device);
        stream_ = at::empty({1, dim}, on_device);
        partial_out_ = at::empty({q_heads * decode_layers::kMaxSplits * head_dim}, on_device.dtype(at::kFloat));
        partial_lse_ = at::empty({q_heads * decode_layers::kMaxSplits}, on_device.dtype(at::kFloat));
        counters_ = at::zeros({decode_layers::kCounterWords((int)kv_heads)}, on_device.dtype(at::kInt));
        p_.q = q_.data_ptr(), p_.attention = attention_.data_ptr(), p_.act = act_.data_ptr();
        p_.delta = delta_.data_ptr(), p_.stream = stream_.data_ptr();
        p_.partial_out = partial_out_.data_ptr<float>(), p_.partial_lse = partial_lse_.data_ptr<float>();
        p_.counters = reinterpret_cast<unsigned*>(counters_.data_ptr<int>());
    }

    // (delta, h), both [1, dim]: the last layer's down_proj output and the residual stream before it, for the
    // lm_head's gemv(delta, weight, h, norm_weight). The outputs are this object's buffers, rewritten by the
    // next call.
    std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& embedding, const at::Tensor& tokens,
                                               const at::Tensor& positions, const at::Tensor& cache_seqlens,
                                               const at::Tensor& cos, const at::Tensor& sin) {
        const at::Tensor& like = table_;
        check_fused_input(embedding, q_, "DecodeLayers", "embedding");
        FD_CHECK(embedding.dim() == 2 && embedding.size(1) == p_.dim, "DecodeLayers: embedding must be [vocab, ",
                 p_.dim, "], got ", embedding.sizes());
        auto check_state = [&](const at::Tensor& t, const char* name, at::ScalarType type) {
            FD_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == type && t.numel() == 1 &&
                         t.is_contiguous(),
                     "DecodeLayers: ", name, " must be a contiguous ", type, " CUDA tensor of one element (batch 1) on ",
                     like.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
        };
        check_state(tokens, "tokens", at::kLong);
        check_state(positions, "positions", at::kLong);
        check_state(cache_seqlens, "cache_seqlens", at::kInt);
        for (const at::Tensor* t : {&cos, &sin}) {
            check_fused_input(*t, q_, "DecodeLayers", "cos/sin");
            FD_CHECK(t->dim() == 2 && t->size(0) >= p_.max_seq && t->size(1) == p_.head_dim,
                     "DecodeLayers: cos and sin must be [>= ", p_.max_seq, ", ", p_.head_dim, "], got ", t->sizes());
        }
        decode_layers::Params p = p_;
        if (trace_.defined()) p.trace = reinterpret_cast<unsigned long long*>(trace_.data_ptr<int64_t>());
        p.embedding = embedding.data_ptr();
        p.vocab = embedding.size(0);
        p.tokens = tokens.data_ptr<int64_t>();
        p.positions = positions.data_ptr<int64_t>();
        p.cache_seqlens = cache_seqlens.data_ptr<int>();
        p.cos = cos.data_ptr();
        p.sin = sin.data_ptr();
        const c10::cuda::CUDAGuard guard(like.device());
        check_cuda(decode_layers::launch(p, dtype_, c10::cuda::getCurrentCUDAStream().stream()),
                   "DecodeLayers launch");
        return {delta_, stream_};
    }

    // Phase tracing (decode_layers.h Params::trace): returns the int64 buffer [blocks, slots] the next calls fill,
    // or stops tracing with enabled=False.
    c10::optional<at::Tensor> set_trace(bool enabled) {
        if (!enabled) {
            trace_ = at::Tensor();
            return c10::nullopt;
        }
        int sms = 0;
        check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, table_.device().index()),
                   "DecodeLayers: device query");
        trace_ = at::zeros({sms, decode_layers::trace_slots_per_block(p_.n_layers)}, table_.options());
        return trace_;
    }

  private:
    decode_layers::Params p_;
    flash_decode::DType dtype_;
    std::vector<at::Tensor> tensors_;  // the layers' tensors, kept alive while their addresses are in table_
    at::Tensor table_, q_, attention_, act_, delta_, stream_, partial_out_, partial_lse_, counters_, trace_;
};

// kv_read (benchmark_kernel.py's bandwidth bound): the launch geometry of reading rows [0, rows) of every sequence of
// k_cache and v_cache [batch, seq, kv_heads, head_dim], whose rows must each be one contiguous run of bytes.
struct KvReadPlan {
    kv_read::Params params;
    int blocks_per_segment;
    int64_t words() const { return 2 * (int64_t)params.batch * blocks_per_segment; }  // block_xor's: one a block
};

KvReadPlan kv_read_plan(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t rows) {
    FD_CHECK(k_cache.is_cuda() && v_cache.device() == k_cache.device(),
             "kv_read: k_cache and v_cache must be CUDA tensors on one device");
    FD_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
             "kv_read: k_cache and v_cache must both be [batch, seq, kv_heads, head_dim] of one dtype, got ",
             k_cache.sizes(), " and ", v_cache.sizes());
    FD_CHECK(rows >= 0 && rows <= k_cache.size(1), "kv_read: rows ", rows, " is outside the cache's 0..",
             k_cache.size(1), " positions");
    FD_CHECK(k_cache.size(0) >= 1 && 2 * k_cache.size(0) <= kMaxGridY, "kv_read: batch ", k_cache.size(0),
             " is outside 1..", kMaxGridY / 2);
    for (const at::Tensor* t : {&k_cache, &v_cache}) {
        FD_CHECK((*t)[0].is_contiguous(), "kv_read: each sequence of the caches must be contiguous (its rows one run of "
                 "bytes), got strides ", t->strides(), "; call .contiguous()");
        FD_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && t->stride(0) * t->element_size() % 16 == 0,
                 "kv_read: the caches and their sequences must start on 16-byte boundaries (16-byte loads)");
    }
    const int64_t row_bytes = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
    FD_CHECK(row_bytes % 16 == 0, "kv_read: a cache row (kv_heads x head_dim) of ", row_bytes,
             " bytes is not a multiple of 16");
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, k_cache.device().index()), "device query");
    KvReadPlan plan;
    plan.params = {k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0) * k_cache.element_size(),
                   v_cache.stride(0) * v_cache.element_size(), rows * row_bytes, (int)k_cache.size(0), nullptr};
    plan.blocks_per_segment = kv_read::blocks_per_segment(plan.params.batch, plan.params.segment_bytes, sms);
    return plan;
}

// The words kv_read's block_xor needs for these arguments.
int64_t kv_read_blocks(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t rows) {
    return kv_read_plan(k_cache, v_cache, rows).words();
}

// Reads the rows, writes each block's XOR of the 32-bit words it read into block_xor (int32, kv_read_blocks words;
// a new tensor when not given) and returns it: their XOR is that of every word read.
at::Tensor kv_read_forward(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t rows,
                           c10::optional<at::Tensor> block_xor_) {
    KvReadPlan plan = kv_read_plan(k_cache, v_cache, rows);
    const int64_t words = plan.words();
    at::Tensor block_xor = block_xor_.has_value()
                               ? *block_xor_
                               : at::empty({words}, k_cache.options().dtype(at::kInt));
    FD_CHECK(block_xor.device() == k_cache.device() && block_xor.scalar_type() == at::kInt &&
                 block_xor.is_contiguous() && block_xor.numel() == words,
             "kv_read: block_xor must be a contiguous int32 tensor of kv_read_blocks(...) = ", words,
             " elements on the caches' device");
    plan.params.block_xor = reinterpret_cast<uint32_t*>(block_xor.data_ptr<int32_t>());
    const c10::cuda::CUDAGuard guard(k_cache.device());
    check_cuda(kv_read::launch(plan.params, plan.blocks_per_segment, c10::cuda::getCurrentCUDAStream().stream()),
               "kv_read launch");
    return block_xor;
}

// Why the persistent decode kernel does not serve these sizes on the current GPU, or None.
c10::optional<std::string> decode_layers_unsupported(int64_t dim, int64_t hidden, int64_t q_heads, int64_t kv_heads,
                                                     int64_t head_dim) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "querying the current device");
    cudaError_t err = cudaSuccess;
    const char* reason = decode_layers::unsupported_reason((int)dim, (int)hidden, (int)q_heads, (int)kv_heads,
                                                           (int)head_dim, device, &err);
    check_cuda(err, "device query");
    if (reason == nullptr) return c10::nullopt;
    return std::string(reason);
}

// A process-wide mode named "auto", "always" or "off" (flash_decode::BulkPipeline, WarpGroups, KvHeadPairs); `setter`
// names the function in the error.
template <typename Mode>
Mode parse_mode(const char* setter, const std::string& mode) {
    FD_CHECK(mode == "auto" || mode == "always" || mode == "off", setter, ": mode '", mode,
             "' is not one of 'auto', 'always', 'off'");
    return mode == "auto" ? Mode::kAuto : mode == "always" ? Mode::kAlways : Mode::kOff;
}

// Defines `name`(mode) on the module: sets the process-wide mode that `mode` returns (parse_mode).
template <typename Mode>
void def_mode_setter(py::module& m, const char* name, Mode& (*mode)(), const char* doc) {
    m.def(
        name, [name, mode](const std::string& value) { mode() = parse_mode<Mode>(name, value); }, doc,
        py::arg("mode"));
}

// Defines `name`(enabled) on the module: sets the process-wide switch that `flag` returns.
void def_switch_setter(py::module& m, const char* name, bool& (*flag)(), const char* doc) {
    m.def(name, [flag](bool enabled) { flag() = enabled; }, doc, py::arg("enabled"));
}

// The blocks of one split of a launch (flash_decode's units: batch x kv_heads x head groups).
int units_of(const char* caller, int64_t batch, int64_t q_heads, int64_t kv_heads) {
    FD_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, caller, ": q_heads ", q_heads, " is not a multiple of kv_heads ",
             kv_heads);
    return (int)(batch * kv_heads * flash_decode::head_groups_for((int)(q_heads / kv_heads)));
}

// Defines `name`(batch, q_heads, kv_heads, head_dim, seq_capacity, num_splits, early_cache_reads) on the module: what
// `query` answers for a launch of that shape and split count on the current GPU.
void def_launch_query(py::module& m, const char* name, bool (*query)(int, int, int, int, bool), const char* doc) {
    m.def(
        name,
        [name, query](int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t seq_capacity,
                      int64_t num_splits, bool early_cache_reads) {
            const int units = units_of(name, batch, q_heads, kv_heads);
            return query(units, (int)num_splits, (int)head_dim, (int)seq_capacity, early_cache_reads);
        },
        doc, py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("seq_capacity"),
        py::arg("num_splits"), py::arg("early_cache_reads") = false);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Flash-decode (split-KV) attention for Llama 3 decoding; see csrc/flash_decode_kernel.cuh";
    m.def("flash_decode", &flash_decode_forward,
          "out[b, h] = softmax(scale * q[b, h] . k[b, :len_b, h // group]) @ v[b, :len_b, h // group]\n"
          "q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; cache_seqlens int32 [B]; num_splits 0 = automatic; "
          "optional out [B, Hq, D] (its rows 16-byte aligned, like q's) and lse float32 [B, Hq]. "
          "early_cache_reads=True (a decode step) promises that the kernels just before it wrote no length and no "
          "cache row but the newest (cache_seqlens - 1), so it may read the length and the older rows before they "
          "finish (programmatic launch).",
          py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("softmax_scale"),
          py::arg("num_splits") = 0, py::arg("out") = py::none(), py::arg("lse") = py::none(),
          py::arg("early_cache_reads") = false);
    m.def("kv_read", &kv_read_forward,
          "The bandwidth bound of the benchmarks: reads rows [0, rows) of every sequence of k_cache and v_cache [B, S, "
          "Hkv, D] (each sequence contiguous) and computes nothing but a checksum: returns block_xor int32 "
          "[kv_read_blocks(...)], each block's XOR of the 32-bit words it read (optional out: block_xor).",
          py::arg("k_cache"), py::arg("v_cache"), py::arg("rows"), py::arg("block_xor") = py::none());
    m.def("kv_read_blocks", &kv_read_blocks, "The number of int32 words kv_read's block_xor holds for these arguments.",
          py::arg("k_cache"), py::arg("v_cache"), py::arg("rows"));
    m.def("default_num_splits", &default_num_splits,
          "The number of splits flash_decode picks when num_splits=0 for these sizes on the current device.",
          py::arg("batch_size"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
          py::arg("max_seqlen"), py::arg("early_cache_reads") = false);
    m.def("add_rmsnorm", &add_rmsnorm,
          "(weight * rmsnorm(h), h) with h = x + residual (h = x without residual); replaces the PyTorch "
          "residual add and RMSNorm of llama3.py with the same rounding.",
          py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
    m.def("rope_kv_write", &rope_kv_write,
          "RoPE on q and k of the fused qkv projection [B * tokens, (Hq + 2 Hkv) D] (tokens consecutive tokens "
          "of each of B sequences); writes k, v into the caches at positions[b] + t (positions [B], int64); "
          "returns q [B * tokens, Hq, D].",
          py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("q_heads"), py::arg("tokens") = 1);
    m.def("silu_mul", &silu_mul, "silu(gate) * up for gate_up [..., 2F] -> [..., F]", py::arg("gate_up"));
    m.def("gemv", &gemv_forward,
          "(x' @ weight^T, h) for 1 to 16 rows of x [rows, k]; with norm_weight (1 to 4 rows) "
          "x' = rmsnorm(h) * norm_weight, "
          "h = x + residual (or x), else x' = h = x; silu_mul: weight = [gate; up], out = silu(x' gate^T) * "
          "(x' up^T).",
          py::arg("x"), py::arg("weight"), py::arg("residual") = py::none(), py::arg("norm_weight") = py::none(),
          py::arg("eps") = 1e-5, py::arg("silu_mul") = false, py::arg("out") = py::none());
    m.def("gemv_rope_kv_write", &gemv_rope_kv_write,
          "(q, h): gemv's qkv projection with the RMSNorm prologue (1 to 4 rows) and rope_kv_write's RoPE and "
          "cache write in its epilogue; q [rows, q_heads, head_dim]. With token_ids (int64 [rows], no residual) x is "
          "the embedding table and the input rows are x[token_ids] (the first layer of a decode step).",
          py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("norm_weight"), py::arg("eps"),
          py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("q_heads"), py::arg("token_ids") = py::none());
    def_switch_setter(m, "set_cluster_merge", &flash_decode::cluster_merge_enabled,
                      "Merge flash_decode's splits inside a thread-block cluster through distributed shared memory "
                      "(sm_90+, 2 to 8 splits; on by default); False merges them through a float32 workspace in global "
                      "memory, for comparison.");
    m.def("uses_cluster_merge",
          [](int64_t num_splits, bool early_cache_reads) {
              return flash_decode::uses_cluster_merge((int)num_splits, early_cache_reads);
          },
          "Whether flash_decode with this many splits merges them in a thread-block cluster on the current GPU "
          "(early_cache_reads, a decode step: clusters of up to 16 blocks, else 8).",
          py::arg("num_splits"), py::arg("early_cache_reads") = false);
    def_switch_setter(m, "set_narrow_tiles", &flash_decode::narrow_tiles_enabled,
                      "Narrow tiles (8 cache rows a warp, 32 a block) for flash_decode's short plain launches in which "
                      "every split has at most one such tile (one block, or up to 8 merged in a cluster; on by "
                      "default): a warp then issues a quarter (head 64) or half (head 128) of the loads. False keeps "
                      "the standard tile, for comparison.");
    def_switch_setter(m, "set_short_kernel", &flash_decode::short_kernel_enabled,
                      "The short-launch kernel for flash_decode's narrow-tile launches at head 128 (eight warps, a pair "
                      "per 8 rows each taking half of head_dim, every loop unrolled; on by default). False runs them "
                      "in the narrow one-tile instance of the general kernel, for comparison.");
    def_launch_query(m, "uses_narrow_tiles", &flash_decode::uses_narrow_tiles,
                     "Whether a flash_decode launch of this shape and split count runs narrow tiles on the current "
                     "GPU.");
    def_launch_query(m, "uses_short_kernel", &flash_decode::uses_short_kernel,
                     "Whether a flash_decode launch of this shape and split count runs the short-launch kernel (its "
                     "narrow tiles at head 128) on the current GPU.");
    def_mode_setter(m, "set_bulk_pipeline", &flash_decode::bulk_pipeline_mode,
                    "How flash_decode's plain launches stream the cache on sm_90+: 'auto' (the default) through shared "
                    "memory with the tensor memory accelerator (the bulk variant) for large launches, where it was "
                    "measured faster; 'always' for every plain launch; 'off' never (the register pipeline), for "
                    "comparison.");
    m.def("uses_bulk_pipeline",
          [](int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t seq_capacity,
             bool early_cache_reads) {
              const int units = units_of("uses_bulk_pipeline", batch, q_heads, kv_heads);
              return flash_decode::uses_bulk_pipeline(units, (int)head_dim, (int)seq_capacity, early_cache_reads);
          },
          "Whether flash_decode of this shape takes the bulk variant on the current GPU, for any split count (given "
          "caches the driver accepts as tensor maps: 16-byte strides and addresses).",
          py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("seq_capacity"),
          py::arg("early_cache_reads") = false);
    def_mode_setter(m, "set_warp_groups", &flash_decode::warp_groups_mode,
                    "Blocks of two groups of four warps for flash_decode's plain launches: 'auto' (the default) where "
                    "the grid runs at once with one block an SM; 'always' for every plain launch; 'off' never (four "
                    "warps), for comparison.");
    def_launch_query(m, "uses_warp_groups", &flash_decode::uses_warp_groups,
                     "Whether a flash_decode launch of this shape and split count runs blocks of two warp groups on "
                     "the current GPU (the register pipeline's or the bulk variant's: uses_bulk_pipeline).");
    def_mode_setter(m, "set_kv_head_pairs", &flash_decode::kv_head_pairs_mode,
                    "Blocks of two adjacent KV heads, whose tensor copies bring both heads' rows, for flash_decode's "
                    "bulk variant at head 64: 'auto' (the default) for launches of one split whose pair blocks fill "
                    "their waves of two an SM to 15/16, either dtype; 'always' for every bulk launch that can (an even "
                    "number of KV heads, at most 8 query heads a KV head); 'off' never, for comparison.");
    m.def("uses_kv_head_pairs",
          [](int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t seq_capacity,
             int64_t num_splits, at::ScalarType dtype) {
              units_of("uses_kv_head_pairs", batch, q_heads, kv_heads);  // (its checks)
              return flash_decode::uses_kv_head_pairs((int)batch, (int)q_heads, (int)kv_heads, (int)head_dim,
                                                      (int)seq_capacity, (int)num_splits,
                                                      kernel_dtype(dtype, "uses_kv_head_pairs"));
          },
          "Whether a flash_decode launch of this shape, split count and cache dtype runs blocks of a KV-head pair on "
          "the current GPU.",
          py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("seq_capacity"),
          py::arg("num_splits"), py::arg("dtype") = at::kBFloat16);
    m.def("set_programmatic_launch", [](bool enabled) { programmatic_launch::enabled() = enabled; },
          "Launch the decode-step kernels with programmatic dependent launch (sm_90+; on by default), so each "
          "may start while the previous one finishes; False gives plain launches, for comparison.",
          py::arg("enabled"));
    m.def("sample_tokens", &sample_tokens,
          "Next tokens [B] from logits [B, V] (float32, bfloat16 or float16) without sorting: greedy for "
          "temperature <= 0, else top-p sampling with rng_state = int64 {seed, counter} on the device (the caller "
          "advances the counter). ctas_per_row: 0 = automatic, 1 = one thread block per row, or "
          "max_sampling_ctas_per_row(vocab) = a cluster of blocks per row (sm_90+; the default up to 16 rows); "
          "the two draw different, equally distributed tokens. With positions [B] (int64) it also advances a "
          "decode loop in place: the tokens go to out (int64 [B]), positions += 1, cache_seqlens (int32 [B]) = "
          "positions + 1, history[b, positions[b]] = token (int64 [B, L]); draws are then keyed by the new "
          "positions instead of rng_state's counter.",
          py::arg("logits"), py::arg("temperature"), py::arg("top_p"), py::arg("rng_state") = py::none(),
          py::arg("ctas_per_row") = 0, py::arg("out") = py::none(), py::arg("positions") = py::none(),
          py::arg("cache_seqlens") = py::none(), py::arg("history") = py::none());
    py::class_<DecodeLayers>(m, "DecodeLayers",
                             "Every layer of a batch-1 decode step as one persistent kernel (sm_90+; "
                             "csrc/decode_layers.cu). Built from per-layer lists of the model's tensors; calling it "
                             "runs the layers for tokens at positions and returns (delta, h) for the lm_head's "
                             "gemv(delta, weight, h, norm_weight).")
        .def(py::init<const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                      const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                      const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, int64_t, double, double>(),
             py::arg("wqkv"), py::arg("wo"), py::arg("w_gate_up"), py::arg("w_down"), py::arg("attention_norm"),
             py::arg("ffn_norm"), py::arg("k_cache"), py::arg("v_cache"), py::arg("q_heads"), py::arg("eps"),
             py::arg("softmax_scale"))
        .def("__call__", &DecodeLayers::forward, py::arg("embedding"), py::arg("tokens"), py::arg("positions"),
             py::arg("cache_seqlens"), py::arg("cos"), py::arg("sin"))
        .def("set_trace", &DecodeLayers::set_trace,
             "Trace the phases of the next calls into an int64 [SMs, n_layers * 10 + 3] buffer (returned): per "
             "layer 10 %globaltimer stamps of thread 0 of each block (layer start, qkv done, barrier passed, "
             "attention done, passed, o done, passed, gate_up done, passed, down done), then clock totals: producer "
             "waits for a free stage, first consumer warp's waits for data, grid-barrier waits. False stops.",
             py::arg("enabled") = true);
    m.def("decode_layers_unsupported", &decode_layers_unsupported,
          "Why the persistent decode kernel (DecodeLayers) does not serve a model of these sizes on the current GPU, "
          "or None when it does.",
          py::arg("dim"), py::arg("hidden"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"));
    m.def("max_sampling_ctas_per_row", [](int64_t vocab) { return sampling::max_ctas_per_row((int)vocab); },
          "The cluster size sample_tokens can use for this vocabulary on the current GPU (1: none).",
          py::arg("vocab"));
}
