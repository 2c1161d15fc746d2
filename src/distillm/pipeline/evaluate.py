"""The before/after evaluation of a run on the held-out prompts."""

from __future__ import annotations

import logging
import time

from ..config import RunConfig
from ..evaluation.degeneracy import degeneracy_figures, degenerate
from ..evaluation.divergence import teacher_nll, teacher_student_divergence
from ..generation.factory import generate_once, sampling_params
from ..models import ModelPair
from ..testing.faults import fault_point
from .paths import RunPaths

logger = logging.getLogger("distillm")


def evaluate(config: RunConfig, models: ModelPair, eval_prompts, teacher_eval_rows, paths: RunPaths, tag: str, *,
             modality):
    """Held-out figures for the current student: teacher NLL of its samples, KL / TVD / acceptance rate on the
    teacher's responses. `modality`: the run's `pipeline.modality` variant (its generation backend, its images)."""
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
    result = {"teacher_nll_of_student_samples": teacher_nll(models.teacher, samples, **common)}
    # distinct-2 (distinct word bigrams / all), repetition, loop and empty rates of the samples, beside the
    # teacher's, and the degenerate flag (evaluation.degeneracy): a collapsed student repeats itself
    student = degeneracy_figures([row["response"] for row in samples])
    teacher = degeneracy_figures([row["response"] for row in teacher_eval_rows])
    for key in ("distinct_2", "repetition", "loop_rate", "empty_rate"):
        result[key], result[f"teacher_{key}"] = student[key], teacher[key]
    verdict = degenerate(student, teacher)
    result["degenerate"], result["degenerate_reasons"] = verdict.flagged, list(verdict.reasons)
    fault_point(f"eval:{tag}")
    result.update(teacher_student_divergence(models.teacher, models.student, teacher_eval_rows, **common))
    result["seconds"] = round(time.time() - start, 1)
    return result
