"""Error of a top-k teacher (`distillm.losses.fused.TopKTeacher`: the teacher's k most likely tokens'
log-probs and the tail mass 1 - sum_k p over the other tokens) against the exact teacher, on SmolLM2-135M-Instruct
-> a student, for the losses DistiLLM-2 and KD use. Tail treatments (`--tails`), in the same run: `uniform`
(the tail mass spread evenly), `student` (spread in proportion to the student's own probabilities, i.e. one tail
bucket on both sides) and `power` (in proportion to q ** g, g fitted per position to the top-k; the pipeline's
default); each also "+actual": the teacher's exact log-prob of the actual next token, which a
vLLM server sends beside the top-k, as a (k+1)-th known entry where that token is outside the top-k
(`losses.fused.with_actual_token`, what training through `--teacher-url` does).

The student: `--student-quant int4|int3` (the project's default student: the whole teacher fake-quantized in
groups of `--student-quant-group-size`, round-to-nearest, untrained, built by the pipeline's own
`quant.qat.prepare_qat`), or `--student-layers` (the teacher's layers; even:10 is far from the teacher, even:26
close). Which tail is best depends on the student (power for all but the far even:10).

Data (`--responses`): the first `--prompts` built-in training prompts with the teacher's own sampled responses
(temperature 0.8, top-p 0.95, `--max-new-tokens`), i.e. the fixed responses a cache would hold, and/or the
student's own samples with the same settings (DistiLLM-2 takes its SRKL on those; there the actual token is
more often outside the teacher's top-k). For each k and loss: the loss (mean over response tokens) and its
gradient w.r.t. the student's hidden states and output head, computed with the fused losses from the exact
teacher (its hidden states and head) and from the top-k teacher. Reported: |L_k - L| / |L| and
||g_k - g|| / ||g|| (Frobenius, over hidden states and head together), the mean tail mass the top-k leaves out,
the student's mass off the teacher's top-k, and how often the actual token is outside the top-k.

    python benchmarks/bench_topk_teacher.py --quick     # 8 prompts, 32 new tokens
    python benchmarks/bench_topk_teacher.py --quick --ks 20,64,128 --student-quant int4 --responses teacher,student
    python benchmarks/bench_topk_teacher.py             # 32 prompts, 64 new tokens
    python benchmarks/bench_topk_teacher.py --speed     # the cost of each tail: fused SRKL time, ratio to uniform

The last lines are the headlines: the worst relative gradient error over the losses at the largest k, per
response set.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

LOSSES = {"fkl": None, "skl (a=0.1)": 0.1, "srkl (a=0.1)": 0.1}


def load_pair(student_layers: str = "even:10", student_quant: str = "none", group_size: int = 32):
    """SmolLM2-135M-Instruct (float32) and its student: the teacher's layers `student_layers`, or with
    `student_quant` (int8/int4/int3/int2) the whole teacher fake-quantized in groups of `group_size`, round-to-
    nearest, untrained (the pipeline's `--student-quant` student, built by the same `quant.qat.prepare_qat`)."""
    from distillm.models import load_model, parse_layer_spec, prune_layers

    torch.manual_seed(0)
    teacher, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    teacher.eval()
    if student_quant != "none":
        from distillm.quant.qat import prepare_qat, quant_bits

        student = prune_layers(teacher, list(range(teacher.config.num_hidden_layers))).float()
        prepare_qat(student, quant_bits(student_quant), group_size)
        label = f"{student_quant} g{group_size} (all layers, round-to-nearest)"
    else:
        student = prune_layers(teacher, parse_layer_spec(student_layers, teacher.config.num_hidden_layers)).float()
        label = f"layers {student_layers}"
    student.eval()
    return teacher, student, tokenizer, label


def response_problem(teacher, student, tokenizer, prompts_n: int, max_new_tokens: int, who: str = "teacher",
                     seed: int = 0) -> dict:
    """`prompts_n` built-in training prompts with sampled responses (temperature 0.8, top-p 0.95) of `who`
    ("teacher": the fixed responses a cache holds; "student": the student's own samples, on which DistiLLM-2
    takes its SRKL), through both models' final hidden states at the response positions."""
    from distillm.data.prompts import encode_prompts, load_prompts
    from distillm.losses.fused import HeadInputs
    from distillm.models import real_vocab_size
    from distillm.training.collate import build_sequences, pad_left
    from distillm.training.fused_inputs import fused_inputs

    torch.manual_seed(seed)
    vocab = real_vocab_size(tokenizer)
    records, _ = load_prompts("builtin:train", limit=prompts_n)
    prompts, _ = encode_prompts(records, tokenizer, max_prompt_length=256)
    batch = pad_left([(p.input_ids, 0) for p in prompts], tokenizer.pad_token_id)
    generator = {"teacher": teacher, "student": student}[who]
    with torch.inference_mode():
        out = generator.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    sequences = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        response = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
        response = [t for t in response if t != tokenizer.pad_token_id] or [tokenizer.eos_token_id]
        sequences.append(build_sequences(prompt.input_ids, response, 1024))
    data = pad_left(sequences, tokenizer.pad_token_id)
    with torch.inference_mode():
        t = fused_inputs(teacher, data)
    s = fused_inputs(student, data)
    mask = s.mask
    tokens = int(mask.sum())
    hidden = s.head.hidden.detach().requires_grad_(True)
    head = s.head.weight.detach().requires_grad_(True)
    student_in = HeadInputs(hidden, head)
    return dict(teacher=teacher, student=student, tokenizer=tokenizer, vocab=vocab, sequences=sequences, data=data,
                t=t, s=s, mask=mask, tokens=tokens, hidden=hidden, head=head, student_in=student_in,
                labels=s.labels)


def teacher_response_problem(prompts_n: int, max_new_tokens: int, student_layers: str, student_quant: str = "none",
                             group_size: int = 32) -> dict:
    """SmolLM2-135M-Instruct, its student (`load_pair`), and `prompts_n` sampled teacher responses to built-in
    prompts, through both models' final hidden states: what the top-k benchmarks score (shared with
    bench_teacher_server.py)."""
    teacher, student, tokenizer, _ = load_pair(student_layers, student_quant, group_size)
    return response_problem(teacher, student, tokenizer, prompts_n, max_new_tokens, "teacher")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", default="8,32,64,128")
    parser.add_argument("--tails", default="uniform,student,power", help="tail treatments to compare")
    parser.add_argument("--student-layers", default="even:10",
                        help="the teacher layers the student keeps (more layers: a student closer to the teacher)")
    parser.add_argument("--student-quant", default="none", choices=["none", "int8", "int4", "int3", "int2"],
                        help="the student: the whole teacher fake-quantized (round-to-nearest, untrained), as the "
                             "pipeline's --student-quant builds it; overrides --student-layers")
    parser.add_argument("--student-quant-group-size", type=int, default=32)
    parser.add_argument("--responses", default="teacher",
                        help="whose sampled responses to score: teacher, student, or teacher,student")
    parser.add_argument("--actual-token", default="both", choices=["off", "on", "both"],
                        help="also (or only) give the loss the teacher's exact log-prob of the actual token as a "
                             "(k+1)-th known entry when it is outside the top-k (losses.fused.with_actual_token)")
    parser.add_argument("--speed", action="store_true",
                        help="instead: time the fused SRKL loss + backward with each tail on a synthetic problem "
                             "(256 tokens, V = 49152, H = 576, k = 64; best of 3) and print the ratios to uniform")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = 8, 32
    if args.speed:
        return tail_speed(args.tails.split(",") + (["power"] if "power" not in args.tails else []))

    teacher, student, tokenizer, label = load_pair(args.student_layers, args.student_quant,
                                                   args.student_quant_group_size)
    headline = {}
    for who in args.responses.split(","):
        headline[who] = run(args, response_problem(teacher, student, tokenizer, args.prompts, args.max_new_tokens,
                                                   who), label, who)
    for who, line in headline.items():
        print(f"headline ({who} responses): {line}")


def tail_speed(tails: list[str], n: int = 256, h: int = 576, v: int = 49152, k: int = 64) -> None:
    """The cost of a tail treatment: the fused SRKL loss and its gradient from a top-k teacher, per tail."""
    import time

    from distillm.losses.fused import HeadInputs, TopKTeacher, fused_weighted_divergence

    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    head = torch.randn(v, h) * 0.05
    top = torch.log_softmax(torch.randn(n, v) * 3, -1).topk(k)
    weights = torch.full((n,), 1.0 / n)
    best = {}
    for _ in range(3):
        for tail in tails:
            start = time.perf_counter()
            loss, _ = fused_weighted_divergence("srkl", HeadInputs(hidden, head), TopKTeacher(top.values, top.indices,
                                                tail), weights, alpha=0.1)
            loss.backward()
            best[tail] = min(best.get(tail, float("inf")), time.perf_counter() - start)
    base = best.get("uniform", next(iter(best.values())))
    for tail, seconds in best.items():
        print(f"{tail}: {seconds:.3f} s (fused SRKL + backward, {n} tokens, V = {v}, k = {k}), "
              f"ratio to uniform {seconds / base:.2f}")


def run(args, p: dict, label: str, who: str) -> str:
    from distillm.losses.fused import (HeadInputs, TopKTeacher, fused_weighted_divergence, mixture_weight,
                                       with_actual_token)

    sequences, vocab, t, mask, tokens, hidden, head, student_in, labels = (
        p[k] for k in ("sequences", "vocab", "t", "mask", "tokens", "hidden", "head", "student_in", "labels"))
    teacher_in = HeadInputs(t.head.hidden.clone(), t.head.weight)
    t_logp = torch.log_softmax(torch.nn.functional.linear(t.head.hidden, t.head.weight)[..., :vocab].float(), -1)
    own = t_logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # log p(actual token), as vLLM sends it
    with torch.no_grad():
        s_logp = torch.log_softmax(torch.nn.functional.linear(hidden, head)[..., :vocab].float(), -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask].mean().item()
    token_weights = mask.float() / tokens
    print(f"\n{len(sequences)} {who} responses, {tokens} response tokens, V = {vocab}, student {label}, "
          f"KL(teacher || student) per token {kl:.3f}", flush=True)

    def loss_and_grad(name, teacher_scores):
        divergence = name.split(" ")[0]
        loss, _ = fused_weighted_divergence(divergence, student_in, teacher_scores, token_weights,
                                            **mixture_weight(divergence, LOSSES[name]), mask=mask, vocab_size=vocab)
        grads = torch.autograd.grad(loss, (hidden, head))
        return loss.detach(), torch.cat([g.reshape(-1) for g in grads])

    exact = {name: loss_and_grad(name, teacher_in) for name in LOSSES}
    ks = [int(k) for k in args.ks.split(",")]
    variants = [(tail, actual) for tail in args.tails.split(",")
                for actual in {"off": [False], "on": [True], "both": [False, True]}[args.actual_token]]
    names = [tail + ("+actual" if actual else "") for tail, actual in variants]
    print(f"\n| responses | k | loss | tail | teacher tail mass | loss rel. error | gradient rel. error |\n"
          "|---|---:|---|---|---:|---:|---:|")
    worst = {}
    for k in ks:
        top = t_logp.topk(k, dim=-1)
        tail_mass = (1 - top.values.exp().sum(-1))[mask].mean().item()
        q_tail = (1 - s_logp.gather(-1, top.indices).exp().sum(-1))[mask].mean().item()
        outside = (~(top.indices == labels.clamp_min(0).unsqueeze(-1)).any(-1))[mask].float().mean().item()
        print(f"k = {k}: teacher tail mass {tail_mass:.4f}, student mass off the teacher's top-k {q_tail:.4f}, "
              f"actual token outside the top-k at {outside:.1%} of positions", flush=True)
        for name in LOSSES:
            for (tail, actual), variant in zip(variants, names):
                scores = TopKTeacher(top.values, top.indices, tail, own)
                if actual:
                    scores = with_actual_token(scores, labels)
                loss, grad = loss_and_grad(name, scores)
                ref_loss, ref_grad = exact[name]
                loss_err = ((loss - ref_loss).abs() / ref_loss.abs()).item()
                grad_err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
                worst[variant, k] = max(worst.get((variant, k), 0.0), grad_err)
                print(f"| {who} | {k} | {name} | {variant} | {tail_mass:.4f} | {loss_err:.2e} | {grad_err:.2e} |",
                      flush=True)
    for k in ks:
        print(f"worst gradient relative error at k = {k} ({who} responses): "
              + ", ".join(f"{v} {worst[v, k]:.2e}" for v in names))
    return f"worst gradient relative error at k = {ks[-1]}: " + ", ".join(f"{v} {worst[v, ks[-1]]:.2e}" for v in names)


if __name__ == "__main__":
    main()
