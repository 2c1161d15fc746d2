"""The `distillm` command: generate, train, run, eval, compare, align, speculate.

Every option of the config (see `distillm.config`) is a flag of `train` and `run`; a YAML file given with
`--config` sets many at once, and flags override it. `distillm run` with no arguments is the default demo.

The commands' modules are imported with this one: `import distillm` loads the pipeline (torch, transformers)
anyway, so importing them on use saved little. Optional heavy packages (vLLM, TRL, PEFT, torchao, matplotlib, ...)
are still imported on use, inside the functions that need them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import shlex
import sys
from pathlib import Path

import transformers

from . import models  # models.load_model looked up at call time (tests replace it)
from .align import align
from .compare import CompareError, Comparison
from .compare.protocol import ABLATIONS, SIZES, VARIANTS, CompareSettings
from .config import (METHOD_NAMES, PRESETS, AlignConfig, ConfigError, RunConfig, apply_overrides, check_flags,
                     load_config, option_fields, range_text, renamed_options)
from .data.prompts import check_chat_template, encode_prompts, load_prompts
from .data.vision import check_no_images, encode_image_prompts, load_image_prompts
from .distributed import process_state
from .errors import DistillmError
from .evaluation.cli import add_eval_parser, cmd_eval
from .generation.base import SamplingParams
from .generation.factory import make_backend
from .generation.runner import generate_responses
from .io import disk_error, read_jsonl
from .models import load_tokenizer, loadable_path
from .pipeline import run
from .pipeline.cross import CROSS_METRIC_ROWS, flat_metrics
from .quant.qat import format_export
from .speculate import add_speculate_parser, cmd_speculate
from .vision import is_vision_model, load_vision_model

logger = logging.getLogger("distillm")

METRIC_ROWS = [
    ("teacher_nll_of_student_samples", "teacher NLL of student samples", "lower"),
    ("kl", "KL(teacher || student) on teacher responses", "lower"),
    ("tvd", "TVD on teacher responses", "lower"),
    ("acceptance_rate", "expected acceptance rate (1 - TVD)", "higher"),
]


def _add_config_options(parser: argparse.ArgumentParser, config_cls: type = RunConfig) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (flat or sectioned keys).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a different run in --output-dir.")
    if config_cls is RunConfig:
        parser.add_argument("--preset", default=None, choices=[*sorted(PRESETS), "none"],
                            help="Starting settings under your config and flags: 'demo' sizes the SmolLM2 CPU demo "
                            "(128 prompts, 3 rounds), 'tiny' uses tiny random models. Default: 'demo' when no --config, "
                            "--teacher, --student or --prompts is given, else none.")
        parser.add_argument("--resume", action="store_true",
                            help="Continue the run in --output-dir with the config it was started with (its "
                            "config.yaml); rerunning the same command continues it too.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, f) in option_fields(config_cls).items():
        group = groups.setdefault(section or "run", parser.add_argument_group(f"{section or 'run'} options"))
        flag = "--" + name.replace("_", "-")
        accepted = range_text(f)
        help_text = f"{f.metadata['help']} (default: {f.default}{'; ' + accepted if accepted else ''})"
        if str(f.type).startswith("bool"):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=name, metavar=name.upper(), default=argparse.SUPPRESS, help=help_text)
        for alias in f.metadata.get("aliases", ()):  # an earlier name: still accepted, with a warning
            kind = {"action": argparse.BooleanOptionalAction} if str(f.type).startswith("bool") else {}
            group.add_argument("--" + alias.replace("_", "-"), dest=alias, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS, **kind)


def _overrides(args: argparse.Namespace, config_cls: type = RunConfig) -> dict:
    known = {**option_fields(config_cls), **renamed_options(config_cls)}
    return {key: value for key, value in vars(args).items() if key in known}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillm",
        description="Distil a teacher LLM into a smaller student with DistiLLM-2 (contrastive distillation) or one of "
        "the classic baselines (--method).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="Whole pipeline: teacher responses, on-policy rounds of training, evaluation.",
                         description="The method's data (teacher responses, once, for most methods), then --rounds "
                         "epochs of training (DistiLLM-2 and DPKD regenerate the student's responses every round; the "
                         "on-policy baselines sample the student while training), with a held-out evaluation before "
                         "and after. --method picks the method (default distillm2). With no arguments: the default "
                         "demo (SmolLM2-135M-Instruct -> itself with int4-quantized weights, recovered by distillation on built-in "
                         "prompts and exported as GGUF; --preset demo-pruned: the 10-layer pruned student).")
    _add_config_options(run)

    train = sub.add_parser("train", help="Train a student, e.g. from teacher responses you already have (no evaluation).",
                           description="Like `run`, without the before/after evaluation by default. "
                           "--teacher-responses reuses a JSONL made by `distillm generate` instead of generating "
                           "teacher responses.")
    _add_config_options(train)

    defaults = RunConfig()  # `generate` samples as `run` does unless told otherwise
    gen = sub.add_parser("generate", help="Sample one response per prompt with a model, into resumable JSONL.")
    gen.add_argument("--model", required=True, help="Alias, Hugging Face id, local directory or .gguf file.")
    gen.add_argument("--prompts", default="builtin:train", help="Prompt file or builtin:train / builtin:eval.")
    gen.add_argument("--output", required=True, help="Output JSONL (rerun to continue an interrupted one).")
    gen.add_argument("--num-prompts", type=int, default=None, help="Use only the first N prompts.")
    gen.add_argument("--prompt-field", default="prompt")
    gen.add_argument("--messages-field", default="messages")
    gen.add_argument("--image-field", default="image", help="Vision-language models: field holding the image path.")
    gen.add_argument("--max-prompt-length", type=int, default=defaults.data.max_prompt_length)
    gen.add_argument("--no-chat-template", action="store_true", help="Use raw prompt text (no chat template).")
    gen.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"])
    gen.add_argument("--temperature", type=float, default=defaults.generation.temperature, help="0 for greedy decoding.")
    gen.add_argument("--top-p", type=float, default=defaults.generation.top_p)
    gen.add_argument("--max-new-tokens", type=int, default=defaults.generation.max_new_tokens)
    gen.add_argument("--batch-size", type=int, default=defaults.generation.generation_batch_size)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--vllm-tensor-parallel-size", type=int, default=defaults.generation.vllm_tensor_parallel_size,
                     help="vLLM: GPUs one engine spreads the model over (a 70B teacher: 4 or 8).")
    gen.add_argument("--vllm-gpu-memory-utilization", type=float,
                     default=defaults.generation.vllm_gpu_memory_utilization,
                     help="vLLM: fraction of each GPU's memory the engine may take.")
    gen.add_argument("--trust-remote-code", action="store_true")

    add_eval_parser(sub)

    align = sub.add_parser("align", help="Preference alignment (DPO, with TRL) of a distilled student on prompt/chosen/"
                           "rejected pairs.",
                           description="Direct preference optimisation with TRL's DPOTrainer: --policy (a distilled "
                           "student, or a `distillm run` directory) initialises the policy and is the frozen reference "
                           "model; --preferences holds one prompt (or messages), chosen and rejected response per row. "
                           "--rounds is the number of epochs over the pairs. Writes config.yaml, checkpoints/, "
                           "logs/train_log.jsonl, student/ (the aligned model) and metrics.json to --output-dir; rerun "
                           "the same command to resume.")
    _add_config_options(align, AlignConfig)

    add_speculate_parser(sub)

    _add_compare_parser(sub)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING if quiet else logging.INFO)
    logging.getLogger("distillm").setLevel(logging.WARNING if quiet else logging.INFO)

    transformers.logging.set_verbosity_error()


def format_metrics(metrics: dict) -> str:
    """The before/after table printed at the end of a run."""
    if "before" not in metrics or "after" not in metrics:
        return ""
    lines = [f"{'held-out metric':<46}{'before':>10}{'after':>10}  better", "-" * 74]
    rows = METRIC_ROWS
    if "on_teacher_responses" in metrics["before"]:  # a cross-tokenizer run: aligned-space and per-byte figures
        metrics = {**metrics, "before": flat_metrics(metrics["before"]), "after": flat_metrics(metrics["after"])}
        rows = CROSS_METRIC_ROWS
    for key, label, better in rows:
        b, a = metrics["before"][key], metrics["after"][key]
        improved = a < b if better == "lower" else a > b
        lines.append(f"{label:<46}{b:>10.4f}{a:>10.4f}  {'yes' if improved else 'NO'} ({better} is better)")
    for key, name in (("distinct_2", "distinct-2"), ("repetition", "repetition")):
        b, a = metrics["before"].get(key), metrics["after"].get(key)
        if a is None or b is None:
            continue
        t = metrics["after"][f"teacher_{key}"]
        count = metrics["after"].get("eval_samples", 1)
        label = f"{name}{f', {count} samples/prompt' if count > 1 else ' of samples'} (teacher: {t:.4f})"
        verdict = "yes" if abs(a - t) < abs(b - t) else "NO"
        test = metrics["after"].get(f"{key}_change")  # evaluation.degeneracy.gap_change_test
        note = ""
        if test:
            p = test["p_closer"] if verdict == "yes" else test["p_farther"]
            note = f"; p = {p:.3g}" + ("" if p < 0.05 else ", within noise")
        lines.append(f"{label:<46}{b:>10.4f}{a:>10.4f}  {verdict} (closer to the teacher's is better{note})")
    b, a = metrics["before"].get("student_entropy"), metrics["after"].get("student_entropy")
    t = metrics["after"].get("teacher_entropy")
    if None not in (a, b, t):  # mean next-token entropy (nats) on the teacher's responses: flatter or sharper
        verdict = "yes" if abs(a - t) < abs(b - t) else "NO"
        lines.append(f"{f'entropy on teacher responses (teacher: {t:.4f})':<46}{b:>10.4f}{a:>10.4f}  {verdict} "
                     "(closer to the teacher's is better)")
    if any(metrics["after"].get(f"{key}_change") for key in ("distinct_2", "repetition")):
        lines.append("p: paired permutation test over the held-out prompts (and samples) that the gap to the "
                     "teacher changed by chance (docs/evaluation.md)")
    if metrics["after"].get("teacher_scores"):  # --teacher-url: KL / TVD are top-k figures (pipeline.evaluate)
        lines.append(f"teacher scores: {metrics['after']['teacher_scores']}")
    if "degenerate" in metrics["after"]:  # evaluation.degeneracy: closer to collapse than to the teacher
        for tag in ("before", "after"):
            if metrics[tag].get("degenerate"):
                lines.append(f"DEGENERATE student samples ({tag}): " + "; ".join(metrics[tag]["degenerate_reasons"]))
        if not metrics["after"]["degenerate"]:
            lines.append("student samples after: not degenerate (docs/evaluation.md, the degenerate rule)")
    return "\n".join(lines)


def _user_text(prompt: str) -> str:
    """The last user message of a chat-templated prompt (ChatML's "<|im_start|>user ... <|im_end|>"), else the
    prompt itself."""
    found = re.findall(r"<\|im_start\|>user\s*(.*?)<\|im_end\|>", prompt, flags=re.S)
    return found[-1] if found else prompt


def format_answers(run_dir: Path, *, n: int = 3, width: int = 110, quantized: bool = False) -> str:
    """The first `n` held-out prompts with the teacher's answer, the student's before and after distillation (the
    evaluation's samples, temperature --temperature), one line each, cut at `width` characters."""
    files = [run_dir / "data" / "teacher_eval.jsonl", run_dir / "eval" / "before_samples.jsonl",
             run_dir / "eval" / "after_samples.jsonl"]
    if not all(f.is_file() for f in files):
        return ""
    teacher, before, after = ({row["id"]: row for row in read_jsonl(f)} for f in files)
    labels = ("teacher", "round-to-nearest start" if quantized else "student before", "distilled")
    flat = lambda text: " ".join(str(text).split())  # noqa: E731  (one line per answer)
    cut = lambda text: text if len(text) <= width else text[:width - 3] + "..."  # noqa: E731
    lines = ["", f"Held-out answers (first {n} held-out prompts; sampled as in the evaluation):"]
    for key in list(teacher)[:n]:
        if key not in before or key not in after:
            continue
        lines.append(f"- prompt {key}: {cut(flat(_user_text(teacher[key].get('prompt', ''))))}")
        for label, rows in zip(labels, (teacher, before, after)):
            lines.append(f"    {label:<23}| {cut(flat(rows[key]['response']))}")
    return "\n".join(lines)


def _cmd_run(args, *, evaluate_default: bool) -> int:
    overrides = _overrides(args)
    if not evaluate_default:
        overrides.setdefault("evaluate", False)
    preset = args.preset
    if preset is None:
        own_setup = args.config or any(key in overrides for key in ("teacher", "student", "prompts"))
        preset = "none" if own_setup else "demo"
        if preset == "demo":
            logger.info("Preset 'demo' (the SmolLM2 CPU demo sizing); --preset none for the plain defaults")
    config = load_config(args.config, preset=preset, overrides=overrides)
    if args.resume:
        config = resumed_config(config.output_dir, overrides, overwrite=args.overwrite)
    metrics = run(config, overwrite=args.overwrite)
    if not process_state().is_main_process:  # one summary per run, not one per process
        return 0
    training = metrics.get("training", {})
    print(f"\nDistilled student: {Path(config.output_dir) / 'student'}")
    losses = " -> ".join(f"{x:.3f}" for x in training.get("mean_loss_per_round", []))
    print(f"Training: {training.get('steps')} optimizer steps; mean loss per round: {losses}")
    table = format_metrics(metrics)
    if table:
        print(table)
    answers = format_answers(Path(config.output_dir), quantized=config.model.student_quant != "none")
    if answers:
        print(answers)
    if training.get("export"):
        print(format_export(training["export"]))
    print(f"Wall time: {metrics.get('wall_seconds')} s; metrics: {Path(config.output_dir) / 'metrics.json'}")
    return 0


def resumed_config(output_dir: str, overrides: dict, *, overwrite: bool) -> RunConfig:
    """The config a run in `output_dir` was started with, for --resume; flags given with --resume must agree
    with it (a run cannot change its settings halfway)."""
    if overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite replaces it: pass one of them.")
    stored = Path(output_dir) / "config.yaml"
    if not stored.is_file():
        raise ConfigError(f"--resume: {output_dir} holds no distillm run to continue (no config.yaml). Check "
                          "--output-dir, or drop --resume to start a new run there.")
    config = load_config(stored, preset="none")
    config.output_dir = output_dir

    flat = config.flat()
    asked = apply_overrides(copy.deepcopy(config), {k: v for k, v in overrides.items() if k != "output_dir"},
                            where="command line").flat()
    clashes = [f"--{key.replace('_', '-')} {asked[key]} (the run has {flat[key]})" for key in flat
               if asked[key] != flat[key]]
    if clashes:
        raise ConfigError(f"--resume: {stored} was started with other settings: {'; '.join(clashes)}. Drop those "
                          "flags to continue it, or start a new run in another --output-dir.")
    return config


def _cmd_generate(args) -> int:
    # generate's flags mean what the config options of the same role mean: checked the same way, before loading
    check_flags(args, {"--seed": "generation_seed", "--temperature": "temperature", "--top-p": "top_p",
                       "--max-new-tokens": "max_new_tokens", "--batch-size": "generation_batch_size",
                       "--max-prompt-length": "max_prompt_length", "--num-prompts": "num_prompts", "--dtype": "dtype",
                       "--vllm-tensor-parallel-size": "vllm_tensor_parallel_size",
                       "--vllm-gpu-memory-utilization": "vllm_gpu_memory_utilization"})
    config = RunConfig()
    config.generation.backend = args.backend
    config.generation.generation_batch_size = args.batch_size
    config.generation.vllm_tensor_parallel_size = args.vllm_tensor_parallel_size
    config.generation.vllm_gpu_memory_utilization = args.vllm_gpu_memory_utilization
    config.model.dtype = args.dtype
    if is_vision_model(args.model, trust_remote_code=args.trust_remote_code):  # (image, prompt) rows
        model, processor = load_vision_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        tokenizer = processor.tokenizer
        records, report = load_image_prompts(args.prompts, image_field=args.image_field,
                                             prompt_field=args.prompt_field, messages_field=args.messages_field,
                                             limit=args.num_prompts)
        prompts = encode_image_prompts(records, processor, max_prompt_length=args.max_prompt_length,
                                       use_chat_template=not args.no_chat_template)
        n_truncated = 0
        backend = make_backend(config, model, tokenizer, model_dir=None, processor=processor)
    else:
        check_no_images(args.prompts, args.image_field, model=args.model)
        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)  # checked before the weights
        check_chat_template(tokenizer, not args.no_chat_template, model=args.model)
        model, tokenizer = models.load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                             tokenizer=tokenizer)
        records, report = load_prompts(args.prompts, prompt_field=args.prompt_field,
                                       messages_field=args.messages_field, limit=args.num_prompts)
        prompts, n_truncated = encode_prompts(records, tokenizer, max_prompt_length=args.max_prompt_length,
                                              use_chat_template=not args.no_chat_template)
        backend = make_backend(config, model, tokenizer, model_dir=loadable_path(args.model))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    rows = generate_responses(backend, prompts, args.output, params, tokenizer, desc=f"responses ({args.model})")
    print(f"{len(rows)} responses in {args.output} ({report.n_empty_skipped} empty prompts skipped, "
          f"{n_truncated} truncated)")
    return 0


def _cmd_align(args) -> int:
    config = load_config(args.config, overrides=_overrides(args, AlignConfig), config_cls=AlignConfig)
    metrics = align(config, overwrite=args.overwrite)
    first, last = metrics["first"], metrics["last"]
    print(f"\nAligned model: {Path(config.output_dir) / 'student'} ({metrics['pairs']} preference pairs, "
          f"{metrics['steps']} optimizer steps, {metrics['train_seconds']} s)")
    print(f"{'DPO (logged per step)':<28}{'first step':>12}{'last step':>12}")
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        if first.get(key) is not None and last.get(key) is not None:
            print(f"{key:<28}{first[key]:>12.4f}{last[key]:>12.4f}")
    print(f"Wall time: {metrics['wall_seconds']} s; metrics: {Path(config.output_dir) / 'metrics.json'}")
    return 0


# ----------------------------------------------------------------------------------------------- compare


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompareError(f"--seeds expects comma-separated integers (e.g. 0,1,2), got {text!r}.") from None


def _add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="Every method (and DistiLLM-2's ablation) on the same budget, over seeds, in one table.",
        description="Train every variant on the same teacher, student initialisation, prompts and budget, evaluate "
        "each on held-out prompts, and write results.md (mean ± std over seeds), results.json and charts to "
        "--output-dir. Rerun the same command to continue: finished cells are skipped.")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--size", default="full", choices=[k for k in SIZES if k != "tiny"] + ["tiny"],
                   help="full: a few hours on 2 CPU cores; long: every built-in training prompt and 8 rounds (about "
                   "6x full's steps); quick: the same protocol in < 30 min; tiny: tiny random models (tests).")
    p.add_argument("--quick", dest="size", action="store_const", const="quick", help="Same as --size quick.")
    p.add_argument("--teacher", default=CompareSettings.teacher)
    p.add_argument("--student-layers", default=CompareSettings.student_layers)
    p.add_argument("--student", default=None,
                   help="Every cell's starting student (a saved model directory, e.g. a SeqKD warm-up's "
                   "cells/seqkd/seed_0/run/student) instead of pruning the teacher to --student-layers; the "
                   "reference row 'initial' is then this student.")
    p.add_argument("--student-quant", default=CompareSettings.student_quant,
                   help="The quantized regime: the student is the teacher with fake-quantized linear weights (int4, "
                   "int3, ...), starting from round-to-nearest; none (default): the pruned student of "
                   "--student-layers.")
    p.add_argument("--student-quant-group-size", type=int, default=CompareSettings.student_quant_group_size)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="Comma-separated: methods (" + ", ".join(METHOD_NAMES) + ") and ablation variants ("
                   + ", ".join(ABLATIONS) + "). Default: all.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated training/generation seeds.")
    p.add_argument("--learning-rate", type=float, default=CompareSettings.learning_rate)
    p.add_argument("--report-only", action="store_true",
                   help="Write the results of the cells finished so far (e.g. while another process runs the rest).")
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="Keep the comparison's small records (shared prompts and teacher responses, the reference "
                   "evaluation, each finished cell's cell.json, generations and training log) in DIR too, and "
                   "restore what DIR holds into --output-dir first: a comparison moved to another machine continues "
                   "where it stopped. DIR can be committed (a few hundred kB per cell).")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint: adds the judge's win rate.")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-api-key-env", default=None, help="Environment variable holding the judge's API key.")


def _cmd_compare(args) -> int:
    settings = CompareSettings(
        output_dir=args.output_dir, size=args.size, teacher=args.teacher, student_layers=args.student_layers,
        student=args.student, student_quant=args.student_quant, student_quant_group_size=args.student_quant_group_size,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()], seeds=_int_list(args.seeds),
        learning_rate=args.learning_rate, judge_url=args.judge_url, judge_model=args.judge_model,
        judge_api_key_env=args.judge_api_key_env)
    command = "distillm " + " ".join(shlex.quote(a) for a in args.argv)
    if args.report_only:
        # the results show the command that runs the comparison, not this one
        saved = Path(settings.output_dir) / "command.txt"
        command = saved.read_text().strip() if saved.is_file() else None
    summary = Comparison(settings, command=command, archive=args.archive).run(report_only=args.report_only)
    out = Path(settings.output_dir)
    print((out / "results.md").read_text())
    print(f"Wall time of this invocation: {summary['wall_seconds_this_invocation']} s "
          f"({summary['cells_skipped']} finished cells skipped); results: {out / 'results.md'}")
    return 0


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `distillm` alone, or with only run's flags, runs the default demo: insert "run" after the global flags
    n_global = next((i for i, a in enumerate(argv) if a not in ("-q", "--quiet")), len(argv))
    rest = argv[n_global:]
    commands = ("run", "train", "generate", "eval", "compare", "align", "speculate", "-h", "--help")
    if not rest or rest[0] not in commands:
        argv = [*argv[:n_global], "run", *rest]
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    try:
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "align":
            return _cmd_align(args)
        if args.command == "speculate":
            return cmd_speculate(args)
        if args.command == "eval":
            args.argv = argv
            return cmd_eval(args)
        if args.command == "compare":
            args.argv = argv[argv.index("compare"):]
            return _cmd_compare(args)
        return _cmd_run(args, evaluate_default=args.command == "run")
    except DistillmError as err:
        print(f"distillm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or an unwritable place met outside distillm's own writers (e.g. a checkpoint)
        clear = disk_error(err.filename or "a file", err)
        if clear is None:
            raise
        print(f"distillm: error: {clear}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillm: interrupted; rerun the same command to continue where it stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
