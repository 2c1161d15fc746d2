"""Peak memory and time of one forward + backward of a token-level distillation loss: plain (full logits) vs
fused (chunked, `distillm.losses.fused`), and the peers Liger-Kernel (LigerFusedLinearJSDLoss) and TRL
(GKDTrainer.generalized_jsd_loss on full logits) where they can be imported.

Setting: student and teacher hidden states [B * L, H] (every position a response token), their output heads
[V, H] (no bias, as SmolLM2), fp32, JSD with b = 0.5 (the divergence all four implement; `--divergence` picks
another for plain and fused), loss = mean over tokens, gradient w.r.t. the student's hidden states and head.

Method. Each (configuration, implementation) runs in a fresh subprocess, so one out-of-memory does not end
the script and no allocator state leaks between runs. The subprocess builds the inputs, resets the kernel's
peak-RSS mark (`echo 5 > /proc/self/clear_refs`) after one small warm-up call, records VmRSS, runs forward + backward once, and reports
VmHWM - VmRSS: the extra resident memory at the peak of that call, as the kernel counts it (logits,
temporaries, saved tensors and the gradients of the hidden states and head, which every implementation
produces). Time is the wall clock of forward + backward, the best of `--repeats` calls (the first one is the
memory run). The subprocess's address space is capped (RLIMIT_AS, `--mem-cap-gib`, at most the available
memory less 2 GiB), so a configuration that does not fit fails fast with an allocation error and is reported as
infeasible instead of swapping or calling the OOM killer.

    python benchmarks/bench_loss.py --quick      # V = 49,152, L = 512: a few minutes on 2 CPU cores
    python benchmarks/bench_loss.py              # V in {49,152, 151,936} x L in {512, 2048}, batch 4, H = 576
                                                 # plus V = 151,936, L = 256 (--extra), where plain still fits

The last line is the headline: fused/plain extra peak memory at the largest configuration (an upper bound when
plain does not fit under the cap) and the time ratio at the largest configuration where plain runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLS = ("plain", "fused", "fused_weighted", "liger", "trl")
LABELS = {
    "plain": "plain (full logits, distillm divergences)",
    "fused": "fused per-token (fused_divergence)",
    "fused_weighted": "fused weighted (fused_weighted_divergence)",
    "liger": "Liger LigerFusedLinearJSDLoss (compiled=False)",
    "trl": "TRL GKDTrainer.generalized_jsd_loss (full logits)",
}


# ----------------------------------------------------------------------------------------------- worker side
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(impl: str, args):
    """Inputs and a closure running forward + backward once (gradients cleared before each call)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    n, h, v = args.batch * args.length, args.hidden, args.vocab
    h_s = (torch.randn(n, h) / h**0.25).requires_grad_(True)
    w_s = (torch.randn(v, h) / h**0.25).requires_grad_(True)
    h_t, w_t = torch.randn(n, h) / h**0.25, torch.randn(v, h) / h**0.25
    weight = {"jsd": 0.5, "skl": 0.1, "srkl": 0.1}.get(args.divergence)

    if impl == "plain":
        from distillm.losses import divergences as D
        fn = {"jsd": lambda s, t: D.generalized_jsd(s, t, 0.5), "fkl": D.forward_kl, "rkl": D.reverse_kl,
              "skl": lambda s, t: D.skew_forward_kl(s, t, 0.1), "srkl": lambda s, t: D.skew_reverse_kl(s, t, 0.1),
              "tvd": D.total_variation}[args.divergence]

        def step():
            s = F.linear(h_s, w_s)
            with torch.no_grad():
                t = F.linear(h_t, w_t)
            return fn(s, t).mean()
    elif impl in ("fused", "fused_weighted"):
        from distillm.losses.fused import HeadInputs, fused_divergence, fused_weighted_divergence, mixture_weight
        student, teacher = HeadInputs(h_s, w_s), HeadInputs(h_t, w_t)
        if impl == "fused":
            def step():
                return fused_divergence(args.divergence, student, teacher, **mixture_weight(args.divergence, weight),
                                        chunk_size=args.chunk).mean()
        else:
            token_weights = torch.full((n,), 1.0 / n)

            def step():
                return fused_weighted_divergence(args.divergence, student, teacher, token_weights,
                                                 **mixture_weight(args.divergence, weight), chunk_size=args.chunk)[0]
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        kwargs = {} if args.chunk is None else {"chunk_size": args.chunk}
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False,
                                          **kwargs)
        labels = torch.zeros(n, dtype=torch.long)

        def step():
            return loss_fn(h_s, w_s, h_t, w_t, labels)
    elif impl == "trl":
        from trl.experimental.gkd import GKDTrainer

        def step():
            s = F.linear(h_s, w_s)
            with torch.no_grad():
                t = F.linear(h_t, w_t)
            return GKDTrainer.generalized_jsd_loss(s.unsqueeze(0), t.unsqueeze(0), beta=0.5)
    else:
        raise ValueError(impl)

    def run():
        h_s.grad = w_s.grad = None
        loss = step()
        loss.backward()
        return float(loss)

    return run


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"impl": args.impl, "vocab": args.vocab, "length": args.length}
    try:
        # one small call first: lazy initialisation (libraries, thread pools) is not the loss's memory
        _build(args.impl, argparse.Namespace(**{**vars(args), "length": 16, "vocab": 1024, "chunk": None}))()
        run = _build(args.impl, args)
    except ImportError as error:
        print(json.dumps({**result, "status": "skipped", "why": f"not importable: {error}"}))
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        base = _proc_kib("VmRSS")
        base_vm = _proc_kib("VmSize")
        start = time.perf_counter()
        loss = run()
        times = [time.perf_counter() - start]
        peak = _proc_kib("VmHWM")
        for _ in range(args.repeats - 1):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as error:
        msg = str(error).splitlines()[0][:160]
        status = "oom" if "alloc" in msg.lower() or isinstance(error, MemoryError) else "error"
        if status == "oom":
            # the call tried to add more address space than the cap left it: a lower bound on its need
            cap = resource.getrlimit(resource.RLIMIT_AS)[0]
            result["needs_more_than_gib"] = (cap / 2**10 - base_vm) / 2**20
        print(json.dumps({**result, "status": status, "why": msg}))
        return
    print(json.dumps({**result, "status": "ok", "loss": loss, "extra_peak_gib": (peak - base) / 2**20,
                      "time_s": min(times), "times": times, "load1": os.getloadavg()[0]}))


# ----------------------------------------------------------------------------------------------- driver side
def _available_gib() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def run_one(impl: str, vocab: int, length: int, args) -> dict:
    cap_gib = min(args.mem_cap_gib, _available_gib() - 2.0)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--vocab", str(vocab),
           "--length", str(length), "--batch", str(args.batch), "--hidden", str(args.hidden),
           "--divergence", args.divergence, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    chunk = args.liger_chunk if impl == "liger" else args.chunk
    if chunk:
        cmd += ["--chunk", str(chunk)]
    cap = int(cap_gib * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=args.timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            out["cap_gib"] = cap_gib
            return out
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
    status = "oom" if proc.returncode in (-9, 137) or "alloc" in tail.lower() else "error"
    return {"impl": impl, "vocab": vocab, "length": length, "status": status, "why": tail, "cap_gib": cap_gib}


def fmt(r: dict | None, key: str, spec: str) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        if r["status"] == "oom":
            if "needs_more_than_gib" in r:
                return f"does not fit (needs > {r['needs_more_than_gib']:.1f})"
            return f"does not fit ({r['cap_gib']:.0f} GiB cap)"
        return {"skipped": "skipped"}.get(r["status"], "error")
    return format(r[key], spec)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="V = 49,152 and L = 512 only")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--length", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--extra", nargs="*", default=["151936x256"], metavar="VxL",
                        help="shapes run besides the V x L grid (default: the largest with V = 151,936 that plain "
                             "fits in this machine's 24 GiB, for a time ratio at that vocabulary)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--divergence", default="jsd", choices=["jsd", "fkl", "rkl", "skl", "srkl", "tvd"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--chunk", type=int, default=None, help="fused chunk size (default: the library's)")
    parser.add_argument("--liger-chunk", type=int, default=None, help="Liger chunk size (default: Liger's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per configuration (best is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mem-cap-gib", type=float, default=18.0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", help="also write the results as JSON lines to this file")
    parser.add_argument("--from-json", nargs="+", help="print the table and headline of earlier --json files (a later "
                        "file's result replaces an earlier one's for the same configuration); run nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.vocab, args.length = args.vocab[0], args.length[0]
        return worker(args)
    if args.quick:
        args.vocab, args.length, args.extra = [49152], [512], []
    args.shapes = [(v, l) for v in args.vocab for l in args.length]
    for spec in args.extra:
        try:
            v, l = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            parser.error(f"--extra {spec!r}: expected VOCABxLENGTH, e.g. 151936x256")
        if (v, l) not in args.shapes:
            args.shapes.append((v, l))
    if args.divergence != "jsd":
        args.impls = [i for i in args.impls if i not in ("liger", "trl")]
    if args.from_json:
        rows = []
        for path in args.from_json:  # a configuration in a later file replaces all of its rows from earlier files
            with open(path) as handle:
                new = [json.loads(line) for line in handle if line.strip()]
            shapes = {(r["vocab"], r["length"]) for r in new}
            rows = [r for r in rows if (r["vocab"], r["length"]) not in shapes] + new
        results = {(r["vocab"], r["length"], r["impl"]): r for r in rows}
        args.shapes = sorted({(r["vocab"], r["length"]) for r in rows})
        return summarize(results, args)

    import platform

    import torch
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{_available_gib():.1f} GiB available, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"divergence {args.divergence}, batch {args.batch}, hidden {args.hidden}, fp32; "
          "memory = peak RSS - RSS before the call (fresh subprocess each)", flush=True)
    results = {}
    for vocab, length in args.shapes:
        for impl in args.impls:
            r = run_one(impl, vocab, length, args)
            results[(vocab, length, impl)] = r
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(r) + "\n")
            if r["status"] == "ok":
                print(f"  V={vocab} L={length} {impl}: {r['extra_peak_gib']:.3f} GiB, {r['time_s']:.2f} s",
                      flush=True)
            else:
                print(f"  V={vocab} L={length} {impl}: {fmt(r, 'time_s', '')} [{r.get('why', '')}]", flush=True)

    summarize(results, args)


def _plain_bound(r: dict) -> float:
    """Lower bound (GiB) on what an out-of-memory run needed: the address space its call could still add. Older
    result files lack it: the cap less 3.5 GiB, more than a worker holds before the call (torch and the inputs:
    2.9 GiB measured at V = 151,936, L = 256, and the inputs at V = 151,936, L = 2048 are 0.4 GiB larger)."""
    return r.get("needs_more_than_gib", r["cap_gib"] - 3.5)


def summarize(results: dict, args) -> None:
    """The table, the ratios to plain, and the headline (last line).

    Memory: fused / plain at the largest configuration; where plain does not fit under the cap, the honest bound
    fused / cap (plain needs more than the cap). Time: fused / plain at the largest configuration where plain ran.
    """
    print()
    print("| V | L | N = B*L | implementation | extra peak memory (GiB) | fwd+bwd time (s) | memory / plain | time / plain |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for vocab, length in args.shapes:
        plain = results.get((vocab, length, "plain"))
        for impl in args.impls:
            r = results.get((vocab, length, impl))
            if r is None:
                continue
            ok = r["status"] == "ok" and plain is not None and plain["status"] == "ok"
            mem_ratio = f"{r['extra_peak_gib'] / plain['extra_peak_gib']:.3f}" if ok else "-"
            time_ratio = f"{r['time_s'] / plain['time_s']:.2f}" if ok else "-"
            print(f"| {vocab} | {length} | {args.batch * length} | {LABELS[impl]} | {fmt(r, 'extra_peak_gib', '.3f')} "
                  f"| {fmt(r, 'time_s', '.2f')} | {mem_ratio} | {time_ratio} |")
    print()

    def ok(v, l, impl):
        r = results.get((v, l, impl))
        return r if r is not None and r["status"] == "ok" else None

    # the 1.15x time target, checked at every configuration where plain and a fused path both ran
    for v, l in args.shapes:
        for impl in ("fused", "fused_weighted"):
            if ok(v, l, "plain") and ok(v, l, impl):
                ratio = ok(v, l, impl)["time_s"] / ok(v, l, "plain")["time_s"]
                print(f"time {impl}/plain at V={v} L={l}: {ratio:.2f} "
                      f"({'meets' if ratio <= 1.15 else 'MISSES'} the <= 1.15 target)")
    vocab, length = max(args.shapes, key=lambda vl: vl[0] * vl[1])
    plain = results.get((vocab, length, "plain"))
    feasible = [vl for vl in args.shapes if ok(*vl, "plain")]
    parts = []
    for impl in ("fused", "fused_weighted"):
        r = ok(vocab, length, impl)
        if r is None or plain is None:
            continue
        if plain["status"] == "ok":
            part = f"{impl} {r['extra_peak_gib'] / plain['extra_peak_gib']:.3f}"
        elif plain["status"] == "oom":
            part = f"{impl} < {r['extra_peak_gib'] / _plain_bound(plain):.3f} ({r['extra_peak_gib']:.2f} GiB)"
            if feasible:  # plain's memory is linear in N x V: extrapolate from the largest shape where it ran
                v, l = max(feasible, key=lambda vl: vl[0] * vl[1])
                estimate = ok(v, l, "plain")["extra_peak_gib"] * (vocab * length) / (v * l)
                part += f", ~{r['extra_peak_gib'] / estimate:.3f} against plain's {estimate:.0f} GiB extrapolated"
        else:
            continue
        if feasible:
            v, l = max(feasible, key=lambda vl: vl[0] * vl[1])
            if ok(v, l, impl):
                part += f", time {ok(v, l, impl)['time_s'] / ok(v, l, 'plain')['time_s']:.2f}x at V={v} L={l}"
        parts.append(part)
    if not parts:
        print(f"headline: no fused result at V={vocab} L={length}")
        return
    note = "" if plain["status"] == "ok" else (
        f" [plain does not fit: it needs more than the {_plain_bound(plain):.1f} GiB of address space the "
        f"{plain['cap_gib']:.1f} GiB cap left the call; bound = fused / that]")
    print(f"headline: fused/plain extra peak memory at V={vocab} L={length} (target <= 0.125){note}: "
          + "; ".join(parts))


if __name__ == "__main__":
    main()
