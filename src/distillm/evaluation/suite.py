"""Evaluate several models on the same prompts, sampling settings and seeds: the engine behind `distillm eval`.

Tasks (pick with `EvalSettings.tasks`):

- ``divergence``: KL(teacher || model), TVD and acceptance rate 1 - TVD on the teacher's responses to the prompts
  (`evaluation.divergence`); the model must share the teacher's tokenizer.
- ``rouge``: ROUGE-L of the model's responses against the reference responses.
- ``perplexity``: the model's perplexity on the reference responses.
- ``math``: final-answer exact match on math word problems (built-in arithmetic generator, or GSM8K/MATH JSONL).
- ``code``: pass@k by execution in the sandbox on HumanEval or MBPP-format problems.
- ``judge``: pairwise LLM-as-judge win rate against reference answers (both orders, bootstrap CI).

Reference responses are, in order of preference: a `references` JSONL file (id, response), the prompt file's own
response field, else the teacher's responses (then the teacher has no ROUGE-L / perplexity of its own: it would
be scored against itself). Every model's generations are cached under ``OUTPUT/generations/NAME/`` with the
settings that made them; a rerun reuses them and the judge's verdict cache, so only new work is done.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..data.prompts import EncodedPrompt, PromptRecord, check_chat_template, encode_prompts, load_prompts
from ..errors import DistillmError
from ..generation.base import SamplingParams
from ..generation.factory import make_backend, release
from ..generation.runner import generate_responses
from ..io import atomic_write_json, read_jsonl
from ..models import (
    check_same_tokenizer, load_model, load_tokenizer, loadable_path, parse_layer_spec, prune_layers, real_vocab_size,
)
from ..quant.qat import dequantized_copy, prepare_qat, quant_bits
from .code import evaluate_samples, load_humaneval, load_mbpp
from .divergence import teacher_student_divergence
from .judge import PairItem, VerdictCache, judge_pairs, win_rate
from .math import arithmetic_problems, load_math_problems, problem_prompt, score_responses
from .report import write_report
from .sandbox import SandboxLimits, check_limits
from .text import distinct_n, mean_rouge_l, perplexity, reference_rows

logger = logging.getLogger("distillm")

TASKS = ("divergence", "rouge", "perplexity", "math", "code", "judge")
LOCAL_TASKS = ("divergence", "rouge", "perplexity", "math")


class EvalError(DistillmError):
    """Bad evaluation settings or inputs; the message says which option or file and how to fix it."""


@dataclass
class ModelSpec:
    """A model to evaluate: `source` is an alias, directory, .gguf file or Hub id; with `layers`, the model is
    `source` pruned to those decoder layers, with `quant` (e.g. "int3"), `source` with its linear weights rounded to
    the nearest point of that grid in groups of `quant_group_size` (a run's initial student either way).
    `train_log` feeds the training curves."""

    name: str
    source: str
    layers: str | None = None
    train_log: str | None = None
    quant: str | None = None
    quant_group_size: int = 32


@dataclass
class EvalSettings:
    tasks: tuple[str, ...] = LOCAL_TASKS
    teacher: str | None = None  # the name of the teacher among the models (divergence; default references)
    prompts: str = "builtin:eval"
    num_prompts: int | None = None
    references: str | None = None
    max_prompt_length: int = 512
    max_length: int = 1024
    chat_template: bool = True  # False: plain prompt text (base models; --no-chat-template)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 16
    dtype: str = "auto"
    math: str = "builtin"  # "builtin" (arithmetic generator) or a GSM8K / MATH JSONL file
    num_math: int = 50
    code: str = "humaneval"  # "humaneval" or an MBPP-format JSONL file
    num_code: int | None = 20
    code_samples: int = 1
    code_k: tuple[int, ...] = (1,)
    code_timeout_s: float = 10.0
    code_memory_mb: int = 1024
    code_concurrency: int = 2
    judge_reference: str | None = None  # a model name whose responses are the judge's reference answers
    judge_concurrency: int = 4

    def validate(self, names: list[str]) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise EvalError(f"Unknown task(s) {', '.join(unknown) or '(none given)'} in --tasks: choose from "
                            f"{', '.join(TASKS)} (comma-separated).")
        if self.teacher is not None and self.teacher not in names:
            raise EvalError(f"--teacher-name {self.teacher!r} is not one of the models ({', '.join(names)}).")
        if "divergence" in self.tasks and self.teacher is None:
            raise EvalError("The divergence task needs a teacher: pass --teacher SPEC (or --run DIR, whose config "
                            "names it), or leave divergence out of --tasks.")
        if self.judge_reference is not None and self.judge_reference not in names:
            raise EvalError(f"--judge-reference {self.judge_reference!r} is not one of the models ({', '.join(names)}).")
        if self.code_samples > 1 and self.temperature == 0 and "code" in self.tasks:
            raise EvalError(f"--code-samples {self.code_samples} with --temperature 0 would give identical samples: "
                            "sample with --temperature > 0 (e.g. 0.8), or use --code-samples 1.")
        if "code" in self.tasks:
            check_limits(self.code_timeout_s, self.code_memory_mb, timeout_name="--code-timeout",
                         memory_name="--code-memory-mb")
        if "code" in self.tasks and any(k > self.code_samples or k < 1 for k in self.code_k):
            raise EvalError(f"--code-k {','.join(map(str, self.code_k))}: each k must be between 1 and "
                            f"--code-samples ({self.code_samples}).")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)

    def sampling(self, offset: int = 0) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              seed=self.seed + offset)


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    model_dir: str | None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_names(models: list[ModelSpec]) -> None:
    seen = set()
    for spec in models:
        if not _NAME.match(spec.name):
            raise EvalError(f"Model name {spec.name!r}: use letters, digits, '.', '_' and '-' only "
                            "(it names a folder of the output directory), e.g. --model student=runs/demo/student.")
        if spec.name in seen:
            raise EvalError(f"Model name {spec.name!r} is given twice: give each --model / --run a distinct name.")
        seen.add(spec.name)
    if not models:
        raise EvalError("No models to evaluate: pass --model NAME=SPEC, --teacher SPEC or --run DIR.")


def _check_tokenizers(models: list[ModelSpec], settings: EvalSettings) -> dict:
    """Each model's tokenizer, loaded alone (no weights) to check the prompt format before any model is loaded."""
    tokenizers = {}
    for spec in models:
        if spec.source not in tokenizers:
            tokenizers[spec.source] = load_tokenizer(spec.source)
            check_chat_template(tokenizers[spec.source], settings.chat_template, model=spec.source)
    return tokenizers


def _load(spec: ModelSpec, settings: EvalSettings, cache: dict, tokenizers: dict | None = None) -> _Loaded:
    """Load a model (a pruned one is cut from its source, reusing the source if it is loaded already)."""
    tokenizer = (tokenizers or {}).get(spec.source)
    if spec.layers is None and spec.quant is None:
        model, tokenizer = load_model(spec.source, dtype=settings.dtype, tokenizer=tokenizer)
        return _Loaded(model, tokenizer, loadable_path(spec.source))
    if spec.source not in cache:
        cache[spec.source] = load_model(spec.source, dtype=settings.dtype, tokenizer=tokenizer)
    base, tokenizer = cache[spec.source]
    if spec.quant is not None:  # round-to-nearest: the fake-quantized model's forward, as plain linears
        student = prepare_qat(copy.deepcopy(base), quant_bits(spec.quant), spec.quant_group_size)
        return _Loaded(dequantized_copy(student).eval(), tokenizer, None)
    keep = parse_layer_spec(spec.layers, base.config.num_hidden_layers)
    return _Loaded(prune_layers(base, keep), tokenizer, None)


def _encode(records: list[PromptRecord], tokenizer, settings: EvalSettings) -> list[EncodedPrompt]:
    encoded, _ = encode_prompts(records, tokenizer, max_prompt_length=settings.max_prompt_length,
                                use_chat_template=settings.chat_template)
    return encoded


def _generate(loaded: _Loaded, prompts: list[EncodedPrompt], path: Path, params: SamplingParams, desc: str,
              settings: EvalSettings) -> list[dict]:
    config = RunConfig()
    config.generation.generation_batch_size = settings.batch_size
    backend = make_backend(config, loaded.model, loaded.tokenizer, model_dir=loaded.model_dir)
    try:
        return generate_responses(backend, prompts, path, params, loaded.tokenizer, desc=desc)
    finally:
        release(backend)


def _check_generation_dir(folder: Path, spec: ModelSpec, settings: EvalSettings) -> None:
    """Cached generations are reused only when they were made by the same model with the same settings."""
    keys = ("prompts", "num_prompts", "max_prompt_length", "temperature", "top_p", "max_new_tokens", "seed", "math",
            "num_math", "code", "num_code", "code_samples")
    stamp = {"model": dataclasses.asdict(spec) | {"train_log": None},
             "settings": {k: getattr(settings, k) for k in keys}}
    if not settings.chat_template:  # recorded only when off, so folders made before the option stay valid
        stamp["settings"]["chat_template"] = False
    path = folder / "made_with.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(stamp)):
            raise EvalError(f"{folder} holds generations made by another model or with other settings than this "
                            f"evaluation's (see {path}): choose another --output-dir, or delete {folder}.")
    else:
        atomic_write_json(path, stamp)


def _references(settings: EvalSettings, records: list[PromptRecord]) -> tuple[dict[str, str] | None, str]:
    if settings.references:
        path = Path(settings.references)
        if not path.is_file():
            raise EvalError(f"--references file not found: {path}")
        refs = {}
        for number, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row.get("response"), str) or "id" not in row:
                raise EvalError(f"{path}:{number}: a reference row needs 'id' and a string 'response'.")
            refs[str(row["id"])] = row["response"]
        missing = [r.id for r in records if r.id not in refs]
        if missing:
            raise EvalError(f"{path} has no response for {len(missing)} prompts (e.g. id {missing[0]!r}): give one "
                            "reference per prompt id of --prompts.")
        return refs, f"file {path}"
    if all(r.response for r in records):
        return {r.id: r.response for r in records}, f"the response field of {settings.prompts}"
    return None, "teacher"


def run_evaluation(models: list[ModelSpec], settings: EvalSettings, output_dir: str | Path, *, judge=None,
                   command: str | None = None) -> dict:
    """Evaluate `models` on `settings.tasks`; writes OUTPUT/results.json, report.md and figures; returns results."""
    started = time.time()
    _check_names(models)
    names = [m.name for m in models]
    settings.validate(names)
    tasks = set(settings.tasks)
    if "judge" in tasks and judge is None:
        raise EvalError("The judge task needs a judge: pass --judge-url and --judge-model (an OpenAI-compatible "
                        "endpoint) or --judge-hf MODEL, or leave judge out of --tasks.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, _ = load_prompts(settings.prompts, limit=settings.num_prompts)
    tokenizers = _check_tokenizers(models, settings)
    references, reference_source = _references(settings, records)
    if references is None and settings.teacher is None and tasks & {"rouge", "perplexity", "judge"}:
        raise EvalError(f"{settings.prompts} has no reference responses: give --references FILE, or a teacher "
                        "(--teacher SPEC) whose responses serve as references.")
    if settings.teacher is not None:  # the teacher goes first: its responses are others' references
        models = sorted(models, key=lambda m: m.name != settings.teacher)

    math_problems = []
    if "math" in tasks:
        math_problems = (arithmetic_problems(settings.num_math, seed=settings.seed) if settings.math == "builtin"
                         else load_math_problems(settings.math, limit=settings.num_math))
    code_problems = []
    if "code" in tasks:
        code_problems = (load_humaneval(limit=settings.num_code) if settings.code == "humaneval"
                         else load_mbpp(settings.code, limit=settings.num_code))

    results: dict = {"command": command, "settings": {**dataclasses.asdict(settings), "tasks": list(settings.tasks)},
                     "teacher": settings.teacher, "reference_source": reference_source, "models": {}}
    teacher: _Loaded | None = None
    teacher_rows: list[dict] | None = None
    responses: dict[str, dict[str, str]] = {}
    base_cache: dict = {}
    for spec in models:
        t0 = time.time()
        folder = out / "generations" / spec.name
        _check_generation_dir(folder, spec, settings)
        loaded = _load(spec, settings, base_cache, tokenizers)
        is_teacher = spec.name == settings.teacher
        metrics: dict = {}
        details: dict = {}
        prompts = _encode(records, loaded.tokenizer, settings)
        rows = _generate(loaded, prompts, folder / "responses.jsonl", settings.sampling(),
                         f"{spec.name}: responses", settings)
        responses[spec.name] = {row["id"]: row["response"] for row in rows}
        if is_teacher:
            teacher, teacher_rows = loaded, rows
        common = dict(vocab_size=real_vocab_size(loaded.tokenizer), pad_token_id=loaded.tokenizer.pad_token_id,
                      max_length=settings.max_length)
        own_references = references is None and is_teacher
        texts = [responses[spec.name][r.id] for r in records]
        if "rouge" in tasks:  # reference-free: the teacher's own value is the one to match
            metrics["distinct_2"] = distinct_n(texts, 2)
        if "rouge" in tasks and not own_references:
            refs = references or responses[settings.teacher]
            metrics["rouge_l"] = mean_rouge_l(texts, [refs[r.id] for r in records])
        if "perplexity" in tasks and not own_references:
            if references is None:  # the teacher's own tokens
                check_same_tokenizer(teacher.tokenizer, loaded.tokenizer)
                ref_rows = teacher_rows
            else:
                ref_rows = reference_rows([p.input_ids for p in prompts], [references[p.id] for p in prompts],
                                          loaded.tokenizer)
            metrics.update(perplexity(loaded.model, ref_rows, **common, desc=f"{spec.name}: perplexity"))
        if "divergence" in tasks and not is_teacher:
            check_same_tokenizer(teacher.tokenizer, loaded.tokenizer)
            metrics.update(teacher_student_divergence(teacher.model, loaded.model, teacher_rows, **common,
                                                      desc=f"{spec.name}: divergence"))
        if "math" in tasks:
            math_records = [PromptRecord(p.id, [{"role": "user", "content": problem_prompt(p)}]) for p in math_problems]
            math_rows = _generate(loaded, _encode(math_records, loaded.tokenizer, settings), folder / "math.jsonl",
                                  settings.sampling(offset=1), f"{spec.name}: math", settings)
            scored = score_responses(math_problems, {row["id"]: row["response"] for row in math_rows})
            metrics["math_accuracy"] = scored["accuracy"]
            details["math"] = scored
        if "code" in tasks:
            code_records = [PromptRecord(p.id, [{"role": "user", "content": p.instruction()}]) for p in code_problems]
            encoded = _encode(code_records, loaded.tokenizer, settings)
            samples: dict[str, list[str]] = {p.id: [] for p in code_problems}
            for i in range(settings.code_samples):
                code_rows = _generate(loaded, encoded, folder / f"code_{i}.jsonl", settings.sampling(offset=100 + i),
                                      f"{spec.name}: code sample {i + 1}/{settings.code_samples}", settings)
                for row in code_rows:
                    samples[row["id"]].append(row["response"])
            limits = SandboxLimits(timeout_s=settings.code_timeout_s, memory_mb=settings.code_memory_mb)
            scored = evaluate_samples(code_problems, samples, ks=settings.code_k, limits=limits,
                                      concurrency=settings.code_concurrency, desc=f"{spec.name}: code tests")
            metrics.update({f"code_{k}": v for k, v in scored.items() if k.startswith("pass@")})
            details["code"] = scored
        results["models"][spec.name] = {
            "source": spec.source, "layers": spec.layers, "quant": spec.quant, "train_log": spec.train_log,
            "metrics": metrics, "details": details, "seconds": round(time.time() - t0, 1),
        }
        logger.info("%s: %s", spec.name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if not is_teacher:
            del loaded
            gc.collect()

    if "judge" in tasks:
        reference_name = settings.judge_reference or (None if references is not None else settings.teacher)
        refs = responses[reference_name] if reference_name else references
        results["judge"] = {"judge": judge.identity, "reference": reference_name or reference_source}
        cache = VerdictCache(out / "judge_verdicts.jsonl")
        instructions = {r.id: r.messages[-1]["content"] for r in records}
        for spec in models:
            if spec.name == reference_name:
                continue
            items = [PairItem(r.id, instructions[r.id], responses[spec.name][r.id], refs[r.id]) for r in records]
            judged = judge_pairs(judge, items, cache=cache, concurrency=settings.judge_concurrency,
                                 desc=f"{spec.name}: judging")
            summary = win_rate(judged, seed=settings.seed)
            entry = results["models"][spec.name]
            entry["metrics"]["win_rate"] = summary["win_rate"]
            entry["details"]["judge"] = {**summary, "per_prompt": judged}
    results["wall_seconds"] = round(time.time() - started, 1)
    write_report(results, out)
    atomic_write_json(out / "results.json", results)
    return results
