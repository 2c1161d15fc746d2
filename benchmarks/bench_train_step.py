"""Training-step throughput (tokens/s) and peak step memory of a DistiLLM-2 step, SmolLM2-135M-Instruct teacher ->
its 10-layer student, with the plain loss path (full logits) and the fused one (the default), against TRL's
experimental GKDTrainer step (`trl.experimental.gkd`) and TRL's stable DistillationTrainer step
(`trl.DistillationTrainer`, trl >= 1.10) at the same batch and sequence length.

What is timed: `Trainer.training_step` (student forward, teacher forward, loss, backward) of each trainer on
the same tensors; the optimizer step, identical for all, is left out. DistiLLM-2 trains on P pairs = 2P
sequences (P teacher responses, P student responses); TRL's GKD step gets the same 2P sequences (lmbda = 0:
off-policy, no generation inside the step, beta = 0.5), and so does the DistillationTrainer (beta = 0.5, its
on-policy generation bypassed: the step gets the completions), so every variant processes the same tokens and
tokens/s = 2P x (prompt + response length) / step time. Models in fp32 on the CPU, no gradient checkpointing
(TRL's configs default to bf16 and checkpointing: turned off, `LIKE_FOR_LIKE`); the responses are random token
ids (their content does not change the cost). The variants run interleaved (one step of each, repeated), so a
change in the machine's load hits all of them alike; each figure is the median over the repeats, after one
warm-up step each. Peak step memory: see `PeakRSS`.

    python benchmarks/bench_train_step.py --quick   # P = 2 pairs, 64 + 64 tokens: a few minutes on 2 cores
    python benchmarks/bench_train_step.py           # P = 4 pairs, 128 + 128 tokens

The last lines are the headlines: DistiLLM-2 fused against TRL's DistillationTrainer (tokens/s, memory) and
against TRL GKD (tokens/s).

QAT row (`--qat int4`, or int3): the full-size student (the teacher's copy, all 30 layers, as in the default demo)
with and without torchao fake quantization of its linear weights, the same DistiLLM-2 fused step, interleaved;
prints both times, their ratio (the fake-quantization overhead) and the student's memory:

    python benchmarks/bench_train_step.py --qat int4 --threads 2   # batch 4 pairs = 8 x (48 + 48) tokens
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def build_batch(tokenizer, pairs: int, prompt_len: int, response_len: int, seed: int = 0):
    """Rows of fixed-length random prompts and responses, and the DistiLLM-2 collated batch of them."""
    from distillm.training.collate import DistillCollator

    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)

    def ids(n):
        return torch.randint(10, vocab - 10, (n,), generator=g).tolist()

    rows = [{"id": str(i), "_index": i, "prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len),
             "rejected_ids": ids(response_len)} for i in range(pairs)]
    collate = DistillCollator(tokenizer.pad_token_id, prompt_len + response_len)
    return rows, collate(rows)


def distillm_trainer(student, teacher, tokenizer, rows, impl: str, out: str):
    from transformers import TrainingArguments

    from distillm.config import load_config
    from distillm.methods.distillm2 import DistiLLM2
    from distillm.models import real_vocab_size
    from distillm.training.collate import DistillCollator, RowDataset
    from distillm.training.trainer import DistillTrainer

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=len(rows), max_steps=10, report_to=[],
                             save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    return DistillTrainer(model=student, teacher=teacher, method=DistiLLM2(load_config()),
                          vocab_size=real_vocab_size(tokenizer), args=args, train_dataset=RowDataset(rows),
                          data_collator=DistillCollator(tokenizer.pad_token_id, 4096), loss_impl=impl)


# TRL's configs (SFTConfig, hence GKDConfig, and DistillationConfig) default to gradient checkpointing and bf16
# mixed precision; the distillm variants run fp32 without recomputation, so the TRL ones are set the same way
LIKE_FOR_LIKE = {"gradient_checkpointing": False, "bf16": False}


def trl_trainer(student, teacher, tokenizer, sequences: int, out: str):
    """GKDTrainer as TRL's documentation sets it up (model, teacher_model, GKDConfig, a chat data set,
    processing_class), off-policy (lmbda = 0) so that the step has the same data as DistiLLM-2's."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    data = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]}] * sequences)
    args = GKDConfig(output_dir=out, per_device_train_batch_size=sequences, lmbda=0.0, beta=0.5, max_steps=10,
                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **LIKE_FOR_LIKE)
    return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                      processing_class=tokenizer)


def trl_distillation_trainer(student, teacher, tokenizer, sequences: int, out: str):
    """TRL's stable DistillationTrainer (trl >= 1.10: `trl.DistillationTrainer`, chunked full-vocabulary
    generalized JSD over hidden states and heads), beta = 0.5 as the GKD variant. It is on-policy: its
    `_prepare_inputs` generates the completions of each batch. Here that generation is bypassed (the benchmark's
    `_prepare_inputs` hands the step the given completions), so its step processes the same sequences as the
    others: the student and teacher forwards, the chunked loss and the backward."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi"}]}] * sequences)
    args = DistillationConfig(output_dir=out, per_device_train_batch_size=sequences, beta=0.5, max_steps=10,
                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **LIKE_FOR_LIKE)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    trainer._prepare_inputs = lambda inputs: inputs  # no generation inside the timed step (see the docstring)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, which the benchmark does not call
    return trainer


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every `interval` s by a thread (/proc/self/statm).
    The benchmark runs with a fixed glibc mmap threshold (see `main`), so large tensors are mapped on allocation and
    unmapped on free: the resident size follows the live tensors and a step's peak is not hidden by memory the
    allocator kept from an earlier step."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.threading = interval, threading
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        self.thread = self.threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.extra = self.peak - self.start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="P = 2 pairs, 64 + 64 tokens, 2 repeats")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="plain,fused,trl,trl-distill",
                        help="comma-separated subset of plain,fused,trl,trl-distill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="/tmp/bench_train_step")
    parser.add_argument("--qat", choices=["int8", "int4", "int3", "int2"], default=None,
                        help="the QAT row instead: full-size student with / without fake quantization")
    args = parser.parse_args(argv)
    if args.qat:
        return qat_benchmark(args)
    if args.quick:
        args.pairs, args.prompt_len, args.response_len, args.repeats = 2, 64, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see PeakRSS: rerun this process with a fixed threshold
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv),
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})

    from distillm.models import load_model, parse_layer_spec, prune_layers

    teacher, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    keep = parse_layer_spec("even:10", teacher.config.num_hidden_layers)
    student = prune_layers(teacher, keep).float()
    rows, batch = build_batch(tokenizer, args.pairs, args.prompt_len, args.response_len)
    sequences = batch["input_ids"].shape[0]
    tokens = int(batch["attention_mask"].sum())
    response_tokens = int((batch["labels"] != -100).sum())

    variants = args.variants.split(",")
    trainers, inputs = {}, {}
    for name in variants:
        model = copy.deepcopy(student)
        if name == "trl":
            trainer = trl_trainer(model, teacher, tokenizer, sequences, os.path.join(args.out, name))
            # the same sequences; TRL's loss masks by labels (prompt and padding are -100), its model sees all columns
            inputs[name] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                            "labels": batch["labels"]}
        elif name == "trl-distill":
            trainer = trl_distillation_trainer(model, teacher, tokenizer, sequences, os.path.join(args.out, name))
            # prompt and completion columns of the same (fixed-length) sequences
            width = args.response_len
            completion_mask = (batch["labels"][:, -width:] != -100).long()
            inputs[name] = {"prompt_ids": batch["input_ids"][:, :-width],
                            "prompt_mask": batch["attention_mask"][:, :-width],
                            "completion_ids": batch["input_ids"][:, -width:], "completion_mask": completion_mask,
                            "num_items_in_batch": completion_mask.sum().float()}
        else:
            trainer = distillm_trainer(model, teacher, tokenizer, rows, name, os.path.join(args.out, name))
            inputs[name] = dict(batch)
        trainer.model.train()
        trainers[name] = trainer

    def step(name):
        trainer = trainers[name]
        batch_copy = {k: v.clone() for k, v in inputs[name].items()}
        if name == "trl":
            counts = int((batch_copy["labels"][:, 1:] != -100).sum())
        elif name == "trl-distill":
            counts = batch_copy["num_items_in_batch"]
        else:
            counts = trainer._get_num_items_in_batch([batch_copy], "cpu")
        with PeakRSS() as memory:
            start = time.perf_counter()
            loss = trainer.training_step(trainer.model, batch_copy, counts)
            elapsed = time.perf_counter() - start
            trainer.model.zero_grad(set_to_none=True)
        return elapsed, float(loss), memory.extra

    load = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average at start {load[0]:.2f}",
          flush=True)
    print(f"batch: {args.pairs} pairs = {sequences} sequences x ({args.prompt_len} prompt + {args.response_len} "
          f"response) tokens = {tokens} tokens per step ({response_tokens} response tokens)", flush=True)
    times = {name: [] for name in variants}
    peaks = {name: [] for name in variants}
    for rep in range(args.repeats + 1):  # the first round is the warm-up
        for name in variants:
            elapsed, loss, extra = step(name)
            print(f"  {'warm-up' if rep == 0 else f'repeat {rep}'}: {name:11s} {elapsed:7.2f} s  loss {loss:.4f}  "
                  f"peak +{extra / 2**20:.0f} MiB", flush=True)
            if rep:
                times[name].append(elapsed)
                peaks[name].append(extra)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    labels = {"plain": "distillm DistiLLM-2, plain loss (full logits)",
              "fused": "distillm DistiLLM-2, fused loss (default)",
              "trl": "TRL GKDTrainer, experimental (lmbda=0, beta=0.5)",
              "trl-distill": "TRL DistillationTrainer, stable (beta=0.5, generation bypassed)"}
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    peak = {name: statistics.median(p) for name, p in peaks.items()}
    ref = "trl" if "trl" in rate else None
    print(f"\n| step | median time (s) | tokens/s | peak step memory (MiB) | tokens/s vs {ref or '-'} | memory vs "
          f"{ref or '-'} |\n|---|---:|---:|---:|---:|---:|")
    for name in variants:
        vs = f"{rate[name] / rate[ref]:.2f}" if ref else "-"
        mem_vs = f"{peak[name] / peak[ref]:.2f}" if ref and peak[ref] > 0 else "-"
        print(f"| {labels[name]} | {statistics.median(times[name]):.2f} | {rate[name]:.1f} | "
              f"{peak[name] / 2**20:.0f} | {vs} | {mem_vs} |")
    if "plain" in rate and "fused" in rate:
        print(f"fused / plain tokens/s: {rate['fused'] / rate['plain']:.2f}")
    if "fused" in rate and "trl-distill" in rate:
        print(f"distillm2 fused / TRL DistillationTrainer: tokens/s {rate['fused'] / rate['trl-distill']:.2f}, "
              f"peak step memory {peak['fused'] / max(peak['trl-distill'], 1):.2f}")
    if "fused" in rate and "trl" in rate:
        print(f"headline: distillm2 fused tokens/s / TRL GKD tokens/s = {rate['fused'] / rate['trl']:.2f}")


def qat_benchmark(args) -> None:
    """Fake-quantization overhead: the full-size student's DistiLLM-2 fused step with and without torchao fake
    quantization (same weights, same batch), interleaved; and the student's memory."""
    import resource

    from distillm.models import load_model, prune_layers
    from distillm.quant.qat import prepare_qat, quant_bits

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs, prompt_len, response_len = 4, 48, 48  # 8 sequences x 96 tokens (the measurement)
    if args.quick:
        pairs, args.repeats = 2, 2
    teacher, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    student = prune_layers(teacher, list(range(teacher.config.num_hidden_layers))).float()
    rows, batch = build_batch(tokenizer, pairs, prompt_len, response_len)
    tokens = int(batch["attention_mask"].sum())
    models = {"full": copy.deepcopy(student),
              "qat": prepare_qat(copy.deepcopy(student), quant_bits(args.qat), 32)}
    trainers = {name: distillm_trainer(model, teacher, tokenizer, rows, "fused", os.path.join(args.out, name))
                for name, model in models.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    print(f"batch: {pairs} pairs = {batch['input_ids'].shape[0]} sequences x ({prompt_len} + {response_len}) tokens "
          f"= {tokens} tokens per step", flush=True)
    times = {name: [] for name in trainers}
    for rep in range(args.repeats + 1):
        for name, trainer in trainers.items():
            trainer.model.train()
            batch_copy = {k: v.clone() for k, v in batch.items()}
            counts = trainer._get_num_items_in_batch([batch_copy], "cpu")
            start = time.perf_counter()
            loss = trainer.training_step(trainer.model, batch_copy, counts)
            elapsed = time.perf_counter() - start
            trainer.model.zero_grad(set_to_none=True)
            print(f"  {'warm-up' if rep == 0 else f'repeat {rep}'}: {name:5s} {elapsed:7.2f} s  loss {float(loss):.4f}",
                  flush=True)
            if rep:
                times[name].append(elapsed)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    full, qat = (statistics.median(times[name]) for name in ("full", "qat"))
    params = sum(p.numel() for p in student.parameters())
    print(f"\n| step (DistiLLM-2 fused, full-size student) | median time (s) | tokens/s |\n|---|---:|---:|")
    print(f"| no fake quantization | {full:.2f} | {tokens / full:.1f} |")
    print(f"| torchao {args.qat} fake quantization, groups of 32 | {qat:.2f} | {tokens / qat:.1f} |")
    print(f"QAT overhead: {qat / full:.2f}x the step time of the same student without fake quantization")
    print(f"full-size student: {params / 1e6:.1f}M parameters; fp32 weights {params * 4 / 2**20:.0f} MiB, + gradients "
          f"and AdamW's two moments = {params * 16 / 2**20:.0f} MiB in training")
    print(f"peak resident memory of this process (teacher + both students + one step each): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
