"""Math word problems: final-answer exact match (the paper's GSM8K / MATH pass@1), loaders and a generator.

- `extract_answer` reads the final answer of a response: the text after the last ``####`` (GSM8K format), else
  the last ``\\boxed{...}`` (MATH format), else the last number in the text.
- `answers_match` compares two answers as numbers when both parse as numbers (``1,000`` = ``1000.0`` = ``$1000``,
  ``0.5`` = ``1/2``), else as whitespace- and case-normalised strings.
- `load_math_problems` reads GSM8K-style JSONL (``question`` + ``answer`` ending in ``#### 42``) and MATH-style
  JSONL (``problem`` + ``solution`` holding ``\\boxed{...}``, or an explicit ``answer`` field).
- `arithmetic_problems` writes word problems with known integer answers from a seed (written for this
  project: the demo needs math problems and nothing may be downloaded).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from ..errors import DistillmError
from ..io import iter_json_objects

#: The instruction appended to every problem: the format `extract_answer` reads first.
ANSWER_INSTRUCTION = "Solve the problem step by step, then write the final answer on its own line as '#### <number>'."

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


class MathDataError(DistillmError):
    """A math problem file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class MathProblem:
    id: str
    question: str
    answer: str


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer written in `text`, or None when it holds none (see the module docstring)."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0].strip() if tail else ""
        numbers = _NUMBER.findall(line)
        return numbers[0].strip() if numbers else (line or None)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip().rstrip(".") if numbers else None


def _as_number(text: str) -> Fraction | None:
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    cleaned = re.sub(r"^\\(?:text|mathrm)\{(.*)\}$", r"\1", cleaned)
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(-?\d+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """True when `predicted` equals `gold` as a number (exactly), or as normalised text when either is not one."""
    if predicted is None:
        return False
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    norm = lambda s: re.sub(r"\s+", "", s).lower().rstrip(".")  # noqa: E731
    return norm(predicted) == norm(gold)


def problem_prompt(problem: MathProblem) -> str:
    return f"{problem.question}\n{ANSWER_INSTRUCTION}"


def score_responses(problems: list[MathProblem], responses: dict[str, str]) -> dict:
    """Exact match of the extracted final answers: accuracy (pass@1 with one sample) and per-problem details."""
    details = []
    for problem in problems:
        predicted = extract_answer(responses[problem.id])
        details.append({"id": problem.id, "gold": problem.answer, "predicted": predicted,
                        "correct": answers_match(predicted, problem.answer)})
    correct = sum(d["correct"] for d in details)
    return {"accuracy": correct / max(len(details), 1), "correct": correct, "total": len(details),
            "no_answer": sum(d["predicted"] is None for d in details), "details": details}


# ----------------------------------------------------------------------------------------------- loaders


def load_math_problems(path: str | Path, *, limit: int | None = None) -> list[MathProblem]:
    """GSM8K- or MATH-style JSONL (see the module docstring). Ids come from `id`/`task_id`/`unique_id` or the line."""
    path = Path(path)
    if not path.is_file():
        raise MathDataError(f"Math problem file not found: {path}")
    problems = []
    for number, row in iter_json_objects(path, MathDataError):
        question = row.get("question", row.get("problem"))
        if not isinstance(question, str) or not question.strip():
            raise MathDataError(f"{path}:{number}: no 'question' (GSM8K) or 'problem' (MATH) text field.")
        if isinstance(row.get("answer"), (str, int, float)) and "####" in str(row["answer"]):
            answer = extract_answer(str(row["answer"]))
        elif isinstance(row.get("answer"), (str, int, float)):
            answer = str(row["answer"])
        elif isinstance(row.get("solution"), str):
            answer = _last_boxed(row["solution"])
        else:
            answer = None
        if not answer:
            raise MathDataError(f"{path}:{number}: no final answer: give 'answer' ('... #### 42' or '42'), or a "
                                "'solution' holding \\boxed{...}.")
        pid = str(row.get("id", row.get("task_id", row.get("unique_id", f"{path.stem}:{number}"))))
        problems.append(MathProblem(pid, question.strip(), answer))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise MathDataError(f"{path}: no problems found.")
    return problems


# ----------------------------------------------------------------------------------------------- generator

_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "coins", "cards"]


def _one_problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "two_step", "price"])
    if kind == "add":
        a, b = rng.randint(3, 60), rng.randint(3, 60)
        return f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(20, 90)
        b = rng.randint(2, a - 1)
        return f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?", a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in total?", a * b
    if kind == "div":
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?", q)
    if kind == "two_step":
        a, b, c = rng.randint(10, 40), rng.randint(2, 9), rng.randint(1, 9)
        return (f"{name} has {a} {item}, buys {b} packs of {c} {item} each, then gives 5 to {other}. "
                f"How many {item} does {name} have now?", a + b * c - 5)
    price, count = rng.randint(2, 15), rng.randint(2, 9)
    paid = price * count + rng.randint(1, 20)
    return (f"A notebook costs {price} dollars. {name} buys {count} notebooks and pays with {paid} dollars. "
            f"How many dollars of change does {name} get?", paid - price * count)


def arithmetic_problems(n: int, *, seed: int = 0) -> list[MathProblem]:
    """`n` arithmetic word problems with known integer answers, the same ones for the same seed."""
    if n < 1:
        raise MathDataError(f"the number of arithmetic problems must be at least 1, got {n}.")
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        question, answer = _one_problem(rng)
        problems.append(MathProblem(f"arith-{seed}-{i:04d}", question, str(answer)))
    return problems
