"""GPU checks of the model: bf16 against transformers, custom decode kernel against the PyTorch reference,
ragged batches, and CUDA-graph capture of a decode step. Tolerances come from test_llama3.TOLERANCES:
bf16 prefill logits relative error < 2e-2; greedy tokens equal for 32 steps, or a first divergence only
where transformers' logits for both tokens are within bf16 rounding (2^-6 of the largest logit)."""

import pytest
import torch
from conftest import random_prompts
from transformers import LlamaForCausalLM

import llama3
from test_llama3 import TOLERANCES, compare_greedy, hf_greedy_reference, relative_error

pytestmark = pytest.mark.cuda

KERNEL_VS_REFERENCE_TOLERANCE = 1e-2  # relative error of bf16 logits, kernel path vs reference path


def load_cuda(directory, dtype=torch.bfloat16, max_batch_size=4, max_seq_len=96):
    return llama3.Transformer.from_pretrained(directory, device="cuda", dtype=dtype,
                                              max_batch_size=max_batch_size, max_seq_len=max_seq_len)


@pytest.fixture
def decode_path():
    """Sets llama3.USE_CUSTOM_DECODE_KERNEL for one test; the kernel must load when asked for."""
    saved = llama3.USE_CUSTOM_DECODE_KERNEL

    def use(custom: bool):
        llama3.USE_CUSTOM_DECODE_KERNEL = custom
        if custom:
            assert llama3._custom_decode_kernels() is not None, \
                "custom decode kernel failed to build/load: run python3 load_custom_kernels.py"

    yield use
    llama3.USE_CUSTOM_DECODE_KERNEL = saved


@pytest.mark.parametrize("custom_kernel", [True, False])
def test_bf16_matches_transformers(tiny_checkpoint, decode_path, custom_kernel):
    decode_path(custom_kernel)
    directory, _ = tiny_checkpoint
    hf_model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    model = load_cuda(directory)
    prompts = random_prompts([7, 19], seed=10)
    ours = model.generate(prompts, 32, temperature=0, ignore_eos=True)
    prefill = model.prefill(*llama3.pad_prompts(prompts, "cuda"))
    for b, prompt in enumerate(prompts):
        reference, reference_logits = hf_greedy_reference(hf_model, prompt, 32)
        assert relative_error(prefill[b], reference_logits[0]) < TOLERANCES[torch.bfloat16][0]
        ok, message = compare_greedy(ours[b], reference, reference_logits, torch.bfloat16)
        assert ok, message


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (8, 2), (9, 3), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_kernel_matches_reference(decode_path, head_dim, n_heads, n_kv_heads, dtype):
    decode_path(True)
    g = torch.Generator(device="cuda").manual_seed(head_dim + n_heads)
    batch, seq_len = 6, 1000
    # Batch slices of a larger cache, as the model passes them.
    full_k = torch.randn(batch + 2, seq_len, n_kv_heads, head_dim, generator=g, device="cuda").to(dtype)
    full_v = torch.randn(batch + 2, seq_len, n_kv_heads, head_dim, generator=g, device="cuda").to(dtype)
    k, v = full_k[:batch], full_v[:batch]
    q = torch.randn(batch, n_heads, head_dim, generator=g, device="cuda").to(dtype)
    lengths = torch.tensor([1, 0, seq_len, 257, 513, 77], dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    out = llama3.decode_attention(q, k, v, lengths, scale)
    expected = llama3.decode_attention_naive(q, k, v, lengths, scale)
    reference = llama3.decode_attention_reference(q, k, v, lengths, scale)
    assert out.dtype == dtype and out.shape == q.shape and torch.all(out[1] == 0)
    # Both are one rounding to bf16/fp16 away from the exact result.
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(reference.double(), expected, atol=1e-2, rtol=1e-2)


def test_model_decode_with_kernel_matches_reference_path(gqa_checkpoint, decode_path):
    model = load_cuda(gqa_checkpoint[0])
    tokens, lengths = llama3.pad_prompts(random_prompts([5, 23, 12], seed=11), "cuda")

    def decode(feed=None):
        """Greedy decode steps' logits; with `feed`, those tokens are fed instead of our own."""
        next_tokens, positions, steps = model.prefill(tokens, lengths).argmax(-1), lengths.clone(), []
        for step in range(24):
            fed = next_tokens if feed is None else feed[step]
            steps.append((fed, model.forward_decode(fed, positions)))
            next_tokens, positions = steps[-1][1].argmax(-1), positions + 1
        return steps

    decode_path(False)
    reference = decode()
    decode_path(True)
    kernel = decode(feed=[fed for fed, _ in reference])
    for step, ((_, expected), (_, logits)) in enumerate(zip(reference, kernel)):
        assert relative_error(logits, expected) < KERNEL_VS_REFERENCE_TOLERANCE, f"decode step {step}"


def test_generate_across_attention_length_bounds_matches_transformers(gqa_checkpoint, decode_path):
    """generate captures its decode graphs per attention-length bound (the kernel's split count comes from the
    cache rows it is given) and replays several steps at once: a greedy run that crosses a bound, mostly in
    multi-step replays, follows transformers."""
    decode_path(True)
    directory, _ = gqa_checkpoint
    hf_model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    model = load_cuda(directory, max_batch_size=1, max_seq_len=512)
    bounds = model._attention_row_bounds(1)
    assert bounds == [256, 512]  # one split (two 128-row tiles), then several
    prompt = random_prompts([230], seed=13)[0]
    ours = model.generate([prompt], 41, temperature=0, ignore_eos=True)[0]  # lengths 231..270
    reference, reference_logits = hf_greedy_reference(hf_model, prompt, 41)
    ok, message = compare_greedy(ours, reference, reference_logits, torch.bfloat16)
    assert ok, message


@pytest.mark.parametrize("custom_kernel", [True, False])
def test_ragged_batch_equals_one_by_one_on_cuda(gqa_checkpoint, decode_path, custom_kernel):
    decode_path(custom_kernel)
    directory, _ = gqa_checkpoint
    prompts = random_prompts([3, 17, 9, 1], seed=12)
    # fp32 for exact token equality (different batch sizes may pick different GEMM kernels).
    model = load_cuda(directory, dtype=torch.float32)
    batched = model.generate(prompts, 24, temperature=0, ignore_eos=True)
    for b, prompt in enumerate(prompts):
        assert model.generate([prompt], 24, temperature=0, ignore_eos=True)[0] == batched[b]
    model = load_cuda(directory)
    batched_prefill = model.prefill(*llama3.pad_prompts(prompts, "cuda"))
    for b, prompt in enumerate(prompts):
        alone = model.prefill(torch.tensor([prompt], device="cuda"))[0]
        assert relative_error(batched_prefill[b], alone) < TOLERANCES[torch.bfloat16][0]


@pytest.mark.parametrize("custom_kernel", [True, False])
def test_decode_step_replays_in_a_cuda_graph(gqa_checkpoint, decode_path, custom_kernel):
    """forward_decode has static shapes and no host syncs, so a captured graph reproduces eager decoding."""
    decode_path(custom_kernel)
    model = load_cuda(gqa_checkpoint[0], max_batch_size=2)
    prompts = random_prompts([6, 11], seed=13)
    tokens, lengths = llama3.pad_prompts(prompts, "cuda")
    static_tokens = model.prefill(tokens, lengths).argmax(-1)
    static_positions = lengths.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel build, allocator) off the capture stream
        for _ in range(2):
            model.forward_decode(static_tokens, static_positions)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model.forward_decode(static_tokens, static_positions)

    for _ in range(8):
        expected = model.forward_decode(static_tokens, static_positions).clone()  # eager, same cache writes
        graph.replay()
        assert relative_error(static_logits, expected) < 1e-3
        static_tokens.copy_(static_logits.argmax(-1))
        static_positions.add_(1)
