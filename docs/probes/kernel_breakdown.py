#!/usr/bin/env python3
"""Where our kernel's time goes at a long batch-1 launch, against the read bound, and what a head-major cache changes.

Issue 3's item 1 (90% of the copy bandwidth at S >= 65536) fails at batch 1 head 64 S = 65536. split_merge_bound.py
times what any split-KV kernel must do there (read the bytes, merge the splits); this probe takes our kernel apart in
the same alternating rounds, beside kv_read (the benchmarks' read bound), the one-element floor and cuDNN:

  ours              the repo's kernel (its automatic choices: the bulk variant, two warp groups, 16 splits)
  no_split_merge    a copy of csrc/ whose bulk one-head instances return once their partial results are written: no
                    ticket, no merge of the splits
  no_epilogue       a copy whose bulk one-head instances return right after the loop: no warps' merge, no partial
                    results (a store behind a condition that never holds keeps the loop's results, and so its math)
  ours_hnd          the repo's kernel on a copy of K and V stored [B, Hkv, S, D] (head-major: each head's rows
                    contiguous, as gpt-fast's cache and FlashInfer's HND layout), passed as a [B, S, Hkv, D]-shaped
                    view; cudnn_hnd the same for cuDNN (which then reads [B, Hkv, S, D] contiguous)

The two copies' outputs are wrong by construction (not checked; the others are, against the float32 reference); only
their times count. Each copy is built as its own module under build/kernel_breakdown/ with load_custom_kernels.py's
sources and flags; an edit that no longer applies (the kernel changed) stops the probe with a message. Timing:
benchmark_kernel.py's Timer (L2 flushed by a read, a spin, CUDA events), every implementation in alternating rounds of
--iters launches, the median of the rounds' medians.

  python3 docs/probes/kernel_breakdown.py          # README, "Where the kernel's time goes there" (H200 results)
  python3 docs/probes/kernel_breakdown.py --shapes 1:64:131072,1:128:65536 --rounds 5
"""
import argparse
import dataclasses
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from split_merge_bound import flushed_timer, print_table, time_shape  # noqa: E402  (that probe's timing and table)

KERNEL_FILE = "flash_decode_kernel.cuh"
# name: (a line of KERNEL_FILE, the lines inserted after it); each line must occur exactly once
ABLATIONS = {
    "no_split_merge": (
        "    if (active_splits == 1) return;  // (the same for every block of the unit: one length)\n",
        "    if constexpr (kBulk && !kHeadPairs) return;  // (kernel_breakdown.py: no split merge)\n",
    ),
    "no_epilogue": (
        "        // ---- this warp's result per head into shared memory ----\n",
        "        if constexpr (kBulk && !kHeadPairs) {  // (kernel_breakdown.py: nothing after the loop)\n"
        "            float kept = m + l;\n"
        "#pragma unroll\n"
        "            for (int n = 0; n < kOutTiles; ++n)\n"
        "#pragma unroll\n"
        "                for (int j = 0; j < kAccParts; ++j) kept += acc[n][j];\n"
        "            if (kept == 1234.5f) p.partial_out[threadIdx.x] = kept;\n"
        "            return;\n"
        "        }\n",
    ),
}
BUILD_ROOT = os.path.join(REPO, "build", "kernel_breakdown")


def ablation_tree(name, root=BUILD_ROOT):
    """csrc/ with the ablation's edit, in root/<name>_<digest of the edited sources>, written once: its build is reused
    exactly while nothing changes (a copy keeps old file times, which ninja alone would trust); its path."""
    anchor, insertion = ABLATIONS[name]
    source_dir = os.path.join(REPO, "csrc")
    files = {}
    for entry in sorted(os.listdir(source_dir)):
        if os.path.isfile(os.path.join(source_dir, entry)):
            with open(os.path.join(source_dir, entry), "rb") as f:
                files[entry] = f.read()
    text = files[KERNEL_FILE].decode()
    if text.count(anchor) != 1:
        sys.exit(f"kernel_breakdown.py: the {name} edit no longer applies: csrc/{KERNEL_FILE} has the line\n  "
                 f"{anchor.strip()}\n{text.count(anchor)} times, not once; update ABLATIONS to the kernel")
    files[KERNEL_FILE] = text.replace(anchor, anchor + insertion).encode()
    digest = hashlib.sha1(b"".join(n.encode() + b"\0" + c + b"\0" for n, c in files.items())).hexdigest()[:12]
    tree = os.path.join(root, f"{name}_{digest}")
    csrc = os.path.join(tree, "csrc")
    if not os.path.isdir(csrc):
        # (this ablation's trees of older sources, with their builds: exactly <name>_ and 12 hex digits)
        for old in glob.glob(os.path.join(glob.escape(root), f"{glob.escape(name)}_{'[0-9a-f]' * 12}")):
            shutil.rmtree(old, ignore_errors=True)
        staging = csrc + ".partial"
        os.makedirs(staging)
        for entry, content in files.items():
            with open(os.path.join(staging, entry), "wb") as f:
                f.write(content)
        os.rename(staging, csrc)
    return tree


def build_ablation(tree):
    """The module built from an ablation_tree (or reused), as load_custom_kernels.py builds csrc/."""
    import load_custom_kernels
    build_dir = Path(tree, "build")
    build_dir.mkdir(exist_ok=True)
    module = load_custom_kernels.compile_extension(f"kernel_breakdown_{os.path.basename(tree)}", Path(tree, "csrc"),
                                                   build_dir)
    module.set_programmatic_launch(False)  # (as benchmark_kernel.py times ours)
    return module


def build_ablations():
    """Every ablation's module, the builds run side by side in child processes (each is the whole extension)."""
    trees = {name: ablation_tree(name) for name in ABLATIONS}
    children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--build-ablation", tree])
                for tree in trees.values()]
    if any([child.wait() != 0 for child in children]):  # (a list: every child waited for)
        sys.exit("kernel_breakdown.py: building an ablation failed (its compiler output is above)")
    return {name: build_ablation(tree) for name, tree in trees.items()}


def head_major(inp):
    """The same inputs with K and V stored [B, Hkv, S, D], seen as [B, S, Hkv, D]."""
    def view(cache):
        return cache.transpose(1, 2).contiguous().transpose(1, 2)
    return dataclasses.replace(inp, k_cache=view(inp.k_cache), v_cache=view(inp.v_cache))


def parse_shape(spec):
    """'1:64:65536' -> (1, 64, 65536)."""
    match = re.fullmatch(r"(\d+):(64|128):(\d+)", spec)
    if not match or int(match[1]) < 1 or int(match[3]) < 1:
        raise ValueError(f"bad shape {spec!r}: batch:head_dim:S with head_dim 64 or 128")
    return int(match[1]), int(match[2]), int(match[3])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1:64:65536",
                        help="batch:head_dim:S,... (32 query / 8 KV heads, bf16), shapes that take the bulk variant "
                             "in one head a block")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--build-ablation", help=argparse.SUPPRESS)  # (a tree, in a child of build_ablations)
    args = parser.parse_args(argv)
    if args.build_ablation:
        build_ablation(args.build_ablation)
        return
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1 or args.iters < 1:
        parser.error("--rounds and --iters must be positive")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("kernel_breakdown.py: needs a CUDA GPU of compute capability 9.0 or newer (the bulk variant)")
    import benchmark_kernel as bk
    ours = bk.load_custom_module()
    for batch, head_dim, seq in shapes:
        splits = ours.default_num_splits(batch, 32, 8, head_dim, seq)
        if not ours.uses_bulk_pipeline(batch, 32, 8, head_dim, seq) or ours.uses_kv_head_pairs(
                batch, 32, 8, head_dim, seq, splits):
            sys.exit(f"kernel_breakdown.py: {batch}:{head_dim}:{seq} does not run the bulk variant in one head a "
                     "block, which the ablations edit")
        if seq <= (splits - 1) * (128 if head_dim == 64 else 64):  # (the bulk variant's tile rows)
            sys.exit(f"kernel_breakdown.py: at {batch}:{head_dim}:{seq} some of the {splits} splits have no tile: in "
                     "no_epilogue those blocks would still take the merge's ticket, and nobody would reset it")
    ablations = build_ablations()
    timer = flushed_timer(args.iters)
    table = []
    for batch, head_dim, seq in shapes:
        spec = f"{batch}:{head_dim}:{seq}"
        inp = bk.build_inputs(batch, 32, 8, head_dim, seq, torch.bfloat16, "cuda", 0, False)
        hnd = head_major(inp)
        ref = bk.reference_output(inp)

        def kernel(module, x):
            out = torch.empty_like(x.q)
            return lambda: module.flash_decode(x.q, x.k_cache, x.v_cache, x.cache_seqlens, x.scale, num_splits=0,
                                               out=out)
        tiny = torch.zeros(1, device="cuda")
        block_xor = torch.empty(ours.kv_read_blocks(inp.k_cache, inp.v_cache, seq), dtype=torch.int32, device="cuda")
        fns = {"floor": lambda: tiny.add_(1),
               "kv_read": lambda: ours.kv_read(inp.k_cache, inp.v_cache, seq, block_xor=block_xor),
               "ours": kernel(ours, inp), "ours_hnd": kernel(ours, hnd)}
        fns.update({name: kernel(module, inp) for name, module in ablations.items()})
        fns["cudnn"], _ = bk.sdpa_factory("CUDNN_ATTENTION")(inp, None)
        fns["cudnn_hnd"], _ = bk.sdpa_factory("CUDNN_ATTENTION")(hnd, None)
        print(spec, flush=True)
        for name in ("ours", "ours_hnd", "cudnn", "cudnn_hnd"):  # (the ablations' outputs are wrong by construction)
            err, status = bk.check(fns[name](), ref)
            if status != "OK":
                sys.exit(f"kernel_breakdown.py: {name} at {spec}: relative error {err:.2e} ({status})")
        table.append(time_shape(timer, fns, args.rounds, spec, bk.bytes_moved(inp) / (0.9 * timer.copy_gbps * 1e3)))
        del inp, hnd, ref, fns
        torch.cuda.empty_cache()
    print_table(table)


if __name__ == "__main__":
    main()
