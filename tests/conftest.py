"""Tiny random Llama checkpoints written by transformers, shared by the whole session; the kernel tests'
random inputs."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 512
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
DEFAULT_ROPE = dict(rope_type="default", rope_theta=10000.0)

# name -> (n_heads, n_kv_heads, head_dim, rope, tied embeddings, sharded). Together they cover GQA ratios
# 1, 2 and 4, head sizes 64 and 128, both RoPE rules, tied and untied heads, sharded and single files.
# (original_max_position_embeddings 64 puts RoPE pairs in all three bands of the llama3 rule.)
TINY_VARIANTS = {
    "llama3rope-gqa4-hd64-untied-sharded": (8, 2, 64, LLAMA3_ROPE, False, True),
    "defaultrope-gqa2-hd128-tied": (4, 2, 128, DEFAULT_ROPE, True, False),
    "llama3rope-mha-hd64-tied-sharded": (4, 4, 64, LLAMA3_ROPE, True, True),
    "defaultrope-gqa4-hd128-untied": (8, 2, 128, DEFAULT_ROPE, False, False),
}


# The kernel tests draw fresh random inputs every run: kernel_generator mixes this run's seed into each test's own.
# pytest prints it (header and summary); KERNEL_TEST_SEED=<seed> repeats a run's inputs.
KERNEL_TEST_SEED = int(os.environ.setdefault("KERNEL_TEST_SEED", str(int.from_bytes(os.urandom(4), "little"))))


def pytest_report_header(config):
    return f"kernel tests' random inputs: KERNEL_TEST_SEED={KERNEL_TEST_SEED} (set it to repeat them)"


def pytest_terminal_summary(terminalreporter):  # (also under -q, which drops the header)
    terminalreporter.write_line(f"kernel tests' random inputs: KERNEL_TEST_SEED={KERNEL_TEST_SEED}")


def kernel_generator(seed: int = 0, device: str = "cuda") -> torch.Generator:
    """A generator for a kernel test's random inputs: the test's own seed (so that its cases differ) and this run's."""
    return torch.Generator(device=device).manual_seed(KERNEL_TEST_SEED * 1_000_003 + seed)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in lengths]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def tiny_llama_config(n_heads, n_kv_heads, head_dim, rope, tied, hidden_size=128, n_layers=2,
                      intermediate_size=256, vocab_size=VOCAB_SIZE) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, max_position_embeddings=512, rope_parameters=dict(rope), tie_word_embeddings=tied,
        # Larger than the usual 0.02 so logits are peaked: greedy paths are then far from ties and the
        # generated text varies, which makes token comparisons meaningful.
        initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )


def write_checkpoint(directory, config: LlamaConfig, max_shard_size="1GB", seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return model


@pytest.fixture(scope="session", params=list(TINY_VARIANTS))
def tiny_checkpoint(request, tmp_path_factory):
    """(checkpoint dir, transformers model in fp32) for each tiny variant."""
    n_heads, n_kv_heads, head_dim, rope, tied, sharded = TINY_VARIANTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    model = write_checkpoint(directory, tiny_llama_config(n_heads, n_kv_heads, head_dim, rope, tied),
                             max_shard_size="200KB" if sharded else "1GB")
    assert (directory / "model.safetensors.index.json").exists() == sharded
    return directory, model


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory):
    """One tiny GQA checkpoint for the tests that don't need every variant."""
    directory = tmp_path_factory.mktemp("gqa")
    model = write_checkpoint(directory, tiny_llama_config(8, 2, 64, LLAMA3_ROPE, False), max_shard_size="200KB")
    return directory, model
