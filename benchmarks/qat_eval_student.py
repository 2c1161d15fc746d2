"""Held-out KL / TVD of a saved fake-quantized student (qat_budget.py's student/ directory), computed with
torchao's own fake-quantized forward (no inference cache), against the run's held-out teacher responses.

    PYTHONPATH=src python benchmarks/qat_eval_student.py --run runs/qat_budget/int3-kd-lr5e-5 --bits 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from qat_budget import fake_quantize  # noqa: E402

from distillm.evaluation.divergence import teacher_student_divergence  # noqa: E402
from distillm.io import read_jsonl  # noqa: E402
from distillm.models import load_model, real_vocab_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=192)
    args = ap.parse_args()
    run = Path(args.run)
    teacher, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    student, _ = load_model(str(run / "student"), dtype="float32")
    fake_quantize(student, args.bits, args.group_size)
    rows = read_jsonl(run / "data" / "teacher_eval.jsonl")
    figures = teacher_student_divergence(teacher, student, rows, vocab_size=real_vocab_size(tokenizer),
                                         pad_token_id=tokenizer.pad_token_id, max_length=args.max_length)
    (run / "after_fresh.json").write_text(json.dumps(figures, indent=1), encoding="utf-8")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
