"""The distillation pipeline, by stage: the method's data (teacher responses once, for most methods), then `rounds` epochs
of training -- for DistiLLM-2 and DPKD each round starts by regenerating the student's responses; the on-policy
baselines draw fresh student data inside the trainer -- with a held-out evaluation before and after. Every stage
writes its output atomically into the run directory and is skipped or continued when the same command is run
again.

Stages, data flowing one way (prompts -> generation -> training -> evaluation -> the run):

    paths.py      the run directory: RunPaths, prepare_run_dir, config_changes
    setup.py      loading a text run's models and prompt sets
    modality.py   what differs between text, vision-language and cross-tokenizer runs: one variant object per
                  modality (TextModality, VisionModality, CrossModality), chosen once, that every stage calls
    cross.py      the cross-tokenizer stages CrossModality calls: prompts per side, the two models, the
                  teacher's responses carried over to the student's tokens, the aligned evaluation
    data.py       the training rows: teacher responses, (teacher, student) pairs, DataContext for the methods
    training.py   the Trainer's arguments, the step plan, the rounds of training, saving the student
    evaluate.py   the before/after evaluation
    driver.py     `run`: the whole pipeline
    (generation.factory: the configured generation backend, sampling parameters, generate_once)

Run directory layout::

    config.yaml                  the resolved config of the run
    data/teacher_train.jsonl     teacher responses (prompt, response, ids), generated once
    data/teacher_eval.jsonl      teacher responses to the held-out prompts
    data/teacher_eval_J.jsonl    --eval-samples > 1: the teacher's further samples J = 1, 2, ... (diversity figures)
    data/teacher_rationales_train.jsonl  step-by-step only: the teacher's rationale + answer responses
    rounds/round_K/student.jsonl the student's responses at the start of round K (distillm2, dpkd)
    rounds/round_K/pairs.jsonl   TRL DPO columns: prompt, chosen (teacher), rejected (student), plus token ids
    checkpoints/checkpoint-N     transformers Trainer checkpoints (resume from the last one)
    logs/train_log.jsonl         per-step loss, the method's metrics (e.g. skl, srkl, skew_t, skew_s, b), sources
    logs/training.json           the training summary, written after the student: marks training as finished
    student/                     the distilled student (safetensors + tokenizer; saved as student.tmp, renamed)
    eval/{before,after}_samples.jsonl  student samples on held-out prompts (_J.jsonl: --eval-samples' further sets)
    metrics.json                 before/after metrics, training summary, timings
"""

from __future__ import annotations

from ..generation.factory import generate_once, make_backend, release, sampling_params
from ..models import ModelPair
from ..rundir import RunDirError
from .paths import RunPaths, config_changes, prepare_run_dir
from .setup import check_context_length, load_prompt_set, load_text_models
from .modality import CrossModality, TextModality, VisionModality, load_models, modality_for
from .data import DataContext, check_teacher_row, import_teacher_responses, pair_rows
from .evaluate import evaluate
from .training import (MIN_OPTIMIZER_STEPS, StepPlan, check_step_plan, learning_rates, read_json_or_none,
                       save_student, sharded_engine, step_plan, train, training_arguments, training_kwargs)
from .driver import run

__all__ = ["CrossModality", "DataContext", "MIN_OPTIMIZER_STEPS", "ModelPair", "RunDirError", "RunPaths", "StepPlan",
           "TextModality", "VisionModality", "check_context_length", "check_step_plan", "check_teacher_row",
           "config_changes", "evaluate", "generate_once", "import_teacher_responses", "learning_rates", "load_models",
           "load_prompt_set", "load_text_models", "make_backend", "modality_for", "pair_rows", "prepare_run_dir",
           "read_json_or_none", "release", "run", "sampling_params", "save_student", "sharded_engine", "step_plan",
           "train", "training_arguments", "training_kwargs"]
