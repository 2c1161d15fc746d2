"""The paper's comparison at laptop scale: every method (and DistiLLM-2's component ablation) trained from the same
teacher, student initialisation, prompts and budget, evaluated on held-out prompts over several seeds, in one
table (mean ± std over seeds) and one chart.

One *cell* is (variant, seed): a normal `distillm run` directory under ``OUT/cells/VARIANT/seed_S`` (its config
saved there), then an evaluation of its student with the evaluation suite. A cell is finished once its
``cell.json`` exists (written atomically, last); a rerun skips finished cells, and an unfinished cell continues
where its run stopped (the run directory is itself resumable). Work shared by every cell is done once, under
``OUT/shared``: the prompt file, the teacher's responses to it (every cell trains from the same file, so the
teacher side of the budget is identical), and the teacher's and the initial student's evaluation.

Equal budget: the same optimizer steps (rounds x prompts / batch), batch, learning rate and schedule,
`max_new_tokens` and sampling settings (temperature, top-p) for every variant. What each method then generates
differs by design (on-policy methods sample the student for every batch, DistiLLM-2 once per round, SeqKD never);
each cell records the tokens it actually generated (student and teacher) and its wall time, and the table shows
them. Seeds vary the training seed and the generation seed of the student samples; the shared teacher responses
and the held-out evaluation (greedy decoding) are the same for every seed.

Held-out metrics (local, no network): the teacher's NLL of the student's responses, KL and TVD on the teacher's
responses, ROUGE-L against the teacher's responses, exact match on built-in arithmetic problems, and, when a judge
endpoint is given, the judge's win rate against the teacher's responses. Degeneracy figures (repetition, loop and
empty rates, distinct-2 and its distance to the teacher's) flag collapsed students, which every ranking puts last;
the preference figure compares each variant's greedy answers with the initial student's, prompt by prompt, by
their length-normalised teacher log-likelihood (docs/evaluation.md, "Degenerate students and the preference
figure").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import METHOD_NAMES, load_config
from .errors import DistillmError
from .io import atomic_write_json, atomic_write_text, read_jsonl

logger = logging.getLogger("distillm")


class CompareError(DistillmError):
    """Bad comparison settings, or an output directory holding another comparison."""


#: the ablation of DistiLLM-2's components (paper Table 6): the fourth row, "all", is the distillm2 cell itself
ABLATIONS: dict[str, dict] = {
    "contrastive": {"method": "distillm2", "curriculum": False, "b_ramp": False},
    "contrastive+b_ramp": {"method": "distillm2", "curriculum": False, "b_ramp": True},
    "contrastive+curriculum": {"method": "distillm2", "curriculum": True, "b_ramp": False},
}
ABLATION_ROWS = [("contrastive loss only", "contrastive"), ("+ b ramp", "contrastive+b_ramp"),
                 ("+ curriculum a", "contrastive+curriculum"), ("all (DistiLLM-2)", "distillm2")]
VARIANTS: dict[str, dict] = {**{name: {"method": name} for name in METHOD_NAMES}, **ABLATIONS}

#: metric key -> (label, better); the order is the table's
METRICS = {
    "teacher_nll": ("teacher NLL of responses", "lower"),
    "kl": ("KL(teacher ‖ student)", "lower"),
    "tvd": ("TVD", "lower"),
    "rouge_l": ("ROUGE-L", "higher"),
    "distinct_2": ("distinct-2", "target"),  # neither direction: the teacher's value is the target
    # degeneracy (evaluation.degeneracy): a collapsed student wins the teacher-NLL column; these expose it
    "distinct_2_gap": ("distinct-2 distance to the teacher's", "lower"),  # no '|' in a table cell
    "repetition": ("repetition (seq-rep-4)", "target"),
    "loop_rate": ("answers ending in a loop", "target"),
    "empty_rate": ("empty answers", "target"),
    "math_accuracy": ("arithmetic exact match", "higher"),
    "win_rate": ("judge win rate", "higher"),
}
HEADLINE = ("teacher_nll", "kl", "rouge_l", "math_accuracy", "win_rate")
CHARTED = HEADLINE + ("distinct_2",)

#: sizes; `full` is the default on SmolLM2 (a few hours on 2 CPU cores), `quick` the same protocol in < 30 min
SIZES: dict[str, dict] = {
    "full": dict(num_builtin=128, num_generated=32, rounds=2, max_new_tokens=32, batch_size=8,
                 num_eval_prompts=40, num_math=40, eval_max_new_tokens=64),
    "quick": dict(num_builtin=14, num_generated=2, rounds=2, max_new_tokens=16, batch_size=8,
                  num_eval_prompts=8, num_math=8, eval_max_new_tokens=24),
    # tiny random models: the tests
    "tiny": dict(num_builtin=6, num_generated=2, rounds=2, max_new_tokens=8, batch_size=4,
                 num_eval_prompts=3, num_math=3, eval_max_new_tokens=8),
}


@dataclass
class CompareSettings:
    output_dir: str = "runs/compare"
    size: str = "full"
    teacher: str = "smollm2-135m-instruct"
    student_layers: str = "even:10"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    learning_rate: float = 2e-4
    temperature: float = 0.8
    top_p: float = 0.95
    max_prompt_length: int = 128
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    #: any run option for every cell (e.g. {"save_steps": 4}); applied before the variant's own options
    run_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.size not in SIZES:
            raise CompareError(f"Unknown size {self.size!r}: choose one of {', '.join(SIZES)}.")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise CompareError(f"Unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}.")
        if not self.variants:
            raise CompareError("No variants to compare: give at least one (e.g. --variants distillm2,kd).")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"Seeds must be a non-empty list of distinct integers (got {self.seeds}).")
        if bool(self.judge_url) != bool(self.judge_model):
            raise CompareError("A judge needs both --judge-url and --judge-model (or neither: no win rate).")

    @property
    def sizes(self) -> dict:
        return SIZES[self.size]

    def protocol(self) -> dict:
        """What every cell must share: a directory holding a comparison with another protocol is refused."""
        out = dataclasses.asdict(self)
        for key in ("output_dir", "variants", "seeds", "judge_api_key_env"):
            out.pop(key)
        return out | {"sizes": self.sizes}


# ----------------------------------------------------------------------------------------------- shared work


class Comparison:
    def __init__(self, settings: CompareSettings, *, command: str | None = None):
        self.s = settings
        self.command = command
        self.root = Path(settings.output_dir)
        self.shared = self.root / "shared"
        self.prompts_file = self.shared / "prompts.jsonl"
        self.teacher_file = self.shared / "teacher_train.jsonl"
        self.eval_dir = self.root / "eval"
        self._teacher = None

    # ---------------------------------------------------------------- setup
    def check_directory(self) -> None:
        path = self.root / "compare.json"
        protocol = json.loads(json.dumps(self.s.protocol()))
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous != protocol:
                changed = sorted(k for k in set(previous) | set(protocol) if previous.get(k) != protocol.get(k))
                raise CompareError(f"{self.root} holds a comparison with other settings (differs in: "
                                   f"{', '.join(changed)}; see {path}). Use another --output-dir, or the same "
                                   "settings to continue it (variants and seeds may change).")
        elif self.root.exists() and any(self.root.iterdir()):
            raise CompareError(f"{self.root} is not empty and holds no comparison (no compare.json): choose "
                               "another --output-dir.")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, protocol)

    def build_prompts(self) -> None:
        """The training prompts: the first built-in training prompts plus generated arithmetic problems (none
        of them among the held-out ones)."""
        if self.prompts_file.is_file():
            return
        from .data.builtin import load_builtin
        from .evaluation.math import arithmetic_problems, problem_prompt

        z = self.s.sizes
        rows = [{"id": r["id"], "prompt": r["prompt"]} for r in load_builtin("train")[:z["num_builtin"]]]
        held_out = {p.question for p in arithmetic_problems(z["num_math"], seed=0)}
        generated = [p for p in arithmetic_problems(z["num_generated"] + len(held_out), seed=1234)
                     if p.question not in held_out][:z["num_generated"]]
        rows += [{"id": p.id, "prompt": problem_prompt(p)} for p in generated]
        atomic_write_text(self.prompts_file, "".join(json.dumps(r) + "\n" for r in rows))

    def run_config(self, variant: str, seed: int, output_dir: Path | str, *, teacher_responses: bool = True):
        z = self.s.sizes
        overrides = {
            "output_dir": str(output_dir), "teacher": self.s.teacher, "student_layers": self.s.student_layers,
            "prompts": str(self.prompts_file), "eval_prompts": None, "evaluate": False,
            "max_new_tokens": z["max_new_tokens"], "max_prompt_length": self.s.max_prompt_length,
            "max_length": self.s.max_prompt_length + z["max_new_tokens"] + 8,
            "temperature": self.s.temperature, "top_p": self.s.top_p, "rounds": z["rounds"],
            "learning_rate": self.s.learning_rate, "per_device_train_batch_size": z["batch_size"],
            "gradient_accumulation_steps": 1, "generation_batch_size": 32, "seed": seed, "generation_seed": seed,
            "save_steps": max(1, (z["num_builtin"] + z["num_generated"]) // z["batch_size"]),  # once per round
            # the teacher's scores on the shared teacher responses, computed once per method and reused by every
            # seed and round; exact (its final hidden states; the head is applied in the loss), so no cell's
            # numbers change -- only the teacher passes over the same sequences go
            "teacher_cache": "exact",
            "teacher_cache_dir": str(self.shared / "teacher_cache" / VARIANTS[variant]["method"]),
            **self.s.run_overrides, **VARIANTS[variant],
        }
        if teacher_responses:
            overrides["teacher_responses"] = str(self.teacher_file)
        return load_config(overrides=overrides)

    def teacher_responses(self) -> None:
        """The teacher's responses to the training prompts, sampled once (generation seed 0) for every cell."""
        if self.teacher_file.is_file():
            return
        from .generation.hf import HFBackend
        from .generation.runner import generate_responses
        from .pipeline import load_prompt_set, sampling_params

        config = self.run_config("seqkd", 0, self.shared / "unused", teacher_responses=False)
        teacher, tokenizer = self.teacher_model()
        prompts = load_prompt_set(config, tokenizer, "train")
        backend = HFBackend(teacher, tokenizer, max_batch_size=config.generation.generation_batch_size)
        generate_responses(backend, prompts, self.teacher_file, sampling_params(config), tokenizer,
                           desc="teacher responses (shared)")

    def teacher_model(self):
        if self._teacher is None:
            from .models import load_model

            self._teacher = load_model(self.s.teacher)
        return self._teacher

    # ---------------------------------------------------------------- evaluation
    def eval_settings(self):
        from .evaluation.suite import EvalSettings, LOCAL_TASKS

        z = self.s.sizes
        tasks = tuple(t for t in LOCAL_TASKS if t != "perplexity") + (("judge",) if self.s.judge_url else ())
        return EvalSettings(tasks=tasks, teacher="teacher", prompts="builtin:eval",
                            num_prompts=z["num_eval_prompts"], max_prompt_length=self.s.max_prompt_length,
                            max_length=self.s.max_prompt_length + z["eval_max_new_tokens"] + 8, temperature=0.0,
                            max_new_tokens=z["eval_max_new_tokens"], seed=0, batch_size=32,
                            num_math=z["num_math"])

    def judge(self):
        if not self.s.judge_url:
            return None
        from .evaluation.judge import OpenAIChatJudge

        key = os.environ.get(self.s.judge_api_key_env) if self.s.judge_api_key_env else None
        return OpenAIChatJudge(self.s.judge_url, self.s.judge_model, api_key=key)

    def evaluate(self, specs, *, include_teacher: bool = False) -> dict[str, dict]:
        """Evaluation-suite metrics of `specs` (the suite evaluates the teacher first, from its cache after the
        first time), plus the teacher's NLL of each model's held-out responses and their degeneracy figures."""
        from .evaluation.suite import ModelSpec, run_evaluation

        teacher_spec = ModelSpec("teacher", self.s.teacher)
        results = run_evaluation([teacher_spec, *specs], self.eval_settings(), self.eval_dir, judge=self.judge(),
                                 command=self.command)
        out = {}
        for spec in ([teacher_spec] if include_teacher else []) + list(specs):
            metrics = dict(results["models"][spec.name]["metrics"])
            scores = self.answer_scores(spec.name)  # the teacher's log-likelihood of each answer
            metrics["teacher_nll"] = -sum(t for t, _ in scores.values()) / max(sum(c for _, c in scores.values()), 1)
            self.backfill(metrics, spec.name)
            out[spec.name] = {k: v for k, v in metrics.items() if k in METRICS}
        return out

    def answer_scores(self, name: str) -> dict[str, tuple[float, int]]:
        """Prompt id -> (the teacher's summed log-likelihood of the model's held-out answer, its tokens), computed
        once and kept beside the generations (``teacher_scores.json``)."""
        from .evaluation.divergence import sequence_log_likelihoods
        from .models import real_vocab_size

        import hashlib

        folder = self.eval_dir / "generations" / name
        path = folder / "teacher_scores.json"
        rows = read_jsonl(folder / "responses.jsonl")
        # the scores hold for these exact answers: regenerated answers are scored again
        digest = hashlib.sha256(json.dumps([[str(r["id"]), r["prompt_ids"], r["response_ids"]] for r in rows])
                                .encode()).hexdigest()
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("responses_sha256") == digest:
            return {key: (float(t), int(c)) for key, (t, c) in saved["scores"].items()}
        teacher, tokenizer = self.teacher_model()
        scored = sequence_log_likelihoods(teacher, rows, vocab_size=real_vocab_size(tokenizer),
                                          pad_token_id=tokenizer.pad_token_id,
                                          max_length=self.eval_settings().max_length, desc=f"{name}: teacher NLL")
        scores = {str(row["id"]): score for row, score in zip(rows, scored)}
        atomic_write_json(path, {"responses_sha256": digest, "scores": scores})
        return scores

    def preferences(self, cells: list[dict], reference: str = "initial") -> dict[str, dict]:
        """Variant -> its preference over the `reference` model's held-out answers (evaluation.preference), over
        the variant's finished seeds."""
        from .evaluation.divergence import normalised_scores
        from .evaluation.preference import outcomes, paired_scores, preference_over_seeds

        def answers(name):
            rows = read_jsonl(self.eval_dir / "generations" / name / "responses.jsonl")
            scores = self.answer_scores(name)
            return rows, normalised_scores([scores[str(row["id"])] for row in rows])

        ref_rows, ref_scores = answers(reference)
        per_variant: dict[str, list] = {}
        for cell in cells:
            rows, scores = answers(cell_model_name(cell["variant"], cell["seed"]))
            v, r, same = paired_scores(rows, ref_rows, scores, ref_scores)
            per_variant.setdefault(cell["variant"], []).append(outcomes(v, r, same))
        return {variant: preference_over_seeds(rows).as_dict() | {"reference": reference}
                for variant, rows in per_variant.items()}

    def backfill(self, metrics: dict, name: str) -> None:
        """Add the reference-free metrics a finished cell lacks, from its stored held-out generations."""
        from .evaluation.degeneracy import degeneracy_figures

        path = self.eval_dir / "generations" / name / "responses.jsonl"
        wanted = ("distinct_2", "repetition", "loop_rate", "empty_rate")
        if any(k not in metrics for k in wanted) and path.is_file():
            figures = degeneracy_figures([row["response"] for row in read_jsonl(path)])
            for key in wanted:  # repetition is None when no answer has 4 words: left out
                if key not in metrics and figures[key] is not None:
                    metrics[key] = figures[key]

    def reference(self) -> dict:
        """The teacher's and the initial (pruned, untrained) student's figures, computed once."""
        path = self.shared / "reference.json"
        if path.is_file():
            return json.loads(path.read_text())
        from .evaluation.suite import ModelSpec

        started = time.time()
        metrics = self.evaluate([ModelSpec("initial", self.s.teacher, layers=self.s.student_layers)],
                                include_teacher=True)
        reference = {"teacher": metrics["teacher"], "initial": metrics["initial"],
                     "seconds": round(time.time() - started, 1)}
        atomic_write_json(path, reference)
        return reference

    # ---------------------------------------------------------------- cells
    def cell_dir(self, variant: str, seed: int) -> Path:
        return self.root / "cells" / variant / f"seed_{seed}"

    def cells(self) -> list[tuple[str, int]]:
        # seed-major: a comparison stopped part-way has every variant at its first seeds
        return [(variant, seed) for seed in self.s.seeds for variant in self.s.variants]

    def finished(self, variant: str, seed: int) -> dict | None:
        path = self.cell_dir(variant, seed) / "cell.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def stale_run(self, run_dir: Path, config) -> bool:
        """Whether an unfinished cell's run directory was started with other run settings (by an older version of
        the comparison, say): it cannot be continued under this protocol, so the cell starts again (logged)."""
        from .pipeline import RunPaths, config_changes

        saved = RunPaths(run_dir).config
        changed = config_changes(saved, config.to_yaml()) if saved.is_file() else []
        if changed:
            logger.warning("%s holds an unfinished run started with other settings (differs in: %s): starting "
                           "that cell again", run_dir, ", ".join(changed))
        return bool(changed)

    def run_cell(self, variant: str, seed: int) -> dict:
        from .evaluation.suite import ModelSpec
        from .methods import build_method
        from .pipeline import run

        folder = self.cell_dir(variant, seed)
        started = time.time()
        config = self.run_config(variant, seed, folder / "run")
        metrics = run(config, overwrite=self.stale_run(folder / "run", config))
        train_seconds = round(time.time() - started, 1)
        name = cell_model_name(variant, seed)
        spec = ModelSpec(name, str(folder / "run" / "student"), train_log=str(folder / "run" / "logs" / "train_log.jsonl"))
        evaluated = self.evaluate([spec])[name]
        method = build_method(config)
        tokens = generated_tokens(folder / "run", uses_teacher_rows=_uses_teacher_rows(method, config),
                                  shared_teacher_file=self.teacher_file)
        cell = {"variant": variant, "seed": seed, "method": config.method.method,
                "options": VARIANTS[variant], "metrics": evaluated, "steps": metrics["training"]["steps"],
                "mean_loss_per_round": metrics["training"]["mean_loss_per_round"], **tokens,
                "run_seconds": train_seconds, "wall_seconds": round(time.time() - started, 1),
                "run_dir": str((folder / "run").relative_to(self.root))}
        atomic_write_json(folder / "cell.json", cell)  # last: the cell counts as finished from here
        # the checkpoints (weights + optimizer state, ~1 GB per cell on SmolLM2) only serve to resume the run,
        # which is finished: the student and the logs stay
        shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
        return cell

    # ---------------------------------------------------------------- all of it
    def run(self, *, report_only: bool = False) -> dict:
        """Every unfinished cell, then the results; `report_only`: the results of the cells finished so far."""
        from tqdm.auto import tqdm

        started = time.time()
        self.check_directory()
        if self.command and not report_only:
            atomic_write_text(self.root / "command.txt", self.command + "\n")
        self.build_prompts()
        if report_only and not (self.shared / "reference.json").is_file():
            raise CompareError(f"No finished cells in {self.root} yet: run the comparison without --report-only.")
        self.teacher_responses()
        reference = self.reference()
        todo = [c for c in self.cells() if self.finished(*c) is None]
        skipped = len(self.cells()) - len(todo)
        if skipped:
            logger.info("%d of %d cells are finished already; running the other %d", skipped, len(self.cells()),
                        len(todo))
        if not report_only:
            bar = tqdm(todo, desc="comparison cells", unit="cell")
            for variant, seed in bar:
                bar.set_postfix_str(f"{variant} seed {seed}")
                if self.finished(variant, seed) is not None:  # another worker finished it meanwhile
                    continue
                with CellClaim(self.cell_dir(variant, seed)) as claimed:
                    if not claimed:
                        logger.info("%s seed %d is being run by another process; skipping it", variant, seed)
                        continue
                    self.run_cell(variant, seed)
            bar.close()
        cells = [cell for cell in (self.finished(*c) for c in self.cells()) if cell is not None]
        for cell in cells:  # cells finished before a metric was added: computed from their stored generations
            self.backfill(cell["metrics"], cell_model_name(cell["variant"], cell["seed"]))
        for name in ("teacher", "initial"):
            self.backfill(reference[name], name)
        if not cells:
            raise CompareError(f"No finished cells in {self.root} yet: run the comparison without --report-only.")
        summary = summarise(cells, reference, self.s, preferences=self.preferences(cells))
        summary["cells_total"] = len(self.cells())
        summary["wall_seconds_this_invocation"] = round(time.time() - started, 1)
        summary["cells_skipped"] = skipped
        write_results(summary, self.root, command=self.command)
        return summary


def cell_model_name(variant: str, seed: int) -> str:
    """A cell's model name in the shared evaluation (letters, digits, . _ - only)."""
    return f"{variant}-seed{seed}".replace("+", "_")


class CellClaim:
    """An exclusive claim on a cell (``CELL/running.pid``, created with O_EXCL), so that several processes can
    work through one comparison (e.g. one per seed) without two of them running the same cell. A claim left by a
    process that no longer exists is taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "running.pid"
        self.held = False

    def __enter__(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                    return False  # a live process holds it
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                except PermissionError:
                    return False
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _uses_teacher_rows(method, config) -> bool:
    """Whether the method trains on the shared teacher responses (a part of its generation budget)."""
    if method.name in ("distillm2", "dpkd", "seqkd"):
        return True
    if method.name == "imitkd":
        return config.method.imitkd_fixed_fraction > 0
    return method.uses_fixed_responses and method.name != "step-by-step" and config.method.fixed_responses == "teacher"


def _response_tokens(path: Path) -> int:
    return sum(len(row.get("response_ids") or []) for row in read_jsonl(path)) if path.is_file() else 0


def generated_tokens(run_dir: Path, *, uses_teacher_rows: bool, shared_teacher_file: Path) -> dict:
    """Tokens a finished run generated for its training data: the student's (per-round responses, and samples
    drawn while training) and the teacher's (the shared responses if the method trains on them, step-by-step's
    rationales, speculative KD's replacements)."""
    student = sum(_response_tokens(p) for p in sorted(run_dir.glob("rounds/round_*/student.jsonl")))
    teacher = _response_tokens(run_dir / "data" / "teacher_rationales_train.jsonl")
    if uses_teacher_rows:
        teacher += _response_tokens(shared_teacher_file)
    log = run_dir / "logs" / "train_log.jsonl"
    if log.is_file():
        for entry in read_jsonl(log):
            student += int(entry.get("generated_student_tokens", 0))
            teacher += int(entry.get("generated_teacher_tokens", 0))
    return {"student_tokens": student, "teacher_tokens": teacher}


# ----------------------------------------------------------------------------------------------- results


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def checked(metrics: dict, teacher: dict) -> dict:
    """`metrics` plus the distance of its distinct-2 to the teacher's and the degenerate flag
    (evaluation.degeneracy: relative to the teacher's figures on the same prompts)."""
    from .evaluation.degeneracy import degenerate

    verdict = degenerate(metrics, teacher)
    out = dict(metrics)
    if verdict.distinct_2_gap is not None:
        out["distinct_2_gap"] = verdict.distinct_2_gap
    return out | {"degenerate": verdict.flagged, "degenerate_reasons": list(verdict.reasons)}


def summarise(cells: list[dict], reference: dict, settings: CompareSettings, *,
              preferences: dict[str, dict] | None = None) -> dict:
    teacher = reference["teacher"]
    reference = {**reference, "teacher": checked(teacher, teacher), "initial": checked(reference["initial"], teacher)}
    flagged_cells = []
    for cell in cells:
        metrics = checked(cell["metrics"], teacher)
        flagged_cells.append({**cell, "degenerate": metrics.pop("degenerate"),
                              "degenerate_reasons": metrics.pop("degenerate_reasons"), "metrics": metrics})
    cells = flagged_cells
    by_variant: dict[str, list[dict]] = {}
    for cell in cells:
        by_variant.setdefault(cell["variant"], []).append(cell)
    keys = [k for k in METRICS if any(k in c["metrics"] for c in cells) or k in reference["teacher"]]
    rows = {}
    for variant, group in by_variant.items():
        entry = {"seeds": [c["seed"] for c in group], "metrics": {},
                 # flagged if any seed is: that seed's collapse pulls the variant's mean teacher NLL down
                 "degenerate_seeds": [c["seed"] for c in group if c["degenerate"]],
                 "degenerate_reasons": {str(c["seed"]): c["degenerate_reasons"] for c in group if c["degenerate"]},
                 "preference": (preferences or {}).get(variant)}
        for key in keys:
            values = [c["metrics"][key] for c in group if c["metrics"].get(key) is not None]
            if values:
                entry["metrics"][key] = mean_std(values)
        for key in ("steps", "student_tokens", "teacher_tokens", "wall_seconds"):
            entry[key] = mean_std([float(c[key]) for c in group])
        rows[variant] = entry
    return {"settings": dataclasses.asdict(settings), "sizes": settings.sizes, "metric_keys": keys,
            "reference": reference, "variants": rows, "cells": cells}


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def _ms(pair) -> str:
    if pair is None:
        return "—"
    mean, std = pair
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _preference(value: dict | None) -> str:
    return "—" if value is None else f"{_fmt(value['rate'])} [{_fmt(value['low'])}, {_fmt(value['high'])}]"


def _table(summary: dict, variants: list[tuple[str, str]], *, with_reference: bool) -> list[str]:
    keys = summary["metric_keys"]
    arrow = {"lower": "↓", "higher": "↑", "target": "≈"}
    head = ["variant"] + [f"{METRICS[k][0]} {arrow[METRICS[k][1]]}" for k in keys] + [
        "degenerate", "preference vs initial ↑", "seeds", "steps", "student tokens generated",
        "teacher tokens generated", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    if with_reference:
        for name in ("teacher", "initial"):
            values = summary["reference"][name]
            label = "teacher" if name == "teacher" else "initial student (pruned, untrained)"
            flag = "—" if name == "teacher" else ("**yes**" if values.get("degenerate") else "no")
            lines.append(f"| {label} | " + " | ".join(_fmt(values[k]) if values.get(k) is not None else "—"
                                                      for k in keys) + f" | {flag} | — | — | — | — | — | — |")
    for label, variant in variants:
        entry = summary["variants"].get(variant)
        if entry is None:
            continue
        one = len(entry["seeds"]) == 1  # no spread to show from one seed
        cells = [(_fmt(entry["metrics"][k][0]) if k in entry["metrics"] else "—") if one else _ms(entry["metrics"].get(k))
                 for k in keys]
        flagged = entry.get("degenerate_seeds", [])
        cells += [f"**yes** ({len(flagged)}/{len(entry['seeds'])} seeds)" if flagged else "no",
                  _preference(entry.get("preference"))]
        cells += [",".join(map(str, entry["seeds"])), f"{entry['steps'][0]:.0f}", f"{entry['student_tokens'][0]:.0f}",
                  f"{entry['teacher_tokens'][0]:.0f}", f"{entry['wall_seconds'][0]:.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ranking(summary: dict, key: str) -> list[str]:
    """Method variants (not the ablation's extra rows) ordered best first by the mean of `key`, every variant
    flagged as degenerate (on any seed) after every other one: a collapsed student cannot rank first."""
    from .evaluation.degeneracy import rank

    values = {v: e["metrics"][key][0] for v, e in summary["variants"].items()
              if v in METHOD_NAMES and key in e["metrics"]}
    return [v for v, _ in rank(values, METRICS[key][1], degenerate_variants(summary))]


def degenerate_variants(summary: dict) -> list[str]:
    return [v for v, e in summary["variants"].items() if e.get("degenerate_seeds")]


def write_results(summary: dict, out_dir: Path, *, command: str | None = None) -> Path:
    """results.md (tables), results.json (every cell) and comparison.png / ablation.png in `out_dir`."""
    out = Path(out_dir)
    z = summary["sizes"]
    s = summary["settings"]
    seeds = sorted({seed for e in summary["variants"].values() for seed in e["seeds"]})
    lines = ["# Method comparison", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    n_prompts = z["num_builtin"] + z["num_generated"]
    lines += [
        f"Teacher `{s['teacher']}`, student: its layers `{s['student_layers']}` (same initialisation for every "
        f"cell). Training: {n_prompts} prompts ({z['num_builtin']} built-in + {z['num_generated']} generated "
        f"arithmetic problems), {z['rounds']} rounds, batch {z['batch_size']}, learning rate {s['learning_rate']} "
        f"(cosine), responses up to {z['max_new_tokens']} tokens sampled at temperature {s['temperature']}, "
        f"top-p {s['top_p']}, teacher responses sampled once and shared. Held-out: {z['num_eval_prompts']} "
        f"built-in eval prompts and {z['num_math']} arithmetic problems, greedy, up to "
        f"{z['eval_max_new_tokens']} tokens. Mean ± sample std over seeds {', '.join(map(str, seeds))}.", "",
    ]
    total = summary.get("cells_total", len(summary["cells"]))
    if len(summary["cells"]) < total:
        lines += [f"**Partial results: {len(summary['cells'])} of {total} cells finished** (a variant's row is "
                  "over its finished seeds, listed in its `seeds` column; a row from one seed has no ± std).", ""]
    lines += ["## Methods", ""]
    method_rows = [(v, v) for v in summary["variants"] if v in METHOD_NAMES]
    lines += _table(summary, method_rows, with_reference=True) + [""]
    if any(v in summary["variants"] for v in ABLATIONS):
        lines += ["## DistiLLM-2 ablation", ""]
        lines += _table(summary, ABLATION_ROWS, with_reference=False) + [""]
    lines += ["↓ lower is better, ↑ higher is better, ≈ closest to the teacher is best. Teacher NLL: the teacher's "
              "mean per-token NLL of the model's greedy held-out responses; KL and TVD per token on the teacher's "
              "greedy held-out responses; ROUGE-L against them. Distinct-2: distinct word bigrams / all bigrams "
              "over the greedy held-out responses -- near 0 for a student that repeats the same tokens in every "
              "answer, which the teacher NLL column rewards. Repetition: the share of an answer's word 4-grams that "
              "repeat an earlier one (mean over answers); loop: answers ending in 3 or more copies of a unit; empty: "
              "answers with no word. Degenerate: on some seed, closer to collapse than to the teacher on one of "
              "these (repetition, loop or empty rate more than halfway from the teacher's value to 1, or distinct-2 "
              "below half the teacher's); such variants rank last. Preference vs initial: the share of held-out "
              "prompts where the variant's greedy answer has the higher length-normalised teacher log-likelihood "
              "than the initial student's (ties half; each prompt averaged over seeds), with a 95 % percentile "
              "bootstrap interval over prompts -- read it with the degenerate column, as the teacher's likelihood "
              "favours repetition. docs/evaluation.md gives the details. Tokens generated: for the cell's training "
              "data (mean over seeds).", ""]
    ranks = {k: ranking(summary, k) for k in summary["metric_keys"] if k in HEADLINE}
    if ranks:
        lines += ["## Ranking (best first, by mean)", ""]
        for key, order in ranks.items():
            means = {summary["variants"][v]["metrics"][key][0] for v in order}
            if len(means) == 1:  # nothing to rank
                lines.append(f"- {METRICS[key][0]}: every method {_fmt(means.pop())}")
            elif order:
                flagged = set(degenerate_variants(summary))
                lines.append(f"- {METRICS[key][0]}: " + " > ".join(f"{v} (degenerate)" if v in flagged else v
                                                                   for v in order))
        flagged = degenerate_variants(summary)
        if flagged:
            lines += ["", "Degenerate, ranked last whatever their figures (seed: the figures that flag it):"]
            for v in flagged:
                why = "; ".join(f"seed {seed}: " + ", ".join(reasons)
                                for seed, reasons in summary["variants"][v]["degenerate_reasons"].items())
                lines.append(f"- {v}: {why}")
        lines.append("")
    if _plot(summary, out / "comparison.png", [v for v, _ in method_rows], with_reference=True):
        lines += ["![methods](comparison.png)", ""]
    ablation = [v for _, v in ABLATION_ROWS if v in summary["variants"]]
    if len(ablation) > 1 and _plot(summary, out / "ablation.png", ablation, with_reference=False):
        lines += ["![ablation](ablation.png)", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    atomic_write_json(out / "results.json", {"command": command, **summary})
    return out / "results.md"


def _plot(summary: dict, path: Path, variants: list[str], *, with_reference: bool) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CHARTED if k in summary["metric_keys"]]
    if not keys or not variants:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names, means, stds = [], [], []
        for v in variants:
            pair = summary["variants"][v]["metrics"].get(key)
            if pair is not None:
                names.append(v), means.append(pair[0]), stds.append(pair[1])
        ax.bar(names, means, yerr=stds, capsize=3, color="tab:blue")
        if with_reference:
            for name, style in (("teacher", "-"), ("initial", "--")):
                value = summary["reference"][name].get(key)
                if value is not None:
                    ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=name)
            ax.legend(fontsize=7)
        label, better = METRICS[key]
        ax.set_title(f"{label}\n(" + ("the teacher's value is the target" if better == "target"
                                      else f"{better} is better") + ")", fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    from .evaluation.report import save_figure

    save_figure(fig, path, dpi=100)  # a unique temporary file: several workers may write the results at once
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompareError(f"--seeds expects comma-separated integers (e.g. 0,1,2), got {text!r}.") from None


def add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="Every method (and DistiLLM-2's ablation) on the same budget, over seeds, in one table.",
        description="Train every variant on the same teacher, student initialisation, prompts and budget, evaluate "
        "each on held-out prompts, and write results.md (mean ± std over seeds), results.json and charts to "
        "--output-dir. Rerun the same command to continue: finished cells are skipped.")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--size", default="full", choices=[k for k in SIZES if k != "tiny"] + ["tiny"],
                   help="full: a few hours on 2 CPU cores; quick: the same protocol in < 30 min; tiny: tiny random "
                   "models (tests).")
    p.add_argument("--quick", dest="size", action="store_const", const="quick", help="Same as --size quick.")
    p.add_argument("--teacher", default=CompareSettings.teacher)
    p.add_argument("--student-layers", default=CompareSettings.student_layers)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="Comma-separated: methods (" + ", ".join(METHOD_NAMES) + ") and ablation variants ("
                   + ", ".join(ABLATIONS) + "). Default: all.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated training/generation seeds.")
    p.add_argument("--learning-rate", type=float, default=CompareSettings.learning_rate)
    p.add_argument("--report-only", action="store_true",
                   help="Write the results of the cells finished so far (e.g. while another process runs the rest).")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint: adds the judge's win rate.")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-api-key-env", default=None, help="Environment variable holding the judge's API key.")


def cmd_compare(args) -> int:
    import shlex

    settings = CompareSettings(
        output_dir=args.output_dir, size=args.size, teacher=args.teacher, student_layers=args.student_layers,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()], seeds=_int_list(args.seeds),
        learning_rate=args.learning_rate, judge_url=args.judge_url, judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env)
    command = "distillm " + " ".join(shlex.quote(a) for a in args.argv)
    if args.report_only:
        # the results show the command that runs the comparison, not this one
        saved = Path(settings.output_dir) / "command.txt"
        command = saved.read_text().strip() if saved.is_file() else None
    summary = Comparison(settings, command=command).run(report_only=args.report_only)
    out = Path(settings.output_dir)
    print((out / "results.md").read_text())
    print(f"Wall time of this invocation: {summary['wall_seconds_this_invocation']} s "
          f"({summary['cells_skipped']} finished cells skipped); results: {out / 'results.md'}")
    return 0
