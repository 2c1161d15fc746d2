"""The before/after evaluation of a run on the held-out prompts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..config import RunConfig
from ..evaluation.degeneracy import degeneracy_figures, degenerate, gap_change_test, per_set, set_figures
from ..evaluation.text import distinct_n
from ..evaluation.divergence import (served_teacher_nll, served_teacher_student_divergence, teacher_nll,
                                     teacher_student_divergence)
from ..generation.factory import STUDENT_EVAL_SEED, eval_seed_offset, generate_once, sampling_params
from ..io import read_jsonl
from ..models import ModelPair
from ..testing.faults import fault_point
from ..teacher.remote import RemoteScores
from .paths import RunPaths

logger = logging.getLogger("distillm")


def evaluate(config: RunConfig, models: ModelPair, eval_prompts, teacher_eval_rows, paths: RunPaths, tag: str, *,
             modality, teacher_client=None, teacher_samples=None):
    """Held-out figures for the current student: teacher NLL of its samples, KL / TVD / acceptance rate on the
    teacher's responses. `modality`: the run's `pipeline.modality` variant (its generation backend, its images).
    `teacher_client`: the --teacher-url client; the teacher's figures then come from the server (`served_figures`).
    `teacher_samples`: with --eval-samples K > 1, the teacher's K sets of responses (the first is
    `teacher_eval_rows`); the student then samples K sets too. The teacher NLL pools them; distinct-2,
    repetition, loop and empty rates are means over the sets (`degeneracy.set_figures`)."""
    d = config.data
    start = time.time()
    backend = modality.backend(config, models.student, models.tokenizer, model_dir=None)  # HF: the live student
    sets = student_sample_sets(config, backend, eval_prompts, paths, tag, models.tokenizer)
    samples = [row for rows in sets for row in rows]
    teacher_sets = teacher_samples or [teacher_eval_rows]
    common = dict(vocab_size=models.vocab_size, pad_token_id=models.tokenizer.pad_token_id, max_length=d.max_length,
                  image_inputs=modality.image_inputs())
    served = served_figures(config, teacher_client, models.vocab_size) if teacher_client is not None else None
    if served is not None:
        result = {"teacher_scores": served.label,
                  "teacher_nll_of_student_samples": served_teacher_nll(served.scores, samples, **common)}
    else:
        result = {"teacher_nll_of_student_samples": teacher_nll(models.teacher, samples, **common)}
    result["eval_samples"] = len(sets)
    # distinct-2 (distinct word bigrams / all), repetition, loop and empty rates of the samples, beside the
    # teacher's, and the degenerate flag (evaluation.degeneracy): a collapsed student repeats itself. Several
    # sets (--eval-samples): each figure is the mean of its per-set values
    student, teacher = set_figures(response_texts(sets)), set_figures(response_texts(teacher_sets))
    for key in ("distinct_2", "repetition", "loop_rate", "empty_rate"):
        result[key], result[f"teacher_{key}"] = student[key], teacher[key]
    verdict = degenerate(student, teacher)
    paired = paired_answers(paths, sets, teacher_sets) if tag != "before" else None
    if paired:  # is the change against the start more than chance?
        *args, sizes = paired
        result["distinct_2_change"] = gap_change_test(
            *args, figure=per_set(lambda texts: distinct_n(texts, 2), sizes)).as_dict()
        if student["repetition"] is not None and teacher["repetition"] is not None:
            try:
                result["repetition_change"] = gap_change_test(
                    *args, figure=per_set(lambda texts: degeneracy_figures(texts)["repetition"], sizes)).as_dict()
            except ValueError:  # no answer with 4 words on one side
                pass
    result["degenerate"], result["degenerate_reasons"] = verdict.flagged, list(verdict.reasons)
    fault_point(f"eval:{tag}")
    if served is not None:
        result.update(served_teacher_student_divergence(served.scores, models.student, teacher_eval_rows, **common))
    else:
        result.update(teacher_student_divergence(models.teacher, models.student, teacher_eval_rows, **common))
    result["seconds"] = round(time.time() - start, 1)
    return result


def student_sample_sets(config: RunConfig, backend, eval_prompts, paths: RunPaths, tag: str, tokenizer) -> list:
    """The student's --eval-samples sets of held-out samples at `tag`, each generated once (a resumed run reads
    the files back), set J from its own seed."""
    count = config.evaluation.eval_samples
    of = (lambda j: f", set {j + 1} of {count}") if count > 1 else (lambda j: "")
    return [generate_once(backend, eval_prompts, paths.eval_samples(tag, j),
                          sampling_params(config, seed_offset=eval_seed_offset(STUDENT_EVAL_SEED, j),
                                          max_new_tokens=config.evaluation.eval_max_new_tokens),
                          tokenizer, desc=f"student samples ({tag}){of(j)}")
            for j in range(count)]


def response_texts(sets: list[list[dict]]) -> list[list[str]]:
    """The answers' texts, set by set (the form `degeneracy.set_figures` takes)."""
    return [[row["response"] for row in rows] for rows in sets]


def paired_answers(paths: RunPaths, sets: list[list[dict]], teacher_sets: list[list[dict]]):
    """(teacher, before, after, sizes) for `evaluation.degeneracy.gap_change_test`: the pairs are the (set,
    prompt) answered both before training (eval/before_samples*.jsonl) and now, set after set (`sizes`: the
    pairs of each set, for `degeneracy.per_set`); the teacher's answers are its responses to the same prompts in
    the same set (its first set where it has fewer). None without pairs."""
    teacher, before, after, sizes = [], [], [], []
    for j, rows in enumerate(sets):
        before_path = paths.eval_samples("before", j)
        if not before_path.is_file():
            continue
        start = {row["id"]: row["response"] for row in read_jsonl(before_path)}
        reference = {row["id"]: row["response"] for row in teacher_sets[min(j, len(teacher_sets) - 1)]}
        count = len(after)
        for row in rows:
            if row["id"] in start and row["id"] in reference:
                teacher.append(reference[row["id"]])
                before.append(start[row["id"]])
                after.append(row["response"])
        sizes.append(len(after) - count)
    return (teacher, before, after, sizes) if after else None


@dataclass(frozen=True)
class ServedFigures:
    """How the evaluation reads a served teacher: `scores(batch)` a batch's `TopKTeacher`, `label` what
    metrics.json says of the figures (`teacher_scores`)."""

    scores: Callable
    label: str


def served_figures(config: RunConfig, client, vocab_size: int) -> ServedFigures:
    """The evaluation's view of the --teacher-url server: top --teacher-top-k log-probs and the actual token's
    exact log-prob per position (`RemoteScores`, its own counts), the tail of --teacher-topk-tail."""
    t = config.training
    service = RemoteScores(client, t.teacher_top_k, vocab_size, tail=t.teacher_topk_tail)
    label = (f"top-{t.teacher_top_k} from {', '.join(client.urls)} ({t.teacher_topk_tail} tail, the actual token "
             "as a known entry): kl, tvd and acceptance_rate are top-k figures, not comparable with a local "
             "teacher's exact ones; teacher_nll_of_student_samples is exact (the server's log-prob of each token)")
    return ServedFigures(lambda batch: service.scores(None, batch), label)
