"""The distillation pipeline: the method's data (teacher responses once, for most methods), then `rounds` epochs
of training -- for DistiLLM-2 and DPKD each round starts by regenerating the student's responses; the on-policy
baselines draw fresh student data inside the trainer -- with a held-out evaluation before and after. Every stage
writes its output atomically into the run directory and is skipped or continued when the same command is run
again.

Run directory layout::

    config.yaml                  the resolved config of the run
    data/teacher_train.jsonl     teacher responses (prompt, response, ids), generated once
    data/teacher_eval.jsonl      teacher responses to the held-out prompts
    data/teacher_rationales_train.jsonl  step-by-step only: the teacher's rationale + answer responses
    rounds/round_K/student.jsonl the student's responses at the start of round K (distillm2, dpkd)
    rounds/round_K/pairs.jsonl   TRL DPO columns: prompt, chosen (teacher), rejected (student), plus token ids
    checkpoints/checkpoint-N     transformers Trainer checkpoints (resume from the last one)
    logs/train_log.jsonl         per-step loss, the method's metrics (e.g. skl, srkl, alpha_t, alpha_s, b), sources
    logs/training.json           the training summary, written after the student: marks training as finished
    student/                     the distilled student (safetensors + tokenizer; saved as student.tmp, renamed)
    eval/{before,after}_samples.jsonl  student samples on held-out prompts
    metrics.json                 before/after metrics, training summary, timings
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import DistributedType
from transformers import TrainingArguments, set_seed

from .config import RunConfig
from .distributed import process_state
from .errors import DistillmError
from .faults import fault_point
from .data.prompts import EncodedPrompt, check_chat_template, encode_prompts, load_prompts
from .generation.base import SamplingParams
from .generation.hf import HFBackend
from .generation.runner import generate_sharded
from .generation.vllm_backend import LazyVLLMBackend, choose_backend_name
from .io import atomic_write_json, atomic_write_text, iter_json_objects, read_jsonl, write_jsonl
from . import rundir
from .rundir import RunDirError
from .methods import build_method
from .methods.base import Method
from .models import (
    add_lora, check_quantization_supported, check_same_tokenizer, count_parameters, is_peft_model, load_model,
    load_quantized_student, load_tokenizer, loadable_path, merged_copy, parse_layer_spec, prune_layers, real_vocab_size,
    resolve_dtype,
)
from .evaluation.divergence import teacher_nll, teacher_student_divergence
from .training.callbacks import OnPolicyRoundCallback
from .training.collate import DistillCollator, RowDataset
from .training.sources import OnlineSampler
from .training.teacher_cache import TeacherCache
from .training.vision import ImageInputs, VisionCollator
from .generation.vision import VisionHFBackend
from .vision import load_image_prompt_set, load_vision_models, uses_images
from .training.trainer import DistillTrainer, last_complete_checkpoint
from .quant.qat import is_qat_model, plain_copy, prepare_qat, quant_bits, save_quantized_student

logger = logging.getLogger("distillm")


@dataclass
class RunPaths:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    config = property(lambda self: self.root / "config.yaml")
    teacher_train = property(lambda self: self.root / "data" / "teacher_train.jsonl")
    teacher_eval = property(lambda self: self.root / "data" / "teacher_eval.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    train_log = property(lambda self: self.root / "logs" / "train_log.jsonl")
    student = property(lambda self: self.root / "student")
    training_summary = property(lambda self: self.root / "logs" / "training.json")
    metrics = property(lambda self: self.root / "metrics.json")

    def round_dir(self, k: int) -> Path:
        return self.root / "rounds" / f"round_{k}"

    def eval_samples(self, tag: str) -> Path:
        return self.root / "eval" / f"{tag}_samples.jsonl"


def prepare_run_dir(config, *, overwrite: bool = False, lock: bool = True, kind: str = "run") -> RunPaths:
    """Create the run directory, or continue the run it holds if its config is the same one.

    A directory holding a run with a different config is refused unless `overwrite`, which empties it -- only a
    directory carrying distillm's run marker (see `distillm.rundir`); the CLI's --resume continues such a run by
    passing the config stored in it. With `lock` this process takes the directory's exclusive lock first (held
    until `rundir.unlock` or the process ends). Every refusal comes before anything in the directory is touched.
    """
    paths = RunPaths(config.output_dir)
    root = paths.root
    text = config.to_yaml()
    rundir.check_usable(root)
    exists = root.is_dir()
    marked = exists and rundir.is_marked(root)
    legacy = exists and not marked and paths.config.is_file()  # a run made before the marker (or a stranger)
    if exists and not marked and not legacy and rundir.contents(root):
        # never wiped, even with --overwrite: it may be anything (a home directory, a dataset)
        raise RunDirError(f"{root} is not empty and holds no distillm run (no {rundir.MARKER} marker): choose "
                          "another --output-dir.")
    if overwrite and exists and rundir.contents(root):
        if legacy:
            raise RunDirError(f"--overwrite: {root} has a config.yaml but no distillm run marker ({rundir.MARKER}): "
                              "it is not a distillm run, or one made by an older version. distillm does not delete "
                              "it: choose another --output-dir, or delete it yourself if it is an old run you no "
                              "longer need.")
        why = rundir.protected(root)
        if why:
            raise RunDirError(f"--overwrite: distillm does not delete {root}: {why}. Use a subdirectory as "
                              "--output-dir.")
    if legacy and config_changes(paths.config, text):
        raise RunDirError(
            f"{root} has a config.yaml that is not this run's (differs in: "
            f"{', '.join(config_changes(paths.config, text))}) and no distillm run marker ({rundir.MARKER}): it is "
            "not a distillm run, or one made by an older version with other settings. distillm neither continues "
            "nor deletes it: choose another --output-dir (or pass --resume to continue an older run with its own "
            "config).")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"Cannot create the output directory {root} ({err.strerror}): choose a writable "
                          "--output-dir.") from err
    if lock:
        rundir.lock(root)
    try:
        if overwrite and rundir.contents(root):
            rundir.remove_run(root)
        if paths.config.is_file():
            # output_dir itself may differ: a run directory can be moved or copied and continued
            changed = config_changes(paths.config, text)
            produced = [p for p in rundir.contents(root) if p.name != paths.config.name]
            if changed and produced:
                raise RunDirError(
                    f"{root} already holds a run with a different config (differs in: {', '.join(changed)}). "
                    "Pass --resume to continue that run with its own config, --overwrite to replace it, or choose "
                    "another --output-dir."
                )
            if produced:
                logger.info("Continuing the run in %s", root)
        rundir.write_marker(root, kind)
        atomic_write_text(paths.config, text)
    except BaseException:
        if lock:
            rundir.unlock(root)
        raise
    return paths


def config_changes(saved: Path, text: str) -> list[str]:
    """The dotted keys in which the run config saved at `saved` differs from the YAML `text` (output_dir aside: a
    run directory can be moved or copied and continued); [] when they agree."""
    try:
        loaded = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        loaded = None
    if not isinstance(loaded, dict):
        return ["config.yaml (not a distillm config)"]
    previous = {**loaded, "output_dir": None}
    current = {**yaml.safe_load(text), "output_dir": None}
    return sorted(_diff_keys(previous, current)) if previous != current else []


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff_keys(va, vb, f"{key}.")
        elif va != vb:
            out.add(prefix + key)
    return out


# ----------------------------------------------------------------------------------------------- models


@dataclass
class ModelPair:
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int
    teacher_path: str | None  # a directory vLLM can load (None for built-in tiny models)
    processor: object | None = None  # a vision-language run's processor (see distillm.vision); None for text
    cross: object | None = None  # a cross-tokenizer run's crosstok.data.CrossSetup (tokenizer is the student's)


def load_models(config: RunConfig, tokenizer=None) -> ModelPair:
    """Teacher in the configured dtype; student in fp32 (its master weights: a bf16/fp16 dtype trains it under
    autocast instead, see training_arguments), both on this process's device. With --lora the student is wrapped
    in a PEFT LoRA adapter; with --load-in-4bit (QLoRA) its base weights are loaded in 4-bit first. `tokenizer`: the
    teacher's, if `load_tokenizer` has loaded it already."""
    m = config.model
    if uses_images(config):  # a vision-language teacher: distillm.vision loads the pair and the processor
        return load_vision_models(config)
    device = process_state().device
    if m.load_in_4bit:
        check_quantization_supported()  # before the teacher is loaded
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
    check_context_length(config, teacher=teacher, student=student)
    if m.student_quant != "none":  # before LoRA: the adapters wrap the fake-quantized linears
        prepare_qat(student, quant_bits(m.student_quant), m.student_quant_group_size,
                    train_embeddings=m.student_quant_train_embeddings)
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
    logger.info("Teacher %s: %.1fM parameters; student: %.1fM", m.teacher, count_parameters(teacher) / 1e6,
                count_parameters(student) / 1e6)
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


def load_prompt_set(config: RunConfig, tokenizer, which: str, *, processor=None) -> list[EncodedPrompt]:
    if processor is not None:  # (image, prompt) rows, tokenized by the vision-language model's processor
        return load_image_prompt_set(config, processor, which)
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


# ----------------------------------------------------------------------------------------------- generation


def sampling_params(config: RunConfig, *, seed_offset: int = 0, max_new_tokens: int | None = None) -> SamplingParams:
    g = config.generation
    return SamplingParams(temperature=g.temperature, top_p=g.top_p,
                          max_new_tokens=g.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          seed=g.generation_seed + seed_offset)


def generate_once(*args, **kwargs) -> list[dict]:
    """`generate_responses`; in a multi-process run each process answers its share of the batches and rank 0
    writes the merged file (`generation.runner.generate_sharded`: no prompt lost or answered twice)."""
    return generate_sharded(*args, **kwargs)


def make_backend(config: RunConfig, model, tokenizer, *, model_dir: str | None, processor=None):
    """The configured backend for `model`; vLLM needs the model saved in `model_dir`. A vision-language model
    (`processor` given) generates with transformers, from each prompt's image."""
    g = config.generation
    if processor is not None:
        return VisionHFBackend(model, processor, max_batch_size=g.generation_batch_size,
                               max_batch_tokens=g.max_batch_tokens)
    name = choose_backend_name(g.backend)
    if name == "vllm" and model_dir is not None:
        if process_state().num_processes > 1 and g.vllm_tensor_parallel_size > 1:
            raise DistillmError(
                "--vllm-tensor-parallel-size > 1 inside a multi-process run is not supported: each training process "
                "starts its own vLLM engine on its own GPU (colocated, tensor parallel size 1). Generate the teacher "
                "responses first in one process with `distillm generate --backend vllm --vllm-tensor-parallel-size "
                "N`, then pass them with --teacher-responses.")
        return LazyVLLMBackend(model_dir, dtype=str(resolve_dtype(config.model.dtype)).removeprefix("torch."),
                               tensor_parallel_size=g.vllm_tensor_parallel_size,
                               gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                               trust_remote_code=config.model.trust_remote_code)
    return HFBackend(model, tokenizer, max_batch_size=g.generation_batch_size, max_batch_tokens=g.max_batch_tokens)


def release(backend) -> None:
    """Free what a backend holds (a vLLM engine keeps GPU memory until closed)."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def pair_rows(teacher_rows: list[dict], student_rows: list[dict]) -> list[dict]:
    """TRL DPO columns (prompt, chosen = teacher response, rejected = student response) plus token ids.
    Both responses must answer the same prompt tokens: each is scored under the prompt it was sampled from."""
    by_id = {row["id"]: row for row in student_rows}
    pairs = []
    for t in teacher_rows:
        s = by_id[t["id"]]
        if s["prompt_ids"] != t["prompt_ids"]:
            raise DistillmError(f"Prompt {t['id']!r}: the teacher and student responses were generated from different "
                                "prompt tokens (a teacher file made with other prompt settings?).")
        pairs.append({"id": t["id"], "prompt": t["prompt"], "chosen": t["response"], "rejected": s["response"],
                      "prompt_ids": t["prompt_ids"], "chosen_ids": t["response_ids"], "rejected_ids": s["response_ids"]})
    return pairs


def import_teacher_responses(path: str, prompts: list[EncodedPrompt], tokenizer, out: Path) -> None:
    """Use existing teacher responses as the run's teacher data. Rows are matched to the prompt set by id and
    take its (templated, truncated) prompt tokens; rows without `response_ids` are tokenized (plus EOS)."""
    if not Path(path).is_file():
        raise DistillmError(f"Teacher responses file not found: {path}")
    rows = {}
    vocab = real_vocab_size(tokenizer)
    for number, row in iter_json_objects(path):
        if "id" not in row or "response" not in row:
            raise DistillmError(f"{path}:{number}: a teacher response row needs 'id' and 'response' fields "
                                "(`distillm generate` writes such files).")
        check_teacher_row(row, f"{path}:{number}", vocab)
        rows[str(row["id"])] = row
    missing = [p.id for p in prompts if p.id not in rows]
    if missing:
        raise DistillmError(f"{path} has no response for {len(missing)} of the {len(prompts)} training prompts "
                            f"(e.g. id {missing[0]!r}): generate it from the same prompt file and settings.")
    imported = []
    for prompt in prompts:
        row = rows[prompt.id]
        ids = row.get("response_ids") or tokenizer(row["response"], add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id]
        imported.append({"id": prompt.id, "prompt": prompt.text, "response": row["response"],
                         "prompt_ids": prompt.input_ids, "response_ids": ids,
                         "finish_reason": row.get("finish_reason", "stop")})
    write_jsonl(out, imported)


def check_teacher_row(row: dict, where: str, vocab: int) -> None:
    """A teacher response row's fields have the types training needs, and its token ids are in the vocabulary."""
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise DistillmError(f"{where}: field 'id' must be a string or an integer (the prompt's id).")
    if not isinstance(row["response"], str):
        raise DistillmError(f"{where}: field 'response' must be a string (the response text).")
    ids = row.get("response_ids")
    if ids is None:
        return
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DistillmError(f"{where}: field 'response_ids' must be a list of integer token ids. Fix it, or drop the "
                            "field to have the response text tokenized.")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise DistillmError(
            f"{where}: field 'response_ids' holds the token id {bad}, outside the tokenizer's vocabulary (0 to "
            f"{vocab - 1}): were these responses tokenized by another model? Regenerate them with `distillm generate "
            "--model` the teacher, or drop 'response_ids' from the rows to have the response text tokenized.")


class DataContext:
    """What a method's `build_rows` may use: the training prompts, the teacher (while its backend is open) and
    the run directory. Teacher responses are generated at most once and cached in data/."""

    def __init__(self, config: RunConfig, tokenizer, prompts: list[EncodedPrompt], paths: RunPaths, teacher_backend):
        self.config, self.tokenizer, self.prompts, self.paths = config, tokenizer, prompts, paths
        self.backend = teacher_backend
        self._teacher_rows: list[dict] | None = None

    def teacher_generate(self, prompts: list[EncodedPrompt], filename: str, desc: str) -> list[dict]:
        """The teacher's sampled responses to `prompts`, generated (resumably) into data/`filename`."""
        return generate_once(self.backend, prompts, self.paths.root / "data" / filename, sampling_params(self.config),
                             self.tokenizer, desc=desc)

    def teacher_rows(self) -> list[dict]:
        """Rows (id, prompt_ids, response_ids, ...) of the teacher's responses to the training prompts."""
        if self._teacher_rows is None:
            self._teacher_rows = self.teacher_generate(self.prompts, self.paths.teacher_train.name, "teacher responses")
        return self._teacher_rows

    def dataset_rows(self) -> list[dict]:
        """Rows of the prompt file's own reference responses (its response field or last assistant message)."""
        missing = [p.id for p in self.prompts if not p.response]
        if missing:
            d = self.config.data
            raise DistillmError(
                f"{d.prompts}: --fixed-responses dataset needs a reference response for every prompt (field "
                f"'{d.response_field}', or a final assistant message in '{d.messages_field}'), but {len(missing)} of "
                f"{len(self.prompts)} have none (e.g. id {missing[0]!r}). Add them, point --response-field at the "
                "field that holds them, or use --fixed-responses teacher.")
        return [{"id": p.id, "prompt": p.text, "response": p.response, "prompt_ids": p.input_ids,
                 "response_ids": self.encode_response(p.response)} for p in self.prompts]

    def fixed_rows(self) -> list[dict]:
        """The fixed (off-policy) responses the config asks for: the teacher's or the data set's."""
        return self.dataset_rows() if self.config.method.fixed_responses == "dataset" else self.teacher_rows()

    def prompt_rows(self) -> list[dict]:
        """Prompt-only rows, for methods that answer every prompt afresh while training."""
        return [{"id": p.id, "prompt": p.text, "prompt_ids": p.input_ids, "response_ids": []} for p in self.prompts]

    def encode(self, transform) -> list[EncodedPrompt]:
        """The training prompts again, each chat passed through `transform(messages) -> messages` first (e.g. to
        add a task prefix), in the same order and with the same ids."""
        d = self.config.data
        records, _ = load_prompts(d.prompts, prompt_field=d.prompt_field, messages_field=d.messages_field,
                                  response_field=d.response_field, id_field=d.id_field,
                                  system_prompt=d.system_prompt, limit=d.num_prompts)
        wanted = {p.id for p in self.prompts}
        records = [r for r in records if r.id in wanted]
        for record in records:
            record.messages = transform(record.messages)
        encoded, _ = encode_prompts(records, self.tokenizer, max_prompt_length=d.max_prompt_length,
                                    use_chat_template=d.chat_template)
        return encoded

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(config: RunConfig, models: ModelPair, eval_prompts, teacher_eval_rows, paths: RunPaths, tag: str):
    """Held-out figures for the current student: teacher NLL of its samples, KL / TVD / acceptance rate on the
    teacher's responses."""
    d = config.data
    start = time.time()
    backend = make_backend(config, models.student, models.tokenizer, model_dir=None,  # HF: the live student
                           processor=models.processor)
    samples = generate_once(
        backend, eval_prompts, paths.eval_samples(tag),
        sampling_params(config, seed_offset=7_777, max_new_tokens=config.evaluation.eval_max_new_tokens),
        models.tokenizer, desc=f"student samples ({tag})",
    )
    common = dict(vocab_size=models.vocab_size, pad_token_id=models.tokenizer.pad_token_id, max_length=d.max_length,
                  image_inputs=ImageInputs(models.processor) if models.processor is not None else None)
    result = {"teacher_nll_of_student_samples": teacher_nll(models.teacher, samples, **common)}
    # distinct-2 (distinct word bigrams / all) of the samples, beside the teacher's: a collapsed student repeats
    from .evaluation.text import distinct_n

    result["distinct_2"] = distinct_n([row["response"] for row in samples])
    result["teacher_distinct_2"] = distinct_n([row["response"] for row in teacher_eval_rows])
    fault_point(f"eval:{tag}")
    result.update(teacher_student_divergence(models.teacher, models.student, teacher_eval_rows, **common))
    result["seconds"] = round(time.time() - start, 1)
    return result


# ----------------------------------------------------------------------------------------------- training


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
    from transformers import get_scheduler

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
          train_prompts: list[EncodedPrompt], validation_rows: list[dict] | None = None) -> dict:
    """`rounds` epochs of the method on its rows; resumes from the last complete checkpoint in the run directory.
    Paired methods (distillm2, dpkd) regenerate the student's responses at the start of every round."""
    tokenizer = models.tokenizer
    summary = read_json_or_none(paths.training_summary)
    if summary is not None and (paths.student / "config.json").is_file():
        # Training finished before (the summary is written after the student): a resumed run reuses the student.
        logger.info("Training already finished: using the student in %s", paths.student)
        if models.processor is not None:
            from .vision import load_vision_model

            loaded = load_vision_model(str(paths.student), dtype="float32")[0]
        else:
            loaded = load_model(str(paths.student), dtype="float32")[0]
        models.student = loaded.to(models.student.device)
        return summary

    def refresh(round_index: int, model) -> list[dict]:
        folder = paths.round_dir(round_index)
        if (folder / "pairs.jsonl").is_file():  # this round's data is complete (a resumed run, or round 0 again)
            try:
                return read_jsonl(folder / "pairs.jsonl")
            except DistillmError as err:  # damaged by something else than distillm (it writes it atomically)
                logger.warning("%s Rebuilding it.", err)
        model_dir = None
        if choose_backend_name(config.generation.backend) == "vllm" and models.processor is None:
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
        backend = make_backend(config, model, tokenizer, model_dir=model_dir, processor=models.processor)
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
    image_inputs = None
    if models.processor is not None:  # vision-language: each row's image, batched by the processor
        image_inputs = ImageInputs(models.processor, {p.id: p.image for p in train_prompts})
        collator = VisionCollator(tokenizer.pad_token_id, config.data.max_length, image_inputs, method.sequences)
    elif models.cross is not None:  # the teacher has another tokenizer: both sides' ids + the alignment
        collator = models.cross.collator(config.data.max_length, method.sequences)
    else:
        collator = DistillCollator(tokenizer.pad_token_id, config.data.max_length, method.sequences)
    sampler = OnlineSampler(models.student, models.teacher, tokenizer, sampling_params(config), models.vocab_size,
                            image_inputs=image_inputs)
    teacher_cache = None
    if config.training.teacher_cache != "off" and method.needs_teacher and (
            method.uses_fixed_responses or method.paired_rounds):
        # the first group of every row is a fixed (teacher) response: the same sequences every round
        if image_inputs is not None:  # the teacher's scores depend on the image, which the cache keys leave out
            raise DistillmError("--teacher-cache is not supported for vision-language runs yet; run without it.")
        state = process_state()
        if state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise DistillmError("--teacher-cache is not supported under DeepSpeed/FSDP (the teacher's head is "
                                "sharded); run without it, or with DDP / one process.")
        with state.main_process_first():  # one process builds it, the others then read it
            teacher_cache = TeacherCache(config.training.teacher_cache_dir or paths.root / "teacher_cache",
                                         config.training.teacher_cache, k=config.training.teacher_cache_k,
                                         vocab_size=models.vocab_size).build(
                models.teacher.to(args.device), [method.sequences(row)[0] for row in dataset.rows],
                max_length=config.data.max_length, pad_token_id=tokenizer.pad_token_id,
                batch_size=config.training.per_device_train_batch_size)
    trainer_class, extra = DistillTrainer, {}
    if models.cross is not None:
        from .crosstok.trainer import CrossDistillTrainer

        trainer_class, extra = CrossDistillTrainer, {"cross": models.cross}
    trainer = trainer_class(
        model=models.student, teacher=models.teacher, method=method, vocab_size=models.vocab_size,
        sampler=sampler, validation_rows=validation_rows, max_nonfinite_steps=config.training.max_nonfinite_steps,
        loss_impl=config.loss.loss_impl, loss_chunk_size=config.loss.loss_chunk_size, teacher_cache=teacher_cache,
        args=args, train_dataset=dataset,
        data_collator=collator,
        processing_class=models.processor or tokenizer, **extra,
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
            from peft import PeftModel

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


# ----------------------------------------------------------------------------------------------- the whole run


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
    from .crosstok.run import cross_tokenizers, run_cross

    pair = cross_tokenizers(config)  # (teacher, student) tokenizers when their vocabularies differ, else None
    if pair is not None:
        return run_cross(config, paths, started, *pair)
    evaluating = bool(config.evaluation.evaluate and config.data.eval_prompts)
    vision = uses_images(config)
    if vision:  # the prompts need the vision-language model's processor
        models = load_models(config)
        tokenizer, processor = models.tokenizer, models.processor
    else:  # the tokenizer alone (seconds) settles the prompt format and the step count before the weights are read
        tokenizer, processor = load_tokenizer(config.model.teacher,
                                              trust_remote_code=config.model.trust_remote_code), None
        check_chat_template(tokenizer, config.data.chat_template, model=config.model.teacher)
    train_prompts = load_prompt_set(config, tokenizer, "train", processor=processor)
    check_step_plan(config, len(train_prompts), state.num_processes)
    eval_prompts = load_prompt_set(config, tokenizer, "eval", processor=processor) if evaluating else []
    inputs = {**files, "train_encoded": rundir.encoded_digest(train_prompts),
              "eval_encoded": rundir.encoded_digest(eval_prompts) if evaluating else None}
    rundir.check_inputs(paths.root, config, inputs, keys=("train_encoded", "eval_encoded", "teacher_responses"))
    if state.is_main_process:
        rundir.record_inputs(paths.root, inputs)
    if finished:  # the files were rewritten, but the prompts the run was made from are the same
        logger.info("%s already holds a finished run; metrics.json is unchanged", paths.root)
        return metrics
    if not vision:
        models = load_models(config, tokenizer)
    if config.data.teacher_responses and not paths.teacher_train.is_file() and state.is_main_process:
        import_teacher_responses(config.data.teacher_responses, train_prompts, models.tokenizer, paths.teacher_train)
    state.wait_for_everyone()
    method = build_method(config)
    teacher_backend = make_backend(config, models.teacher, models.tokenizer, model_dir=models.teacher_path,
                                   processor=models.processor)
    try:
        rows = method.build_rows(DataContext(config, models.tokenizer, train_prompts, paths, teacher_backend))
        teacher_eval = generate_once(teacher_backend, eval_prompts, paths.teacher_eval,
                                     sampling_params(config, seed_offset=99), models.tokenizer,
                                     desc="teacher responses (held-out)") if evaluating else []
    finally:
        release(teacher_backend)
    metrics: dict = {"method": method.name, "teacher": config.model.teacher,
                     "student": config.model.student or f"teacher layers {config.model.student_layers}",
                     "num_train_prompts": len(train_prompts), "num_eval_prompts": len(eval_prompts)}
    if evaluating:
        before_file = paths.root / "eval" / "before.json"
        before = read_json_or_none(before_file)
        if before is not None:  # a resumed run: the student has trained since, so reuse the first figures
            metrics["before"] = before
        else:
            metrics["before"] = evaluate(config, models, eval_prompts, teacher_eval, paths, "before")
            atomic_write_json(before_file, metrics["before"])
    validation = teacher_eval
    if not validation and method.uses_validation:
        logger.warning("No held-out prompts: %s measures its validation loss on the first %d training rows",
                       method.name, min(32, len(rows)))
        validation = rows[:32]
    metrics["training"] = train(config, models, method, rows, paths, train_prompts=train_prompts,
                                validation_rows=validation)
    if evaluating and sharded_engine():
        logger.warning("No 'after' evaluation under FSDP / DeepSpeed ZeRO-3: the models are sharded now. Evaluate "
                       "the saved student with `distillm eval --model distilled=%s`.", paths.student)
    elif evaluating:
        metrics["after"] = evaluate(config, models, eval_prompts, teacher_eval, paths, "after")
    metrics["wall_seconds"] = round(time.time() - started, 1)
    metrics["complete"] = True
    if state.is_main_process:
        atomic_write_json(paths.metrics, metrics)
    return metrics
