"""Where DistiLLM-2's two terms push a student, at given students (issue 19's "SRKL gradient share").

For each student: its own samples of the first N training prompts (T 0.8, top-p 0.95, as in training), then
`distillm.evaluation.gradients`: the gradients of KL(p || q) and SKL_a on the teacher's responses and of SRKL_a on
the student's samples, their norms and cosines, and for b = 1 and 1.5 the SRKL term's share of the combined
update and the cosine of that update with the KL gradient (the direction that lowers the held-out KL).

    python benchmarks/bench_gradient_share.py --teacher-rows RUN_OR_COMPARE/shared/teacher_train.jsonl \\
        --student start=rtn:int3 --student distillm2=runs/compare-int3/cells/distillm2/seed_0/run/student \\
        --output gradient_share.json

`rtn:int3` (or `rtn:int4`, ...) is the teacher quantized round-to-nearest in groups of 32, and `layers:even:10`
the teacher's pruned copy: a comparison's starting students. Every --student is checked before any work. Prints
one block per student, writes every figure as JSON, and ends with the headline: per student, the SRKL share at
b = 1 and the cosine of that update with the KL gradient.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from distillm.data.prompts import EncodedPrompt
from distillm.evaluation.gradients import format_report, gradient_report, term_gradients
from distillm.generation.base import SamplingParams
from distillm.generation.hf import HFBackend
from distillm.generation.runner import generate_responses
from distillm.io import atomic_write_json, read_jsonl
from distillm.models import load_model, parse_layer_spec, prune_layers, real_vocab_size
from distillm.quant.qat import QUANT_BITS, dequantized_copy, prepare_qat, quant_bits


def check_source(source: str) -> str | None:
    """Why `source` is not a student this script can load (checked for every --student before any work), or None."""
    if source.startswith("rtn:"):
        if source.removeprefix("rtn:") not in QUANT_BITS:
            return "use " + ", ".join(f"rtn:{name}" for name in QUANT_BITS) + " (a bit width distillm quantizes to)"
    elif source.startswith("layers:"):
        if not source.removeprefix("layers:"):
            return "use layers:SPEC, e.g. layers:even:10 (the teacher's layers a pruned student keeps)"
    elif not (Path(source) / "config.json").is_file():
        return "no model directory there (a distilled student directory, rtn:intN or layers:SPEC)"
    return None


def load_student(source: str, teacher, group_size: int):
    if source.startswith("rtn:"):
        bits = quant_bits(source.removeprefix("rtn:"))
        return dequantized_copy(prepare_qat(copy.deepcopy(teacher), bits, group_size)).float()
    if source.startswith("layers:"):  # a comparison's pruned starting student
        keep = parse_layer_spec(source.removeprefix("layers:"), teacher.config.num_hidden_layers)
        return prune_layers(teacher, keep).float()
    return load_model(source, dtype="float32")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--teacher-rows", required=True, help="JSONL of the teacher's responses (prompt_ids, "
                    "response_ids), e.g. a comparison's shared/teacher_train.jsonl")
    ap.add_argument("--student", action="append", required=True, metavar="NAME=SOURCE")
    ap.add_argument("--n", type=int, default=32, help="first N rows")
    ap.add_argument("--quick", action="store_true", help="8 rows (about a minute per student on one thread)")
    ap.add_argument("--skew", type=float, default=0.1, help="a of SKL and SRKL (DistiLLM-2's base skew)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=168)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n = 8
    students = []
    for item in args.student:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            sys.exit(f"--student {item!r}: expected NAME=SOURCE")
        problem = check_source(source)
        if problem:
            sys.exit(f"--student {item}: {problem}")
        students.append((name, source))
    path = Path(args.teacher_rows)
    if not path.is_file():
        sys.exit(f"--teacher-rows {path}: no such file")
    teacher_rows = read_jsonl(path)[:args.n]
    for number, row in enumerate(teacher_rows, start=1):
        if not {"prompt_ids", "response_ids"} <= set(row):
            sys.exit(f"{path}:{number}: a row needs prompt_ids and response_ids")
    teacher, tokenizer = load_model(args.teacher, dtype="float32")
    vocab = real_vocab_size(tokenizer)
    prompts = [EncodedPrompt(str(r.get("id", i)), "", list(r["prompt_ids"])) for i, r in enumerate(teacher_rows)]
    results = {"teacher": args.teacher, "teacher_rows": str(path), "n": len(teacher_rows), "skew": args.skew,
               "torch_threads": torch.get_num_threads(), "students": {}}
    for name, source in students:
        started = time.time()
        student = load_student(source, teacher, args.group_size)
        with tempfile.TemporaryDirectory() as tmp:
            samples = generate_responses(
                HFBackend(student, tokenizer, max_batch_size=32), prompts, Path(tmp) / "samples.jsonl",
                SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=args.seed),
                tokenizer, desc=f"{name}: samples")
        grads = term_gradients(teacher, student, {"teacher": teacher_rows, "student": samples}, skew=args.skew,
                               vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                               desc=name)
        report = gradient_report(grads)
        results["students"][name] = {"source": source, **report, "seconds": round(time.time() - started, 1),
                                     "sample": samples[0]["response"]}
        print(f"\n== {name} ({source}), {len(teacher_rows)} rows, a = {args.skew}, {time.time() - started:.0f} s")
        print(format_report(report, "  "))
        del student, grads
    if args.output:
        atomic_write_json(args.output, results)
        print(f"\nwritten: {args.output}")
    print(json.dumps({n: r["mix"] for n, r in results["students"].items()}, indent=1))
    print("headline: " + "; ".join(
        f"{n}: SRKL share at b=1 {r['mix']['b=1']['srkl_share']:.2f}, cosine of the b=1 update with the KL "
        f"gradient {r['mix']['b=1']['cosine_with_kl']:.2f}" for n, r in results["students"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
