"""The whole run: teacher responses, rounds of student responses + training, before/after evaluation,
metrics.json (see `distillm.pipeline` for the run directory's layout)."""

from __future__ import annotations

import logging
import time

from .. import rundir
from ..config import RunConfig
from ..distributed import process_state
from ..generation.factory import release
from ..io import atomic_write_json
from ..methods import build_method
from ..errors import DistillmError
from ..models import real_vocab_size
from ..teacher.remote import RemoteBackend, connect
from .data import import_teacher_responses
from .modality import modality_for
from .paths import RunPaths, prepare_run_dir
from .training import check_step_plan, read_json_or_none, sharded_engine, train

logger = logging.getLogger("distillm")


def describe_student(m) -> str:
    """The student as metrics.json names it: a given model, the teacher quantized, or the teacher's kept layers."""
    if m.student:
        return m.student
    if m.student_quant != "none":
        return f"the teacher, {m.student_quant} fake-quantized in groups of {m.student_quant_group_size}"
    return f"teacher layers {m.student_layers}"


def connect_teacher(config: RunConfig, tokenizer, modality):
    """The checked client of --teacher-url (reachable, same tokenizer), before any weights are read; or None."""
    if not config.training.teacher_url:
        return None
    modality.check_remote_teacher()
    if config.training.teacher_cache != "off":
        raise DistillmError("--teacher-cache and --teacher-url do not combine: the server's scores are top-k "
                            "already; drop --teacher-cache.")
    tokenizer = modality.teacher_tokenizer(tokenizer)  # cross-tokenizer runs: the server serves the teacher's ids
    return connect(config, tokenizer, real_vocab_size(tokenizer),
                   whose="the teacher's (--teacher)" if modality.name == "cross" else "the student's")


def run(config: RunConfig, *, overwrite: bool = False) -> dict:
    """Teacher responses, rounds of student responses + training, before/after evaluation, metrics.json."""
    started = time.time()
    state = process_state()
    with state.main_process_first():  # one process sets the directory up (and wipes it), the others then agree
        # only the main process locks the directory: the others work in it under its lock
        paths = prepare_run_dir(config, overwrite=overwrite and state.is_main_process, lock=state.is_main_process)
    try:
        return _run(config, paths, started)
    finally:
        if state.is_main_process:
            rundir.unlock(paths.root)


def _run(config: RunConfig, paths: RunPaths, started: float) -> dict:
    state = process_state()
    metrics = read_json_or_none(paths.metrics)
    files = rundir.file_digests(config)
    finished = metrics is not None and metrics.get("complete")
    if finished and (rundir.stored_inputs(paths.root) is None or rundir.inputs_match_files(paths.root, config)):
        logger.info("%s already holds a finished run; metrics.json is unchanged", paths.root)
        return metrics
    # a changed teacher-responses file is refused before any model is loaded; prompt files are compared as encoded
    rundir.check_inputs(paths.root, config, files, keys=("teacher_responses",))
    # text, vision-language or two tokenizers (pipeline.modality): each stage below asks it what differs
    modality = modality_for(config)
    modality.check(config)  # what the modality does not support, refused before anything is loaded
    evaluating = bool(config.evaluation.evaluate and config.data.eval_prompts)
    tokenizer = modality.open(config)  # as early and cheaply as the modality allows (text: no weights read)
    teacher_client = connect_teacher(config, tokenizer, modality)
    train_prompts = modality.load_prompt_set(config, tokenizer, "train")
    check_step_plan(config, len(train_prompts), state.num_processes)
    eval_prompts = modality.load_prompt_set(config, tokenizer, "eval") if evaluating else []
    inputs = {**files, "train_encoded": rundir.encoded_digest(train_prompts),
              "eval_encoded": rundir.encoded_digest(eval_prompts) if evaluating else None, **modality.input_digests()}
    rundir.check_inputs(paths.root, config, inputs,
                        keys=("train_encoded", "eval_encoded", "teacher_responses", *modality.input_digests()))
    if state.is_main_process:
        rundir.record_inputs(paths.root, inputs)
    if finished:  # the files were rewritten, but the prompts the run was made from are the same
        logger.info("%s already holds a finished run; metrics.json is unchanged", paths.root)
        return metrics
    models = modality.load_models(config, tokenizer)
    if config.data.teacher_responses and not paths.teacher_train.is_file() and state.is_main_process:
        import_teacher_responses(config.data.teacher_responses, train_prompts, models.tokenizer, paths.teacher_train)
    state.wait_for_everyone()
    method = build_method(config)
    if teacher_client is not None:  # --teacher-url: the teacher's responses come from the server
        teacher_backend = RemoteBackend(teacher_client, modality.teacher_vocab_size(models))
    else:
        teacher_backend = modality.teacher_backend(config, models)
    try:
        rows = method.build_rows(modality.data_context(config, models, train_prompts, paths, teacher_backend))
        teacher_eval = modality.teacher_eval(config, models, teacher_backend, eval_prompts,
                                             paths) if evaluating else []
        # --eval-samples K: the teacher's further K - 1 sets, for the diversity figures of the evaluation
        teacher_samples = [teacher_eval] + [
            modality.teacher_eval(config, models, teacher_backend, eval_prompts, paths, sample=j)
            for j in range(1, config.evaluation.eval_samples)] if evaluating else []
    finally:
        release(teacher_backend)
    metrics: dict = {"method": method.name, "teacher": config.model.teacher,
                     "student": describe_student(config.model), **modality.describe(),
                     "num_train_prompts": len(train_prompts), "num_eval_prompts": len(eval_prompts)}
    if evaluating:
        before_file = paths.root / "eval" / "before.json"
        before = read_json_or_none(before_file)
        if before is not None:  # a resumed run: the student has trained since, so reuse the first figures
            metrics["before"] = before
        else:
            metrics["before"] = modality.evaluate(config, models, eval_prompts, teacher_eval, paths, "before",
                                                  teacher_samples=teacher_samples, teacher_client=teacher_client)
            atomic_write_json(before_file, metrics["before"])
    validation = teacher_eval
    if not validation and method.uses_validation:
        logger.warning("No held-out prompts: %s measures its validation loss on the first %d training rows",
                       method.name, min(32, len(rows)))
        validation = rows[:32]
    metrics["training"] = train(config, models, method, rows, paths, train_prompts=train_prompts,
                                validation_rows=validation, teacher_client=teacher_client, modality=modality)
    if evaluating and sharded_engine():
        logger.warning("No 'after' evaluation under FSDP / DeepSpeed ZeRO-3: the models are sharded now. Evaluate "
                       "the saved student with `distillm eval --model distilled=%s`.", paths.student)
    elif evaluating:
        metrics["after"] = modality.evaluate(config, models, eval_prompts, teacher_eval, paths, "after",
                                              teacher_samples=teacher_samples, teacher_client=teacher_client)
    metrics["wall_seconds"] = round(time.time() - started, 1)
    metrics["complete"] = True
    if state.is_main_process:
        atomic_write_json(paths.metrics, metrics)
    return metrics
