#!/usr/bin/env python3
"""Benchmark end-to-end Llama 3 inference throughput: this repo's llama3.py, transformers or vLLM.

Examples:
  python3 benchmark_model.py --model_name "unsloth/Llama-3.2-1B" --max_gen_batch_size=1 --max_gen_len=128 --input_len=128
  python3 benchmark_model.py ... --dummy_weights            # random weights from the built-in config (no network)
  python3 benchmark_model.py ... --use_hf_impl              # transformers generate, static cache, same weights
  python3 benchmark_model.py ... --use_vllm_impl            # vLLM offline LLM.generate (pip install vllm)
  python3 benchmark_model.py --dummy_weights --sweep --impls custom,hf --json results/model_sweep.json
  python3 benchmark_model.py --dummy_weights --sweep --scenarios "1,128,128;16,2048,128"
  python3 benchmark_model.py --dummy_weights --profile      # where the GPU time of a decode step goes
  python3 benchmark_model.py --model_name tiny/config.json --dummy_weights --device cpu --dtype fp32

Method. Prompts are random token ids (seeded by --random_seed) drawn from [0, min(vocab, 128000)) minus
the EOS ids, identical for every implementation. Every implementation samples the same way (temperature
0.6, top-p 0.9, no top-k by default; --temperature 0 is greedy) and ignores EOS, so each sequence
produces exactly --max_gen_len tokens (checked). Per scenario: "compiling" is the first generate call
(our CUDA-graph capture of the decode step, transformers' auto torch.compile, vLLM's engine start), then
one full untimed warmup call, then one timed call:
  throughput = batch x output tokens / duration, duration = prefill + decode seconds of one generate
  call (torch.cuda.synchronize + time.perf_counter around it).
Peak memory: torch.cuda.max_memory_allocated over the timed call (peak stats reset just before it), so it
covers the weights, the KV cache, CUDA-graph pools and activations, not the CUDA context. On the CPU it is
the process's peak resident memory; for vLLM (another process) the card memory in use.

Roofline (printed with every result): the time if the prefill ran at the card's measured matmul rate and every
decode step only read its bytes at the measured copy bandwidth:
  prefill FLOPs   = 2 x (layer matmul params x B x input + lm_head params x B) + 2 x B x layers x q heads
                    x head_dim x input^2 (causal attention: QK^T and PV)
  bytes per step  = unique parameter bytes (lm_head once; an untied embedding table counts only its B rows)
                    + KV cache of the batch at the average length, B x layers x 2 x kv heads x head_dim
                    x dtype bytes x (input + output / 2)
  roofline tok/s  = B x output / (prefill FLOPs / matmul rate + (output - 1) x bytes per step / copy bandwidth)
"decode roofline" (JSON) is the decode step alone: B / (bytes per step / copy bandwidth). The copy
bandwidth is a 1 GiB device-to-device copy (bytes read + written, median of 10; about 3.0 TB/s on an
H100); the matmul rate a square matmul in --dtype (8192^3 on CUDA), median of 5.

Exit codes: 0 done, 1 error (bad model, out of memory, wrong token count), 2 bad arguments,
3 vLLM asked for but not installed.
"""

import argparse
import datetime
import gc
import importlib.util
import inspect
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import llama3

SWEEP_SCENARIOS = [(256, 128, 128), (64, 128, 2048), (16, 2048, 128), (16, 2048, 2048),
                   (1, 128, 128), (1, 128, 2048), (1, 2048, 128), (1, 2048, 2048)]
IMPL_TITLES = {"custom": "custom llama3", "hf": "transformers (Hugging Face)", "vllm": "vLLM"}
IMPL_NAMES = tuple(IMPL_TITLES)  # also the order a sweep runs them in
MAX_PROMPT_TOKEN = 128000  # Llama 3's special tokens start here
COMPILE_GEN_LEN = 4  # our first call only needs one decode step to capture its CUDA graph
VLLM_MISSING_EXIT = 3
VLLM_MISSING_MESSAGE = ("vLLM is not installed: pip install vllm (it installs its own torch version); "
                        "use a separate virtual environment for it, or benchmark --use_hf_impl instead")
BANNER = "=================================="


class BenchmarkError(Exception):
    """A user-facing error: printed as 'error: ...' without a traceback."""


class DoesNotFit(Exception):
    """The scenario does not fit in device memory (an out-of-memory error from any implementation)."""


@dataclass
class Sampling:
    temperature: float = 0.6
    top_p: float | None = 0.9
    top_k: int | None = None

    def describe(self):
        if self.temperature == 0:
            return "greedy (temperature 0), EOS ignored"
        top_k = self.top_k if self.top_k else "off"
        return f"temperature {self.temperature}, top-p {self.top_p}, top-k {top_k}, EOS ignored"


# ----------------------------------------------------------------------------------------------
# inputs, timing, memory


def random_prompts(batch, input_len, vocab_size, eos_ids, seed):
    """batch lists of input_len token ids, never an EOS id nor a special token (ids >= 128000)."""
    allowed = torch.ones(min(vocab_size, MAX_PROMPT_TOKEN), dtype=torch.bool)
    allowed[[t for t in eos_ids if 0 <= t < len(allowed)]] = False
    pool = allowed.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (batch, input_len), generator=generator)].tolist()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(seconds, result) of fn(), with the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def measure_ceilings(device, dtype):
    """(copy GB/s read + written, matmul TFLOP/s in dtype): the roofline's two rates, measured here."""
    from benchmark_kernel import Timer  # the kernel benchmark's copy-bandwidth method, reused

    timer = Timer(str(device), iters=10, warmup=1, flush=False)
    timer.measure_ceilings()
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    times_us = timer.time_us(lambda: torch.matmul(a, b), iters=5)
    del a, b
    free_memory(device)
    return timer.copy_gbps, 2 * n ** 3 / (statistics.median(times_us) * 1e6)


def process_peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------
# implementations: prepare(batch, max_seq_len), compile(...), generate(...) -> tokens, peak_memory()


class TorchRunner:
    """A model in this process: its peak is torch's allocator peak (CUDA) or the process's (CPU)."""

    model = None

    def peak_memory(self):
        device = self.model.device
        if device.type == "cuda":
            return (torch.cuda.max_memory_allocated(device) / 2 ** 20,
                    "torch.cuda.max_memory_allocated over the timed run: weights + KV cache + graphs + activations")
        return process_peak_rss_mib(), "CPU run: peak resident memory of the whole process"


class CustomRunner(TorchRunner):
    """This repo's llama3.Transformer.generate (CUDA-graph decode on CUDA when llama3 supports it)."""

    name = "custom"
    compile_what = "first generate call: CUDA graph capture of the decode step (and of short prefills), on CUDA"

    def __init__(self, model, use_cuda_graph=None):
        self.model = model
        self.extra = {}
        if "use_cuda_graph" in inspect.signature(model.generate).parameters:
            self.extra["use_cuda_graph"] = use_cuda_graph

    def prepare(self, batch, max_seq_len):
        if (self.model.max_batch_size, self.model.max_seq_len) != (batch, max_seq_len):
            self.model.setup_cache(batch, max_seq_len)

    def compile(self, prompts, gen_len, sampling, seed):
        self.generate(prompts, min(gen_len, COMPILE_GEN_LEN), sampling, seed)

    def generate(self, prompts, gen_len, sampling, seed):
        return self.model.generate(prompts, gen_len, temperature=sampling.temperature, top_p=sampling.top_p,
                                   top_k=sampling.top_k, ignore_eos=True, seed=seed, **self.extra)


class HFRunner(TorchRunner):
    """transformers' generate with a static KV cache (auto torch.compile of the decode step on CUDA)."""

    name = "hf"
    compile_what = "first generate call: transformers' torch.compile of the static-cache decode step, on CUDA"

    def __init__(self, hf_model):
        self.model = hf_model

    def prepare(self, batch, max_seq_len):
        # A fresh compile per scenario: dynamo's recompile limit would otherwise silently fall back to
        # eager after a few shapes, and transformers grows the static cache to the largest length seen.
        torch._dynamo.reset()
        if hasattr(self.model, "_previous_max_cache_length"):
            del self.model._previous_max_cache_length

    def compile(self, prompts, gen_len, sampling, seed):
        self.generate(prompts, gen_len, sampling, seed)  # the static cache length is part of the compiled shape

    def generate(self, prompts, gen_len, sampling, seed):
        input_ids = torch.tensor(prompts, device=self.model.device)
        kwargs = dict(do_sample=False)
        if sampling.temperature > 0:
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p or 1.0,
                          top_k=sampling.top_k or 0)
        torch.manual_seed(seed)
        # eos_token_id=None: no stopping and, unlike min_new_tokens, no masking of the EOS logits, so the
        # sampled distribution is the same as with ignore_eos in llama3 and vLLM.
        out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=gen_len,
                                  eos_token_id=None, pad_token_id=0, cache_implementation="static", **kwargs)
        return out[:, input_ids.shape[1]:].tolist()


class VLLMRunner:
    """vLLM's offline LLM.generate; one engine for the whole sweep, started by the first compile()."""

    name = "vllm"
    compile_what = "engine start, first scenario only: weights, torch.compile, CUDA graph capture"

    def __init__(self, model_dir, dtype_name, dummy_weights, max_num_seqs, max_model_len, seed):
        self.engine_args = dict(model=str(model_dir), dtype=DTYPE_NAMES[dtype_name], seed=seed,
                                max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                skip_tokenizer_init=True,  # prompts are token ids
                                enable_prefix_caching=False)  # the timed call repeats the warmup's prompts
        if dummy_weights:
            self.engine_args["load_format"] = "dummy"
        self.llm = None

    def prepare(self, batch, max_seq_len):
        pass

    def compile(self, prompts, gen_len, sampling, seed):
        if self.llm is None:
            from vllm import LLM
            self.llm = LLM(**self.engine_args)

    def generate(self, prompts, gen_len, sampling, seed):
        from vllm import SamplingParams
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p or 1.0,
                                top_k=sampling.top_k or -1, max_tokens=gen_len, ignore_eos=True)
        requests = [{"prompt_token_ids": p} for p in prompts]  # vllm.inputs.TokensPrompt is this TypedDict
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def peak_memory(self):
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2 ** 20, "card memory in use: vLLM's engine process reserves its share up front"


def generate_tokens(runner, prompts, gen_len, sampling, seed=0):
    """Tokens of one generate call; the tests compare implementations through this."""
    runner.prepare(len(prompts), len(prompts[0]) + gen_len)
    return runner.generate(prompts, gen_len, sampling, seed)


# ----------------------------------------------------------------------------------------------
# models


DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def model_config_dict(args):
    """The Hugging Face config.json dict of --model_name (built-in, config path or checkpoint)."""
    if args.dummy_weights:
        return llama3._read_config_for_random_init(args.model_name)  # llama3's own name/path rules
    return json.loads((llama3.resolve_checkpoint(args.model_name) / "config.json").read_text())


def load_our_model(args, batch, max_seq_len):
    kwargs = dict(device=args.device, dtype=llama3.resolve_dtype(args.dtype), max_batch_size=batch,
                  max_seq_len=max_seq_len)
    if args.dummy_weights:
        return llama3.Transformer.from_config(args.model_name, seed=args.random_seed, **kwargs)
    return llama3.Transformer.from_pretrained(args.model_name, **kwargs)


def hf_dtype_kwargs(dtype):
    import transformers
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def hf_model_from_ours(model, config_dict):
    """A transformers LlamaForCausalLM holding exactly our weights: real checkpoints are loaded by
    transformers from the same dir; random weights are copied back out of our fused q/k/v and gate/up
    tensors through the same name -> row-slice map the loader uses."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise BenchmarkError(f"--use_hf_impl needs transformers ({exc}): pip install transformers")
    dtype_kw = hf_dtype_kwargs(model.dtype)
    if model.checkpoint_dir is not None:
        hf = LlamaForCausalLM.from_pretrained(model.checkpoint_dir, **dtype_kw)
        return hf.to(model.device).eval()
    with torch.device(model.device):
        hf = LlamaForCausalLM._from_config(LlamaConfig(**config_dict), **dtype_kw).eval()
    targets = model._checkpoint_targets()
    hf_params = dict(hf.named_parameters())  # a tied lm_head is listed once, as model.embed_tokens.weight
    if set(hf_params) != set(targets):
        raise BenchmarkError(f"transformers' Llama parameters do not match llama3's map: only in transformers "
                             f"{sorted(set(hf_params) - set(targets))[:3]}, only in llama3 "
                             f"{sorted(set(targets) - set(hf_params))[:3]}")
    with torch.no_grad():
        for name, source in targets.items():
            hf_params[name].copy_(source)
    return hf


def weight_read_bytes(model_args, dtype, batch):
    """Bytes one decode step must read for the weights: unique parameters (a tied lm_head once), but an
    untied embedding table only for its batch rows."""
    with torch.device("meta"):
        model = llama3.Transformer(model_args)
    total = sum(p.numel() for p in model.parameters())
    if not model_args.tie_word_embeddings:
        total -= model.tok_embeddings.weight.numel()
    return (total + batch * model_args.dim) * torch.finfo(dtype).bits // 8


def kv_cache_bytes(model_args, dtype, batch, seq_len):
    """K and V of every layer for batch sequences of seq_len positions (may be fractional: an average)."""
    c = model_args
    return batch * c.n_layers * 2 * c.n_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8 * seq_len


def roofline(model_args, dtype, batch, input_len, output_len, copy_gbps, matmul_tflops):
    """(end-to-end roofline tok/s, decode-step roofline tok/s, bytes per decode step); see the docstring."""
    c = model_args
    q, kv, ff = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size
    layer_matmul_params = c.n_layers * (c.dim * (q + 2 * kv) + q * c.dim + 3 * c.dim * ff)
    prefill_flops = (2 * (layer_matmul_params * batch * input_len + c.vocab_size * c.dim * batch)
                     + 2 * batch * c.n_layers * q * input_len ** 2)
    step_bytes = weight_read_bytes(c, dtype, batch) + kv_cache_bytes(c, dtype, batch, input_len + output_len / 2)
    step_s = step_bytes / (copy_gbps * 1e9)
    seconds = prefill_flops / (matmul_tflops * 1e12) + (output_len - 1) * step_s
    return batch * output_len / seconds, batch / step_s, step_bytes


# ----------------------------------------------------------------------------------------------
# one scenario


def run_scenario(runner, scenario, args, vocab_size, eos_ids, log):
    """Compile, warm up and time one (batch, input, output) scenario; returns its record."""
    batch, input_len, output_len = scenario
    device = torch.device(args.device)
    sampling = sampling_from(args)
    prompts = random_prompts(batch, input_len, vocab_size, eos_ids, args.random_seed)
    rec = dict(impl=runner.name, batch=batch, input_len=input_len, output_len=output_len,
               max_seq_len=input_len + output_len, status="ok")
    out_of_memory = False
    try:
        runner.prepare(batch, input_len + output_len)
        log("compiling the model...")
        rec["compile_s"], _ = timed(device, lambda: runner.compile(prompts, output_len, sampling, args.random_seed))
        log(f"compile time: {rec['compile_s']:.2f} Seconds ({runner.compile_what})")
        log("model warmup...")
        rec["warmup_s"], _ = timed(device, lambda: runner.generate(prompts, output_len, sampling, args.random_seed))
        log("running inference...")
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        duration, tokens = timed(device, lambda: runner.generate(prompts, output_len, sampling, args.random_seed))
        rec["peak_mib"], rec["peak_memory_covers"] = runner.peak_memory()
    except Exception as exc:
        if not is_oom(exc):
            raise
        out_of_memory = True  # raised below, once the exception and the tensors its frames hold are gone
    if out_of_memory:
        free_memory(device)
        raise DoesNotFit(f"out of memory at batch {batch}, {input_len} input + {output_len} output tokens")
    counts = sorted({len(t) for t in tokens})
    if len(tokens) != batch or counts != [output_len]:
        raise BenchmarkError(f"{runner.name} returned {len(tokens)} sequences of {counts} tokens, expected "
                             f"{batch} of {output_len} (EOS must be ignored)")
    rec.update(duration_s=duration, tokens_per_s=batch * output_len / duration,
               ms_per_step=1e3 * duration / output_len)
    return rec


def add_roofline(rec, model_args, dtype, ceilings):
    if ceilings is None or rec["status"] != "ok":
        return
    roof, decode_roof, step_bytes = roofline(model_args, dtype, rec["batch"], rec["input_len"],
                                             rec["output_len"], *ceilings)
    rec.update(roofline_tok_s=roof, decode_roofline_tok_s=decode_roof, bytes_per_decode_step=step_bytes,
               pct_roofline=100 * rec["tokens_per_s"] / roof)


def sampling_from(args):
    return Sampling(args.temperature, args.top_p, args.top_k)


# ----------------------------------------------------------------------------------------------
# profile: where the time of one decode step goes


# First match wins; names are matched case-insensitively against CUDA kernel names (or aten op names on
# the CPU). Whatever matches nothing is "elementwise/other" (SiLU x up, residual adds, copies, casts).
PROFILE_CATEGORIES = [
    ("decode attention", r"flash_decode|decode_attention|splitkv"),
    ("GEMM/GEMV", r"gemm|gemv|cutlass|xmma|nvjet|matmul|splitkreduce|aten::mm|aten::addmm|aten::bmm"),
    ("sampling", r"sort|topk|softmax|exponential|distribution|argmax|cumsum|scan|scatter|sample_(cluster_)?kernel"),
    ("norm", r"rms|norm|mean|rsqrt|pow"),
    ("rope", r"rope|rotary"),
]
OTHER_CATEGORY = "elementwise/other"


def kernel_category(name):
    for category, pattern in PROFILE_CATEGORIES:
        if re.search(pattern, name, re.I):
            return category
    return OTHER_CATEGORY


def kernel_times(device, fn, trace_path=None):
    """{name: [microseconds, calls, exposed microseconds]} of the GPU kernels (CPU: aten ops' self time)
    fn runs. A kernel's exposed time is how far it pushes the end of the GPU's busy time past every kernel
    that started before it: with programmatic dependent launch a kernel starts early and mostly waits, so
    its own duration overstates its cost, while the exposed times add up to the busy time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    spans = []  # (start, end, name, microseconds)
    for event in prof.events():
        if cuda and event.device_type == DeviceType.CUDA:
            spans.append((event.time_range.start, event.time_range.end, event.name, event.time_range.elapsed_us()))
        elif not cuda and event.name.startswith("aten::"):
            spans.append((0, 0, event.name, event.self_cpu_time_total))
    return tally_kernel_spans(spans, overlapping=cuda)


def tally_kernel_spans(spans, overlapping=True):
    """[(start, end, name, microseconds)] -> {name: [microseconds, calls, exposed microseconds]}; exposed: the
    part of [start, end) past the end of every span that started earlier (the span's own time when the
    spans do not overlap in time, as aten ops' self times)."""
    times = {}
    busy_until = None
    for start, end, name, us in sorted(spans, key=lambda span: span[0]):
        if overlapping:
            exposed = max(0.0, end - (start if busy_until is None else max(start, busy_until)))
            busy_until = end if busy_until is None else max(busy_until, end)
        else:
            exposed = us
        entry = times.setdefault(name, [0.0, 0, 0.0])
        entry[0] += us
        entry[1] += 1
        entry[2] += exposed
    return times


def profile_decode(runner, args, vocab_size, eos_ids):
    """Per decode step: kernel time by category, wall time and launch gaps. Each number is the
    difference between a generate call of 1 + steps tokens and one of 1 token (prefill + first sample),
    divided by steps, so the prefill cancels out; graph-replayed kernels are listed like any other."""
    device = torch.device(args.device)
    steps = min(args.profile_steps, args.max_gen_len - 1)
    sampling = sampling_from(args)
    prompts = random_prompts(args.max_gen_batch_size, args.input_len, vocab_size, eos_ids, args.random_seed)
    runs = {n: (lambda n=n: runner.generate(prompts, n, sampling, args.random_seed)) for n in (1, 1 + steps)}
    for fn in runs.values():
        fn()  # warm both lengths
    wall = {n: statistics.median(timed(device, fn)[0] for _ in range(3)) for n, fn in runs.items()}
    short = kernel_times(device, runs[1])
    long = kernel_times(device, runs[1 + steps], args.profile_trace)
    per_kernel = []
    for name, (us, calls, exposed) in long.items():
        us0, calls0, exposed0 = short.get(name, (0.0, 0, 0.0))
        per_kernel.append(dict(name=name, category=kernel_category(name), us_per_step=(us - us0) / steps,
                               exposed_us_per_step=(exposed - exposed0) / steps,
                               calls_per_step=(calls - calls0) / steps))
    per_kernel.sort(key=lambda k: -k["us_per_step"])
    by_category = {c: 0.0 for c, _ in PROFILE_CATEGORIES + [(OTHER_CATEGORY, None)]}
    exposed_by_category = dict.fromkeys(by_category, 0.0)
    for k in per_kernel:
        by_category[k["category"]] += k["us_per_step"]
        exposed_by_category[k["category"]] += k["exposed_us_per_step"]
    wall_us = 1e6 * (wall[1 + steps] - wall[1]) / steps
    kernels_us = sum(by_category.values())
    exposed_us = sum(exposed_by_category.values())
    return dict(steps=steps, batch=args.max_gen_batch_size, context=args.input_len, wall_us_per_step=wall_us,
                kernel_us_per_step=kernels_us, exposed_us_per_step=exposed_us, gaps_us_per_step=wall_us - exposed_us,
                by_category=by_category, exposed_by_category=exposed_by_category, top_kernels=per_kernel[:30])


def print_profile(prof, cuda):
    what = "GPU kernel" if cuda else "aten op self"
    print(f"\n### Decode step profile: batch {prof['batch']}, context {prof['context']}+, "
          f"{prof['steps']} steps ({what} time per step)\n")
    wall = prof["wall_us_per_step"]
    pct = lambda us: f"{100 * us / wall:.1f}" if wall > 0 else "-"
    rows = [(c, us, prof["exposed_by_category"][c]) for c, us in prof["by_category"].items()]
    rows += [("all kernels", prof["kernel_us_per_step"], prof["exposed_us_per_step"]),
             ("launch gaps / idle", None, prof["gaps_us_per_step"]), ("wall time per step", None, wall)]
    print_markdown(["category", "kernel us per step", "exposed us per step", "% of wall (exposed)"],
                   [[c, "" if us is None else f"{us:.1f}", f"{exposed:.1f}", pct(exposed)]
                    for c, us, exposed in rows])
    if cuda and prof["kernel_us_per_step"] > 1.02 * prof["exposed_us_per_step"]:
        print("\nKernels overlapped (programmatic dependent launch: a kernel starts before the one before it ends "
              "and waits), so kernel times add up to more than the wall time. The exposed time is what each "
              "kernel adds to the step: how far its end lies past the end of everything that started before it.")
    print(f"\nTop {len(prof['top_kernels'])} kernels by time per decode step:\n")
    print_markdown(["kernel", "category", "us per step", "exposed us", "calls per step"],
                   [[k["name"][:110], k["category"], f"{k['us_per_step']:.2f}", f"{k['exposed_us_per_step']:.2f}",
                     f"{k['calls_per_step']:.2f}"] for k in prof["top_kernels"]])


# ----------------------------------------------------------------------------------------------
# printing


def print_markdown(head, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def print_header(impl, args):
    print(f"Benchmarking {IMPL_TITLES[impl]} model inference implementation:")
    print(BANNER)
    print(f"model name: {args.model_name}")
    print(f"batch size: {args.max_gen_batch_size}")
    print(f"max output tokens: {args.max_gen_len}")
    print(f"input tokens: {args.input_len}")
    print(f"max model sequence length: {args.input_len + args.max_gen_len}")
    print(BANNER)
    print(f"using device: {torch.device(args.device).type}")
    # beyond the original's printout:
    print(f"device name: {device_name(args.device)}")
    print(f"weights: {'random (--dummy_weights)' if args.dummy_weights else 'checkpoint'}, {args.dtype}")
    print(f"sampling: {sampling_from(args).describe()}")


def print_result(rec):
    print(f"duration: {rec['duration_s']} Seconds | throughput: {rec['tokens_per_s']} Toks/sec")
    print(f"peak memory consumption: {rec['peak_mib']:.0f} MiB")
    print(f"  ({rec['peak_memory_covers']})")
    if "roofline_tok_s" in rec:
        print(f"roofline: {rec['roofline_tok_s']:.0f} Toks/sec ({rec['pct_roofline']:.1f}% reached)")


def fmt_int(value):
    return f"{value:,.0f}" if value is not None else "-"


def print_sweep_table(recs, meta):
    several = len({r["impl"] for r in recs}) > 1
    print(f"\n### {meta['model_name']} ({meta['weights']}, {meta['dtype']}), {meta['device_name']}, "
          f"{meta['date'][:10]}")
    print(f"sampling: {meta['sampling']}; copy bandwidth {meta['copy_gbps'] / 1e3:.3g} TB/s, "
          f"matmul {meta['matmul_tflops']:.3g} TFLOP/s; torch {meta['torch']}\n")
    head = ["batch", "input, output", "tokens/s", "ms per step (duration/outputs)", "roofline tok/s",
            "% of roofline", "peak MiB"]
    rows = []
    for r in recs:
        row = [r["batch"], f"{r['input_len']}, {r['output_len']}"]
        if r["status"] == "ok":
            row += [fmt_int(r["tokens_per_s"]), f"{r['ms_per_step']:.2f}", fmt_int(r.get("roofline_tok_s")),
                    f"{r['pct_roofline']:.1f}" if "pct_roofline" in r else "-", fmt_int(r["peak_mib"])]
        else:
            row += [r["status"]] + ["-"] * 4
        rows.append(([r["impl"]] if several else []) + row)
    print_markdown((["impl"] if several else []) + head, rows)


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine() or "cpu"


def write_json(path, meta, recs, profile=None):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = {"meta": meta, "results": recs}
    if profile is not None:
        data["profile"] = profile
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


def run_meta(args, ceilings):
    import transformers
    return dict(model_name=args.model_name, weights="random" if args.dummy_weights else "checkpoint",
                dtype=args.dtype, sampling=sampling_from(args).describe(), sampling_params=asdict(sampling_from(args)),
                random_seed=args.random_seed, device=args.device, device_name=device_name(args.device),
                torch=torch.__version__, transformers=transformers.__version__,
                custom_decode_kernel=custom_kernel_state(args), cuda_graph=not args.no_cuda_graph,
                custom_gemv=llama3.USE_CUSTOM_GEMV, programmatic_launch=not args.no_programmatic_launch,
                persistent_decode=llama3.USE_PERSISTENT_DECODE,
                copy_gbps=ceilings[0] if ceilings else None, matmul_tflops=ceilings[1] if ceilings else None,
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=[os.path.basename(sys.argv[0])] + sys.argv[1:])


def custom_kernel_state(args):
    if not llama3.USE_CUSTOM_DECODE_KERNEL:
        return "off (--no_custom_kernel)"
    if torch.device(args.device).type != "cuda":
        return "off (CPU: PyTorch reference)"
    loaded = getattr(llama3, "_custom_decode_kernels", lambda: True)() is not None
    return "on" if loaded else "FAILED TO LOAD: PyTorch reference used"


# ----------------------------------------------------------------------------------------------
# modes


def prepare_runs(args, impls, scenarios):
    """(ModelArgs, iterator of runners). The weights are loaded once; the runners come one at a time in
    the order custom, hf, vllm, each freed before the next, so a peak counts one model and vLLM's engine
    (which reserves most of the card) finds it empty."""
    config_dict = model_config_dict(args)
    model = None
    if "custom" in impls or "hf" in impls:
        one = len(scenarios) == 1
        model = load_our_model(args, scenarios[0][0] if one else 1, sum(scenarios[0][1:]) if one else 16)
    # from_pretrained adds generation_config.json's EOS ids
    model_args = model.config if model is not None else llama3.ModelArgs.from_hf_config(config_dict, args.model_name)

    def runners():
        nonlocal model
        for name in [n for n in IMPL_NAMES if n in impls]:
            if name == "custom":
                runner = CustomRunner(model, False if args.no_cuda_graph else None)
            elif name == "hf":
                runner = HFRunner(hf_model_from_ours(model, config_dict))
            else:
                model_dir = (write_config_dir(config_dict) if args.dummy_weights
                             else llama3.resolve_checkpoint(args.model_name))
                runner = VLLMRunner(model_dir, args.dtype, args.dummy_weights, max(s[0] for s in scenarios),
                                    max(s[1] + s[2] for s in scenarios), args.random_seed)
            if name == "hf" or "hf" not in impls:
                model = None  # nothing after this runner needs our weights
            yield runner
            runner.model = runner.llm = None
            free_memory(torch.device(args.device))

    return model_args, runners()


def write_config_dir(config_dict):
    """A dir holding only config.json: what vLLM's load_format='dummy' needs, with no network."""
    directory = Path(tempfile.mkdtemp(prefix="benchmark_model_config_"))
    (directory / "config.json").write_text(json.dumps(config_dict))
    return directory


def run_sweep(args, impls, scenarios, ceilings):
    model_args, runners = prepare_runs(args, impls, scenarios)
    dtype = llama3.resolve_dtype(args.dtype)
    recs = []
    for runner in runners:
        for i, scenario in enumerate(scenarios, 1):
            print(f"[{runner.name} {i}/{len(scenarios)}] batch {scenario[0]}, input {scenario[1]}, "
                  f"output {scenario[2]}:", flush=True)
            try:
                rec = run_scenario(runner, scenario, args, model_args.vocab_size, model_args.eos_token_ids,
                                   lambda text: print("  " + text, flush=True))
                add_roofline(rec, model_args, dtype, ceilings)
                print(f"  {rec['tokens_per_s']:,.1f} tokens/s, {rec['duration_s']:.3f} s, "
                      f"peak {rec['peak_mib']:.0f} MiB", flush=True)
            except DoesNotFit as exc:
                print(f"  OOM: {exc}", flush=True)
                b, t, n = scenario
                rec = dict(impl=runner.name, batch=b, input_len=t, output_len=n, max_seq_len=t + n,
                           status="OOM", note=str(exc))
            recs.append(rec)
    meta = run_meta(args, ceilings)
    print_sweep_table(recs, meta)
    return meta, recs


def run_single(args, impl, ceilings):
    scenario = (args.max_gen_batch_size, args.input_len, args.max_gen_len)
    print_header(impl, args)
    model_args, runners = prepare_runs(args, [impl], [scenario])
    runner = next(runners)
    if impl == "custom" and custom_kernel_state(args).startswith("FAILED"):
        print("WARNING: the custom decode kernel failed to load; timing the PyTorch reference instead")
    dtype = llama3.resolve_dtype(args.dtype)
    try:
        rec = run_scenario(runner, scenario, args, model_args.vocab_size, model_args.eos_token_ids, print)
    except DoesNotFit as exc:
        kv_gib = kv_cache_bytes(model_args, dtype, scenario[0], scenario[1] + scenario[2]) / 2 ** 30
        raise BenchmarkError(f"{exc}: the KV cache alone needs {kv_gib:.2f} GiB; lower --max_gen_batch_size, "
                             "--input_len or --max_gen_len")
    add_roofline(rec, model_args, dtype, ceilings)
    print_result(rec)
    profile = None
    if args.profile:
        print(f"profiling {min(args.profile_steps, args.max_gen_len - 1)} decode steps...")
        profile = profile_decode(runner, args, model_args.vocab_size, model_args.eos_token_ids)
        print_profile(profile, torch.device(args.device).type == "cuda")
        if args.profile_trace:
            print(f"wrote {args.profile_trace}")
        if impl == "custom" and llama3.USE_PERSISTENT_DECODE and args.max_gen_batch_size == 1:
            profile["persistent_phases"] = persistent_phases(runner.model, args.input_len)
            if profile["persistent_phases"]:
                print_persistent_phases(profile["persistent_phases"])
    return run_meta(args, ceilings), [rec], profile


PERSISTENT_PHASES = ["qkv", "barrier", "attention", "barrier", "o", "barrier", "gate_up", "barrier", "down",
                     "barrier (next layer)"]


def persistent_phases(model, position):
    """Where the persistent decode kernel's time goes (csrc/decode_layers.cu, --persistent_decode): its phase
    trace over a few eager steps at `position` (graphs keep the trace switch of their capture), as mean us per
    layer over blocks and layers, and the slowest block's."""
    layers = model._decode_layers
    if layers is None:
        return None
    trace = layers.set_trace(True)
    device = model.device
    tokens = torch.tensor([17], device=device)
    positions = torch.tensor([position], device=device)
    for _ in range(3):
        model.forward_decode(tokens, positions, float_logits=False)
    torch.cuda.synchronize(device)
    layers.set_trace(False)
    n_layers = len(model.layers)
    stamps = trace[:, :n_layers * 10].double().view(-1, n_layers, 10) / 1000  # [blocks, layers, events] us
    spans = [stamps[:, :, i + 1] - stamps[:, :, i] for i in range(9)] + [stamps[:, 1:, 0] - stamps[:, :-1, 9]]
    return dict(position=position, kernel_us=float(stamps[:, -1, 9].max() - stamps[:, 0, 0].min()),
                phases=[dict(phase=name, mean_us=float(d.mean()), slowest_block_us=float(d.max(0).values.mean()))
                        for name, d in zip(PERSISTENT_PHASES, spans)])


def print_persistent_phases(phases):
    print(f"\nPersistent decode kernel at position {phases['position']}: {phases['kernel_us']:.1f} us from the first "
          "block's start to the last block's end; per layer (stamps of thread 0 of each block: a phase ends when "
          "the block's first warp is done, so the barrier after it also holds the other warps' last units):\n")
    print_markdown(["phase", "mean us a layer", "slowest block us"],
                   [[p["phase"], f"{p['mean_us']:.2f}", f"{p['slowest_block_us']:.2f}"] for p in phases["phases"]])


# ----------------------------------------------------------------------------------------------
# arguments


def parse_scenarios(text):
    try:
        scenarios = [tuple(int(x) for x in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        scenarios = []
    if not scenarios or any(len(s) != 3 or min(s) < 1 for s in scenarios):
        raise argparse.ArgumentTypeError(f"expected 'batch,input,output;...' with positive integers, got {text!r}")
    return scenarios


def parse_impls(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in IMPL_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {unknown}; choose from {','.join(IMPL_NAMES)}")
    return list(dict.fromkeys(names))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="unsloth/Llama-3.2-1B",
                   help="hub name, local checkpoint dir, .gguf, 'smollm2'; with --dummy_weights a built-in "
                        "name or a config.json path")
    p.add_argument("--max_gen_batch_size", type=int, default=1, help="sequences generated together")
    p.add_argument("--max_gen_len", type=int, default=128, help="output tokens per sequence")
    p.add_argument("--input_len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--random_seed", type=int, default=0, help="prompts, random weights and sampling")
    p.add_argument("--use_vllm_impl", action="store_true", help="benchmark vLLM instead (pip install vllm)")
    p.add_argument("--use_hf_impl", action="store_true", help="benchmark transformers' static-cache generate instead")
    p.add_argument("--dummy_weights", action="store_true", help="random weights from the model's config")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (slow; small models)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=None, help="default: off")
    p.add_argument("--sweep", action="store_true", help="the original README's eight scenarios, one model load")
    p.add_argument("--scenarios", type=parse_scenarios, default=None, metavar="B,IN,OUT;...",
                   help="sweep these scenarios instead (implies --sweep)")
    p.add_argument("--impls", type=parse_impls, default=None, help=f"sweep these, comma-separated: {','.join(IMPL_NAMES)}")
    p.add_argument("--json", default=None, metavar="PATH", help="write machine-readable results")
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of a decode step (ours)")
    p.add_argument("--profile_steps", type=int, default=32, help="decode steps profiled")
    p.add_argument("--profile_trace", default=None, metavar="PATH", help="also write a Chrome/Perfetto trace")
    p.add_argument("--no_cuda_graph", action="store_true", help="eager decode steps in llama3 (for comparison)")
    p.add_argument("--no_custom_kernel", action="store_true",
                   help="no CUDA extension in llama3: PyTorch split-KV decode attention, PyTorch norms/RoPE/sampling")
    p.add_argument("--no_custom_gemv", action="store_true",
                   help="cuBLAS (and separate norm/SiLU kernels) for the batch-1..4 projections instead of csrc/gemv.cu")
    p.add_argument("--no_programmatic_launch", action="store_true",
                   help="plain kernel launches instead of programmatic dependent launch (for comparison)")
    p.add_argument("--persistent_decode", action="store_true",
                   help="batch-1 decode layers as one persistent kernel (csrc/decode_layers.cu, sm_90+; experimental, "
                        "off by default: see docs/perf-notes.md); with --profile, its phase breakdown")
    args = p.parse_args(argv)
    validate_args(p, args)
    return args


def validate_args(p, args):
    for name in ("max_gen_batch_size", "max_gen_len", "input_len", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        llama3._check_sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as exc:
        p.error(str(exc))
    if args.use_hf_impl and args.use_vllm_impl:
        p.error("choose one of --use_hf_impl and --use_vllm_impl (or --sweep --impls custom,hf,vllm)")
    if args.scenarios:
        args.sweep = True
    if args.impls and not args.sweep:
        p.error("--impls is for --sweep; use --use_hf_impl or --use_vllm_impl for one run")
    if args.impls and (args.use_hf_impl or args.use_vllm_impl):
        p.error("with --impls, leave out --use_hf_impl/--use_vllm_impl")
    if args.profile and (args.sweep or args.use_hf_impl or args.use_vllm_impl):
        p.error("--profile profiles one run of our implementation: drop --sweep/--use_hf_impl/--use_vllm_impl")
    if args.profile and args.max_gen_len < 2:
        p.error("--profile needs --max_gen_len >= 2 (decode steps)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r} (cuda, cuda:N or cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device available: use --device cpu (slow; small models)")


def selected_impls(args):
    if args.impls:
        return args.impls
    return ["vllm" if args.use_vllm_impl else "hf" if args.use_hf_impl else "custom"]


def main(argv=None):
    args = parse_args(argv)
    impls = selected_impls(args)
    if "vllm" in impls and importlib.util.find_spec("vllm") is None:
        print(VLLM_MISSING_MESSAGE, file=sys.stderr)
        sys.exit(VLLM_MISSING_EXIT)
    if args.no_custom_kernel:  # the extension's fused ops and sampler too, not only its attention
        llama3.USE_CUSTOM_DECODE_KERNEL = False
        llama3.USE_FUSED_DECODE_OPS = False
    if args.no_custom_gemv:
        llama3.USE_CUSTOM_GEMV = False
    if args.no_programmatic_launch:
        llama3.set_programmatic_launch(False)
    if args.persistent_decode:
        llama3.USE_PERSISTENT_DECODE = True
    device = torch.device(args.device)
    try:
        ceilings = measure_ceilings(device, llama3.resolve_dtype(args.dtype))  # first, while the card is empty
        if args.sweep:
            meta, recs = run_sweep(args, impls, args.scenarios or SWEEP_SCENARIOS, ceilings)
            profile = None
        else:
            meta, recs, profile = run_single(args, impls[0], ceilings)
    except (ValueError, BenchmarkError) as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        write_json(args.json, meta, recs, profile)


if __name__ == "__main__":
    main()
