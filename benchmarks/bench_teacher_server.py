"""The teacher as a service, measured on SmolLM2-135M-Instruct (teacher) -> its 10-layer student: what crosses the
wire per response token, and the loss and gradient error of the server's top-K scores against the exact local
teacher, at K = 20 and 64; and how much of the scoring the prefetch hides behind training.

The teacher runs in a loopback server process (`distillm.teacher.loopback`, vLLM's completions/prompt_logprobs
protocol over HTTP on 127.0.0.1). Data: the teacher's own sampled responses to the first `--prompts` built-in
training prompts (temperature 0.8, top-p 0.95, `--max-new-tokens`), as a run's fixed responses.

Reported per K: bytes received per scored response token (vLLM's JSON: id, logprob, rank, decoded token per
entry) against the 8 K bytes of a binary (int32 id, float32 log-prob) encoding; and for fkl, skl (a = 0.1) and
srkl (a = 0.1) (tail="auto"): |L_K - L| / |L| and ||g_K - g|| / ||g|| (gradient w.r.t. the student's hidden states
and head), L, g from the exact teacher. Prefetch: `--steps` micro-batches of `--batch` sequences, each followed
by a student forward + backward ("training"), scored one after another (wait, then train) or with every
micro-batch's requests sent first (RemoteScores.prefetch, as the trainer does per optimizer step): the wall
times and their ratio, in one run. On this 2-core machine the server and the trainer share the CPUs, so the
overlap can hide little; on separate machines it hides up to min(scoring, training) per micro-batch.

    python benchmarks/bench_teacher_server.py --quick     # 8 prompts, 32 new tokens
    python benchmarks/bench_teacher_server.py             # 32 prompts, 64 new tokens
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_topk_teacher import teacher_response_problem  # noqa: E402  (the shared teacher-response setup)

LOSSES = {"fkl": None, "skl (a=0.1)": 0.1, "srkl (a=0.1)": 0.1}


def start_server(model: str):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distillm.teacher.loopback", "--model", model, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"the loopback server did not start: {line!r}")
    return proc, line.split()[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", default="20,64")
    parser.add_argument("--steps", type=int, default=4, help="micro-batches in the prefetch comparison")
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch there")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = 8, 32
    torch.set_num_threads(1)

    from distillm.losses.fused import HeadInputs, fused_weighted_divergence, mixture_weight
    from distillm.teacher.client import TeacherClient
    from distillm.teacher.remote import RemoteScores
    from distillm.training.collate import pad_left
    from distillm.training.fused_inputs import fused_inputs

    proc, url = start_server("smollm2-135m-instruct")
    try:
        p = teacher_response_problem(args.prompts, args.max_new_tokens, "even:10")
        teacher, student, tokenizer, vocab, sequences, data, t, s, mask, tokens, hidden, head, student_in = (
            p[k] for k in ("teacher", "student", "tokenizer", "vocab", "sequences", "data", "t", "s", "mask",
                           "tokens", "hidden", "head", "student_in"))
        token_weights = mask.float() / tokens

        def loss_and_grad(name, teacher_scores):
            divergence = name.split(" ")[0]
            loss, _ = fused_weighted_divergence(divergence, student_in, teacher_scores, token_weights,
                                                **mixture_weight(divergence, LOSSES[name]), mask=mask, vocab_size=vocab)
            grads = torch.autograd.grad(loss, (hidden, head))
            return loss.detach(), torch.cat([g.reshape(-1) for g in grads])

        exact = {name: loss_and_grad(name, HeadInputs(t.head.hidden.clone(), t.head.weight)) for name in LOSSES}
        print(f"{len(sequences)} teacher responses, {tokens} response tokens, V = {vocab}, server {url}", flush=True)
        worst, per_k_bytes = {}, {}
        print("\n| K | bytes/token (JSON) | bytes/token (binary 8K) | loss | loss rel. error | gradient rel. error |"
              "\n|---:|---:|---:|---|---:|---:|")
        for k in [int(x) for x in args.ks.split(",")]:
            client = TeacherClient(url, concurrency=2)
            scores = RemoteScores(client, k, vocab).scores(None, data)
            per_token = client.bytes_received / max(tokens, 1)
            per_k_bytes[k] = per_token
            for name in LOSSES:
                loss, grad = loss_and_grad(name, scores)
                ref_loss, ref_grad = exact[name]
                worst[k] = max(worst.get(k, 0.0), ((grad - ref_grad).norm() / ref_grad.norm()).item())
                print(f"| {k} | {per_token:,.0f} | {8 * k} | {name} | "
                      f"{((loss - ref_loss).abs() / ref_loss.abs()).item():.2e} | "
                      f"{((grad - ref_grad).norm() / ref_grad.norm()).item():.2e} |", flush=True)
            client.close()

        # prefetch: score micro-batch i + 1 .. while micro-batch i trains
        k = int(args.ks.split(",")[0])
        micro = [pad_left(sequences[(i * args.batch) % len(sequences):][:args.batch], tokenizer.pad_token_id)
                 for i in range(args.steps)]

        def train_step(b):
            f = fused_inputs(student, b)
            f.head.hidden.float().pow(2).mean().backward()
            student.zero_grad(set_to_none=True)

        times = {}
        for mode in ("sequential", "prefetch"):
            client = TeacherClient(url, concurrency=2)
            remote = RemoteScores(client, k, vocab, max_pending=args.steps)
            start = time.perf_counter()
            if mode == "prefetch":
                for b in micro:
                    remote.prefetch(b)
            for b in micro:
                remote.scores(None, b)
                train_step(b)
            times[mode] = time.perf_counter() - start
            client.close()
        print(f"\nprefetch: {args.steps} micro-batches of {args.batch} sequences, K = {k}: sequential "
              f"{times['sequential']:.2f} s, prefetched {times['prefetch']:.2f} s, ratio "
              f"{times['prefetch'] / times['sequential']:.2f}")
        print("headline: " + "; ".join(f"K = {k}: {per_k_bytes[k]:,.0f} bytes/token, worst gradient rel. error "
                                       f"{worst[k]:.2e}" for k in worst)
              + f"; prefetched / sequential {times['prefetch'] / times['sequential']:.2f}")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
