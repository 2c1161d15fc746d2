"""The comparison's work: the shared prompts, teacher responses and reference evaluation, then one cell per
(variant, seed) -- a `distillm run` plus its evaluation -- claimed by one process at a time (see
`distillm.compare`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..data.builtin import load_builtin
from ..evaluation.degeneracy import degeneracy_figures
from ..evaluation.divergence import normalised_scores, sequence_log_likelihoods
from ..evaluation.judge import OpenAIChatJudge
from ..evaluation.math import arithmetic_problems, problem_prompt
from ..evaluation.preference import outcomes, paired_scores, preference_over_seeds
from ..evaluation.suite import EvalSettings, LOCAL_TASKS, ModelSpec, run_evaluation
from ..generation.factory import sampling_params
from ..generation.hf import HFBackend
from ..generation.runner import generate_responses
from ..models import load_model, real_vocab_size
from ..pipeline import run
from ..pipeline.paths import RunPaths, config_changes
from ..pipeline.setup import load_prompt_set
from .. import methods
from ..config import load_config
from ..io import atomic_write_json, atomic_write_text, read_jsonl
from . import archive as records
from .protocol import METRICS, VARIANTS, CompareError, CompareSettings, cell_model_name, protocol_changes
from .report import summarise, write_results

logger = logging.getLogger("distillm")


class Comparison:
    def __init__(self, settings: CompareSettings, *, command: str | None = None, archive: str | Path | None = None):
        self.s = settings
        self.command = command
        self.archive = Path(archive) if archive else None  # `compare.archive`: the small records, kept elsewhere
        self.root = Path(settings.output_dir)
        self.shared = self.root / "shared"
        self.prompts_file = self.shared / "prompts.jsonl"
        self.teacher_file = self.shared / "teacher_train.jsonl"
        self.eval_dir = self.root / "eval"
        self._teacher = None

    # ---------------------------------------------------------------- setup
    def check_directory(self) -> None:
        student = self.s.student
        if student is not None and not (Path(student) / "config.json").is_file():
            raise CompareError(f"--student {student}: no model there (no config.json). Give a saved model "
                               "directory, e.g. a warm-up run's student/ (or the comparison cell's "
                               "cells/VARIANT/seed_S/run/student).")
        path = self.root / "compare.json"
        if path.is_file():
            changed = protocol_changes(json.loads(path.read_text()), self.s)
            if changed:
                raise CompareError(f"{self.root} holds a comparison with other settings (differs in: "
                                   f"{', '.join(changed)}; see {path}). Use another --output-dir, or the same "
                                   "settings to continue it (variants and seeds may change).")
        elif self.root.exists() and any(self.root.iterdir()):
            raise CompareError(f"{self.root} is not empty and holds no comparison (no compare.json): choose "
                               "another --output-dir.")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.s.protocol())

    def build_prompts(self) -> None:
        """The training prompts: the first built-in training prompts plus generated arithmetic problems (none
        of them among the held-out ones)."""
        if self.prompts_file.is_file():
            return
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
            "output_dir": str(output_dir), "teacher": self.s.teacher, "student": self.s.student,
            "student_layers": self.s.student_layers,
            "student_quant": self.s.student_quant, "student_quant_group_size": self.s.student_quant_group_size,
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
        config = self.run_config("seqkd", 0, self.shared / "unused", teacher_responses=False)
        teacher, tokenizer = self.teacher_model()
        prompts = load_prompt_set(config, tokenizer, "train")
        backend = HFBackend(teacher, tokenizer, max_batch_size=config.generation.generation_batch_size)
        generate_responses(backend, prompts, self.teacher_file, sampling_params(config), tokenizer,
                           desc="teacher responses (shared)")

    def teacher_model(self):
        if self._teacher is None:
            self._teacher = load_model(self.s.teacher)
        return self._teacher

    # ---------------------------------------------------------------- evaluation
    def eval_settings(self):
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
        key = os.environ.get(self.s.judge_api_key_env) if self.s.judge_api_key_env else None
        return OpenAIChatJudge(self.s.judge_url, self.s.judge_model, api_key=key)

    def evaluate(self, specs, *, include_teacher: bool = False) -> dict[str, dict]:
        """Evaluation-suite metrics of `specs` (the suite evaluates the teacher first, from its cache after the
        first time), plus the teacher's NLL of each model's held-out responses and their degeneracy figures."""
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

    def answers(self, cells: list[dict], n: int = 3) -> dict:
        """The first `n` held-out prompts' greedy answers: the teacher's, the initial student's and, per variant,
        its lowest finished seed's -- the text behind the table (results.md's last section)."""
        seed = min(cell["seed"] for cell in cells)
        names = {"teacher": "teacher", "initial": "initial student"}
        for variant in self.s.variants:  # the table's variants in the comparison's order
            if any(c["variant"] == variant and c["seed"] == seed for c in cells):
                names[cell_model_name(variant, seed)] = variant
        rows = {name: read_jsonl(self.eval_dir / "generations" / name / "responses.jsonl") for name in names}
        by_id = {name: {str(r["id"]): r["response"] for r in model_rows} for name, model_rows in rows.items()}
        instructions = {str(r["id"]): r["prompt"] for r in load_builtin("eval")}  # not the chat-rendered prompt
        prompts = []
        for row in rows["teacher"][:n]:
            prompts.append({"id": str(row["id"]), "prompt": instructions.get(str(row["id"]), row["prompt"]),
                            "answers": {label: by_id[name].get(str(row["id"]), "") for name, label in names.items()}})
        return {"seed": seed, "prompts": prompts}

    def backfill(self, metrics: dict, name: str) -> None:
        """Add the reference-free metrics a finished cell lacks, from its stored held-out generations."""
        path = self.eval_dir / "generations" / name / "responses.jsonl"
        wanted = ("distinct_2", "repetition", "loop_rate", "empty_rate")
        if any(k not in metrics for k in wanted) and path.is_file():
            figures = degeneracy_figures([row["response"] for row in read_jsonl(path)])
            for key in wanted:  # repetition is None when no answer has 4 words: left out
                if key not in metrics and figures[key] is not None:
                    metrics[key] = figures[key]

    def initial_spec(self) -> ModelSpec:
        """Every cell's starting student: the given one, the teacher quantized round-to-nearest, or its pruned
        copy."""
        if self.s.student is not None:
            return ModelSpec("initial", self.s.student)
        if self.s.student_quant != "none":
            return ModelSpec("initial", self.s.teacher, quant=self.s.student_quant,
                             quant_group_size=self.s.student_quant_group_size)
        return ModelSpec("initial", self.s.teacher, layers=self.s.student_layers)

    def reference(self) -> dict:
        """The teacher's and the initial (pruned or round-to-nearest quantized, untrained) student's figures,
        computed once."""
        path = self.shared / "reference.json"
        if path.is_file():
            return json.loads(path.read_text())
        started = time.time()
        metrics = self.evaluate([self.initial_spec()], include_teacher=True)
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
        saved = RunPaths(run_dir).config
        changed = config_changes(saved, config.to_yaml()) if saved.is_file() else []
        if changed:
            logger.warning("%s holds an unfinished run started with other settings (differs in: %s): starting "
                           "that cell again", run_dir, ", ".join(changed))
        return bool(changed)

    def run_cell(self, variant: str, seed: int) -> dict:
        folder = self.cell_dir(variant, seed)
        started = time.time()
        config = self.run_config(variant, seed, folder / "run")
        metrics = run(config, overwrite=self.stale_run(folder / "run", config))
        train_seconds = round(time.time() - started, 1)
        name = cell_model_name(variant, seed)
        spec = ModelSpec(name, str(folder / "run" / "student"), train_log=str(folder / "run" / "logs" / "train_log.jsonl"))
        evaluated = self.evaluate([spec])[name]
        uses_teacher_rows = methods.METHODS[config.method.method].uses_teacher_rows(config)
        tokens = generated_tokens(folder / "run", uses_teacher_rows=uses_teacher_rows,
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
        started = time.time()
        self.check_directory()
        if self.archive is not None:
            records.restore(self.root, self.archive, self.s)
        if self.command and not report_only:
            atomic_write_text(self.root / "command.txt", self.command + "\n")
        self.build_prompts()
        if report_only and not (self.shared / "reference.json").is_file():
            raise CompareError(f"No finished cells in {self.root} yet: run the comparison without --report-only.")
        self.teacher_responses()
        reference = self.reference()
        self.save_archive()
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
                self.save_archive()
            bar.close()
        cells = [cell for cell in (self.finished(*c) for c in self.cells()) if cell is not None]
        for cell in cells:  # cells finished before a metric was added: computed from their stored generations
            self.backfill(cell["metrics"], cell_model_name(cell["variant"], cell["seed"]))
        for name in ("teacher", "initial"):
            self.backfill(reference[name], name)
        if not cells:
            raise CompareError(f"No finished cells in {self.root} yet: run the comparison without --report-only.")
        summary = summarise(cells, reference, self.s, preferences=self.preferences(cells))
        summary["answers"] = self.answers(cells)
        summary["cells_total"] = len(self.cells())
        summary["wall_seconds_this_invocation"] = round(time.time() - started, 1)
        summary["cells_skipped"] = skipped
        write_results(summary, self.root, command=self.command)
        self.save_archive()
        return summary

    def save_archive(self) -> None:
        if self.archive is not None:
            records.save(self.root, self.archive)


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
