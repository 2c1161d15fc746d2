"""What the trainer process holds after loading a run's models, with the local teacher and with --teacher-url:
the teacher's resident parameter bytes, the student's, the process's RSS before and after `load_text_models`, and
its peak RSS. SmolLM2-135M-Instruct (teacher) -> its 10-layer student (--student-layers even:10), float32 on CPU.

Each case runs in its own Python process (a freed model's pages are not always returned to the OS, so one process
could not measure both). No server is needed: `load_text_models` does not contact it (`distillm run` checks the
URL before loading, `pipeline.driver.connect_teacher`); the URL only tells it that the teacher is served.

    python benchmarks/bench_teacher_memory.py
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(url: str | None, teacher: str, layers: str) -> dict:
    from distillm.config import load_config
    from distillm.pipeline.setup import load_text_models

    overrides = {"teacher": teacher, "student_layers": layers, **({"teacher_url": url} if url else {})}
    config = load_config(overrides=overrides)
    before = rss_mb()
    pair = load_text_models(config)
    gc.collect()

    def mb(model):
        return 0.0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    return {"teacher_url": url, "teacher_params_mb": round(mb(pair.teacher), 1),
            "student_params_mb": round(mb(pair.student), 1), "rss_before_mb": round(before),
            "rss_after_mb": round(rss_mb()), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--student-layers", default="even:10")
    parser.add_argument("--one", choices=("local", "remote"), help=argparse.SUPPRESS)  # a child process's case
    args = parser.parse_args()
    if args.one:
        url = "http://127.0.0.1:1" if args.one == "remote" else None  # never contacted
        print(json.dumps(measure(url, args.teacher, args.student_layers)))
        return
    results = {}
    for case in ("local", "remote"):
        out = subprocess.run([sys.executable, __file__, "--one", case, "--teacher", args.teacher,
                              "--student-layers", args.student_layers], capture_output=True, text=True, check=True)
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'':<16}{'teacher params':>16}{'student params':>16}{'RSS before':>12}{'RSS after':>12}{'peak RSS':>10}")
    for case, r in results.items():
        print(f"{case:<16}{r['teacher_params_mb']:>13.0f} MB{r['student_params_mb']:>13.0f} MB"
              f"{r['rss_before_mb']:>9} MB{r['rss_after_mb']:>9} MB{r['peak_rss_mb']:>7} MB")
    local, remote = results["local"], results["remote"]
    grown = (remote["rss_after_mb"] - remote["rss_before_mb"]) / max(local["rss_after_mb"] - local["rss_before_mb"], 1)
    print(f"RSS added by loading, --teacher-url / local: {grown:.2f}")


if __name__ == "__main__":
    main()
