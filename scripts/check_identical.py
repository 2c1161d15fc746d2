"""Bit-for-bit check of a refactor: run the tiny preset for every method (and a tiny vision-language run), then
compare each run's metrics.json figures and student weights with a stored baseline.

    python scripts/check_identical.py record  BASE_DIR      # before the change: run every method, keep the outputs
    python scripts/check_identical.py compare BASE_DIR NEW  # after: run again into NEW and compare with BASE_DIR

Figures compared: every value in metrics.json except wall-clock ones (keys ending in "seconds"); paths under the
two output roots are compared relative to them. Weights: every
tensor of student/model.safetensors with torch.equal (same dtype, shape and bits). Exit status 1 on any difference.
Methods: --methods a,b,c (default: every method of the tiny preset, plus vision runs for distillm2 and kd).
Cross-tokenizer runs (a tiny student with another tokenizer, `pipeline.cross`) on request: cross-<method>, e.g.
--methods cross-distillm2,cross-gkd,cross-dpkd,cross-kd.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TEXT_METHODS = ("distillm2", "distillm", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "speculative-kd",
                "step-by-step")
VISION_METHODS = ("distillm2", "kd")


def _run(args: list[str], log: Path) -> None:
    with log.open("w") as handle:
        code = subprocess.call([sys.executable, "-m", "distillm", *args], stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"distillm {' '.join(args)} failed ({code}); see {log}")


def _vision_setup(root: Path) -> dict:
    try:
        from distillm.testing.tiny_vision import write_tiny_vlm_setup
    except ImportError:  # before the testing subpackage existed (the baseline)
        from distillm.tiny_vision import write_tiny_vlm_setup
    return write_tiny_vlm_setup(root / "_vlm", num_prompts=8, num_eval_prompts=2)


def run_all(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    setup = pair_student = None
    for name in names:
        out = root / name
        if (out / "metrics.json").is_file():
            continue
        if name.startswith("vision-"):
            setup = setup or _vision_setup(root)
            args = ["-q", "run", "--preset", "tiny", "--method", name[len("vision-"):], "--teacher",
                    str(setup["teacher"]), "--student", str(setup["student"]), "--prompts", str(setup["prompts"]),
                    "--eval-prompts", str(setup["eval_prompts"]), "--rounds", "2", "--max-new-tokens", "6"]
        elif name.startswith("cross-"):  # the tiny teacher and a tiny student with a merged tokenizer
            if pair_student is None:
                from distillm.crosstok.testing import save_tiny_pair_student

                pair_student = save_tiny_pair_student(root / "_pair_student")
            args = ["-q", "run", "--preset", "tiny", "--method", name[len("cross-"):], "--student", pair_student,
                    "--num-prompts", "8", "--num-eval-prompts", "4", "--rounds", "2", "--max-new-tokens", "12",
                    "--per-device-train-batch-size", "4"]
        else:
            args = ["-q", "run", "--preset", "tiny", "--method", name]
        print(f"running {name}", flush=True)
        _run([*args, "--output-dir", str(out)], root / f"{name}.log")


def _figures(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            if not key.endswith("seconds"):
                yield from _figures(item, f"{prefix}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _figures(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def compare(base: Path, new: Path, names: list[str]) -> list[str]:
    import torch
    from safetensors.torch import load_file

    problems = []
    for name in names:
        # paths inside the two output roots (the tiny VLM's teacher/student) are compared relative to them
        a = dict(_figures(json.loads((base / name / "metrics.json").read_text().replace(str(base), "<root>"))))
        b = dict(_figures(json.loads((new / name / "metrics.json").read_text().replace(str(new), "<root>"))))
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<missing>") != b.get(key, "<missing>"):
                problems.append(f"{name}: metrics{key}: {a.get(key, '<missing>')} != {b.get(key, '<missing>')}")
        wa = load_file(base / name / "student" / "model.safetensors")
        wb = load_file(new / name / "student" / "model.safetensors")
        if set(wa) != set(wb):
            problems.append(f"{name}: weight names differ: {sorted(set(wa) ^ set(wb))}")
        for key in sorted(set(wa) & set(wb)):
            if wa[key].dtype != wb[key].dtype or not torch.equal(wa[key], wb[key]):
                problems.append(f"{name}: weight {key} differs")
        print(f"{name}: {len(a)} figures, {len(wa)} tensors compared", flush=True)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("base")
    parser.add_argument("new", nargs="?")
    parser.add_argument("--methods", default=None, help="comma-separated names (vision runs: vision-<method>, "
                        "cross-tokenizer runs: cross-<method>)")
    args = parser.parse_args()
    names = args.methods.split(",") if args.methods else [*TEXT_METHODS, *(f"vision-{m}" for m in VISION_METHODS)]
    if args.action == "record":
        run_all(Path(args.base), names)
        return 0
    if not args.new:
        parser.error("compare needs NEW")
    run_all(Path(args.new), names)
    problems = compare(Path(args.base), Path(args.new), names)
    for line in problems:
        print("DIFF", line)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
