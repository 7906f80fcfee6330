"""Generate with llama3.py, then check it against transformers' LlamaForCausalLM on the same weights.

    python3 test_llama3.py --model_name smollm2 --chat --device cpu
    python3 test_llama3.py --model_name unsloth/Llama-3.2-1B

The shown completions use the sampling flags (default greedy). The comparison is always a separate
greedy run that ignores EOS: our first --compare_tokens tokens must equal transformers' (a divergence is
accepted only where transformers' top-2 logits are within the dtype's rounding, see TOLERANCES), and our
prefill logits must match transformers' within the dtype's tolerance. Exits 1 on mismatch, 2 on bad input.
"""

import argparse
import sys
import time

import torch

import llama3

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
                   "def fibonacci(n):"]
DEFAULT_CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                        "Explain in one sentence what a GPU is."]

# dtype -> (max relative error ||ours - hf|| / ||hf|| of prefill logits, near-tie tolerance). A greedy
# divergence is blamed on rounding only when transformers' logits for its token and ours differ by at most
# near_tie * max|logits|: 2^-6 is a few bf16 roundings of the largest logit, 2^-9 the same for fp16.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2**-6), torch.float16: (5e-3, 2**-9)}


@torch.no_grad()
def hf_greedy_reference(hf_model, prompt_ids: list[int], n_tokens: int):
    """transformers' greedy continuation of one prompt, EOS ignored: (tokens, float logits [n_tokens, V]).
    Each step reruns the whole sequence without a cache: slow but free of any cache API differences."""
    device = next(hf_model.parameters()).device
    sequence, tokens, step_logits = list(prompt_ids), [], []
    for _ in range(n_tokens):
        logits = hf_model(input_ids=torch.tensor([sequence], device=device)).logits[0, -1].float()
        tokens.append(int(logits.argmax()))
        step_logits.append(logits)
        sequence.append(tokens[-1])
    return tokens, torch.stack(step_logits)


def compare_greedy(ours: list[int], reference: list[int], reference_logits: torch.Tensor, dtype):
    """(ok, message) for our greedy tokens against transformers' (tokens + per-step logits)."""
    n = min(len(ours), len(reference))
    diverged = next((i for i in range(n) if ours[i] != reference[i]), None)
    if diverged is None:
        return len(ours) >= len(reference), f"{n}/{len(reference)} tokens match"
    logits = reference_logits[diverged]
    gap = float(logits[reference[diverged]] - logits[ours[diverged]])
    tolerance = TOLERANCES[dtype][1] * float(logits.abs().max())
    detail = (f"first divergence at token {diverged}: ours {ours[diverged]}, transformers {reference[diverged]} "
              f"(transformers' logit gap {gap:.3g}, near-tie tolerance {tolerance:.3g})")
    if gap <= tolerance:
        return True, f"{diverged}/{len(reference)} tokens match, then a near-tie: {detail}"
    return False, detail


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2",
                        help="hub name, local checkpoint dir, .gguf file, or 'smollm2' (built in)")
    parser.add_argument("--prompt", action="append", default=[], help="extra prompt (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (instruct models)")
    parser.add_argument("--max_gen_len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="default: longest prompt + max_gen_len")
    parser.add_argument("--compare_tokens", type=int, default=32)
    parser.add_argument("--no_compare", action="store_true", help="skip the check against transformers")
    args = parser.parse_args()
    try:
        sys.exit(run(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args) -> int:
    dtype = llama3.resolve_dtype(args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32"))
    checkpoint = llama3.resolve_checkpoint(args.model_name)
    tokenizer = llama3.load_tokenizer(checkpoint)
    prompts = (DEFAULT_CHAT_PROMPTS if args.chat else DEFAULT_PROMPTS) + args.prompt
    if args.chat:
        prompt_ids = [llama3.chat_prompt(tokenizer, p) for p in prompts]
    else:
        prompt_ids = [tokenizer.encode(p) for p in prompts]
    n_compare = 0 if args.no_compare else args.compare_tokens
    max_seq_len = args.max_seq_len or max(map(len, prompt_ids)) + max(args.max_gen_len, n_compare)

    print(f"model {args.model_name} ({checkpoint}) | device {args.device} | {str(dtype)[6:]} | "
          f"{len(prompts)} prompts | max_seq_len {max_seq_len}")
    start = time.perf_counter()
    model = llama3.Transformer.from_pretrained(checkpoint, args.device, dtype, max_batch_size=len(prompts),
                                               max_seq_len=max_seq_len)
    print(f"loaded in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    completions = model.generate(prompt_ids, args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, seed=args.seed, progress=True)
    seconds = time.perf_counter() - start
    for i, (prompt, completion) in enumerate(zip(prompts, completions), 1):
        print(f"\n[{i}] {prompt}\n--> {tokenizer.decode(completion, skip_special_tokens=True).strip()}")
    n_tokens = sum(map(len, completions))
    print(f"\n{n_tokens} tokens in {seconds:.2f} s ({n_tokens / seconds:.1f} tokens/s, prefill included)")
    if args.no_compare:
        return 0
    return compare_with_transformers(model, checkpoint, prompt_ids, n_compare, dtype, args.device)


def compare_with_transformers(model, checkpoint, prompt_ids, n_tokens, dtype, device) -> int:
    from transformers import LlamaForCausalLM

    logits_tolerance = TOLERANCES[dtype][0]
    print(f"\nchecking against transformers LlamaForCausalLM: greedy, EOS ignored, first {n_tokens} tokens")
    hf_model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    ours = model.generate(prompt_ids, n_tokens, temperature=0, ignore_eos=True)
    our_prefill = model.prefill(*llama3.pad_prompts(prompt_ids, device))

    ok, worst = True, 0.0
    for i, ids in enumerate(prompt_ids):
        reference, reference_logits = hf_greedy_reference(hf_model, ids, n_tokens)
        worst = max(worst, relative_error(our_prefill[i], reference_logits[0]))
        tokens_ok, message = compare_greedy(ours[i], reference, reference_logits, dtype)
        ok &= tokens_ok
        print(f"  prompt {i + 1}: {message}")
    logits_ok = worst < logits_tolerance
    print(f"  prefill logits: max relative error {worst:.2e} (tolerance {logits_tolerance:.0e} for "
          f"{str(dtype)[6:]}) {'OK' if logits_ok else 'MISMATCH'}")
    print("PASS" if ok and logits_ok else "FAIL")
    return 0 if ok and logits_ok else 1


if __name__ == "__main__":
    main()
