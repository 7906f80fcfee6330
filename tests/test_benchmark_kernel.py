"""CPU tests of benchmark_kernel.py: runs the script as the user does (subprocess) on tiny sizes."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmark_kernel.py")
TINY = ["--device", "cpu", "--batch_size", "2", "--seq_n", "48", "--q_num_heads", "4",
        "--kv_num_heads", "2", "--iters", "3", "--warmup", "1"]


def run(*args, check_rc=0):
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def field(text, name):
    """The number after 'name:' in the printout."""
    match = re.search(rf"^{re.escape(name)}: ([-+0-9.e]+)", text, re.M)
    assert match, f"no '{name}:' line in:\n{text}"
    return float(match.group(1))


def test_pytorch_kernel_on_cpu():
    out = run(*TINY, "--use_pytorch_kernel", "--head_size", "64", "--verbose").stdout
    assert "implementation: PyTorch split-KV + LSE combine" in out
    assert field(out, "time") > 0
    assert field(out, "bandwidth") > 0
    assert field(out, "copy bandwidth") > 0
    assert field(out, "timing floor (1-element kernel, same method)") > 0
    # K+V for 2 x 48 positions x 2 kv heads x 64 x bf16, plus q and out (2 x 4 x 64 each)
    expected_mb = (2 * 2 * 48 * 2 * 64 * 2 + 2 * 2 * 4 * 64 * 2) / 1e6
    assert field(out, "bytes moved") == pytest.approx(expected_mb, abs=1e-3)
    assert re.search(r"rel error vs float32 reference: [0-9.e+-]+ OK", out), out


def test_compare_json_ragged_fp16(tmp_path):
    path = tmp_path / "r.json"
    out = run(*TINY, "--compare", "--ragged", "--dtype", "fp16", "--num_splits", "2",
              "--json", str(path)).stdout
    assert "| impl" in out and "| status" in out
    data = json.loads(path.read_text())
    by_impl = {r["impl"]: r for r in data["results"]}
    assert by_impl["pytorch"]["status"] == "OK" and by_impl["pytorch"]["rel_err"] < 1e-2
    assert by_impl["naive"]["status"] == "OK"
    assert by_impl["custom"]["status"] == "unsupported"  # no CUDA device here
    assert by_impl["kv_read"]["status"] == "unsupported"  # (a CUDA kernel, and it reads no ragged batches)
    assert by_impl["sdpa_flash"]["status"] == "skipped"  # SDPA ignores cache_seqlens
    assert by_impl["pytorch"]["sum_seqlens"] <= 2 * 48
    assert data["meta"]["copy_gbps"] > 0 and data["meta"]["timing_floor_us"] > 0


def test_sweep_writes_markdown_and_json(tmp_path):
    run(*TINY, "--sweep", "--sweep_batches", "1,2", "--sweep_seq", "16,32",
        "--impls", "pytorch,sdpa_flash,flash_attn", "--out_dir", str(tmp_path), "--json")
    md = (tmp_path / "kernel_sweep_h64_b2.md").read_text()
    assert "| S | pytorch | sdpa_flash | flash_attn |" in md
    assert re.search(r"^\| 32 \| [0-9.]+ \([0-9.]+\) \|", md, re.M), md
    data = json.loads((tmp_path / "kernel_bench_sweep_h64.json").read_text())
    assert len(data["results"]) == 2 * 2 * 3
    assert (tmp_path / "kernel_sweep_h64_b1.md").exists()


def test_compare_in_rounds(tmp_path):
    # every implementation timed in each of three rounds (orders alternating): the record's time is the median of the
    # rounds' medians, its min and p90 over all 3 x 3 launches
    path = tmp_path / "r.json"
    out = run(*TINY, "--compare", "--rounds", "3", "--impls", "pytorch,naive,custom", "--json", str(path)).stdout
    assert "median of the medians of 3 rounds of 3" in out
    data = json.loads(path.read_text())
    assert data["meta"]["rounds"] == 3
    by_impl = {r["impl"]: r for r in data["results"]}
    for name in ("pytorch", "naive"):
        rec = by_impl[name]
        assert rec["status"] == "OK" and rec["rel_err"] < 1e-2
        assert 0 < rec["min_us"] <= rec["time_us"] <= rec["p90_us"]
    assert by_impl["custom"]["status"] == "unsupported" and by_impl["custom"]["time_us"] is None


def test_impls_alone_picks_the_one_implementation_to_run():
    # (what --use_ncu profiles too: `--impls sdpa_cudnn --use_ncu` is cuDNN's kernel, not the custom one)
    out = run(*TINY, "--impls", "naive", "--head_size", "64").stdout
    assert "implementation: PyTorch masked softmax" in out
    assert re.search(r"rel error vs float32 reference: [0-9.e+-]+ OK", out), out


@pytest.mark.parametrize("args, message", [
    (["--head_size", "96"], "head sizes 64 and 128"),
    (["--impls", "pytorch,naive"], "name one implementation"),
    (["--impls", "naive", "--use_pytorch_kernel"], "give one of them"),
    (["--q_num_heads", "6", "--kv_num_heads", "4", "--use_pytorch_kernel"], "must be a multiple"),
    ([], "--use_pytorch_kernel"),  # custom kernel asked for on the CPU
    (["--use_pytorch_kernel", "--dirty_flush", "--dont_flush_gpu_cache"], "give one"),
    (["--use_pytorch_kernel", "--rounds", "3"], "--rounds alternates"),
    (["--compare", "--rounds", "0"], "--rounds must be positive"),
])
def test_bad_input_errors(args, message):
    proc = run("--device", "cpu", "--seq_n", "16", *args, check_rc=None)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_shows_ncu_command():
    out = run("--help").stdout
    assert 'ncu --clock-control none --nvtx --nvtx-include "decode_attention/"' in out
    for flag in ("--use_ncu", "--dont_flush_gpu_cache", "--dirty_flush", "--use_pytorch_kernel", "--compare",
                 "--sweep"):
        assert flag in out


def test_timer_alternating_medians_reverses_every_other_round():
    sys.path.insert(0, REPO)
    import benchmark_kernel

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timer = benchmark_kernel.Timer("cpu", iters=2, warmup=0, flush=False)
    timer.alternating_medians(fns, rounds=3)
    assert calls == ["a", "a", "b", "b", "c", "c", "c", "c", "b", "b", "a", "a", "a", "a", "b", "b", "c", "c"]
    # the median of the rounds' medians: scripted per-launch times, three rounds of three launches
    scripted = {"a": [[1, 9, 2], [5, 5, 5], [0, 3, 100]], "b": [[7, 7, 7], [1, 2, 3], [9, 8, 10]]}
    rounds_seen = {"a": 0, "b": 0}

    def time_us(fn):
        name = fn()
        rounds_seen[name] += 1
        return scripted[name][rounds_seen[name] - 1]

    timer.time_us = time_us
    medians = timer.alternating_medians({"a": lambda: "a", "b": lambda: "b"}, rounds=3)
    assert medians == {"a": 3, "b": 7}  # a: medians 2, 5, 3 -> 3; b: 7, 2, 9 -> 7


def test_kernel_breakdown_probe_edits_still_apply(tmp_path):
    """docs/probes/kernel_breakdown.py edits copies of csrc/ at fixed lines: each must still be there once, the names
    its inserted code uses must still exist in the kernel, and the copy must hold the rest of csrc/ unchanged."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_breakdown",
                                                  os.path.join(REPO, "docs", "probes", "kernel_breakdown.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    csrc = os.path.join(REPO, "csrc")
    with open(os.path.join(csrc, probe.KERNEL_FILE)) as f:
        original = f.read()
    assert set(probe.ABLATIONS) == {"no_split_merge", "no_epilogue"}
    # the kernel's names the insertions use (a renamed one would break only the GPU build)
    for name in ("kBulk", "kHeadPairs", "kOutTiles", "kAccParts", "acc[n][j]", "float m = ", "l = 0.f",
                 "p.partial_out", "active_splits"):
        assert name in original, name
    for name, (anchor, insertion) in probe.ABLATIONS.items():
        assert original.count(anchor) == 1, name
        tree = probe.ablation_tree(name, root=str(tmp_path))
        copied = os.path.join(tree, "csrc")
        written = os.stat(os.path.join(copied, probe.KERNEL_FILE)).st_mtime_ns
        # reused while csrc/ is unchanged: the same tree, its files not written again (their builds stay valid)
        assert probe.ablation_tree(name, root=str(tmp_path)) == tree
        assert os.stat(os.path.join(copied, probe.KERNEL_FILE)).st_mtime_ns == written
        assert sorted(os.listdir(copied)) == sorted(os.listdir(csrc))
        for entry in os.listdir(csrc):
            with open(os.path.join(copied, entry)) as f, open(os.path.join(csrc, entry)) as g:
                expected = g.read()
                if entry == probe.KERNEL_FILE:
                    expected = expected.replace(anchor, anchor + insertion)
                assert f.read() == expected, entry
