"""The before/after evaluation of a run on the held-out prompts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..config import RunConfig
from ..evaluation.degeneracy import degeneracy_figures, degenerate, gap_change_test
from ..evaluation.divergence import (served_teacher_nll, served_teacher_student_divergence, teacher_nll,
                                     teacher_student_divergence)
from ..generation.factory import generate_once, sampling_params
from ..io import read_jsonl
from ..models import ModelPair
from ..testing.faults import fault_point
from ..teacher.remote import RemoteScores
from .paths import RunPaths

logger = logging.getLogger("distillm")


def evaluate(config: RunConfig, models: ModelPair, eval_prompts, teacher_eval_rows, paths: RunPaths, tag: str, *,
             modality, teacher_client=None):
    """Held-out figures for the current student: teacher NLL of its samples, KL / TVD / acceptance rate on the
    teacher's responses. `modality`: the run's `pipeline.modality` variant (its generation backend, its images).
    `teacher_client`: the --teacher-url client; the teacher's figures then come from the server (`served_figures`)."""
    d = config.data
    start = time.time()
    backend = modality.backend(config, models.student, models.tokenizer, model_dir=None)  # HF: the live student
    samples = generate_once(
        backend, eval_prompts, paths.eval_samples(tag),
        sampling_params(config, seed_offset=7_777, max_new_tokens=config.evaluation.eval_max_new_tokens),
        models.tokenizer, desc=f"student samples ({tag})",
    )
    common = dict(vocab_size=models.vocab_size, pad_token_id=models.tokenizer.pad_token_id, max_length=d.max_length,
                  image_inputs=modality.image_inputs())
    served = served_figures(config, teacher_client, models.vocab_size) if teacher_client is not None else None
    if served is not None:
        result = {"teacher_scores": served.label,
                  "teacher_nll_of_student_samples": served_teacher_nll(served.scores, samples, **common)}
    else:
        result = {"teacher_nll_of_student_samples": teacher_nll(models.teacher, samples, **common)}
    # distinct-2 (distinct word bigrams / all), repetition, loop and empty rates of the samples, beside the
    # teacher's, and the degenerate flag (evaluation.degeneracy): a collapsed student repeats itself
    student = degeneracy_figures([row["response"] for row in samples])
    teacher = degeneracy_figures([row["response"] for row in teacher_eval_rows])
    for key in ("distinct_2", "repetition", "loop_rate", "empty_rate"):
        result[key], result[f"teacher_{key}"] = student[key], teacher[key]
    verdict = degenerate(student, teacher)
    before_path = paths.eval_samples("before")
    if tag != "before" and before_path.is_file():  # is the change against the start more than chance?
        before = {row["id"]: row["response"] for row in read_jsonl(before_path)}
        teacher_by_id = {row["id"]: row["response"] for row in teacher_eval_rows}
        paired = [row for row in samples if row["id"] in before and row["id"] in teacher_by_id]
        if paired:
            args = ([teacher_by_id[row["id"]] for row in paired], [before[row["id"]] for row in paired],
                    [row["response"] for row in paired])
            result["distinct_2_change"] = gap_change_test(*args).as_dict()
            if student["repetition"] is not None and teacher["repetition"] is not None:
                try:
                    result["repetition_change"] = gap_change_test(
                        *args, figure=lambda texts: degeneracy_figures(texts)["repetition"]).as_dict()
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
