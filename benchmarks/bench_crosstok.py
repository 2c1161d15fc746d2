"""Peak memory and time of the cross-tokenizer loss at the real pair's sizes: a Gemma-3-270M-like teacher
(V_t = 262,144, H = 640) and a SmolLM2-135M-like student (V_s = 49,152, H = 576), random heads and hidden states,
N sequences x R response tokens, groups as a real alignment has them (~90% 1:1). Forward + backward of
`crosstok.losses.aligned_divergence`:

- head: HeadInputs (hidden states + head), chunks of groups under activation checkpointing -- what training uses;
- logits: the same from full [N, R, V] logits of both models (what a plain implementation would materialise).

Each mode runs in its own process (fresh allocator), with glibc's mmap threshold fixed at 1 MiB so the resident
size follows the live tensors (as benchmarks/bench_train_step.py). Prints peak RSS above the inputs and the
seconds per step, and the ratios.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_crosstok.py [--n 4 --r 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_train_step import PeakRSS  # noqa: E402

from distillm.crosstok.losses import AlignedGroups, aligned_divergence  # noqa: E402
from distillm.crosstok.vocab import VocabMap  # noqa: E402
from distillm.losses.fused import HeadInputs  # noqa: E402

VT, VS, HT, HS = 262_144, 49_152, 640, 576


def inputs(n: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(n, r, HS, generator=g).requires_grad_()
    s_weight = (torch.randn(VS, HS, generator=g) * 0.05).requires_grad_()
    t_hidden = torch.randn(n, r, HT, generator=g)
    t_weight = torch.randn(VT, HT, generator=g) * 0.05
    s_targets = torch.randint(0, VS, (n, r), generator=g)
    t_targets = torch.randint(0, VT, (n, r), generator=g)
    rows, ts, te, ss, se, one = [], [], [], [], [], []
    for b in range(n):  # groups: mostly 1:1, every 10th a 2:1 merge on the teacher side
        i = j = 0
        while i < r - 1 and j < r - 1:
            width = 2 if (i % 10 == 9) else 1
            rows.append(b), ts.append(i), te.append(i + width), ss.append(j), se.append(j + 1), one.append(width == 1)
            i += width
            j += 1
    groups = AlignedGroups(*(torch.tensor(x) for x in (rows, ts, te, ss, se)), torch.tensor(one))
    k = 46_146  # the real pair's shared vocabulary size
    perm_t = torch.randperm(VT, generator=g)[:k]
    perm_s = torch.randperm(VS, generator=g)[:k]
    vmap = VocabMap(perm_t, perm_s, VT, VS)
    return s_hidden, s_weight, t_hidden, t_weight, s_targets, t_targets, groups, vmap


def one(mode: str, n: int, r: int, repeats: int) -> dict:
    s_hidden, s_weight, t_hidden, t_weight, s_targets, t_targets, groups, vmap = inputs(n, r)
    times = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            start = time.perf_counter()
            if mode == "head":
                student, teacher = HeadInputs(s_hidden, s_weight), HeadInputs(t_hidden, t_weight)
            else:
                student = s_hidden @ s_weight.T
                with torch.no_grad():
                    teacher = t_hidden @ t_weight.T
            values = aligned_divergence("skl", student, teacher, s_targets, t_targets, groups, vmap, weight=0.1)
            values.sum().backward()
            s_hidden.grad = s_weight.grad = None
            del student, teacher, values
            times.append(time.perf_counter() - start)
    return {"mode": mode, "n": n, "r": r, "groups": int(groups.row.numel()), "peak_mib": round(mem.extra / 2**20, 1),
            "seconds": round(min(times), 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=("head", "logits"))
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(one(args.mode, args.n, args.r, args.repeats)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    results = {}
    for mode in ("head", "logits"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--n", str(args.n), "--r", str(args.r),
                              "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    h, l = results["head"], results["logits"]
    full = args.n * args.r * (VT + VS) * 4 / 2**20
    print(f"full fp32 logits of both models for {args.n}x{args.r} tokens: {full:.0f} MiB")
    print(f"peak memory head/logits: {h['peak_mib'] / max(l['peak_mib'], 1e-9):.3f}; "
          f"time head/logits: {h['seconds'] / max(l['seconds'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
