"""Run configuration: typed dataclasses, validated at the edge.

A config is one `RunConfig` with sections (model, data, generation, loss, training, evaluation). Every option
has a unique name, so YAML files may be flat (`teacher: ...`) or sectioned (`model: {teacher: ...}`), and each
option is also a command-line flag (`--max-new-tokens 64`). Unknown or mistyped keys are errors that suggest
the closest valid name. Presets ('demo', 'tiny') are plain dicts of overrides applied first.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import DistillmError


class ConfigError(DistillmError):
    """A bad config key or value; the message names it and suggests a fix."""


def opt(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelSection:
    teacher: str = opt("smollm2-135m-instruct", "Teacher: built-in alias, Hugging Face id, local directory or .gguf file.")
    student: str | None = opt(None, "Student (same forms as --teacher). Empty: derive it from the teacher by keeping --student-layers.")
    student_layers: str = opt("even:10", "Teacher layers a derived student keeps: 'even:10' (evenly spread, first and last included), 'every:3', 'first:10' or a list '0,3,6-8'.")
    dtype: str = opt("auto", "Weights dtype: auto (fp32 on CPU, bf16 on a GPU that has it), float32, bfloat16, float16.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code (off unless you trust them).")
    lora: bool = opt(False, "Train a LoRA adapter on the student (PEFT) instead of all its weights; the adapter is saved and merged into a plain model at the end.")
    lora_r: int = opt(16, "LoRA rank (the released DistiLLM-2 configs: 16).")
    lora_alpha: int = opt(128, "LoRA alpha (the released DistiLLM-2 configs: 128).")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    lora_target_modules: str = opt("all-linear", "Modules that get adapters: all-linear, or a comma-separated list of module names (e.g. q_proj,v_proj).")
    student_quant: str = opt("none", "Quantization-aware student: none, int8, int4, int3 or int2. The student's linear weights (not the embeddings or output head) are fake-quantized (symmetric, fp16 scale per group) and trained through a straight-through estimator; without --student it is the teacher itself, all layers, starting from round-to-nearest. student/ and student/student.gguf hold the quantized weights exactly (docs/quantization.md).")
    student_quant_group_size: int = opt(32, "Weights sharing one scale in --student-quant (along each row's inputs); a multiple of 32, the GGUF block size.")
    student_quant_train_embeddings: bool = opt(False, "--student-quant: also train the (unquantized) input embedding and output head. Off: they stay the teacher's, and the GGUF copies the teacher file's bytes for them (exact and small); on: the GGUF stores them in full precision (larger).")
    load_in_4bit: bool = opt(False, "QLoRA: load the student's base weights in 4-bit NF4 (bitsandbytes, NVIDIA GPU only) and train a LoRA adapter on them (implies --lora).")


@dataclass
class DataSection:
    prompts: str = opt("builtin:train", "Training prompts: JSONL, JSON, CSV, Parquet, a saved HF dataset directory ('DIR' or 'DIR:split'), or builtin:train.")
    teacher_responses: str | None = opt(None, "JSONL of teacher responses to reuse instead of generating them (from `distillm generate`, or rows with id and response matching the prompt ids).")
    eval_prompts: str | None = opt("builtin:eval", "Held-out prompts for the before/after evaluation (same formats); empty to skip.")
    num_prompts: int | None = opt(None, "Use only the first N training prompts.")
    num_eval_prompts: int | None = opt(None, "Use only the first N held-out prompts.")
    prompt_field: str = opt("prompt", "Field (column) holding a plain-text prompt.")
    messages_field: str = opt("messages", "Field holding a chat as a list of {role, content} messages (used when present).")
    response_field: str = opt("response", "Field holding a reference response, if any.")
    id_field: str = opt("id", "Field holding a unique prompt id (default: file name and line number).")
    image_field: str = opt("image", "Vision-language models: field holding each prompt's image path (relative to the prompt file's folder).")
    system_prompt: str | None = opt(None, "System message prepended to every chat that has none.")
    chat_template: bool = opt(True, "Render prompts with the tokenizer's own chat template (--no-chat-template: raw text).")
    max_prompt_length: int = opt(512, "Prompts longer than this many tokens are cut from the left (counted and reported).")
    max_length: int = opt(1024, "Maximum prompt + response tokens in training.")


@dataclass
class GenerationSection:
    backend: str = opt("auto", "Generation backend: auto (vLLM if installed and a GPU is present, else hf), hf or vllm.")
    temperature: float = opt(0.8, "Sampling temperature for teacher and student responses (0 = greedy).")
    top_p: float = opt(0.95, "Nucleus sampling top-p.")
    max_new_tokens: int = opt(512, "Maximum tokens per generated response.")
    generation_batch_size: int = opt(32, "Prompts per generation batch (hf backend).")
    max_batch_tokens: int | None = opt(None, "Cap on batch x (prompt + new tokens) per generation batch.")
    generation_seed: int = opt(0, "Seed of the sampling (each batch and round derives its own from it).")
    vllm_gpu_memory_utilization: float = opt(0.4, "Fraction of GPU memory vLLM may take.")
    vllm_tensor_parallel_size: int = opt(1, "vLLM tensor-parallel size.")


METHOD_NAMES = ("distillm2", "distillm", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "speculative-kd",
                "step-by-step")


@dataclass
class MethodSection:
    method: str = opt("distillm2", "Distillation method: " + ", ".join(METHOD_NAMES) + " (see README: Methods).")
    fixed_responses: str = opt("teacher", "Fixed (off-policy) responses of kd, imitkd, gkd and distillm: 'teacher' (sampled once from the teacher) or 'dataset' (the prompt file's response / last assistant message).")
    jsd_beta: float = opt(0.5, "gkd (and speculative-kd with --skd-loss jsd): b of the generalised JSD (0 -> forward KL, 1 -> reverse KL).")
    gkd_lambda: float = opt(0.5, "gkd: probability that a batch is sampled on-policy from the current student (else fixed data).")
    imitkd_fixed_fraction: float = opt(0.0, "imitkd: probability that a batch uses the fixed responses instead of fresh student samples.")
    v1_loss: str = opt("skl", "distillm (v1): skl (skew KL) or srkl (skew reverse KL).")
    v1_alpha: float = opt(0.1, "distillm (v1): the skew a of SKL / SRKL.")
    v1_threshold_init: float = opt(0.0, "distillm (v1): initial probability tau that a batch uses student outputs (fresh or replayed).")
    v1_threshold_step: float = opt(0.1, "distillm (v1): tau rises by this much each time the validation loss rises.")
    v1_fresh_start: float = opt(1.0, "distillm (v1): probability that a student-output batch is freshly generated (and pushed to the replay buffer) rather than replayed, at the start of training.")
    v1_fresh_end: float = opt(0.2, "distillm (v1): that probability at the end of training (linear decay).")
    v1_buffer_capacity: int = opt(1000, "distillm (v1): replay buffer capacity (responses; the oldest are replaced).")
    v1_val_interval: int = opt(10, "distillm (v1): optimizer steps between validation-loss measurements that adapt tau.")
    dpkd_beta: float = opt(0.2, "dpkd: beta of the DPO-style loss.")
    skd_top_k: int = opt(25, "speculative-kd: the teacher keeps a student token if it is in the teacher's top-K, else samples its own.")
    skd_loss: str = opt("fkl", "speculative-kd: loss on the jointly decoded responses: fkl, rkl, jsd or tvd.")
    sbs_rationale_weight: float = opt(1.0, "step-by-step: weight of the rationale task (loss = answer NLL + weight * rationale NLL).")
    sbs_answer_prefix: str = opt("[answer] ", "step-by-step: task prefix of the answer task (prepended to the prompt).")
    sbs_rationale_prefix: str = opt("[rationale] ", "step-by-step: task prefix of the rationale task.")
    sbs_instruction: str = opt("Think step by step: explain your reasoning, then give the final answer on its own last line as 'Answer: <answer>'.", "step-by-step: instruction appended to each prompt when asking the teacher for a rationale.")


@dataclass
class LossSection:
    alpha0: float = opt(0.1, "Base skew a0 (the skew of a sample whose gap equals the running reference gap).")
    alpha_min: float = opt(0.01, "Lower clamp of the curriculum skew.")
    alpha_max: float = opt(0.5, "Upper clamp of the curriculum skew.")
    curriculum: bool = opt(True, "Per-sample curriculum skew a (off: constant a = alpha0).")
    gap_momentum: float = opt(0.9, "Momentum of the running reference gap of the curriculum.")
    b_ramp: bool = opt(True, "Ramp b (weight of SRKL; SKL gets 2 - b) from b-start to b-end (off: b = b-start).")
    b_start: float = opt(1.0, "b at the start of training.")
    b_end: float = opt(1.5, "b at the end of the ramp.")
    ramp_fraction: float = opt(0.5, "Fraction of the training steps over which b ramps.")
    reduction: str = opt("seq_mean", "seq_mean (mean per response, then over responses) or token_mean.")
    loss_temperature: float = opt(1.0, "Temperature dividing both models' logits inside the loss.")
    loss_impl: str = opt("fused", "fused: losses from hidden states and the output heads, a chunk of tokens at a time (no full-vocabulary logits of the batch); plain: from full logits (the reference; same values and gradients, more memory).")
    loss_chunk_size: int | None = opt(None, "Tokens per chunk of the fused losses (default: sized so one chunk's logits take ~64 MiB).")


@dataclass
class TrainingSection:
    rounds: int = opt(2, "Batched on-policy rounds: each regenerates the student's responses, then trains one epoch.")
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule (any transformers scheduler name).")
    warmup_ratio: float = opt(0.1, "Fraction of the steps spent warming up the learning rate.")
    per_device_train_batch_size: int = opt(8, "Pairs per micro-batch per process.")
    gradient_accumulation_steps: int = opt(4, "Micro-batches per optimizer step (default: effective batch 8 x 4 = 32, as the released configs).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    seed: int = opt(42, "Training seed (data order, initialisation of anything random).")
    logging_steps: int = opt(1, "Log every N optimizer steps.")
    save_steps: int = opt(50, "Checkpoint every N optimizer steps (and at the end).")
    save_total_limit: int = opt(2, "Checkpoints kept.")
    report_to: str = opt("none", "Where logs go besides the output directory: none, tensorboard, wandb, ...")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    teacher_cache: str = opt("off", "Cache the teacher's scores on the fixed (teacher) responses across rounds and resumes: off; exact (its final hidden states, H floats per token, memory-mapped; the head is applied in the loss, so losses are unchanged); topk (its top-k log-probs, the tail mass spread over the other tokens: approximate, see README).")
    teacher_cache_k: int = opt(64, "k of --teacher-cache topk.")
    teacher_cache_dir: str | None = opt(None, "Where the teacher cache lives (default: teacher_cache/ in the run directory).")
    max_nonfinite_steps: int = opt(3, "Optimizer steps whose loss or gradients are NaN/inf are skipped and counted; after this many in a row the run stops with a checkpoint and names the batch.")


@dataclass
class EvaluationSection:
    evaluate: bool = opt(True, "Evaluate the student on the held-out prompts before and after distillation.")
    eval_max_new_tokens: int | None = opt(None, "Response length of the evaluation samples (default: max-new-tokens).")


class _SectionedConfig:
    """Shared by RunConfig and AlignConfig: a top-level `output_dir` plus dataclass sections of options."""

    output_dir: str

    @classmethod
    def sections(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "output_dir")

    def flat(self) -> dict[str, Any]:
        out = {"output_dir": self.output_dir}
        for section in self.sections():
            out.update(dataclasses.asdict(getattr(self, section)))
        return out

    def to_yaml(self) -> str:
        nested = {"output_dir": self.output_dir}
        nested.update({s: dataclasses.asdict(getattr(self, s)) for s in self.sections()})
        return yaml.safe_dump(nested, sort_keys=False)


@dataclass
class RunConfig(_SectionedConfig):
    output_dir: str = opt("runs/{method}", "Where the config, data, checkpoints, logs, student and metrics go ('{method}' is replaced by the method's name).")
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    loss: LossSection = field(default_factory=LossSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)


# ----------------------------------------------------------------------------------------- `distillm align`


@dataclass
class AlignModelSection:
    policy: str | None = opt(None, "The model to align, which is also the frozen DPO reference: a distilled student directory (e.g. runs/demo/distillm2/student), a `distillm run` directory (its student/), or any --teacher form.")
    dtype: str = ModelSection.__dataclass_fields__["dtype"].default
    trust_remote_code: bool = False


@dataclass
class AlignDataSection:
    preferences: str | None = opt(None, "Preference pairs: JSONL (or JSON, CSV, Parquet, saved dataset) with a prompt (or messages), a chosen and a rejected response per row.")
    num_preferences: int | None = opt(None, "Use only the first N preference pairs.")
    prompt_field: str = DataSection.__dataclass_fields__["prompt_field"].default
    messages_field: str = DataSection.__dataclass_fields__["messages_field"].default
    chosen_field: str = opt("chosen", "Field holding the preferred response.")
    rejected_field: str = opt("rejected", "Field holding the dispreferred response.")
    id_field: str = DataSection.__dataclass_fields__["id_field"].default
    system_prompt: str | None = None
    chat_template: bool = True
    max_prompt_length: int = 512
    max_length: int = 1024


@dataclass
class DPOSection:
    dpo_beta: float = opt(0.1, "DPO beta: strength of the pull towards the reference model (TRL DPOConfig.beta).")
    dpo_loss_type: str = opt("sigmoid", "TRL DPO loss type: sigmoid (DPO), ipo, hinge, robust, ... (TRL DPOConfig.loss_type).")


@dataclass
class AlignConfig(_SectionedConfig):
    output_dir: str = opt("runs/align", "Where the config, checkpoints, logs, aligned model (student/) and metrics go.")
    model: AlignModelSection = field(default_factory=AlignModelSection)
    data: AlignDataSection = field(default_factory=AlignDataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    training: TrainingSection = field(default_factory=TrainingSection)


SECTIONS = RunConfig.sections()


def option_fields(config_cls: type = RunConfig) -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every option name -> (section or None, dataclass field). An option that repeats another config's option
    (AlignConfig's dtype, prompt_field, ...) takes its help text from there."""
    shared = {name: f for name, (_, f) in _option_fields(RunConfig).items()}
    out = _option_fields(config_cls)
    for name, (section, f) in out.items():
        if "help" not in f.metadata and name in shared:
            out[name] = (section, shared[name])
    return out


def _option_fields(config_cls: type) -> dict[str, tuple[str | None, dataclasses.Field]]:
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    hints = {f.name: f.default_factory for f in fields(config_cls) if f.name != "output_dir"}
    for f in fields(config_cls):
        if f.name in hints:
            for sub in fields(hints[f.name]()):
                out[sub.name] = (f.name, sub)
        else:
            out[f.name] = (None, f)
    return out


def _coerce(name: str, f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = str(f.type)
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' cannot be empty.")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{name}' expects {kind.replace(' | None', ' or empty')}, got {value!r}.") from None


def apply_overrides(config, overrides: dict[str, Any], where: str = "config"):
    """Set options from a flat or sectioned dict, validating names and types."""
    known = option_fields(type(config))
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in config.sections() and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key not in known or known[sub_key][0] != key:
                    _unknown(sub_key, known, f"{where} (section '{key}')")
                flat[sub_key] = sub_value
        else:
            flat[key.replace("-", "_")] = value
    for key, value in flat.items():
        if key not in known:
            _unknown(key, known, where)
        section, f = known[key]
        target = getattr(config, section) if section else config
        setattr(target, key, _coerce(key, f, value, where))
    validate_align(config) if isinstance(config, AlignConfig) else validate(config)
    return config


def _unknown(key: str, known: dict, where: str):
    names = [*known, *SECTIONS]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close and close[0] in SECTIONS:
        hint = f" Did you mean the section '{close[0]}'?"
    elif close:
        hint = f" Did you mean '{close[0]}'?"
    else:
        hint = " Run `distillm run --help` for the list of options."
    raise ConfigError(f"{where}: unknown option '{key}'.{hint}")


def validate(config: RunConfig) -> None:
    """Check values before any work starts, so a typo fails in a second, not after the teacher has generated."""
    from transformers.trainer_utils import SchedulerType

    m, d, g, lo, t, e = (config.model, config.data, config.generation, config.loss, config.training,
                         config.evaluation)
    me = config.method
    positive = {"max_prompt_length": d.max_prompt_length, "max_length": d.max_length,
                "max_new_tokens": g.max_new_tokens, "generation_batch_size": g.generation_batch_size,
                "vllm_tensor_parallel_size": g.vllm_tensor_parallel_size, "rounds": t.rounds,
                "per_device_train_batch_size": t.per_device_train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps, "logging_steps": t.logging_steps,
                "save_steps": t.save_steps, "save_total_limit": t.save_total_limit,
                "max_nonfinite_steps": t.max_nonfinite_steps}
    optional_positive = {"num_prompts": d.num_prompts, "num_eval_prompts": d.num_eval_prompts,
                         "max_batch_tokens": g.max_batch_tokens, "eval_max_new_tokens": e.eval_max_new_tokens}
    checks = [(value >= 1, f"{name} must be >= 1 (got {value})") for name, value in positive.items()]
    checks += [(value is None or value >= 1, f"{name} must be >= 1 or empty (got {value})")
               for name, value in optional_positive.items()]
    schedulers = [s.value for s in SchedulerType]
    checks += [
        (t.learning_rate > 0, "learning_rate must be > 0"),
        (0 <= t.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (t.lr_scheduler_type in schedulers, f"lr_scheduler_type must be one of {', '.join(schedulers)}"),
        (0 <= lo.alpha_min <= lo.alpha0 <= lo.alpha_max < 1, "need 0 <= alpha_min <= alpha0 <= alpha_max < 1"),
        (0 <= lo.gap_momentum < 1, "gap_momentum must be in [0, 1)"),
        (0 <= lo.b_start <= 2 and 0 <= lo.b_end <= 2, "b_start and b_end must be in [0, 2] (SKL gets weight 2 - b)"),
        (0 <= lo.ramp_fraction <= 1, "ramp_fraction must be in [0, 1]"),
        (lo.loss_temperature > 0, "loss_temperature must be > 0"),
        (lo.reduction in ("seq_mean", "token_mean"), "reduction must be seq_mean or token_mean"),
        (lo.loss_impl in ("fused", "plain"), f"loss_impl must be fused or plain (got '{lo.loss_impl}')"),
        (lo.loss_chunk_size is None or lo.loss_chunk_size >= 1, "loss_chunk_size must be >= 1 or empty"),
        (t.teacher_cache in ("off", "exact", "topk"), f"teacher_cache must be off, exact or topk (got '{t.teacher_cache}')"),
        (t.teacher_cache_k >= 1, "teacher_cache_k must be >= 1"),
        (0 < g.top_p <= 1, "top_p must be in (0, 1]"),
        (g.temperature >= 0, "temperature must be >= 0"),
        (0 < g.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization must be in (0, 1]"),
        (g.backend in ("auto", "hf", "vllm"), "backend must be auto, hf or vllm"),
        (d.max_prompt_length < d.max_length, "max_prompt_length must be < max_length"),
        (me.method in METHOD_NAMES, f"method must be one of {', '.join(METHOD_NAMES)} (got '{me.method}')"),
        (me.fixed_responses in ("teacher", "dataset"), "fixed_responses must be teacher or dataset"),
        (0 <= me.jsd_beta <= 1, "jsd_beta must be in [0, 1]"),
        (0 <= me.gkd_lambda <= 1, "gkd_lambda must be in [0, 1]"),
        (0 <= me.imitkd_fixed_fraction <= 1, "imitkd_fixed_fraction must be in [0, 1]"),
        (me.v1_loss in ("skl", "srkl"), "v1_loss must be skl or srkl"),
        (0 <= me.v1_alpha < 1, "v1_alpha must be in [0, 1)"),
        (0 <= me.v1_threshold_init <= 1, "v1_threshold_init must be in [0, 1]"),
        (0 <= me.v1_threshold_step <= 1, "v1_threshold_step must be in [0, 1]"),
        (0 <= me.v1_fresh_end <= 1 and 0 <= me.v1_fresh_start <= 1, "v1_fresh_start and v1_fresh_end must be in [0, 1]"),
        (me.v1_buffer_capacity >= 1, "v1_buffer_capacity must be >= 1"),
        (me.v1_val_interval >= 1, "v1_val_interval must be >= 1"),
        (me.dpkd_beta > 0, "dpkd_beta must be > 0"),
        (me.skd_top_k >= 1, "skd_top_k must be >= 1"),
        (me.skd_loss in ("fkl", "rkl", "jsd", "tvd"), "skd_loss must be fkl, rkl, jsd or tvd"),
        (me.sbs_rationale_weight >= 0, "sbs_rationale_weight must be >= 0"),
        (m.lora_r >= 1 and m.lora_alpha >= 1, "lora_r and lora_alpha must be >= 1"),
        (0 <= m.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (bool(m.lora_target_modules.strip()), "lora_target_modules must be all-linear or a list of module names"),
        (m.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
         "dtype must be auto, float32, bfloat16 or float16"),
    ]
    checks += _quant_checks(m)
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"Invalid config: {message}.")


def _quant_checks(m: ModelSection) -> list[tuple[bool, str]]:
    """--student-quant: the grid must be one the GGUF export stores exactly (Q4_0 blocks for 2-4 bits, Q8_0 for 8:
    32 weights per fp16 scale, so a group of 32k weights is k blocks with one scale)."""
    from .quant.qat import QUANT_BITS

    if m.student_quant == "none":
        return []
    return [
        (m.student_quant in QUANT_BITS, f"student_quant must be none or one of {', '.join(QUANT_BITS)} (got "
         f"'{m.student_quant}'; 5-7 bits have no exact llama.cpp layout distillm writes)"),
        (m.student_quant_group_size >= 32 and m.student_quant_group_size % 32 == 0,
         f"student_quant_group_size must be a multiple of 32 (got {m.student_quant_group_size}): GGUF's Q4_0 and "
         "Q8_0 blocks hold 32 weights with one fp16 scale each, so only whole blocks store a group exactly"),
        (not m.load_in_4bit, "student_quant and load_in_4bit (QLoRA's NF4 weights) are two different quantizations "
         "of the student; choose one (--student-quant with --lora is QAT + LoRA)"),
    ]


def validate_align(config: AlignConfig) -> None:
    """The checks of `distillm align`'s options (the policy and preference file are checked when loaded)."""
    d, t, dpo = config.data, config.training, config.dpo
    checks = [
        (d.max_prompt_length >= 1, f"max_prompt_length must be >= 1 (got {d.max_prompt_length})"),
        (d.max_prompt_length < d.max_length, "max_prompt_length must be < max_length"),
        (d.num_preferences is None or d.num_preferences >= 1, "num_preferences must be >= 1 or empty"),
        (dpo.dpo_beta > 0, "dpo_beta must be > 0"),
        (t.teacher_cache == "off", "teacher_cache is a distillation option; distillm align has no teacher (leave it off)"),
        (t.rounds >= 1, "rounds (epochs over the preference pairs) must be >= 1"),
        (t.learning_rate > 0, "learning_rate must be > 0"),
        (0 <= t.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (t.per_device_train_batch_size >= 1 and t.gradient_accumulation_steps >= 1,
         "per_device_train_batch_size and gradient_accumulation_steps must be >= 1"),
        (t.save_steps >= 1 and t.save_total_limit >= 1 and t.logging_steps >= 1,
         "save_steps, save_total_limit and logging_steps must be >= 1"),
        (config.model.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
         "dtype must be auto, float32, bfloat16 or float16"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"Invalid config: {message}.")


PRESETS: dict[str, dict[str, Any]] = {
    # The default demo: SmolLM2-135M-Instruct -> itself with int3 fake-quantized linear weights (groups of 32, fp16
    # scales), recovered from its round-to-nearest start by distillation; exported as GGUF. Sized for 2 CPU cores.
    "demo": {
        "output_dir": "runs/demo/{method}",
        "student_quant": "int3",
        "student_quant_group_size": 32,
        "num_prompts": 64,
        "num_eval_prompts": 24,
        "max_new_tokens": 48,
        "max_prompt_length": 128,
        "max_length": 192,
        "rounds": 2,
        "learning_rate": 5e-5,
        "warmup_ratio": 0.1,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "generation_batch_size": 32,
    },
    # The earlier demo: SmolLM2-135M-Instruct -> its 10-layer layer-pruned copy, sized for 2 CPU cores
    # (about 10 minutes). A higher learning rate than the 7B recipes: the pruned student starts far away. At this
    # budget the pruned student does not write language yet (README: The default demo).
    "demo-pruned": {
        "output_dir": "runs/demo-pruned/{method}",
        "num_prompts": 128,
        "num_eval_prompts": 24,
        "max_new_tokens": 48,
        "max_prompt_length": 128,
        "max_length": 192,
        "rounds": 3,
        "learning_rate": 2e-4,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "generation_batch_size": 32,
    },
    # Tiny random models, the same pipeline in seconds: for tests and smoke runs.
    "tiny": {
        "output_dir": "runs/tiny/{method}",
        "teacher": "tiny-random",
        "student_layers": "0,3",
        "num_prompts": 32,
        "num_eval_prompts": 8,
        "max_new_tokens": 16,
        "max_prompt_length": 96,
        "max_length": 128,
        "rounds": 3,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "generation_batch_size": 16,
        "save_steps": 4,
    },
}


def load_config(path: str | os.PathLike | None = None, *, preset: str | None = None,
                overrides: dict[str, Any] | None = None, config_cls: type = RunConfig):
    """Defaults, then the preset, then the YAML file, then command-line overrides."""
    config = config_cls()
    if preset and preset != "none":
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset '{preset}': choose one of {', '.join(PRESETS)} or none.")
        apply_overrides(config, PRESETS[preset], where=f"preset '{preset}'")
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err}).") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of option names to values.")
        apply_overrides(config, data, where=str(path))
    if overrides:
        apply_overrides(config, overrides, where="command line")
    if isinstance(config, RunConfig):
        config.output_dir = config.output_dir.replace("{method}", config.method.method)
    return config
