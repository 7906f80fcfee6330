"""The CUDA flash-decode kernel against the float32 PyTorch reference.

The GPU tests (marked `cuda`) run where a GPU is present; the build test compiles csrc/ with plain nvcc
for sm_80 and sm_90 on any machine that has nvcc (CI has it and sets REQUIRE_NVCC=1 so it cannot skip).
"""

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import KERNEL_TEST_SEED, kernel_generator
from llama3 import decode_attention_naive, decode_attention_reference

REPO_DIR = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------
# Build check: nvcc only, no GPU
# ------------------------------------------------------------------------------------------------

def find_nvcc():
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        if os.environ.get("REQUIRE_NVCC"):
            pytest.fail("REQUIRE_NVCC is set but nvcc was not found on PATH or in CUDA_HOME")
        pytest.skip("nvcc not found")
    return str(nvcc)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
# flash_decode: 2 dtypes x 2 head dims x (early cache reads on/off x cluster merge on/off, + plain launches in two warp
# groups with/without the cluster merge, + the bulk variant in blocks of four warps or two groups) + the bulk variant in
# blocks of a KV-head pair at head 64 (2 dtypes) + the one-tile plain instances (2 dtypes x (4 at head 64, 3 at head
# 128)) + the short-launch kernel at head 128 (2 dtypes x one split / cluster x a group of 4 / any); fused_ops: 8
# kernels x 2 dtypes; gemv: 2 dtypes x (4 row counts x (with/without RMSNorm prologue x with/without SiLU epilogue, +
# RMSNorm with RoPE epilogue) + 2 tensor-core variants); sampling: 3 logits dtypes x (block, cluster); decode_layers: 2
# dtypes x 2 head dims x 4 GQA group sizes; kv_read: one (the benchmarks' bound)
@pytest.mark.parametrize("source,kernel_count", [("flash_decode.cu", 64), ("fused_ops.cu", 18), ("gemv.cu", 44),
                                                 ("sampling.cu", 6), ("decode_layers.cu", 16), ("kv_read.cu", 1)])
def test_kernels_compile_with_plain_nvcc_without_spills(arch, source, kernel_count, tmp_path):
    cmd = [find_nvcc(), "-O3", "-std=c++17", "--use_fast_math", f"-arch={arch}", "-Xptxas", "-v",
           "-c", str(REPO_DIR / "csrc" / source), "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr}"
    report = result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert len(kernels) == kernel_count, f"expected {kernel_count} kernels, got {kernels}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    stacks = [int(n) for n in re.findall(r"(\d+) bytes stack frame", report)]
    assert spills and max(spills) == 0, f"register spills:\n{report}"
    assert max(stacks) == 0, f"local-memory stack frame:\n{report}"
    # Host state stays per build: g++ gives a static inside an inline function or a class template's member one copy
    # for the whole process (a GNU unique symbol), shared by two builds loaded into one process (the A/B scripts of
    # docs/perf-notes.md: the second build's KV-head pairs were switched off that way). Only the programmatic-launch
    # switch is meant to be process-wide.
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, "-C", str(tmp_path / "kernels.o")], capture_output=True, text=True, check=True)
        shared = [line for line in symbols.stdout.splitlines()
                  if " u " in line and "programmatic_launch::enabled()" not in line]
        assert not shared, "process-wide statics:\n" + "\n".join(shared)


FAST_DIVISOR_CHECK = r"""
#include <cstdio>
#include <cstdlib>
#include "flash_decode.h"
// The kernel's division, (umulhi(n, magic) + n) >> shift, against n / d: every divisor up to 4096 and a few beyond,
// every numerator below 2^16 (a grid's y index: its units) and random ones below 2^31 (where the method holds).
static unsigned divide(unsigned n, flash_decode::FastDivisor f) {
    return (unsigned)((((unsigned long long)n * f.magic) >> 32) + n) >> f.shift;
}
int main(int argc, char** argv) {
    unsigned long long state = strtoull(argv[1], nullptr, 10) | 1;
    auto next = [&]() { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; };
    const unsigned big[] = {65535u, 65536u, 65537u, 1u << 20, 1000003u, 0x7ffffffeu, 0x7fffffffu};
    for (unsigned d = 1; d <= 4096 + 7; ++d) {
        const unsigned divisor = d <= 4096 ? d : big[d - 4097];
        const flash_decode::FastDivisor f = flash_decode::fast_divisor(divisor);
        for (unsigned i = 0; i < (1u << 16) + 1000; ++i) {
            const unsigned n = i < (1u << 16) ? i : (unsigned)(next() & 0x7fffffffu);
            if (divide(n, f) != n / divisor) {
                printf("%u / %u: %u, expected %u\n", n, divisor, divide(n, f), n / divisor);
                return 1;
            }
        }
        if (divide(0x7fffffffu, f) != 0x7fffffffu / divisor) return 1;
    }
    puts("ok");
    return 0;
}
"""


def test_fast_divisor_divides_like_the_hardware(tmp_path):
    """flash_decode.h's FastDivisor (the kernel's decode of its block index): host code, built with nvcc as a plain
    C++ program, since the header includes the CUDA runtime's."""
    source = tmp_path / "fast_divisor_check.cu"
    source.write_text(FAST_DIVISOR_CHECK)
    binary = tmp_path / "fast_divisor_check"
    subprocess.run([find_nvcc(), "-O2", "-std=c++17", "-I", str(REPO_DIR / "csrc"), str(source), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary), str(KERNEL_TEST_SEED)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# GPU tests
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ext():
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    import load_custom_kernels
    module = load_custom_kernels.load_kernels()
    assert module is not None, load_custom_kernels.load_error()
    return module


@pytest.fixture(params=["cluster", "global"])
def merge(request, ext):
    """Each way flash_decode merges its splits: in a thread-block cluster (sm_90+, 2 to 8 splits), or through
    the float32 workspace in global memory (any GPU, any split count)."""
    if request.param == "cluster" and not ext.uses_cluster_merge(2):
        pytest.skip("no thread-block clusters on this GPU (sm_90+)")
    ext.set_cluster_merge(request.param == "cluster")
    yield request.param
    ext.set_cluster_merge(True)


@pytest.fixture(params=["bulk", "bulk_warp_groups", "bulk_kv_head_pairs", "registers", "warp_groups"])
def pipeline(request, ext):
    """Each way a plain launch streams the cache: through shared memory with the tensor memory accelerator (the bulk
    variant, sm_90+), or the register pipeline; in blocks of four warps or of two groups of four; the bulk variant at
    head 64 also in blocks of a KV-head pair (a group a head; head 128 and odd KV-head counts keep one head a block).
    Each is forced for every launch here, where "auto" keeps the bulk variant for large launches, two groups for grids
    that run at once with one block an SM and pairs for one-split launches whose pair blocks fill two an SM."""
    bulk = request.param.startswith("bulk")
    if bulk and not ext.uses_bulk_pipeline(1, 32, 8, 64, 131072):
        pytest.skip("no tensor memory accelerator on this GPU (sm_90+)")
    ext.set_bulk_pipeline("always" if bulk else "off")
    ext.set_warp_groups("always" if request.param.endswith("warp_groups") else "off")
    ext.set_kv_head_pairs("always" if request.param.endswith("pairs") else "off")
    yield request.param
    ext.set_bulk_pipeline("auto")
    ext.set_warp_groups("auto")
    ext.set_kv_head_pairs("auto")


def make_inputs(batch, seq, q_heads, kv_heads, head_dim, dtype, seed):
    """Fresh random q, k, v for every run (conftest.kernel_generator); `seed` keeps a test's cases apart."""
    gen = kernel_generator(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen, device="cuda").to(dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    return q, k, v, gen


def poison_rows_past_lengths(k, v, lens):
    """NaN into k and inf / NaN into v past each sequence's length, in place (stale or never-written cache rows)."""
    for b, n in enumerate(lens.tolist()):
        k[b, n:] = float("nan")
        v[b, n:, :, ::2] = float("inf")
        v[b, n:, :, 1::2] = float("nan")


def check_against_reference(ext, q, k, v, lens, num_splits=0, tol=1e-2, poison_past_lengths=False):
    """poison_past_lengths: poison_rows_past_lengths after the reference."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    ref, ref_lse = decode_attention_reference(q.float(), k.float(), v.float(), lens, scale, return_lse=True)
    if poison_past_lengths:
        poison_rows_past_lengths(k, v, lens)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    ext.flash_decode(q, k, v, lens, scale, num_splits=num_splits, out=out, lse=lse)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or NaN output elements"
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < tol, f"relative error {err:.3e} >= {tol}"
    empty = lens == 0
    assert torch.equal(lse[empty], ref_lse[empty])  # -inf where nothing is attended to
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-3, atol=1e-3)
    return out


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(8, 8), (16, 8), (32, 8), (64, 8), (9, 3), (24, 8), (32, 2)])
def test_random_shapes_and_gqa_ratios(ext, merge, dtype, head_dim, q_heads, kv_heads):
    # GQA ratios 1, 2, 4, 8, 3 (SmolLM2 / Llama 3.2 3B) and 16 (two head groups per KV head)
    for trial, (batch, seq) in enumerate([(1, 1), (3, 77), (5, 1031), (2, 4099)]):
        q, k, v, gen = make_inputs(batch, seq, q_heads, kv_heads, head_dim, dtype, seed=trial)
        lens = torch.randint(1, seq + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
        lens[0] = seq  # the full cache too
        check_against_reference(ext, q, k, v, lens)


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch,seq", [(1, 65536), (16, 4097), (64, 2048)])
def test_long_and_wide(ext, pipeline, head_dim, batch, seq):
    q, k, v, gen = make_inputs(batch, seq, 32, 8, head_dim, torch.bfloat16, seed=seq)
    lens = torch.randint(1, seq + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    lens[0] = seq
    check_against_reference(ext, q, k, v, lens)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cache_rows_past_the_lengths_never_reach_the_output(ext, merge, pipeline, dtype, head_dim):
    # A real cache holds stale or never-written rows past each length (the kernel reads the first tile
    # before it knows the length): NaN and inf there must not leak in, with one split or several.
    q, k, v, _ = make_inputs(5, 700, 32, 8, head_dim, dtype, seed=head_dim)
    lens = torch.tensor([1, 17, 100, 255, 700], dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(head_dim)
    ref = decode_attention_reference(q.float(), k.float(), v.float(), lens, scale)
    poison_rows_past_lengths(k, v, lens)
    for num_splits in (0, 1, 3, 6):  # (a plain launch reads a split's second tile early when it has two)
        out = torch.full_like(q, float("nan"))
        ext.flash_decode(q, k, v, lens, scale, num_splits=num_splits, out=out)
        torch.cuda.synchronize()
        assert out.isfinite().all(), f"num_splits={num_splits}: non-finite output"
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"num_splits={num_splits}: relative error {err:.3e}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 9, 17])
def test_splits_of_many_tiles(ext, pipeline, dtype, head_dim, num_splits):
    # The bulk variant's ring refilled many times per split (four warps: two stages for grids of up to about one block
    # an SM, here 1 split; one stage for larger grids, here 9 and 17 splits x 32 blocks on an H100; two warp groups: a
    # staggered ring a group (its second tile requested once the length is known, then one tile in flight), except two
    # stages filled at once at head 64 in 9 and 17 splits, where a group has at most kShortGroupTiles = 4 tiles
    # and its ring is refilled at most twice): a capacity that is not a multiple of the tile (the
    # last tile's copy runs past the cache and arrives as zeros), ragged lengths (full, one row, empty, ending
    # inside a tile), rows past the lengths poisoned, and caches that are a slice of a larger batch (the batch
    # stride and a base offset in the tensor maps).
    seq = 9001 - 3 * (head_dim // 64)
    q, k, v, _ = make_inputs(5, seq, 32, 8, head_dim, dtype, seed=num_splits + head_dim)
    q, k, v = q[1:], k[1:], v[1:]
    lens = torch.tensor([seq, 1, 0, 5037], dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(head_dim)
    ref, ref_lse = decode_attention_reference(q.float(), k.float(), v.float(), lens, scale, return_lse=True)
    poison_rows_past_lengths(k, v, lens)
    assert ext.uses_bulk_pipeline(4, 32, 8, head_dim, seq) == pipeline.startswith("bulk")
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device="cuda")
    ext.flash_decode(q, k, v, lens, scale, num_splits=num_splits, out=out, lse=lse)
    torch.cuda.synchronize()
    assert out.isfinite().all() and torch.count_nonzero(out[2]) == 0
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"relative error {err:.3e}"
    assert torch.equal(lse[2], ref_lse[2])
    torch.testing.assert_close(lse[lens > 0], ref_lse[lens > 0], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_bulk_pipeline_serves_large_plain_launches_in_one_wave(ext):
    # "auto": large launches only (the thresholds of flash_decode.h), never a decode step's (early cache reads),
    # one block per SM at batch 1; any mode name but the three is refused
    if not ext.uses_bulk_pipeline(1, 32, 8, 64, 131072):
        pytest.skip("no tensor memory accelerator on this GPU (sm_90+)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert ext.default_num_splits(1, 32, 8, 64, 131072) == sms // 8
    assert ext.default_num_splits(1, 32, 8, 64, 16384) == sms // 8
    # from 1024 tiles of K and V over all blocks (batch 1: head 64 S = 16384, head 128 S = 8192), any split count
    assert ext.uses_bulk_pipeline(1, 32, 8, 64, 16384) and ext.uses_bulk_pipeline(1, 32, 8, 128, 8192)
    assert ext.uses_bulk_pipeline(16, 32, 8, 64, 2048) and ext.uses_bulk_pipeline(64, 32, 8, 128, 2048)
    assert not ext.uses_bulk_pipeline(1, 32, 8, 64, 16256) and not ext.uses_bulk_pipeline(1, 32, 8, 128, 8128)
    assert not ext.uses_bulk_pipeline(16, 32, 8, 64, 896)
    assert not ext.uses_bulk_pipeline(64, 32, 8, 128, 4096, early_cache_reads=True)
    with pytest.raises(ValueError, match="auto"):
        ext.set_bulk_pipeline("on")


@needs_cuda
def test_warp_groups_serve_grids_of_one_block_an_sm(ext):
    # "auto": plain launches whose grid runs at once with one block an SM, never a decode step's
    # (early cache reads)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for head_dim, rows in ((64, 4096), (64, 131072)):  # (the register pipeline, the bulk variant)
        assert ext.uses_warp_groups(1, 32, 8, head_dim, rows, sms // 8)
        assert not ext.uses_warp_groups(1, 32, 8, head_dim, rows, sms // 8 + 1)
    assert not ext.uses_warp_groups(1, 32, 8, 64, 2048, 1, early_cache_reads=True)
    # the register pipeline: not where a split has one tile (the second group would have none)
    assert ext.uses_warp_groups(1, 32, 8, 64, 1024, 4) and not ext.uses_warp_groups(1, 32, 8, 64, 1024, 8)
    assert not ext.uses_warp_groups(1, 32, 8, 128, 256, 4) and ext.uses_warp_groups(1, 32, 8, 128, 256, 2)
    if sms == 132 and ext.uses_cluster_merge(4):
        # an H100's GPCs hold 30 clusters of 4 blocks of one an SM, not 33: 32 such clusters would take two waves
        assert ext.uses_warp_groups(1, 32, 8, 64, 2048, 8) and not ext.uses_warp_groups(4, 32, 8, 64, 2048, 4)
    try:
        ext.set_warp_groups("off")
        assert not ext.uses_warp_groups(1, 32, 8, 64, 2048, 1)
        ext.set_warp_groups("always")
        assert ext.uses_warp_groups(64, 32, 8, 64, 2048, 4)
        assert not ext.uses_warp_groups(1, 32, 8, 64, 2048, 1, early_cache_reads=True)
    finally:
        ext.set_warp_groups("auto")
    with pytest.raises(ValueError, match="auto"):
        ext.set_warp_groups("on")


@needs_cuda
def test_kv_head_pairs_serve_one_split_launches_that_fill_the_gpu(ext):
    # "auto": the bulk variant at head 64 (two pair blocks an SM, either dtype) in one split, whose pair blocks fill
    # their waves of two an SM to at least 15/16 (an H100: batch 62-66 and 124-132 x 8 KV heads); an even number of KV
    # heads and one head group; "always": any bulk launch that can
    if not ext.uses_bulk_pipeline(1, 32, 8, 64, 131072):
        pytest.skip("no tensor memory accelerator on this GPU (sm_90+)")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the rule's numbers assume two pair blocks an SM (sm_90: 228 KB of shared memory, 64K registers)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    places = 2 * sms
    for batch in range(1, 3 * sms // 2):  # (4 pairs a sequence)
        blocks = 4 * batch
        fills = 16 * blocks >= 15 * places * -(-blocks // places)
        assert ext.uses_kv_head_pairs(batch, 32, 8, 64, 2048, 1) == fills, batch
    pair_batch = -(-15 * places // (16 * 4))  # the smallest batch of 8 KV heads whose pairs fill one wave
    assert ext.uses_kv_head_pairs(pair_batch, 32, 8, 64, 2048, 1, torch.bfloat16)
    assert ext.uses_kv_head_pairs(pair_batch, 32, 8, 64, 2048, 1, torch.float16)
    assert not ext.uses_kv_head_pairs(pair_batch, 32, 8, 64, 2048, 2)
    assert not ext.uses_kv_head_pairs(pair_batch, 32, 8, 128, 2048, 1)  # (one head's row is 256 bytes already)
    assert ext.uses_kv_head_pairs(2 * pair_batch, 12, 4, 64, 2048, 1)  # (4 KV heads, GQA 3: as many pairs)
    assert not ext.uses_kv_head_pairs(4 * pair_batch, 9, 3, 64, 2048, 1)  # (odd KV heads)
    assert not ext.uses_kv_head_pairs(pair_batch, 128, 8, 64, 2048, 1)  # (two head groups)
    try:
        ext.set_kv_head_pairs("off")
        assert not ext.uses_kv_head_pairs(pair_batch, 32, 8, 64, 2048, 1)
        ext.set_kv_head_pairs("always")
        ext.set_bulk_pipeline("always")
        for dtype in (torch.bfloat16, torch.float16):
            assert ext.uses_kv_head_pairs(1, 32, 8, 64, 300, 3, dtype)
            assert not ext.uses_kv_head_pairs(1, 24, 3, 64, 300, 3, dtype)
        ext.set_bulk_pipeline("off")
        assert not ext.uses_kv_head_pairs(1, 32, 8, 64, 300, 3)
    finally:
        ext.set_kv_head_pairs("auto")
        ext.set_bulk_pipeline("auto")
    with pytest.raises(ValueError, match="auto"):
        ext.set_kv_head_pairs("on")
    with pytest.raises(ValueError, match="not supported"):
        ext.uses_kv_head_pairs(pair_batch, 32, 8, 64, 2048, 1, torch.float32)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_heads,kv_heads", [(8, 8), (16, 8), (32, 8), (64, 8), (12, 2)])
def test_kv_head_pairs_against_the_reference(ext, dtype, q_heads, kv_heads):
    # Blocks of a KV-head pair forced (GQA 1, 2, 4, 8 and 6): both heads of every pair must get their own rows out of
    # the shared stages, and their own query heads' outputs, with one split or several (the workspace merge of both
    # heads), ragged lengths (an empty sequence, one row, lengths ending inside a tile), rows past the lengths poisoned.
    if not ext.uses_bulk_pipeline(1, 32, 8, 64, 131072):
        pytest.skip("no tensor memory accelerator on this GPU (sm_90+)")
    try:
        ext.set_bulk_pipeline("always")
        ext.set_kv_head_pairs("always")
        for trial, (batch, seq) in enumerate([(3, 77), (5, 1031), (2, 4099)]):
            assert ext.uses_kv_head_pairs(batch, q_heads, kv_heads, 64, seq, 1, dtype)
            q, k, v, gen = make_inputs(batch, seq, q_heads, kv_heads, 64, dtype, seed=100 + trial)
            lens = torch.randint(1, seq + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
            lens[0] = seq
            lens[1] = 0 if trial == 1 else 1
            for num_splits in (1, 3, 0):
                check_against_reference(ext, q, k.clone(), v.clone(), lens, num_splits=num_splits,
                                        poison_past_lengths=True)
    finally:
        ext.set_kv_head_pairs("auto")
        ext.set_bulk_pipeline("auto")


@needs_cuda
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8, 9, 17, 128])
def test_explicit_splits_including_empty_ones(ext, merge, num_splits):
    # Lengths much shorter than num_splits tiles leave splits with no rows; length 0 gives zeros.
    assert ext.uses_cluster_merge(num_splits) == (merge == "cluster" and 2 <= num_splits <= 8)
    q, k, v, _ = make_inputs(4, 3000, 32, 8, 64, torch.bfloat16, seed=num_splits)
    lens = torch.tensor([1, 63, 0, 3000], dtype=torch.int32, device="cuda")
    out = check_against_reference(ext, q, k, v, lens, num_splits=num_splits)
    assert torch.count_nonzero(out[2]) == 0


@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 128])
def test_caches_of_no_row_and_of_one_row(ext, merge, head_dim):
    # A plain launch reads its first tile before the length, rows clamped to the cache's last one. With one row, every
    # warp group and split but the first has no row of it and reads that row only; a cache without rows holds only
    # empty sequences (every length clamps to 0), answered without a launch: zeros and lse -inf.
    for splits in (0, 1, 3):
        q, k, v, _ = make_inputs(3, 1, 32, 8, head_dim, torch.bfloat16, seed=head_dim + splits)
        check_against_reference(ext, q, k, v, torch.tensor([1, 0, 1], dtype=torch.int32, device="cuda"),
                                num_splits=splits, poison_past_lengths=True)
    empty_k, empty_v = k[:, :0], v[:, :0]
    for splits in (0, 3):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device="cuda")
        ext.flash_decode(q, empty_k, empty_v, torch.tensor([0, 5, 0], dtype=torch.int32, device="cuda"), 0.125,
                         num_splits=splits, out=out, lse=lse)
        assert torch.count_nonzero(out) == 0
        assert torch.equal(lse, torch.full_like(lse, float("-inf")))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_narrow_tiles_against_the_reference(ext, merge, dtype, head_dim):
    # Short launches in tiles of 8 rows a warp (mma m16n8k8 for P V): one split, or up to 8 merged in a cluster; odd and
    # ragged lengths, rows past them poisoned, GQA ratios 4, 3 (SmolLM2) and 16 (two head groups); the same launches
    # with narrow tiles off against the reference too.
    cases = [(1, 1, 32, 8), (1, 31, 32, 8), (1, 32, 32, 8), (1, 33, 32, 8), (1, 200, 32, 8), (1, 256, 32, 8),
             (2, 255, 32, 8), (3, 97, 9, 3), (1, 129, 32, 2)]
    used = 0
    for trial, (batch, seq, q_heads, kv_heads) in enumerate(cases):
        q, k, v, gen = make_inputs(batch, seq, q_heads, kv_heads, head_dim, dtype, seed=100 + trial)
        lens = torch.randint(1, seq + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
        lens[0] = seq
        for splits in (0, 8):
            narrow = ext.uses_narrow_tiles(batch, q_heads, kv_heads, head_dim, seq, splits or
                                           ext.default_num_splits(batch, q_heads, kv_heads, head_dim, seq))
            used += narrow
            try:
                for enabled in (True, False):
                    ext.set_narrow_tiles(enabled)
                    check_against_reference(ext, q, k.clone(), v.clone(), lens, num_splits=splits,
                                            poison_past_lengths=True)
            finally:
                ext.set_narrow_tiles(True)
    assert used >= (len(cases) if merge == "cluster" else 2)  # (one split: S <= 32)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_short_kernel_against_the_reference(ext, merge, dtype):
    # The short-launch kernel (head 128, narrow launches: a warp pair per 8 rows, each half of head_dim): one split or 2
    # to 8 merged in a cluster; odd, ragged and empty lengths, rows past them poisoned, GQA 1, 3, 4, 8 and 16 (two head
    # groups), batches of 1-3; and the same launches in the general kernel's narrow instance (switched off).
    cases = [(1, 1, 32, 8, (0, 1)), (1, 32, 32, 8, (0, 1)), (1, 33, 32, 8, (0, 2, 8)), (1, 100, 32, 8, (0, 4, 7)),
             (1, 256, 32, 8, (0, 8)), (2, 255, 24, 8, (0, 8)), (3, 97, 9, 3, (0, 4)), (1, 200, 64, 8, (0, 8)),
             (2, 129, 32, 2, (0, 5)), (1, 64, 8, 8, (0, 2))]
    served = 0
    for trial, (batch, seq, q_heads, kv_heads, split_counts) in enumerate(cases):
        q, k, v, gen = make_inputs(batch, seq, q_heads, kv_heads, 128, dtype, seed=300 + trial)
        lens = torch.randint(1, seq + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
        lens[0] = seq
        if batch == 3:
            lens[1] = 0  # an empty sequence: zeros, lse -inf
        for splits in split_counts:
            served += ext.uses_narrow_tiles(batch, q_heads, kv_heads, 128, seq, splits or
                                            ext.default_num_splits(batch, q_heads, kv_heads, 128, seq))
            try:
                for enabled in (True, False):
                    ext.set_short_kernel(enabled)
                    out = check_against_reference(ext, q, k.clone(), v.clone(), lens, num_splits=splits,
                                                  poison_past_lengths=True)
                    assert torch.count_nonzero(out[lens == 0]) == 0
            finally:
                ext.set_short_kernel(True)
    assert served >= (17 if merge == "cluster" else 4)  # (19 on 128+ SMs; no cluster: one split, S <= 32)


@needs_cuda
def test_narrow_tiles_serve_short_plain_launches(ext):
    # every split at most one 32-row tile, one block or a cluster merge, four warps; never a decode step's, never with
    # two warp groups forced, never when switched off
    assert ext.uses_narrow_tiles(1, 32, 8, 64, 32, 1) and ext.uses_narrow_tiles(3, 32, 8, 128, 20, 1)
    assert not ext.uses_narrow_tiles(1, 32, 8, 64, 33, 1)
    assert not ext.uses_narrow_tiles(1, 32, 8, 64, 32, 1, early_cache_reads=True)
    if ext.uses_cluster_merge(8):
        assert ext.uses_narrow_tiles(1, 32, 8, 64, 256, 8) and ext.uses_narrow_tiles(1, 32, 8, 128, 100, 4)
        assert not ext.uses_narrow_tiles(1, 32, 8, 64, 257, 8) and not ext.uses_narrow_tiles(1, 32, 8, 64, 512, 16)
    try:
        ext.set_warp_groups("always")
        assert not ext.uses_narrow_tiles(1, 32, 8, 64, 32, 1)
        ext.set_warp_groups("auto")
        ext.set_narrow_tiles(False)
        assert not ext.uses_narrow_tiles(1, 32, 8, 64, 32, 1)
    finally:
        ext.set_warp_groups("auto")
        ext.set_narrow_tiles(True)


@needs_cuda
def test_strided_views_of_a_larger_cache(ext):
    # The model passes a batch slice of its [max_batch, max_seq, kv_heads, head_dim] cache and a q that
    # is a view of the fused QKV projection.
    max_batch, seq, q_heads, kv_heads, d = 6, 700, 32, 8, 128
    gen = kernel_generator()
    full_k = torch.randn(max_batch, seq, kv_heads, d, generator=gen, device="cuda").to(torch.bfloat16)
    full_v = torch.randn(max_batch, seq, kv_heads, d, generator=gen, device="cuda").to(torch.bfloat16)
    qkv = torch.randn(3, (q_heads + 2 * kv_heads) * d, generator=gen, device="cuda").to(torch.bfloat16)
    q = qkv[:, : q_heads * d].view(3, q_heads, d)
    lens = torch.tensor([700, 5, 321], dtype=torch.int32, device="cuda")
    check_against_reference(ext, q, full_k[:3], full_v[:3], lens)


@needs_cuda
def test_deterministic_and_race_free(ext, merge):
    q, k, v, _ = make_inputs(2, 50000, 32, 8, 64, torch.bfloat16, seed=7)
    lens = torch.tensor([50000, 31337], dtype=torch.int32, device="cuda")
    for splits in (0, 8):  # automatic (17 here: a global merge), and one a cluster can merge
        first = ext.flash_decode(q, k, v, lens, 0.125, num_splits=splits)
        for _ in range(20):
            assert torch.equal(ext.flash_decode(q, k, v, lens, 0.125, num_splits=splits), first)


@needs_cuda
def test_cuda_graph_replay_follows_device_lengths(ext, merge):
    # One capture serves every decode step: the kernel reads the lengths from the device.
    q, k, v, _ = make_inputs(2, 4096, 32, 8, 64, torch.bfloat16, seed=3)
    lens = torch.tensor([10, 20], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    splits = 6  # within a cluster's reach
    ext.flash_decode(q, k, v, lens, 0.125, num_splits=splits, out=out)  # warm-up outside capture (workspace, counters)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ext.flash_decode(q, k, v, lens, 0.125, num_splits=splits, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    for new_lens in ([1, 4096], [4000, 77], [2048, 2049]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_naive(q.float(), k.float(), v.float(), lens, 0.125)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


@needs_cuda
def test_default_num_splits_fills_the_gpu(ext):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ext.set_bulk_pipeline("off")  # (the bulk variant's rule: test_bulk_pipeline_serves_large_plain_launches_in_one_wave)
    try:
        long_single = ext.default_num_splits(1, 32, 8, 64, 131072)
    finally:
        ext.set_bulk_pipeline("auto")
    assert 8 * long_single >= sms, "batch 1 long context must cover every SM"
    try:
        ext.set_narrow_tiles(False)
        assert ext.default_num_splits(1, 32, 8, 64, 64) == 1  # one tile: nothing to split
        assert ext.default_num_splits(1, 32, 8, 64, 256) == 1  # two tiles: cheaper than a merge
    finally:
        ext.set_narrow_tiles(True)
    # short plain launches of one wave where the standard tile gives one split of two tiles: a split a narrow tile
    # (32 rows), merged in a cluster
    assert ext.default_num_splits(1, 32, 8, 64, 32) == 1
    if ext.uses_cluster_merge(2):
        assert [ext.default_num_splits(1, 32, 8, 64, rows) for rows in (33, 128, 129, 200, 256)] == [1, 1, 5, 7, 8]
        # (head 128 S = 256: the short-launch kernel's 8 splits where 64 blocks are at most half the SMs, else 4)
        assert [ext.default_num_splits(1, 32, 8, 128, rows) for rows in (64, 65, 128, 256)] == [
            1, 3, 4, 8 if 128 <= sms else 4]
        try:
            ext.set_short_kernel(False)
            assert ext.default_num_splits(1, 32, 8, 128, 256) == 4
        finally:
            ext.set_short_kernel(True)
        assert ext.default_num_splits(2, 32, 8, 64, 256) == (8 if sms >= 128 else 1)  # (one wave: 128 blocks)
        assert ext.default_num_splits(4, 32, 8, 64, 256) == 1
        assert ext.default_num_splits(1, 32, 8, 64, 256, early_cache_reads=True) == 1  # (not in a decode step)
    assert ext.default_num_splits(1, 32, 8, 64, 1024) > 1
    assert ext.default_num_splits(16, 32, 8, 64, 2048) == 1  # a block for every other SM is enough
    # ... but inside a decode step two splits give twice the tiles read before the programmatic-launch wait
    assert ext.default_num_splits(16, 32, 8, 64, 2048, early_cache_reads=True) == (2 if 128 < sms <= 256 else 1)
    assert ext.default_num_splits(256, 32, 8, 64, 4096) == 1  # the batch alone fills the GPU
    if 8 * 33 <= 2 * sms:
        def decode_splits(head_dim, rows):
            return ext.default_num_splits(1, 32, 8, head_dim, rows, early_cache_reads=True)
        if ext.uses_cluster_merge(2):
            # decode steps with cluster merges: a split per tile up to a 12-block cluster, at most three tiles a split
            assert [decode_splits(64, rows) for rows in (384, 1024, 2048, 2176, 4096)] == [3, 8, 12, 12, 12]
            assert decode_splits(128, 640) == 10
        else:
            # else splits of <= 2 tiles, read before the wait, merged through the workspace
            assert [decode_splits(64, rows) for rows in (384, 1024, 2048, 2176, 4096)] == [2, 4, 8, 9, 16]
            assert decode_splits(128, 640) == 5
        # beyond three tiles a split: splits of two tiles, merged through the workspace, while they fit two an SM
        assert decode_splits(64, 8192) == 32
    if ext.uses_cluster_merge(2) and 128 <= sms < 256:
        # plain launches at batch 1: up to 8 splits merged in a cluster while a split has at most 4 tiles, else a wave
        assert [ext.default_num_splits(1, 32, 8, 64, rows) for rows in (512, 2048, 4096, 8192)] == [4, 8, 8, sms // 8]
        assert [ext.default_num_splits(1, 32, 8, 128, rows) for rows in (1024, 2048, 4096)] == [8, 8, sms // 8]
    if ext.uses_cluster_merge(2):  # non-portable cluster sizes in decode steps only, up to 12
        assert ext.uses_cluster_merge(12, early_cache_reads=True) and not ext.uses_cluster_merge(12)
        assert not ext.uses_cluster_merge(16, early_cache_reads=True)


@needs_cuda
def test_bad_inputs_give_clear_errors(ext):
    q, k, v, _ = make_inputs(2, 16, 8, 2, 64, torch.bfloat16, seed=0)
    lens = torch.tensor([16, 16], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        q96 = torch.randn(2, 8, 96, device="cuda", dtype=torch.bfloat16)
        ext.flash_decode(q96, q96.new_zeros(2, 16, 2, 96), q96.new_zeros(2, 16, 2, 96), lens, 0.1)
    with pytest.raises(ValueError, match="use bfloat16 or float16"):
        ext.flash_decode(q.float(), k.float(), v.float(), lens, 0.1)
    with pytest.raises(ValueError, match="must all be CUDA tensors"):
        ext.flash_decode(q.cpu(), k, v, lens, 0.1)
    with pytest.raises(ValueError, match="cache_seqlens must be a 1-D int32"):
        ext.flash_decode(q, k, v, lens.long(), 0.1)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ext.flash_decode(q[:, :7], k, v, lens, 0.1)
    with pytest.raises(ValueError, match="contiguous in its last"):
        ext.flash_decode(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, lens, 0.1)
    with pytest.raises(ValueError, match="batch mismatch"):
        ext.flash_decode(q, k[:1], v[:1], lens, 0.1)
    # out's rows: 16-byte aligned, like q's (the kernel writes them in 4- and 8-byte pieces)
    with pytest.raises(ValueError, match="out must start on a 16-byte boundary"):
        ext.flash_decode(q, k, v, lens, 0.1, out=torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q))
    with pytest.raises(ValueError, match="out stride 65 of dimension 1"):
        ext.flash_decode(q, k, v, lens, 0.1, out=torch.empty(2, 8, 65, device="cuda", dtype=q.dtype)[..., :64])
    # rows 4 GiB or more apart (one row of capacity: the view needs no such storage)
    far = torch.zeros(2, 1, 2, 64, device="cuda", dtype=q.dtype).as_strided((2, 1, 2, 64), (128, 1 << 31, 64, 1))
    with pytest.raises(ValueError, match="row strides below 4 GiB"):
        ext.flash_decode(q, far, far, torch.ones(2, dtype=torch.int32, device="cuda"), 0.1)


# ------------------------------------------------------------------------------------------------
# The benchmarks' K/V read bound (csrc/kv_read.cu): a checksum of exactly the bytes it must read
# ------------------------------------------------------------------------------------------------

def xor_of_words(t):
    """XOR of every 32-bit word of t (the reference of kv_read's checksum)."""
    import numpy as np
    words = t.contiguous().view(torch.int32).cpu().numpy().view(np.uint32)
    return int(np.bitwise_xor.reduce(words.ravel())) if words.size else 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,seq,kv_heads,head_dim,rows", [
    (1, 256, 8, 64, 256), (3, 1000, 3, 64, 777), (5, 4097, 8, 128, 4097), (2, 65536, 8, 64, 65535),
    (64, 2048, 8, 128, 1), (4, 300, 2, 64, 0), (1, 131072, 1, 64, 131071)])
def test_kv_read_reads_exactly_the_valid_rows(ext, dtype, batch, seq, kv_heads, head_dim, rows):
    # Fresh random bits (any pattern, NaN included) in a cache with spare positions past `seq` and rows past `rows`
    # that must not be read: either would change the checksum.
    gen = kernel_generator(batch * seq + rows)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shape = (batch, seq + 5, kv_heads, head_dim * itemsize // 4)  # in 32-bit words
    k_full, v_full = (torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device="cuda", dtype=torch.int32)
                      .view(dtype) for _ in range(2))
    k, v = k_full[:, :seq], v_full[:, :seq]  # sequence stride (seq + 5) rows: a view of a larger cache
    words = ext.kv_read_blocks(k, v, rows)
    poison = (torch.arange(words, device="cuda", dtype=torch.int64) * 0x9E3779B1 + 0x5A5A5A5B).to(torch.int32)
    block_xor = poison.clone()  # distinct values: a slot left unwritten would show in the XOR
    ext.kv_read(k, v, rows, block_xor=block_xor)
    torch.cuda.synchronize()
    expected = xor_of_words(k[:, :rows]) ^ xor_of_words(v[:, :rows])
    assert xor_of_words(block_xor) == expected, f"KERNEL_TEST_SEED={KERNEL_TEST_SEED}"
    assert torch.equal(ext.kv_read(k, v, rows), block_xor)  # its own output tensor: the same blocks, the same words


@needs_cuda
def test_kv_read_bad_inputs_give_clear_errors(ext):
    k = torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rows 65 is outside"):
        ext.kv_read(k, k, 65)
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        ext.kv_read(k.cpu(), k.cpu(), 1)
    with pytest.raises(ValueError, match="each sequence of the caches must be contiguous"):
        ext.kv_read(k[:, :, :4], k[:, :, :4], 1)
    with pytest.raises(ValueError, match="elements on the caches' device"):
        ext.kv_read(k, k, 1, block_xor=torch.empty(1, device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match="batch 0 is outside"):
        ext.kv_read(k[:0], k[:0], 1)
