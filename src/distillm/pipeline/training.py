"""Training a run's student: the Trainer's arguments, the step plan, the rounds of training, saving the
student."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
import torch
from accelerate.utils import DistributedType
from transformers import TrainingArguments, get_scheduler, set_seed

from ..config import RunConfig
from ..data.prompts import EncodedPrompt
from ..distributed import process_state
from ..errors import DistillmError
from ..generation.factory import generate_once, release, sampling_params
from ..io import atomic_write_json, read_jsonl, write_jsonl
from ..methods.base import Method
from ..models import ModelPair, is_peft_model, load_model, merged_copy, resolve_dtype
from ..quant.qat import is_qat_model, plain_copy, save_quantized_student
from ..teacher.remote import RemoteJointTeacher, RemoteScores
from ..training.callbacks import OnPolicyRoundCallback
from ..training.collate import RowDataset
from ..training.sources import OnlineSampler
from ..training.teacher_cache import TeacherCache
from ..training.trainer import DistillTrainer, last_complete_checkpoint
from .data import pair_rows
from .paths import RunPaths

logger = logging.getLogger("distillm")


def training_arguments(config: RunConfig, paths: RunPaths, *, num_rows: int) -> TrainingArguments:
    return TrainingArguments(**training_kwargs(config, paths, num_rows=num_rows))


def training_kwargs(config, paths: RunPaths, *, num_rows: int) -> dict:
    """TrainingArguments' keywords from the config's training section (shared by `run`/`train` and `align`), for
    a training set of `num_rows` rows. The warm-up is passed as a whole number of steps, computed from
    --warmup-ratio and the step count (`step_plan`): transformers 5 reads a float `warmup_steps` below 1 as a
    ratio, transformers 4 as a step count (and has a separate warmup_ratio), so an int means the same to both."""
    t = config.training
    plan = step_plan(t, num_rows, process_state().num_processes)
    return dict(
        output_dir=str(paths.checkpoints),
        num_train_epochs=t.rounds,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=plan.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=[] if t.report_to == "none" else [t.report_to],
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if t.gradient_checkpointing else {}),
        bf16=resolve_dtype(config.model.dtype) == torch.bfloat16,
        fp16=resolve_dtype(config.model.dtype) == torch.float16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


#: A run with fewer optimizer steps than this is warned about: too few to move a student measurably.
MIN_OPTIMIZER_STEPS = 10


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps a training run takes: per round (epoch), in all, and how many of them warm up."""

    per_round: int
    total: int
    warmup: int


def step_plan(training, num_rows: int, num_processes: int = 1) -> StepPlan:
    """The optimizer steps transformers' Trainer takes on `num_rows` rows (one per prompt, for every method):
    each process gets ceil(ceil(rows / batch) / processes) micro-batches a round (accelerate deals the batches
    out, the last ones padded so every process has as many), one optimizer step per --gradient-accumulation-steps
    of them, a shorter last one included, at least one per round; --rounds rounds. The warm-up is
    ceil(total x --warmup-ratio) steps, as transformers computes it from a ratio."""
    batches = math.ceil(num_rows / training.per_device_train_batch_size)
    per_process = math.ceil(batches / max(num_processes, 1))
    per_round = max(math.ceil(per_process / training.gradient_accumulation_steps), 1)
    total = per_round * training.rounds
    return StepPlan(per_round, total, math.ceil(total * training.warmup_ratio))


def learning_rates(training, plan: StepPlan) -> list[float] | None:
    """The learning rate of each optimizer step under the configured schedule (None if the schedule cannot be
    built without the Trainer, e.g. one that needs extra arguments)."""
    rates = _learning_rates(training, plan)
    return None if rates is None else list(rates)


def _learning_rates(training, plan: StepPlan):
    """An iterator over the steps' learning rates (lazily: a check can stop at the first positive one), or None."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training.learning_rate)
    try:
        scheduler = get_scheduler(training.lr_scheduler_type, optimizer, num_warmup_steps=plan.warmup,
                                  num_training_steps=plan.total)
    except (ValueError, TypeError, KeyError):
        return None

    def rates():
        for _ in range(plan.total):  # the rate each step uses, then the scheduler steps (as the Trainer does)
            yield optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()

    return rates()


def check_step_plan(config: RunConfig, num_rows: int, num_processes: int = 1) -> StepPlan:
    """Refuse a run whose every optimizer step has a learning rate of 0 (it would train nothing and end looking
    like success, the student unchanged to the last digit), e.g. one step that the warm-up takes; warn when the
    warm-up covers every step or the run has fewer than MIN_OPTIMIZER_STEPS steps. Cheap: run before any model
    is loaded."""
    t = config.training
    plan = step_plan(t, num_rows, num_processes)
    setup = (f"{num_rows} training prompts, --per-device-train-batch-size {t.per_device_train_batch_size}, "
             f"--gradient-accumulation-steps {t.gradient_accumulation_steps}"
             + (f", {num_processes} processes" if num_processes > 1 else "")
             + f" and --rounds {t.rounds} give {plan.total} optimizer step{'s' if plan.total != 1 else ''}")
    more_steps = ("use more prompts (--num-prompts), a smaller --per-device-train-batch-size or "
                  "--gradient-accumulation-steps, or more --rounds")
    rates = _learning_rates(t, plan)
    if rates is not None and not any(rate > 0 for rate in rates):
        cause = (f"the warm-up (--warmup-ratio {t.warmup_ratio}: {plan.warmup} step{'s' if plan.warmup != 1 else ''}) "
                 "starts from a learning rate of 0" if t.learning_rate > 0 else "--learning-rate is 0")
        raise DistillmError(
            f"This run would train nothing: {setup}, and {cause}, so every step has a learning rate of 0 and the "
            f"student would end exactly as it started. {more_steps[0].upper() + more_steps[1:]}, or lower "
            "--warmup-ratio (0: no warm-up).")
    if plan.warmup >= plan.total and plan.total > 0:
        logger.warning("The warm-up covers all %d optimizer steps (%s, --warmup-ratio %s): the learning rate never "
                       "reaches --learning-rate %s. Lower --warmup-ratio, or %s.", plan.total, setup,
                       t.warmup_ratio, t.learning_rate, more_steps)
    if plan.total < MIN_OPTIMIZER_STEPS:
        logger.warning("Only %d optimizer step%s (%s): too few to change the student much. For a real run, %s.",
                       plan.total, "s" if plan.total != 1 else "", setup, more_steps)
    return plan


def train(config: RunConfig, models: ModelPair, method: Method, rows: list[dict], paths: RunPaths, *,
          train_prompts: list[EncodedPrompt], validation_rows: list[dict] | None = None,
          teacher_client=None, modality) -> dict:
    """`rounds` epochs of the method on its rows; resumes from the last complete checkpoint in the run directory.
    Paired methods (distillm2, dpkd) regenerate the student's responses at the start of every round. `modality`:
    the run's `pipeline.modality` variant (text, vision-language or cross-tokenizer): its generation backend,
    batches, Trainer."""
    tokenizer = models.tokenizer
    summary = read_json_or_none(paths.training_summary)
    if summary is not None and (paths.student / "config.json").is_file():
        # Training finished before (the summary is written after the student): a resumed run reuses the student.
        logger.info("Training already finished: using the student in %s", paths.student)
        models.student = modality.load_student(paths.student).to(models.student.device)
        return summary

    def refresh(round_index: int, model) -> list[dict]:
        folder = paths.round_dir(round_index)
        if (folder / "pairs.jsonl").is_file():  # this round's data is complete (a resumed run, or round 0 again)
            try:
                return read_jsonl(folder / "pairs.jsonl")
            except DistillmError as err:  # damaged by something else than distillm (it writes it atomically)
                logger.warning("%s Rebuilding it.", err)
        model_dir = None
        if modality.saves_weights_for_generation(config):
            # vLLM loads weights from a directory: the current student is saved (a LoRA adapter merged in) by
            # rank 0, and each round's engine is started afresh on it, so every round samples the latest weights
            model_dir = str(folder / "student_weights")
            state = process_state()
            if state.is_main_process and not (folder / "student.jsonl").is_file() \
                    and not (Path(model_dir) / "config.json").is_file():
                tmp = folder / "student_weights.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                plain_copy(model).save_pretrained(tmp)  # LoRA merged, fake-quantized weights as plain ones
                tokenizer.save_pretrained(tmp)
                shutil.rmtree(model_dir, ignore_errors=True)
                tmp.rename(model_dir)
            state.wait_for_everyone()
        backend = modality.backend(config, model, tokenizer, model_dir=model_dir)
        try:
            student_rows = generate_once(
                backend, train_prompts, folder / "student.jsonl",
                sampling_params(config, seed_offset=1000 * (round_index + 1)), tokenizer,
                desc=f"student responses (round {round_index})",
            )
        finally:
            release(backend)
        pairs = pair_rows(rows, student_rows)
        write_jsonl(folder / "pairs.jsonl", pairs)
        return pairs

    args = training_arguments(config, paths, num_rows=len(rows))
    set_seed(config.training.seed)
    if not rows:
        raise DistillmError(f"Method {method.name!r} has no training rows: check the prompt file {config.data.prompts}.")
    dataset = RowDataset(refresh(0, models.student) if method.paired_rounds else rows)
    image_inputs = modality.image_inputs(train_prompts)  # vision-language: each row's image; text: None
    collator = modality.collator(config, models, method, image_inputs)
    joint_teacher = None  # speculative-kd with --teacher-url: joint decoding through the server, block by block
    if teacher_client is not None and "speculative" in method.sources:
        joint_teacher = RemoteJointTeacher(teacher_client, models.vocab_size)
    sampler = OnlineSampler(models.student, models.teacher, tokenizer, sampling_params(config), models.vocab_size,
                            image_inputs=image_inputs, joint_teacher=joint_teacher)
    teacher_cache = None
    if config.training.teacher_cache != "off" and method.needs_teacher and (
            method.uses_fixed_responses or method.paired_rounds):
        # the first group of every row is a fixed (teacher) response: the same sequences every round
        modality.check_teacher_cache()
        state = process_state()
        if state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise DistillmError("--teacher-cache is not supported under DeepSpeed/FSDP (the teacher's head is "
                                "sharded); run without it, or with DDP / one process.")
        # in the teacher's tokens (cross-tokenizer: its prompt rendering and its own response ids)
        cache_sequences, cache_pad = modality.teacher_cache_sequences(
            models, [method.sequences(row)[0] for row in dataset.rows])
        with state.main_process_first():  # one process builds it, the others then read it
            teacher_cache = TeacherCache(config.training.teacher_cache_dir or paths.root / "teacher_cache",
                                         config.training.teacher_cache, k=config.training.teacher_cache_k,
                                         vocab_size=modality.teacher_vocab_size(models),
                                         tail=config.training.teacher_topk_tail).build(
                models.teacher.to(args.device), cache_sequences,
                max_length=config.data.max_length, pad_token_id=cache_pad,
                batch_size=config.training.per_device_train_batch_size)
    teacher_service = None
    if teacher_client is not None and method.needs_teacher:  # --teacher-url: top-k scores from the server
        teacher_service = RemoteScores(teacher_client, config.training.teacher_top_k,
                                       modality.teacher_vocab_size(models),
                                       max_pending=config.training.gradient_accumulation_steps,
                                       tail=config.training.teacher_topk_tail)
        teacher_service = modality.teacher_service(teacher_service, models)  # cross: scores the teacher's side
    trainer_class, extra = modality.trainer(models)
    trainer = trainer_class(
        teacher_service=teacher_service,
        model=models.student, teacher=models.teacher, method=method, vocab_size=models.vocab_size,
        sampler=sampler, validation_rows=validation_rows, max_nonfinite_steps=config.training.max_nonfinite_steps,
        loss_impl=config.loss.loss_impl, loss_chunk_size=config.loss.loss_chunk_size, teacher_cache=teacher_cache,
        args=args, train_dataset=dataset,
        data_collator=collator,
        processing_class=modality.processing_class(tokenizer), **extra,
    )
    if method.paired_rounds:
        trainer.add_callback(OnPolicyRoundCallback(dataset, refresh, trainer.model_for_generation))
    last = last_complete_checkpoint(paths.checkpoints)
    if last:
        logger.info("Resuming training from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    if trainer.nonfinite_stop:
        stop = trainer.nonfinite_stop
        raise DistillmError(
            f"Training stopped at step {stop['step']}: {stop['in_a_row']} optimizer steps in a row had a NaN/inf loss "
            f"or gradient and were skipped (last batch: prompt ids {', '.join(stop['batch_ids'][:8])}). A checkpoint "
            f"was saved in {paths.checkpoints}. Lower --learning-rate or check those prompts, then rerun the same "
            "command to resume (or raise --max-nonfinite-steps).")
    export = save_student(trainer, config, models, paths)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    write_jsonl(paths.train_log, history)
    by_round: dict[int, list[float]] = {}
    for entry in history:  # epoch k+1 is the end of round k; steps of round k have epoch in (k, k+1]
        by_round.setdefault(max(math.ceil(entry["epoch"]) - 1, 0), []).append(entry["loss"])
    round_means = [round(sum(v) / len(v), 4) for _, v in sorted(by_round.items())]
    summary = {
        "method": method.name,
        "steps": trainer.state.global_step,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
        "mean_loss_per_round": round_means,
        "skipped_nonfinite_steps": trainer.nonfinite_guard.skipped,
        "log": str(paths.train_log.relative_to(paths.root)),
    }
    if export:  # a quantized student: its files and sizes
        summary["export"] = export
    if teacher_service is not None:  # what went over the wire to the teacher server
        client = teacher_service.client
        summary["teacher_server"] = {"urls": client.urls, "top_k": teacher_service.k,
                                     "scored_sequences": teacher_service.rows, "scored_tokens": teacher_service.tokens,
                                     "requests": client.requests, "retries": client.retries,
                                     "bytes_sent": client.bytes_sent, "bytes_received": client.bytes_received}
        if joint_teacher is not None:  # speculative-kd's joint decoding: drafted tokens ranked, rejected ones sampled
            summary["teacher_server"].update(ranked_draft_tokens=joint_teacher.ranked,
                                             sampled_tokens=joint_teacher.sampled)
    if teacher_cache is not None:  # sequences whose teacher scores came from the cache / from a teacher pass
        summary["teacher_cache"] = {"mode": teacher_cache.label, "cached_sequences": teacher_cache.cached_rows,
                                    "teacher_sequences": teacher_cache.teacher_rows,
                                    "built_sequences": teacher_cache.built_rows}
        logger.info("Teacher cache (%s): %d sequences read from it, %d through the teacher", teacher_cache.label,
                    teacher_cache.cached_rows, teacher_cache.teacher_rows)
    if trainer.args.should_save:
        atomic_write_json(paths.training_summary, summary)  # last: marks the student as complete
    return summary


def read_json_or_none(path: Path):
    """A JSON file written by an earlier attempt, or None if it is missing or unreadable (then it is redone)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning("%s is damaged (%s); redoing that stage", path, err)
        return None


def sharded_engine() -> bool:
    """Whether `accelerate launch` started this run under FSDP or DeepSpeed ZeRO-3 (weights sharded over processes)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"


def save_student(trainer: DistillTrainer, config: RunConfig, models: ModelPair, paths: RunPaths) -> dict | None:
    """The distilled student into student/ as a plain transformers model (safetensors + tokenizer, loadable with
    from_pretrained). A LoRA student's adapter is kept in adapter/ and merged into the weights saved in student/
    (a QLoRA adapter is merged into the base reloaded in the compute dtype, not into its 4-bit weights).
    Gathered from all processes by the Trainer (FSDP / DeepSpeed full state dict). A quantized student
    (--student-quant) is saved by `quant.qat.save_quantized_student` (dequantized weights + GGUF); it returns
    what it wrote."""
    if is_qat_model(models.student):
        return save_quantized_student(trainer, config, models, paths)
    if not is_peft_model(models.student):
        # written to student.tmp and renamed: a student cut off mid-write never stands in student/
        tmp = paths.root / "student.tmp"
        if trainer.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        if trainer.args.should_save:
            shutil.rmtree(paths.student, ignore_errors=True)
            tmp.rename(paths.student)
        trainer.accelerator.wait_for_everyone()
        return
    adapter_dir = paths.root / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter_config.json + adapter_model.safetensors (+ tokenizer)
    if trainer.args.should_save:
        if getattr(models.student, "is_loaded_in_4bit", False) or getattr(
                models.student.get_base_model(), "is_loaded_in_4bit", False):
            from peft import PeftModel  # optional: PEFT, heavy, only for LoRA / QLoRA students

            base_spec = config.model.student or str(paths.root / "student_base")
            base, _ = load_model(base_spec, dtype=config.model.dtype)
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        else:
            merged = merged_copy(trainer.accelerator.unwrap_model(trainer.model))
        tmp = paths.root / "student.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        models.tokenizer.save_pretrained(tmp)
        shutil.rmtree(paths.student, ignore_errors=True)
        tmp.rename(paths.student)
        logger.info("LoRA adapter: %s; merged student: %s", adapter_dir, paths.student)
    trainer.accelerator.wait_for_everyone()
