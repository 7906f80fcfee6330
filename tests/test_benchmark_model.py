"""CPU tests of benchmark_model.py: the script as the user runs it (subprocess) on a tiny model, plus its
transformers peer checked token for token in-process."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA3_ROPE, tiny_llama_config

import benchmark_model as bm
import llama3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmark_model.py")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A config.json path for --dummy_weights: GQA, head 64, untied lm_head, EOS id 2."""
    path = tmp_path_factory.mktemp("tiny_config") / "config.json"
    path.write_text(json.dumps(tiny_llama_config(8, 2, 64, LLAMA3_ROPE, False).to_dict()))
    return str(path)


def run(*args, check_rc=0):
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def tiny_args(config, *extra):
    return ["--model_name", config, "--dummy_weights", "--device", "cpu", "--dtype", "fp32", *extra]


def test_single_run_prints_the_original_format_and_json(tiny_config, tmp_path):
    path = tmp_path / "r.json"
    out = run(*tiny_args(tiny_config, "--max_gen_batch_size=2", "--max_gen_len=6", "--input_len=8",
                         "--json", str(path))).stdout
    expected_lines = [
        "Benchmarking custom llama3 model inference implementation:",
        "==================================",
        f"model name: {tiny_config}",
        "batch size: 2",
        "max output tokens: 6",
        "input tokens: 8",
        "max model sequence length: 14",
        "==================================",
        "using device: cpu",
        "compiling the model...",
        "model warmup...",
        "running inference...",
    ]
    lines = iter(out.splitlines())
    assert all(line in lines for line in expected_lines), out  # in order; extra lines may sit between
    assert out.startswith("\n".join(expected_lines[:9]) + "\n")
    match = re.search(r"^duration: ([0-9.e-]+) Seconds \| throughput: ([0-9.e+-]+) Toks/sec$", out, re.M)
    assert match, out
    duration, throughput = float(match.group(1)), float(match.group(2))
    assert throughput == pytest.approx(2 * 6 / duration)
    assert re.search(r"^peak memory consumption: \d+ MiB$", out, re.M), out

    data = json.loads(path.read_text())
    (rec,) = data["results"]
    assert rec["impl"] == "custom" and rec["status"] == "ok"
    assert (rec["batch"], rec["input_len"], rec["output_len"], rec["max_seq_len"]) == (2, 8, 6, 14)
    assert rec["tokens_per_s"] == pytest.approx(throughput)
    for field in ("duration_s", "compile_s", "warmup_s", "peak_mib", "roofline_tok_s", "pct_roofline",
                  "decode_roofline_tok_s", "bytes_per_decode_step"):
        assert rec[field] > 0, field
    meta = data["meta"]
    assert meta["torch"] == torch.__version__ and meta["copy_gbps"] > 0 and meta["matmul_tflops"] > 0
    assert meta["sampling_params"] == {"temperature": 0.6, "top_p": 0.9, "top_k": None}
    assert meta["command"][0] == "benchmark_model.py" and "--json" in meta["command"]
    assert meta["date"] and meta["device_name"]
    assert meta["custom_gemv"] is True and meta["programmatic_launch"] is True


def test_comparison_switches_are_recorded(tiny_config, tmp_path):
    path = tmp_path / "r.json"
    run(*tiny_args(tiny_config, "--max_gen_batch_size=1", "--max_gen_len=3", "--input_len=4", "--no_custom_gemv",
                   "--no_programmatic_launch", "--persistent_decode", "--json", str(path)))
    meta = json.loads(path.read_text())["meta"]
    assert meta["custom_gemv"] is False and meta["programmatic_launch"] is False
    assert meta["persistent_decode"] is True


def test_sweep_with_two_implementations(tiny_config, tmp_path):
    path = tmp_path / "s.json"
    out = run(*tiny_args(tiny_config, "--sweep", "--scenarios", "1,8,4;2,8,4", "--impls", "custom,hf",
                         "--temperature", "0", "--json", str(path))).stdout
    assert "[custom 2/2] batch 2, input 8, output 4:" in out and "[hf 1/2]" in out
    assert re.search(r"^\| impl +\| batch +\| input, output +\| tokens/s +\|", out, re.M), out
    rows = re.findall(r"^\| (custom|hf) +\| (\d) +\| 8, 4 +\| [0-9,]+ +\|", out, re.M)
    assert rows == [("custom", "1"), ("custom", "2"), ("hf", "1"), ("hf", "2")], out
    recs = json.loads(path.read_text())["results"]
    assert [(r["impl"], r["batch"], r["status"]) for r in recs] == [
        ("custom", 1, "ok"), ("custom", 2, "ok"), ("hf", 1, "ok"), ("hf", 2, "ok")]
    assert all(0 < r["pct_roofline"] for r in recs)


def test_vllm_missing_gives_a_clear_message_and_exit_code_3(tiny_config):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    proc = run(*tiny_args(tiny_config, "--use_vllm_impl"), check_rc=bm.VLLM_MISSING_EXIT)
    assert "vLLM is not installed: pip install vllm (it installs its own torch version)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model_name", "not-a-model", "--dummy_weights"], "unknown model 'not-a-model' for random weights"),
    (["--model_name", "./no/such/dir"], "unknown model './no/such/dir'"),
    (["--max_gen_len", "0"], "--max_gen_len must be >= 1"),
    (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    (["--scenarios", "1,128"], "expected 'batch,input,output;...'"),
    (["--use_hf_impl", "--use_vllm_impl"], "choose one of"),
])
def test_bad_input_is_refused_without_traceback(args, message):
    proc = run("--device", "cpu", *args, check_rc=None)
    assert proc.returncode in (1, 2), proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_profile_on_cpu_lists_categories(tiny_config):
    out = run(*tiny_args(tiny_config, "--profile", "--profile_steps", "4", "--max_gen_len", "8",
                         "--input_len", "8")).stdout
    assert "### Decode step profile: batch 1, context 8+, 4 steps" in out
    for row in ("GEMM/GEMV", "sampling", "norm", "elementwise/other", "launch gaps / idle", "wall time per step"):
        assert re.search(rf"^\| {re.escape(row)} +\| (-?[0-9.]+)? +\| -?[0-9.]+ +\|", out, re.M), row
    # the model's matmuls are GEMM/GEMV in the kernel table (which of mm / bmm / matmul rank in its top 30 varies with
    # the CPU's load: a tiny model's ops all take about the same time)
    assert re.search(r"^\| aten::(mm|bmm|matmul|addmm) +\| GEMM/GEMV +\|", out, re.M), out


def test_exposed_time_counts_only_what_extends_the_busy_time():
    # b starts inside a (programmatic launch) and ends 3 us after it; c starts after an idle gap; d lies
    # wholly inside c
    spans = [(0.0, 10.0, "a", 10.0), (2.0, 13.0, "b", 11.0), (20.0, 30.0, "c", 10.0), (21.0, 25.0, "d", 4.0),
             (5.0, 6.0, "a", 1.0)]
    times = bm.tally_kernel_spans(spans)
    assert times == {"a": [11.0, 2, 10.0], "b": [11.0, 1, 3.0], "c": [10.0, 1, 10.0], "d": [4.0, 1, 0.0]}
    assert bm.tally_kernel_spans(spans, overlapping=False)["b"] == [11.0, 1, 11.0]


@pytest.mark.parametrize("name, category", [
    ("void flash_decode_kernel<cutlass::bfloat16_t, 64>(Params)", "decode attention"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "GEMM/GEMV"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "GEMM/GEMV"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM/GEMV"),
    ("void add_rmsnorm_kernel<__nv_bfloat16>(...)", "norm"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>", "norm"),
    ("void rope_kv_write_kernel<__nv_bfloat16>(...)", "rope"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "sampling"),
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<...>", "sampling"),
    ("void sampling::(anonymous namespace)::sample_kernel<__nv_bfloat16>(__nv_bfloat16 const*, long*, int)", "sampling"),
    ("void sampling::(anonymous namespace)::sample_cluster_kernel<__nv_bfloat16>(__nv_bfloat16 const*, long*)",
     "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise/other"),
])
def test_kernel_categories(name, category):
    assert bm.kernel_category(name) == category


def test_prompts_avoid_eos_and_special_tokens():
    prompts = bm.random_prompts(8, 64, vocab_size=128256, eos_ids=(128001, 128009, 5), seed=1)
    flat = [t for p in prompts for t in p]
    assert len(prompts) == 8 and {len(p) for p in prompts} == {64}
    assert 5 not in flat and max(flat) < 128000 and min(flat) >= 0
    assert prompts == bm.random_prompts(8, 64, 128256, (128001, 128009, 5), seed=1)
    small = bm.random_prompts(4, 200, vocab_size=3, eos_ids=(1,), seed=0)
    assert {t for p in small for t in p} == {0, 2}


def test_roofline_of_llama_3_2_1b_at_batch_1():
    args = llama3.ModelArgs.from_hf_config(llama3.BUILTIN_CONFIGS["unsloth/llama-3.2-1b"])
    # 1,235,814,400 unique parameters (tied lm_head) in bf16, plus one embedding row read
    assert bm.weight_read_bytes(args, torch.bfloat16, 1) == 2 * (1_235_814_400 + 2048)
    roof, decode_roof, step_bytes = bm.roofline(args, torch.bfloat16, 1, 128, 128, copy_gbps=3000,
                                                matmul_tflops=780)
    kv = 16 * 2 * 8 * 64 * 2 * (128 + 64)  # layers x K,V x kv heads x head_dim x bytes x average length
    assert step_bytes == 2 * (1_235_814_400 + 2048) + kv
    assert decode_roof == pytest.approx(3e12 / step_bytes)
    # the shared README: about 1,210 tokens/s; end to end, the first token comes from the (fast) prefill
    assert 1200 < decode_roof < roof < 1225


@pytest.mark.parametrize("dummy_weights", [True, False])
def test_transformers_peer_gives_our_greedy_tokens(tiny_checkpoint, dummy_weights):
    directory, _ = tiny_checkpoint  # tied and untied heads, GQA and MHA, head sizes 64 and 128
    kwargs = dict(device="cpu", dtype=torch.float32, max_batch_size=2, max_seq_len=32)
    if dummy_weights:  # our random weights copied into transformers' unfused q/k/v and gate/up
        config_dict = json.loads((directory / "config.json").read_text())
        model = llama3.Transformer.from_config(config_dict, seed=3, **kwargs)
    else:  # transformers loads the same checkpoint itself
        config_dict = None
        model = llama3.Transformer.from_pretrained(directory, **kwargs)
    hf = bm.HFRunner(bm.hf_model_from_ours(model, config_dict))
    prompts = bm.random_prompts(2, 8, model.config.vocab_size, model.eos_token_ids, seed=0)
    greedy = bm.Sampling(temperature=0.0)
    ours = bm.generate_tokens(bm.CustomRunner(model), prompts, 16, greedy)
    assert bm.generate_tokens(hf, prompts, 16, greedy) == ours
    assert {len(t) for t in ours} == {16}


def test_out_of_memory_scenario_is_an_OOM_row_and_the_sweep_goes_on(tiny_config, tmp_path, monkeypatch, capsys):
    prepare = bm.CustomRunner.prepare

    def prepare_or_oom(self, batch, max_seq_len):
        if batch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        prepare(self, batch, max_seq_len)

    monkeypatch.setattr(bm.CustomRunner, "prepare", prepare_or_oom)
    path = tmp_path / "oom.json"
    bm.main(tiny_args(tiny_config, "--scenarios", "1,8,4;2,8,4;1,4,4", "--json", str(path)))
    out = capsys.readouterr().out
    assert re.search(r"^\| 2 +\| 8, 4 +\| OOM +\|", out, re.M), out
    recs = json.loads(path.read_text())["results"]
    assert [r["status"] for r in recs] == ["ok", "OOM", "ok"]
