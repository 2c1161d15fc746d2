"""Loading a text run's models (`load_text_models`) and prompt sets (`load_prompt_set`); a vision-language run's
are loaded by `distillm.vision`, through `pipeline.modality`."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from types import SimpleNamespace
import torch

from ..config import RunConfig
from ..data.prompts import EncodedPrompt, encode_prompts, load_prompts
from ..distributed import process_state
from ..errors import DistillmError
from ..models import (ModelPair, add_lora, check_quantization_supported, check_same_tokenizer, count_parameters,
                      load_model, load_quantized_student, load_tokenizer, loadable_path, model_config,
                      parse_layer_spec, prune_layers, real_vocab_size, resolve_dtype)
from ..quant.qat import prepare_qat, quant_bits
from .training import sharded_engine

logger = logging.getLogger("distillm")


def load_text_models(config: RunConfig, tokenizer=None) -> ModelPair:
    """Teacher in the configured dtype; student in fp32 (its master weights: a bf16/fp16 dtype trains it under
    autocast instead, see training_arguments), both on this process's device. With --lora the student is wrapped
    in a PEFT LoRA adapter; with --load-in-4bit (QLoRA) its base weights are loaded in 4-bit first. `tokenizer`: the
    teacher's, if `load_tokenizer` has loaded it already.

    With --teacher-url the teacher is served elsewhere and the pair holds no teacher (`ModelPair.teacher` None): a
    separate --student is loaded without reading the teacher's weights at all; a student derived from the teacher
    (--student-layers, --student-quant) is built from its weights, read once and released right after."""
    m = config.model
    device = process_state().device
    remote = bool(config.training.teacher_url)
    if m.load_in_4bit:
        check_quantization_supported()  # before the teacher is loaded
    if remote and m.student:  # the teacher's tokenizer only (connect_teacher checked it against the server's)
        teacher = None
        tokenizer = tokenizer or load_tokenizer(m.teacher, trust_remote_code=m.trust_remote_code)
    else:
        teacher, tokenizer = load_model(m.teacher, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                        tokenizer=tokenizer)
    if m.student_quant != "none" and sharded_engine():
        raise DistillmError("--student-quant is not supported under FSDP / DeepSpeed ZeRO-3 (the fake-quantized "
                            "weights are sharded); run it in one process or with DDP (configs/ddp.yaml).")
    if m.student:
        student, student_tok = load_model(m.student, dtype="float32", trust_remote_code=m.trust_remote_code)
        check_same_tokenizer(tokenizer, student_tok)
    elif m.student_quant != "none":  # a quantized copy of the teacher: every layer, round-to-nearest to start
        student = prune_layers(teacher, list(range(teacher.config.num_hidden_layers))).float()
        logger.info("Student: the teacher itself (all %d layers), quantized to %s", teacher.config.num_hidden_layers,
                    m.student_quant)
    else:
        keep = parse_layer_spec(m.student_layers, teacher.config.num_hidden_layers)
        student = prune_layers(teacher, keep).float()
        logger.info("Student: teacher layers %s (%d of %d)", keep, len(keep), teacher.config.num_hidden_layers)
    if teacher is not None:
        check_context_length(config, teacher=teacher, student=student)
    else:  # the teacher's config alone, where it can be read without its weights
        teacher_config = model_config(m.teacher, trust_remote_code=m.trust_remote_code)
        check_context_length(config, student=student,
                             **({"teacher": SimpleNamespace(config=teacher_config)} if teacher_config else {}))
    if m.student_quant != "none":  # before LoRA: the adapters wrap the fake-quantized linears
        prepare_qat(student, quant_bits(m.student_quant), m.student_quant_group_size,
                    train_embeddings=m.student_quant_train_embeddings)
    teacher_parameters = count_parameters(teacher) if teacher is not None else None
    if remote and teacher is not None:
        # the student is a copy (prune_layers / .float() copy every tensor it keeps): nothing refers to the
        # teacher's weights any more once this reference goes
        del teacher
        teacher = None
        gc.collect()
        logger.info("Teacher %s: its weights were read once to build the student and released; the teacher is "
                    "served by --teacher-url (no teacher model in this process)", m.teacher)
    elif remote:
        logger.info("Teacher %s: served by --teacher-url; its weights are not read here (tokenizer only)", m.teacher)
    if teacher is not None:
        teacher = teacher.to(device)
    if m.load_in_4bit:
        # bitsandbytes quantises while loading: a derived student is saved once, then loaded in 4-bit
        base_dir = loadable_path(m.student) if m.student else None
        if base_dir is None:
            base_dir = str(Path(config.output_dir) / "student_base")
            if process_state().is_main_process and not (Path(base_dir) / "config.json").is_file():
                student.save_pretrained(base_dir)
            process_state().wait_for_everyone()
        student = load_quantized_student(base_dir, compute_dtype=resolve_dtype(m.dtype),
                                         trust_remote_code=m.trust_remote_code)
    else:
        student = student.to(device)
    if m.lora or m.load_in_4bit:
        student = add_lora(student, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules,
                           gradient_checkpointing=config.training.gradient_checkpointing)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        logger.info("LoRA student: r=%d, alpha=%d on %s; %.2fM trainable parameters", m.lora_r, m.lora_alpha,
                    m.lora_target_modules, trainable / 1e6)
    teacher_path = loadable_path(m.teacher)
    if teacher_parameters is not None:
        logger.info("Teacher %s: %.1fM parameters; student: %.1fM", m.teacher, teacher_parameters / 1e6,
                    count_parameters(student) / 1e6)
    else:
        logger.info("Student: %.1fM parameters", count_parameters(student) / 1e6)
    return ModelPair(teacher, student, tokenizer, real_vocab_size(tokenizer), teacher_path)


def check_context_length(config: RunConfig, **models: torch.nn.Module) -> None:
    """Refuse lengths the models cannot take: a training sequence (--max-length) or a prompt plus its response
    (--max-prompt-length + --max-new-tokens) longer than a model's context. Longer prompts are cut from the left
    to --max-prompt-length (counted and reported), so the lengths alone decide."""
    d, g = config.data, config.generation
    for name, model in models.items():
        limit = getattr(model.config, "max_position_embeddings", None)
        if not limit:
            continue
        for what, length, fix in (("max_length", d.max_length, f"--max-length {limit}"),
                                  ("max_prompt_length + max_new_tokens", d.max_prompt_length + g.max_new_tokens,
                                   "--max-prompt-length and --max-new-tokens with a sum")):
            if length > limit:
                raise DistillmError(
                    f"{what} = {length} tokens is longer than the {name}'s context of {limit} tokens "
                    f"(max_position_embeddings in its config): set {fix} or less.")


# ----------------------------------------------------------------------------------------------- data


def load_prompt_set(config: RunConfig, tokenizer, which: str) -> list[EncodedPrompt]:
    """The train or eval prompts of a text run, encoded with the teacher's tokenizer."""
    d = config.data
    path, limit = (d.prompts, d.num_prompts) if which == "train" else (d.eval_prompts, d.num_eval_prompts)
    records, report = load_prompts(
        path, prompt_field=d.prompt_field, messages_field=d.messages_field, response_field=d.response_field,
        id_field=d.id_field, system_prompt=d.system_prompt, limit=limit,
    )
    if report.n_empty_skipped:
        logger.warning("%s: skipped %d empty prompts", report.path, report.n_empty_skipped)
    encoded, n_truncated = encode_prompts(records, tokenizer, max_prompt_length=d.max_prompt_length,
                                          use_chat_template=d.chat_template)
    logger.info("%s prompts: %d from %s (%d truncated, %d empty skipped)", which, len(encoded), report.path,
                n_truncated, report.n_empty_skipped)
    return encoded
