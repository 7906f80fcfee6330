"""Build the custom flash-decode CUDA kernel (csrc/) and load it as a Python module.

    python3 load_custom_kernels.py            # build (or reuse the build), print the time and a self-check
    python3 load_custom_kernels.py --verbose  # show the compiler's commands and register/spill report

The build goes through torch.utils.cpp_extension.load (ninja) into ./build/flash_decode_ext_<digest> for
the GPU that is present (its compute capability, sm_80 and newer); the digest covers csrc/, the flags, the
arch and the torch version, so the build is reused exactly as long as none of them changes. From Python:

    import load_custom_kernels
    ext = load_custom_kernels.load_kernels()      # the module, or None when there is no GPU / no nvcc
    out = ext.flash_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
CSRC_DIR = REPO_DIR / "csrc"
BUILD_ROOT = REPO_DIR / "build"
EXTENSION_NAME = "flash_decode_ext"
SOURCES = ["flash_decode.cu", "fused_ops.cu", "gemv.cu", "sampling.cu", "decode_layers.cu", "kv_read.cu",
           "flash_decode_binding.cpp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]

_module = None
_load_error: str | None = None


class KernelBuildError(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why and what to do."""


def _check_environment():
    """The GPU arch to build for, or a KernelBuildError naming what is missing."""
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        raise KernelBuildError(
            "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); the custom decode kernel "
            "needs an NVIDIA GPU with compute capability 8.0 or newer. On the CPU the model uses the PyTorch "
            "reference (llama3.decode_attention_reference).")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise KernelBuildError(
            f"GPU {torch.cuda.get_device_name()} has compute capability {major}.{minor}; the kernel needs 8.0 or "
            "newer (Ampere, Ada, Hopper).")
    nvcc = Path(cpp_extension.CUDA_HOME or "", "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        raise KernelBuildError(
            "nvcc (the CUDA compiler) was not found: install the CUDA toolkit matching your PyTorch build "
            f"(torch.version.cuda = {torch.version.cuda}) and set CUDA_HOME to it.")
    if shutil.which("ninja") is None:
        raise KernelBuildError("ninja is not installed: pip install ninja")
    return f"{major}.{minor}"


def _build_key(arch: str, cuda_flags: list[str]) -> str:
    """A digest of everything the binary depends on. Builds live in a folder named after it, so a changed
    source is never served by a stale build, whatever the file times say (copied trees keep old mtimes)."""
    import hashlib

    import torch

    digest = hashlib.sha1()
    for path in sorted(CSRC_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join([arch, torch.__version__, str(torch.version.cuda)] + cuda_flags).encode())
    return digest.hexdigest()[:12]


def build_dir(arch: str | None = None) -> Path:
    """Where the current sources are (or will be) built for this GPU (arch: its compute capability)."""
    arch = arch or _check_environment()
    return BUILD_ROOT / f"{EXTENSION_NAME}_{_build_key(arch, NVCC_FLAGS)}"


def compile_extension(name: str, csrc_dir: Path, directory: Path, arch: str | None = None, verbose: bool = False):
    """SOURCES from csrc_dir compiled (or reused) with the project's flags into `directory` for this GPU only, and
    imported as module `name` (`directory` must exist). build_kernels builds csrc/ this way;
    docs/probes/kernel_breakdown.py edited copies of it. arch: the GPU's compute capability (_check_environment's,
    asked for here if not given)."""
    from torch.utils import cpp_extension

    # Build for this GPU only: one architecture keeps the JIT build short and uses the chip's own code.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch or _check_environment()
    return cpp_extension.load(
        name=name,
        sources=[str(csrc_dir / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS + (["-Xptxas", "-v"] if verbose else []),
        extra_include_paths=[str(csrc_dir)],
        build_directory=str(directory),
        verbose=verbose,
    )


def build_kernels(verbose: bool = False):
    """Compile (or reuse) the extension and import it; raises KernelBuildError with the reason."""
    arch = _check_environment()
    directory = build_dir(arch)
    directory.mkdir(parents=True, exist_ok=True)
    try:  # (the module name carries the digest too)
        return compile_extension(directory.name, CSRC_DIR, directory, arch=arch, verbose=verbose)
    except Exception as e:  # the compiler's own output is in the exception text
        raise KernelBuildError(
            f"building the kernel in {directory} failed: {e}\n"
            "Run `python3 load_custom_kernels.py --verbose` to see the full compiler output.") from e


def load_kernels(verbose: bool = False):
    """The compiled module, or None when it cannot be built here (the reason is in `load_error()`).

    The result is cached: the build is checked once per process."""
    global _module, _load_error
    if _module is None and _load_error is None:
        try:
            _module = build_kernels(verbose=verbose)
        except KernelBuildError as e:
            _load_error = str(e)
            if verbose:
                print(f"custom kernel unavailable: {e}", file=sys.stderr)
    return _module


def load_error() -> str | None:
    """Why load_kernels() returned None (None if it did not)."""
    return _load_error


def self_check(ext, seed: int = 0) -> float:
    """Kernel vs the float32 PyTorch reference on fresh random data (ragged lengths, several splits).

    Returns the worst relative error ||out - ref|| / ||ref|| over the cases."""
    import torch
    from llama3 import decode_attention_naive

    gen = torch.Generator(device="cuda").manual_seed(seed)
    worst = 0.0
    for head_dim, q_heads, kv_heads, dtype in [(64, 32, 8, torch.bfloat16), (128, 24, 8, torch.float16)]:
        batch, seq = 3, 1000
        q = torch.randn(batch, q_heads, head_dim, generator=gen, device="cuda").to(dtype)
        k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
        v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
        lens = torch.tensor([1, 517, seq], dtype=torch.int32, device="cuda")
        scale = head_dim ** -0.5
        ref = decode_attention_naive(q.float(), k.float(), v.float(), lens, scale)
        for num_splits in (0, 1, 7):
            out = torch.full_like(q, float("nan"))
            ext.flash_decode(q, k, v, lens, scale, num_splits=num_splits, out=out)
            torch.cuda.synchronize()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="print compiler commands and ptxas register report")
    parser.add_argument("--rebuild", action="store_true", help="delete the build folder first")
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        directory = build_dir()
        if args.rebuild and directory.exists():
            shutil.rmtree(directory)
        print(f"building {EXTENSION_NAME} from {CSRC_DIR} into {directory} ...", flush=True)
        ext = build_kernels(verbose=args.verbose)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    import torch

    print(f"built/loaded in {time.perf_counter() - start:.1f} s for {torch.cuda.get_device_name()} "
          f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    err = self_check(ext)
    status = "OK" if err < 1e-2 else "FAILED"
    print(f"self-check: flash_decode vs float32 reference, worst relative error {err:.2e} "
          f"(bf16/fp16, head 64/128, ragged lengths 1..1000, splits auto/1/7): {status}")
    sys.exit(0 if status == "OK" else 1)


if __name__ == "__main__":
    main()
