#!/usr/bin/env python3
"""Benchmark decode attention (one query token per sequence) on a simulated llama3 KV cache.

Inputs mirror the model: q [B, Hq, D], k_cache / v_cache [B, S, Hkv, D] (random normal values),
cache_seqlens int32 [B] (all = --seq_n, or random in [1, seq_n] with --ragged).

Examples (llama 3.2 1B: head 64, 32 q heads, 8 kv heads):
  python3 benchmark_kernel.py --head_size 64 --q_num_heads 32 --kv_num_heads 8 --batch_size 1 --seq_n 256
  python3 benchmark_kernel.py ... --use_pytorch_kernel            # PyTorch split-KV + combine instead
  python3 benchmark_kernel.py ... --compare                       # custom vs PyTorch vs SDPA vs peers
  python3 benchmark_kernel.py --head_size 128 --sweep             # S = 256 .. 131072, writes results/
  python3 benchmark_kernel.py --head_size 128 --sweep --sweep_batches 16,64 --sweep_seq 2048,4096
  python3 benchmark_kernel.py --use_pytorch_kernel --device cpu --seq_n 64   # no GPU needed

Timing (default): before every timed launch a buffer of twice the L2 size is read (so K/V come
from DRAM and L2 is left holding clean lines), then a ~0.1 ms spin kernel keeps the GPU busy while the
CPU issues the start event and the launch; without that, a short kernel reads mostly CPU launch time.
--dirty_flush zeroes the buffer instead (the method of the tables before 2026-11-27 18:00 UTC): L2 is
then left full of dirty lines, and every kernel timed after it, ours and the peers', pays for writing
some of them back (on an H100 6-11 us at 134-537 MB, 5 MB more DRAM writes in ncu). CUDA events around each
launch; the median of --iters is reported (min/p90 with --verbose). --rounds N (with --compare/--sweep) times
every implementation N times, reversing their order each round, and reports the median of the rounds' medians: a
short launch moves by up to about 1 us with what ran before it in the process. --dont_flush_gpu_cache skips
the flush (warm L2), not the spin. Multi-kernel eager code (the PyTorch implementations) still
counts the CPU time between its kernels, as it would in a model run without CUDA graphs.
The script also prints the timing floor (a 1-element kernel timed the same way; about 3.8 us on
an H100) and the card's device-to-device copy bandwidth, the practical ceiling for these kernels.
kv_read, in --compare and --sweep, is the bound at each shape: a kernel that reads exactly the K and V bytes
of the valid lengths and computes nothing (csrc/kv_read.cu), timed the same way, launch, ramp-up and tail
included (it is not attention: it has no error to check, its status is "bound").

Bytes moved = K+V bytes of the valid cache lengths + q + out (split-KV workspace not counted).
Every implementation is checked against a float32 masked-softmax reference: relative error
||out - ref|| / ||ref||, FAIL above 1e-2 or on NaN/inf.

Nsight Compute (DRAM bytes and throughput of exactly one launch):
  ncu --clock-control none --nvtx --nvtx-include "decode_attention/" python3 benchmark_kernel.py \\
      --head_size 64 --q_num_heads 32 --kv_num_heads 8 --batch_size 1 --seq_n 256 --use_ncu
--use_ncu runs one warmup launch, then one launch inside the NVTX range "decode_attention" and
nothing big after the warmup (no flush, no copy-bandwidth or floor measurement). Add for example
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
to the ncu command to get just the duration and DRAM bytes. --impls sdpa_cudnn (any one implementation)
profiles that one instead of the custom kernel.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUSTOM_HEAD_SIZES = (64, 128)
REL_ERR_LIMIT = 1e-2
DEFAULT_SWEEP_SEQ = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
NVTX_RANGE = "decode_attention"
# GPU spin after the flush (~100-140 us at 1.4-2 GHz): the CPU needs that long to queue the start
# event and a launch that goes through Python layers (SDPA's backend context, dispatch checks);
# without it the GPU reaches the start event first and the timing counts CPU time (seen on the
# H100: SDPA at S=256 read 29-39 us instead of 9-12 us in a sweep with only the flush).
SPIN_CYCLES = 200_000


class Unavailable(Exception):
    """An implementation that cannot run here; status is one of the table's status words."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# inputs, reference, correctness


@dataclass
class Inputs:
    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [B, S, Hkv, D]
    v_cache: torch.Tensor  # [B, S, Hkv, D]
    cache_seqlens: torch.Tensor  # int32 [B], on the device
    seqlens: list  # the same lengths as Python ints (no device sync needed later)
    scale: float
    ragged: bool


def build_inputs(batch, q_heads, kv_heads, head_size, seq_n, dtype, device, seed, ragged):
    torch.manual_seed(seed)
    shape = (batch, seq_n, kv_heads, head_size)
    q = torch.randn(batch, q_heads, head_size, dtype=dtype, device=device)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    if ragged:
        # CPU generator: the same lengths for a seed on every device.
        gen = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, seq_n + 1, (batch,), generator=gen, dtype=torch.int32)
    else:
        lens = torch.full((batch,), seq_n, dtype=torch.int32)
    return Inputs(q, k_cache, v_cache, lens.to(device), lens.tolist(),
                  1.0 / math.sqrt(head_size), ragged)


def bytes_moved(inp):
    """Bytes an ideal kernel must move: K and V of the valid positions, q read, out written."""
    elem = inp.q.element_size()
    kv_heads, head_size = inp.k_cache.shape[2], inp.k_cache.shape[3]
    kv_bytes = 2 * sum(inp.seqlens) * kv_heads * head_size * elem
    return kv_bytes + 2 * inp.q.numel() * elem


def reference_output(inp):
    """float32 masked softmax of the (exactly upcast) inputs; batch-chunked so the upcast and
    head-repeated copies of a large cache stay around 1 GiB."""
    from llama3 import decode_attention_naive

    batch, seq_n, kv_heads, head_size = inp.k_cache.shape
    q_heads = inp.q.shape[1]
    # upcast K/V, their copies repeated to the q heads, and the scores (float32 bytes)
    per_seq = 4 * seq_n * (head_size * (2 * kv_heads + 2 * q_heads) + 2 * q_heads)
    chunk = max(1, (1 << 30) // per_seq)
    outs = []
    for b0 in range(0, batch, chunk):
        sl = slice(b0, b0 + chunk)
        outs.append(decode_attention_naive(
            inp.q[sl].float(), inp.k_cache[sl].float(), inp.v_cache[sl].float(),
            inp.cache_seqlens[sl], inp.scale, dtype=torch.float32))
    return torch.cat(outs)


def check(out, ref):
    """(relative error, 'OK' | 'FAIL'); a NaN/inf anywhere is a FAIL with error nan."""
    out = out.float().reshape(ref.shape)
    if not bool(torch.isfinite(out).all()):
        return float("nan"), "FAIL"
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err, ("OK" if err <= REL_ERR_LIMIT else "FAIL")


# ----------------------------------------------------------------------------------------------
# implementations: factory(inp, args) -> (zero-arg launch returning out [B, Hq, D], note),
# or raise Unavailable. Everything that allocates or probes happens here, outside the timing.

_custom_module = None


def load_custom_module():
    global _custom_module
    if _custom_module is None:
        build_hint = "run `python3 load_custom_kernels.py` to see the build log"
        try:
            import load_custom_kernels
            _custom_module = load_custom_kernels.load_kernels(verbose=False)
        except Exception as exc:  # a missing file or a failing build raise different types
            raise Unavailable("error", f"loading the custom kernel module failed "
                                       f"({first_line(exc)}); {build_hint}") from exc
        if _custom_module is None:
            why = getattr(load_custom_kernels, "load_error", lambda: None)()
            why = first_line(why) if why else ""
            why = f" ({why[:150]}{'...' if len(why) > 150 else ''})" if why else ""
            raise Unavailable("error", f"the custom kernel module failed to build or load{why}; {build_hint}")
        # One kernel timed alone: a plain launch, so it cannot start before the start event (in the model
        # the decode-step kernels use programmatic dependent launch, see csrc/programmatic_launch.cuh).
        _custom_module.set_programmatic_launch(False)
    return _custom_module


def make_custom(inp, args):
    if inp.q.device.type != "cuda":
        raise Unavailable("unsupported", "the custom kernel needs a CUDA device "
                          "(the PyTorch implementation runs anywhere: --use_pytorch_kernel --device cpu)")
    batch, q_heads, head_size = inp.q.shape
    seq_n, kv_heads = inp.k_cache.shape[1], inp.k_cache.shape[2]
    if head_size not in CUSTOM_HEAD_SIZES:
        raise Unavailable("unsupported", f"the custom kernel supports head sizes 64 and 128, not {head_size}")
    mod = load_custom_module()
    mod.set_cluster_merge(not args.no_cluster_merge)
    mod.set_bulk_pipeline(args.bulk_pipeline)
    mod.set_warp_groups(args.warp_groups)  # (before default_num_splits, which follows it)
    mod.set_kv_head_pairs(args.kv_head_pairs)
    mod.set_narrow_tiles(not args.no_narrow_tiles)
    mod.set_short_kernel(not args.no_short_kernel)  # (before default_num_splits, which follows it too)
    splits = args.num_splits
    note = f"num_splits={splits}"
    if splits == 0:
        # the kernel plans from the cache capacity S (it cannot read cache_seqlens without a sync)
        splits_used = mod.default_num_splits(batch, q_heads, kv_heads, head_size, seq_n)
        note = f"num_splits={splits_used} (auto)"
    else:
        splits_used = splits
    two_groups = mod.uses_warp_groups(batch, q_heads, kv_heads, head_size, seq_n, splits_used)
    groups = ", two warp groups" if two_groups else ""
    if mod.uses_bulk_pipeline(batch, q_heads, kv_heads, head_size, seq_n):
        # (it never merges in a cluster)
        if mod.uses_kv_head_pairs(batch, q_heads, kv_heads, head_size, seq_n, splits_used, inp.q.dtype):
            groups = ", KV-head pairs"  # (a warp group a head)
        note += ", bulk copies" + groups + (", workspace merge" if splits_used > 1 else "")
    else:
        if mod.uses_narrow_tiles(batch, q_heads, kv_heads, head_size, seq_n, splits_used):
            short = mod.uses_short_kernel(batch, q_heads, kv_heads, head_size, seq_n, splits_used)
            groups = ", short kernel" if short else ", narrow tiles"
        note += groups + (", cluster merge" if mod.uses_cluster_merge(splits_used) else "")
    out = torch.empty_like(inp.q)

    def launch():
        return mod.flash_decode(inp.q, inp.k_cache, inp.v_cache, inp.cache_seqlens, inp.scale,
                                num_splits=splits, out=out)

    return launch, note


def make_kv_read(inp, args):
    if inp.q.device.type != "cuda":
        raise Unavailable("unsupported", "the K/V read bound is a CUDA kernel")
    if inp.ragged:
        raise Unavailable("unsupported", "ragged lengths: the bound reads the same rows of every sequence")
    mod = load_custom_module()
    rows = inp.seqlens[0]
    block_xor = torch.empty(mod.kv_read_blocks(inp.k_cache, inp.v_cache, rows), dtype=torch.int32,
                            device=inp.q.device)

    def launch():
        return mod.kv_read(inp.k_cache, inp.v_cache, rows, block_xor=block_xor)

    return launch, "K and V of the valid lengths read by a streaming kernel that computes nothing"


def make_pytorch(inp, args):
    from llama3 import decode_attention_reference

    splits = args.num_splits or None

    def launch():
        return decode_attention_reference(inp.q, inp.k_cache, inp.v_cache, inp.cache_seqlens,
                                          inp.scale, num_splits=splits)

    return launch, f"num_splits={splits or 'auto'}"


def make_naive(inp, args):
    from llama3 import decode_attention_naive

    def launch():
        # in the inputs' dtype: the eager baseline (its default computes in float64)
        return decode_attention_naive(inp.q, inp.k_cache, inp.v_cache, inp.cache_seqlens, inp.scale,
                                      dtype=inp.q.dtype)

    return launch, ""


def sdpa_factory(backend_name):
    def make_sdpa(inp, args):
        if inp.ragged:
            raise Unavailable("skipped", "SDPA has no cache_seqlens (it would attend to all S): "
                                         "not run with --ragged")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        q4 = inp.q.unsqueeze(2)  # [B, Hq, 1, D]
        # the same cache memory seen as [B, Hkv, S, D]: no copy, last dim stays contiguous
        k4 = inp.k_cache.transpose(1, 2)
        v4 = inp.v_cache.transpose(1, 2)

        def launch():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q4, k4, v4, scale=inp.scale, enable_gqa=True)
            return out.squeeze(2)

        # SDPA says why it refused a backend only in warnings; keep the first one as the reason.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                launch()
            except RuntimeError as exc:
                reasons = [re.sub(r"\s*\(Triggered internally at .*", "", first_line(w.message))
                           for w in caught] + [first_line(exc)]
                # skip headers such as "Memory efficient kernel not used because:"
                reason = next(r for r in reasons if r and not r.endswith(":"))
                raise Unavailable("unsupported", reason[:300]) from exc
        return launch, ""

    return make_sdpa


def make_flash_attn(inp, args):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ModuleNotFoundError:
        raise Unavailable("not installed", "no module named flash_attn")
    except Exception as exc:  # installed but broken (ABI mismatch ...)
        raise Unavailable("error", f"import flash_attn failed: {first_line(exc)}")
    if inp.q.device.type != "cuda":
        raise Unavailable("unsupported", "flash_attn needs a CUDA device")
    q1 = inp.q.unsqueeze(1)  # [B, 1, Hq, D]; the cache layout [B, S, Hkv, D] is flash_attn's own

    def launch():
        return flash_attn_with_kvcache(q1, inp.k_cache, inp.v_cache, cache_seqlens=inp.cache_seqlens,
                                       softmax_scale=inp.scale, num_splits=args.num_splits).squeeze(1)

    launch()
    return launch, f"num_splits={args.num_splits or 'auto'}"


def make_flashinfer(inp, args):
    try:
        import flashinfer
    except ModuleNotFoundError:
        raise Unavailable("not installed", "no module named flashinfer")
    except Exception as exc:
        raise Unavailable("error", f"import flashinfer failed: {first_line(exc)}")
    if inp.q.device.type != "cuda":
        raise Unavailable("unsupported", "flashinfer needs a CUDA device")
    batch, q_heads, head_size = inp.q.shape
    seq_n, kv_heads = inp.k_cache.shape[1], inp.k_cache.shape[2]
    dev = inp.q.device
    # Zero-copy: each sequence is one page of size S, so the NHD paged cache [pages, page, Hkv, D]
    # is exactly our [B, S, Hkv, D] cache; the last page's length is the sequence length.
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    wrapper.plan(torch.arange(batch + 1, dtype=torch.int32, device=dev),
                 torch.arange(batch, dtype=torch.int32, device=dev),
                 inp.cache_seqlens, q_heads, kv_heads, head_size, seq_n,
                 q_data_type=inp.q.dtype, kv_data_type=inp.k_cache.dtype, sm_scale=inp.scale)

    def launch():
        return wrapper.run(inp.q, (inp.k_cache, inp.v_cache))

    launch()
    return launch, f"paged decode, page size {seq_n}"


# name -> (description, factory); the order is the table's order
IMPLEMENTATIONS = {
    "custom": ("custom flash-decode CUDA kernel (split-KV)", make_custom),
    "kv_read": ("the bound: the same K/V bytes read, no attention (csrc/kv_read.cu)", make_kv_read),
    "pytorch": ("PyTorch split-KV + LSE combine (decode_attention_reference)", make_pytorch),
    "naive": ("PyTorch masked softmax, K/V repeated to the q heads (decode_attention_naive)", make_naive),
    "sdpa_flash": ("torch SDPA, FLASH_ATTENTION backend", sdpa_factory("FLASH_ATTENTION")),
    "sdpa_cudnn": ("torch SDPA, CUDNN_ATTENTION backend", sdpa_factory("CUDNN_ATTENTION")),
    "sdpa_efficient": ("torch SDPA, EFFICIENT_ATTENTION backend", sdpa_factory("EFFICIENT_ATTENTION")),
    "flash_attn": ("flash_attn.flash_attn_with_kvcache", make_flash_attn),
    "flashinfer": ("flashinfer BatchDecodeWithPagedKVCacheWrapper", make_flashinfer),
}
# Entries that time a bound, not an attention: no output to check (status "bound")
BOUNDS = {"kv_read"}
PASSED = ("OK", "bound")  # the statuses of a result that ran and holds


def check_impl(name, out, ref):
    """check() for an attention; (None, "bound") for a bound, which has no output to compare."""
    return (None, "bound") if name in BOUNDS else check(out, ref)


# ----------------------------------------------------------------------------------------------
# timing


class Timer:
    """Times zero-arg launches on one device; holds the L2 flush buffer and the run's ceilings."""

    def __init__(self, device, iters, warmup, flush, dirty_flush=False, rounds=1):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.iters = iters
        self.rounds = rounds  # (for the printouts: run_impls times the rounds)
        self.warmup = warmup
        self.flush_buf = None
        self.dirty_flush = dirty_flush
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            self.device_name = props.name
            l2 = getattr(props, "L2_cache_size", 0) or (64 << 20)
            if flush:
                # (read by a sum, zeroed by --dirty_flush)
                self.flush_buf = torch.zeros(2 * l2 // 4, dtype=torch.int32, device=self.device)
        else:
            self.device_name = platform.processor() or platform.machine() or "cpu"
        self.copy_gbps = None
        self.floor_us = None

    @property
    def flush_kind(self):
        """None (--dont_flush_gpu_cache), "read" (the default) or "zero" (--dirty_flush)."""
        if self.flush_buf is None:
            return None
        return "zero" if self.dirty_flush else "read"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _keep_gpu_busy(self):
        if self.flush_buf is not None:
            # Reading evicts the timed kernel's data and leaves only clean lines. Zeroing (--dirty_flush) leaves
            # dirty ones, whose write-back lands in the next kernel's time (an H100, 2026-11-27: 6-11 us more for
            # every implementation at 134-537 MB; the same zeroing followed by this read: no loss).
            if self.dirty_flush:
                self.flush_buf.zero_()
            else:
                self.flush_buf.sum()
        torch.cuda._sleep(SPIN_CYCLES)  # touches no memory: L2 stays as the flush left it

    def time_us(self, fn, iters=None):
        """Per-launch times in microseconds."""
        iters = iters or self.iters
        if not self.cuda:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection between start.record() and the launch would be timed
        try:
            for start, end in zip(starts, ends):
                self._keep_gpu_busy()  # queued before the start event: not timed
                start.record()
                fn()
                end.record()
            self.sync()
        finally:
            if gc_was_enabled:
                gc.enable()
        return [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends)]

    def alternating_medians(self, fns, rounds):
        """{name: the median of its rounds' medians}: the zero-argument launches of `fns` (warmed up by the caller)
        timed in `rounds` rounds of self.iters launches each, every round in the reverse order of the one before, as
        run_impls orders --rounds (for the probes in docs/probes, whose launches need no records)."""
        names = list(fns)
        medians = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                medians[name].append(statistics.median(self.time_us(fns[name])))
        return {name: statistics.median(m) for name, m in medians.items()}

    def measure_ceilings(self):
        """Copy bandwidth (read + write bytes / time) and the floor of this timing method."""
        nbytes = (1 << 30) if self.cuda else (64 << 20)
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        src.fill_(1)
        copy = lambda: dst.copy_(src)
        for _ in range(2):
            copy()
        self.sync()
        self.copy_gbps = 2 * nbytes / (statistics.median(self.time_us(copy, iters=10)) * 1e3)
        self.copy_desc = f"{nbytes >> 20} MiB copy, read + write, median of 10"
        del src, dst
        tiny = torch.zeros(1, device=self.device)
        bump = lambda: tiny.add_(1)
        bump()
        self.floor_us = statistics.median(self.time_us(bump))


def summarize(times):
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"time_us": statistics.median(ordered), "min_us": ordered[0], "p90_us": p90}


# ----------------------------------------------------------------------------------------------
# one configuration


def config_dict(inp):
    batch, seq_n, kv_heads, head_size = inp.k_cache.shape
    return {"batch_size": batch, "q_num_heads": inp.q.shape[1], "kv_num_heads": kv_heads,
            "head_size": head_size, "seq_n": seq_n, "ragged": inp.ragged,
            "sum_seqlens": sum(inp.seqlens), "dtype": str(inp.q.dtype).replace("torch.", "")}


def record_error(rec, exc, args):
    rec["status"], rec["note"] = "error", f"{type(exc).__name__}: {first_line(exc)}"
    if args.verbose:
        import traceback
        traceback.print_exc()


def prepare_one(name, inp, ref, timer, args):
    """Build, warm up and check one implementation: its record and its launch (None where it cannot run); never
    raises for a refusal."""
    desc, factory = IMPLEMENTATIONS[name]
    rec = {"impl": name, "description": desc, **config_dict(inp), "bytes": bytes_moved(inp),
           "status": None, "note": "", "rel_err": None, "time_us": None, "min_us": None,
           "p90_us": None, "gbps": None, "pct_copy_bw": None}
    try:
        fn, rec["note"] = factory(inp, args)
        for _ in range(args.warmup):
            out = fn()
        timer.sync()
        rec["rel_err"], rec["status"] = check_impl(name, out, ref)
        del out
    except Unavailable as exc:
        rec["status"], rec["note"] = exc.status, exc.reason
        return rec, None
    except Exception as exc:  # e.g. out of memory, a kernel's own argument check
        record_error(rec, exc, args)
        return rec, None
    return rec, fn


def record_times(rec, round_times, timer):
    """The record's time: the median of each round's median (one round: the median of its launches); min and p90
    over every launch."""
    rec.update(summarize([t for times in round_times for t in times]))
    rec["time_us"] = statistics.median(statistics.median(times) for times in round_times)
    rec["gbps"] = rec["bytes"] / (rec["time_us"] * 1e3)
    if timer.copy_gbps:
        rec["pct_copy_bw"] = 100.0 * rec["gbps"] / timer.copy_gbps


def time_round(rec, fn, timer, args):
    """One round's launch times of an implementation, or None where a launch failed (recorded as its error)."""
    try:
        return timer.time_us(fn)
    except Exception as exc:
        record_error(rec, exc, args)
        return None


def run_impls(names, inp, ref, timer, args):
    """Every implementation's record. One round: each built, checked and timed before the next is built. Several
    (--rounds): all built and checked first, then timed round by round, every round in the reverse order of the one
    before, so that none always runs first or right after the same neighbour (a short launch moves by up to about
    1 us with what ran before it in the process: README, Results)."""
    if args.rounds == 1:
        recs = []
        for name in names:
            rec, fn = prepare_one(name, inp, ref, timer, args)
            times = time_round(rec, fn, timer, args) if fn is not None else None
            if times is not None:
                record_times(rec, [times], timer)
            recs.append(rec)
        return recs
    prepared = [prepare_one(name, inp, ref, timer, args) for name in names]
    round_times = [[] for _ in prepared]
    order = [i for i, (_, fn) in enumerate(prepared) if fn is not None]
    for r in range(args.rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            rec, fn = prepared[i]
            if fn is None:  # (failed in an earlier round)
                continue
            times = time_round(rec, fn, timer, args)
            if times is None:
                prepared[i] = (rec, None)
                round_times[i] = []
            else:
                round_times[i].append(times)
    for (rec, fn), times in zip(prepared, round_times):
        if fn is not None and times:
            record_times(rec, times, timer)
    return [rec for rec, _ in prepared]


# ----------------------------------------------------------------------------------------------
# printing


def fmt(value, spec, missing="-"):
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def fmt_err(rel_err, status):
    """The relative error; without one, nan for a FAIL (NaN/inf in the output), else - (a bound, a refusal)."""
    return fmt(rel_err, ".2e", "nan" if status == "FAIL" else "-")


def fmt_rate(value):
    """GB/s and percentages: one decimal, but keep small CPU-run values visible."""
    return fmt(value, ".1f" if value is None or value >= 1 else ".3g")


def print_header(args, timer, inp):
    c = config_dict(inp)
    lengths = (f"random in [1, {c['seq_n']}], sum {c['sum_seqlens']}" if inp.ragged
               else f"{c['seq_n']} (all sequences)")
    print("Benchmarking decode attention:")
    print("==================================")
    print(f"device: {timer.device_name} ({timer.device})")
    print(f"dtype: {args.dtype}")
    print(f"batch size: {c['batch_size']}")
    print(f"q heads: {c['q_num_heads']}")
    print(f"kv heads: {c['kv_num_heads']}")
    print(f"head size: {c['head_size']}")
    print(f"sequence length: {lengths}")
    print(f"cache layout: [B, S, Hkv, D] = {list(inp.k_cache.shape)}")
    print("==================================")


def print_method(timer, args):
    if timer.cuda:
        print(f"timing: CUDA events, {timer_note(timer)}")
    else:
        print(f"timing: {timer_note(timer)}")
    print(f"copy bandwidth: {timer.copy_gbps:.1f} GB/s ({timer.copy_desc})")
    print(f"timing floor (1-element kernel, same method): {timer.floor_us:.1f} us")


def print_single(rec, args):
    print(f"implementation: {rec['description']}")
    if rec["note"]:
        print(f"  {rec['note']}")
    print(f"time: {fmt(rec['time_us'], '.1f')} us (median of {args.iters})")
    if args.verbose:
        print(f"  min {fmt(rec['min_us'], '.1f')} us, p90 {fmt(rec['p90_us'], '.1f')} us")
    print(f"bytes moved: {rec['bytes'] / 1e6:.3f} MB (K+V of valid lengths + q + out)")
    print(f"bandwidth: {fmt_rate(rec['gbps'])} GB/s ({fmt_rate(rec['pct_copy_bw'])}% of copy bandwidth)")
    print(f"rel error vs float32 reference: {fmt_err(rec['rel_err'], rec['status'])} {rec['status']}")


def print_table(recs, verbose=False):
    head = ["impl", "time us", "GB/s", "% of copy BW", "rel err", "status"]
    if verbose:
        head[2:2] = ["min us", "p90 us"]
    rows = []
    for r in recs:
        row = [r["impl"], fmt(r["time_us"], ".1f"), fmt_rate(r["gbps"]), fmt_rate(r["pct_copy_bw"]),
               fmt_err(r["rel_err"], r["status"]), r["status"]]
        if verbose:
            row[2:2] = [fmt(r["min_us"], ".1f"), fmt(r["p90_us"], ".1f")]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    for r in recs:
        if r["note"]:
            print(f"  {r['impl']}: {r['note']}")


# ----------------------------------------------------------------------------------------------
# modes


def selected_impls(args):
    if args.compare or args.sweep:
        return args.impls or list(IMPLEMENTATIONS)
    if args.impls:  # one implementation (validate_args checks), e.g. sdpa_cudnn under --use_ncu
        return args.impls
    return ["pytorch" if args.use_pytorch_kernel else "custom"]


def run_config(args, timer, batch, seq_n, impls):
    inp = build_inputs(batch, args.q_num_heads, args.kv_num_heads, args.head_size, seq_n,
                       DTYPES[args.dtype], args.device, args.seed, args.ragged)
    ref = reference_output(inp)
    return inp, run_impls(impls, inp, ref, timer, args)


def free_memory(timer):
    if timer.cuda:
        torch.cuda.empty_cache()


def run_ncu(args):
    """One warmup and one launch inside the NVTX range: what ncu --nvtx-include profiles."""
    name = selected_impls(args)[0]
    inp = build_inputs(args.batch_size, args.q_num_heads, args.kv_num_heads, args.head_size,
                       args.seq_n, DTYPES[args.dtype], args.device, args.seed, args.ragged)
    ref = reference_output(inp)  # before the warmup: nothing big runs after it but the launch
    try:
        fn, note = IMPLEMENTATIONS[name][1](inp, args)
    except Unavailable as exc:
        sys.exit(f"error: {exc.reason}")
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(NVTX_RANGE)
    out = fn()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    err, status = check_impl(name, out, ref)
    print(f"implementation: {IMPLEMENTATIONS[name][0]}")
    if note:
        print(f"  {note}")
    print(f"one launch profiled inside NVTX range '{NVTX_RANGE}' (after one warmup launch)")
    print(f"bytes moved: {bytes_moved(inp) / 1e6:.3f} MB (K+V of valid lengths + q + out); "
          f"compare with ncu's dram__bytes_read.sum + dram__bytes_write.sum")
    print(f"rel error vs float32 reference: {fmt_err(err, status)} {status}")
    print("time and DRAM throughput: read them from the ncu report. Suggested command:")
    print("  " + ncu_command(sys.argv[1:]))
    return status in PASSED


def run_single_or_compare(args, timer):
    impls = selected_impls(args)
    inp, recs = run_config(args, timer, args.batch_size, args.seq_n, impls)
    print_header(args, timer, inp)
    print_method(timer, args)
    if args.compare:
        print()
        print_table(recs, args.verbose)
    else:
        rec = recs[0]
        if rec["status"] not in PASSED + ("FAIL",):
            sys.exit(f"error: {rec['impl']} implementation: {rec['note']}")
        print_single(rec, args)
    return recs


def run_sweep(args, timer):
    impls = selected_impls(args)
    batches = args.sweep_batches or [args.batch_size]
    seqs = args.sweep_seq or DEFAULT_SWEEP_SEQ
    all_recs = []
    first = True
    for batch in batches:
        batch_recs = []
        for seq_n in seqs:
            inp, recs = run_config(args, timer, batch, seq_n, impls)
            if first:
                print_header(args, timer, inp)
                print_method(timer, args)
                first = False
            print(f"\nbatch {batch}, sequence length {seq_n}, "
                  f"{bytes_moved(inp) / 1e6:.3f} MB moved:")
            print_table(recs, args.verbose)
            batch_recs += recs
            del inp
            free_memory(timer)
        md_path = write_sweep_markdown(args, timer, batch, seqs, impls, batch_recs)
        print(f"\nwrote {md_path}")
        png_path = plot_sweep(args, timer, batch, impls, batch_recs)
        if png_path:
            print(f"wrote {png_path}")
        all_recs += batch_recs
    return all_recs


def sweep_title(args, timer, batch):
    return (f"{timer.device_name}, {args.dtype}, {args.q_num_heads} q / {args.kv_num_heads} kv heads, "
            f"head {args.head_size}, batch {batch}{', ragged' if args.ragged else ''}, "
            f"{datetime.date.today().isoformat()}")


def sweep_stem(args, batch):
    return os.path.join(args.out_dir, f"kernel_sweep_h{args.head_size}_b{batch}")


def write_sweep_markdown(args, timer, batch, seqs, impls, recs):
    os.makedirs(args.out_dir, exist_ok=True)
    by_key = {(r["impl"], r["seq_n"]): r for r in recs}
    lines = [f"# Decode attention sweep: {sweep_title(args, timer, batch)}", "",
             f"Time in us (achieved TB/s of K+V+q+out bytes); "
             f"{'CUDA events, ' if timer.cuda else ''}{timer_note(timer)}; "
             f"copy bandwidth {timer.copy_gbps / 1e3:.2f} TB/s; timing floor {timer.floor_us:.1f} us; "
             f"torch {torch.__version__}.", "",
             "| S | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for seq_n in seqs:
        cells = []
        for name in impls:
            r = by_key[(name, seq_n)]
            if r["time_us"] is None:
                cells.append(r["status"])
            else:
                cells.append(f"{r['time_us']:.1f} ({r['gbps'] / 1e3:.2f})"
                             + ("" if r["status"] in PASSED else f" {r['status']}"))
        lines.append(f"| {seq_n} | " + " | ".join(cells) + " |")
    notes = {}
    for r in recs:
        if r["time_us"] is None:
            notes.setdefault(r["impl"], f"{r['status']}: {r['note']}")
    if notes:
        lines.append("")
        lines += [f"- {name}: {note}" for name, note in notes.items()]
    path = sweep_stem(args, batch) + ".md"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def timer_note(timer):
    median = (f"median of {timer.iters}" if timer.rounds == 1 else
              f"median of the medians of {timer.rounds} rounds of {timer.iters}, the implementations' order reversed "
              f"every round")
    if not timer.cuda:
        return f"time.perf_counter on the CPU, {median}"
    flush = {None: "L2 not flushed (--dont_flush_gpu_cache)", "read": "L2 flushed by a read",
             "zero": "L2 flushed by zeroing (dirty, --dirty_flush)"}[timer.flush_kind]
    return f"{flush} + GPU kept busy before each launch, {median}"


def plot_sweep(args, timer, batch, impls, recs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot")
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in impls:
        pts = [(r["seq_n"], r["gbps"] / 1e3) for r in recs if r["impl"] == name and r["gbps"]]
        if pts:
            style = dict(color="black", linestyle=":", marker=".") if name in BOUNDS else dict(marker="o")
            ax.plot(*zip(*pts), label=name, **style)
    ax.axhline(timer.copy_gbps / 1e3, linestyle="--", color="gray",
               label=f"copy bandwidth {timer.copy_gbps / 1e3:.2f} TB/s")
    ax.set_xscale("log", base=2)
    seqs = sorted({r["seq_n"] for r in recs})
    ax.set_xticks(seqs, [str(s) for s in seqs], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("achieved bandwidth (TB/s)")
    ax.set_title(sweep_title(args, timer, batch), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = sweep_stem(args, batch) + ".png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_json(args, timer, recs):
    path = args.json
    if path == "auto":
        tag = (f"sweep_h{args.head_size}" if args.sweep
               else f"h{args.head_size}_b{args.batch_size}_s{args.seq_n}")
        path = os.path.join(args.out_dir, f"kernel_bench_{tag}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {"device": timer.device_name, "device_type": timer.device.type,
            "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "iters": timer.iters, "rounds": timer.rounds, "flush_l2": timer.flush_buf is not None,
            "flush": timer.flush_kind,
            "copy_gbps": timer.copy_gbps, "timing_floor_us": timer.floor_us,
            "command": [os.path.basename(sys.argv[0])] + sys.argv[1:]}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": recs}, f, indent=1)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# arguments


def ncu_command(argv):
    args = [a for a in argv if a != "--use_ncu"] + ["--use_ncu"]
    return ('ncu --clock-control none --nvtx --nvtx-include "decode_attention/" python3 '
            'benchmark_kernel.py ' + " ".join(shlex.quote(a) for a in args))


def int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def impl_list(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; "
                                         f"choose from {','.join(IMPLEMENTATIONS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head_size", type=int, default=64, help="head dimension D (custom kernel: 64 or 128)")
    p.add_argument("--q_num_heads", type=int, default=32)
    p.add_argument("--kv_num_heads", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seq_n", type=int, default=256, help="KV cache length S")
    p.add_argument("--use_pytorch_kernel", action="store_true",
                   help="run the PyTorch split-KV + combine implementation instead of the custom kernel")
    p.add_argument("--use_ncu", action="store_true",
                   help="one warmup + one launch in NVTX range 'decode_attention', for ncu (see below)")
    p.add_argument("--dont_flush_gpu_cache", action="store_true",
                   help="do not flush L2 before each timed launch")
    p.add_argument("--dirty_flush", action="store_true",
                   help="flush L2 by zeroing a buffer (leaves it dirty: the method of the tables before "
                        "2026-11-27 18:00 UTC) instead of reading one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--num_splits", type=int, default=0, help="split-KV splits (0 = automatic)")
    p.add_argument("--no_cluster_merge", action="store_true",
                   help="merge the custom kernel's splits through global memory, not in a thread-block cluster")
    p.add_argument("--bulk_pipeline", choices=["auto", "always", "off"], default="auto",
                   help="the custom kernel's bulk variant (sm_90+: the cache through shared memory with the tensor "
                        "memory accelerator): auto = for large launches (the default), always, or off = the "
                        "register pipeline")
    p.add_argument("--warp_groups", choices=["auto", "always", "off"], default="auto",
                   help="blocks of two groups of four warps for the custom kernel: auto = where the grid runs at "
                        "once with one block an SM and each group has a tile (the default), always, or off = four "
                        "warps")
    p.add_argument("--kv_head_pairs", choices=["auto", "always", "off"], default="auto",
                   help="blocks of two adjacent KV heads in the custom kernel's bulk variant at head 64 (tensor "
                        "copies of both heads' rows): auto = for one-split launches whose pair blocks fill their "
                        "waves of two an SM to 15/16 (the default), always, or off")
    p.add_argument("--no_narrow_tiles", action="store_true",
                   help="keep the custom kernel's standard tile at short lengths (by default a split of at most 32 "
                        "rows runs in narrow tiles of 8 rows a warp)")
    p.add_argument("--no_short_kernel", action="store_true",
                   help="run the custom kernel's narrow launches at head 128 in the general kernel instead of the "
                        "short-launch kernel (csrc/flash_decode_short.cuh), for comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=100, help="timed launches; the median is reported")
    p.add_argument("--warmup", type=int, default=5, help="untimed launches before timing")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --compare/--sweep: time every implementation in this many rounds of --iters launches, "
                        "each round in the reverse order of the one before; reported: the median of the rounds' "
                        "medians (default 1: each implementation timed once, in --impls order)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: --use_pytorch_kernel)")
    p.add_argument("--ragged", action="store_true", help="random sequence lengths in [1, seq_n]")
    p.add_argument("--compare", action="store_true",
                   help="time all implementations (--impls) on the same data and print a table")
    p.add_argument("--impls", type=impl_list, default=None,
                   help=f"comma-separated, for --compare/--sweep (default: {','.join(IMPLEMENTATIONS)}); "
                        "without them (also with --use_ncu), the one implementation to run instead of custom")
    p.add_argument("--sweep", action="store_true",
                   help="--compare over sequence lengths 256..131072; writes markdown + PNG to --out_dir")
    p.add_argument("--sweep_batches", type=int_list, default=None,
                   help="e.g. 16,64 (default: --batch_size)")
    p.add_argument("--sweep_seq", type=int_list, default=None,
                   help="e.g. 2048,4096 (default: 256,512,...,131072)")
    p.add_argument("--out_dir", default="results")
    p.add_argument("--json", nargs="?", const="auto", default=None, metavar="PATH",
                   help="write machine-readable results (default path: in --out_dir)")
    p.add_argument("--verbose", action="store_true", help="also min/p90 times, tracebacks")
    args = p.parse_args(argv)
    validate_args(p, args)
    return args


def validate_args(p, args):
    for name in ("head_size", "q_num_heads", "kv_num_heads", "batch_size", "seq_n", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if args.rounds < 1:
        p.error("--rounds must be positive")
    if args.rounds > 1 and not (args.compare or args.sweep):
        p.error("--rounds alternates the implementations of --compare/--sweep: add one of them, or drop --rounds")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the warmup output is what gets checked)")
    if args.num_splits < 0:
        p.error("--num_splits must be >= 0 (0 = automatic)")
    if args.q_num_heads % args.kv_num_heads:
        p.error(f"--q_num_heads ({args.q_num_heads}) must be a multiple of "
                f"--kv_num_heads ({args.kv_num_heads})")
    if args.dirty_flush and args.dont_flush_gpu_cache:
        p.error("--dirty_flush picks how L2 is flushed and --dont_flush_gpu_cache skips the flush: give one")
    if args.use_ncu and (args.compare or args.sweep):
        p.error("--use_ncu profiles one implementation: drop --compare/--sweep")
    if args.impls and not (args.compare or args.sweep):
        if len(args.impls) != 1:
            p.error(f"--impls {','.join(args.impls)}: without --compare/--sweep, name one implementation")
        if args.use_pytorch_kernel:
            p.error("--use_pytorch_kernel and --impls both pick the implementation: give one of them")
    runs_custom = "custom" in selected_impls(args)
    only_custom = not (args.compare or args.sweep)
    if only_custom and runs_custom and args.head_size not in CUSTOM_HEAD_SIZES:
        p.error(f"the custom kernel supports head sizes 64 and 128, not {args.head_size}; "
                f"use --use_pytorch_kernel for other head sizes")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r} (cuda, cuda:N or cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        if only_custom and runs_custom:
            p.error("no CUDA device: the custom kernel needs one; run the PyTorch implementation "
                    "on the CPU with --use_pytorch_kernel --device cpu")
        p.error("no CUDA device available: use --device cpu")
    if device.type != "cuda":
        if only_custom and runs_custom:
            p.error(f"the custom kernel needs a CUDA device, not {args.device}; "
                    f"use --use_pytorch_kernel with --device cpu")
        if args.use_ncu:
            p.error("--use_ncu needs a CUDA device")


def main(argv=None):
    args = parse_args(argv)
    try:
        import llama3  # noqa: F401  (the reference every implementation is checked against)
    except Exception as exc:
        sys.exit(f"error: cannot import llama3 (decode_attention_naive/_reference): {first_line(exc)}")
    if args.use_ncu:
        sys.exit(0 if run_ncu(args) else 1)
    timer = Timer(args.device, args.iters, args.warmup, flush=not args.dont_flush_gpu_cache,
                  dirty_flush=args.dirty_flush, rounds=args.rounds)
    timer.measure_ceilings()
    recs = run_sweep(args, timer) if args.sweep else run_single_or_compare(args, timer)
    if args.json:
        write_json(args, timer, recs)
    # a wrong answer fails the run; a refused or missing peer does not
    sys.exit(1 if any(r["status"] == "FAIL" for r in recs) else 0)


if __name__ == "__main__":
    main()
