"""`distillm speculate`: a student as the draft model of its teacher in speculative decoding.

For a teacher and one or more drafts (typically a run's initial pruned student and its distilled student) it
measures, on held-out prompts:

- the expected acceptance rate 1 - TVD(teacher, draft), token-averaged over the teacher's own responses
  (the acceptance rate of speculative *sampling* at temperature 1), and the top-1 agreement (how often the
  draft's most likely token is the teacher's, the acceptance rate of *greedy* speculative decoding);
- with transformers' assisted generation (`teacher.generate(..., assistant_model=draft)`): the measured
  per-token acceptance rate (accepted / (accepted + rejected) draft tokens; tokens after a rejection are
  discarded unchecked), the share of proposed tokens accepted, the new tokens per teacher forward call, whether the
  output equals plain teacher decoding, and the wall-clock speed-up over plain teacher decoding.

Plain and assisted decoding run prompt by prompt, interleaved (plain, draft 1, draft 2, ... for each prompt),
so a machine whose load changes affects every variant alike. Assisted generation decodes one sequence at a time
(transformers supports batch size 1 only), so every variant here runs at batch size 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation.candidate_generator import AssistedCandidateGenerator

from .errors import DistillmError
from . import models  # models.load_model looked up at call time (tests replace it)
from .io import atomic_write_json, atomic_write_text
from .config import check_flags
from .data.prompts import check_chat_template, encode_prompts, load_prompts
from .evaluation.cli import run_dir_models, run_uses_chat_template
from .evaluation.divergence import scoring_batches, teacher_student_divergence
from .evaluation.suite import EvalError
from .training.collate import IGNORE, response_logits

logger = logging.getLogger("distillm")


class SpeculateError(DistillmError):
    """Bad `distillm speculate` inputs; the message names the option and how to fix it."""


@dataclass
class DraftStats:
    """What assisted decoding with one draft did, summed over prompts."""

    new_tokens: int = 0
    teacher_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0
    seconds: float = 0.0
    identical: int = 0
    prompts: int = 0

    def summary(self, plain_seconds: float) -> dict:
        return {
            "measured_acceptance_rate": self.accepted / max(self.accepted + self.rejections, 1),
            "accepted_of_proposed": self.accepted / max(self.proposed, 1),
            "tokens_per_teacher_call": self.new_tokens / max(self.teacher_calls, 1),
            "teacher_calls": self.teacher_calls, "new_tokens": self.new_tokens, "proposed": self.proposed,
            "accepted": self.accepted, "rejections": self.rejections, "seconds": round(self.seconds, 2),
            "tokens_per_second": self.new_tokens / max(self.seconds, 1e-9),
            "speedup": plain_seconds / max(self.seconds, 1e-9),
            "identical_to_plain": f"{self.identical}/{self.prompts}",
        }


@dataclass
class _Counter:
    calls: int = 0
    proposals: list[int] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)


@contextlib.contextmanager
def count_calls(model: torch.nn.Module):
    """Count the forward calls of `model` (each is one pass over the batch, however many tokens it scores)."""
    counter = _Counter()

    def hook(module, args, kwargs):
        counter.calls += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextlib.contextmanager
def count_proposals(counter: _Counter):
    """Record, per teacher call, how many tokens the assistant proposed and how many the teacher accepted, from
    the two methods of transformers' candidate-generator interface that assisted decoding calls once per step:
    `get_candidates` (its output length) and `update_candidate_strategy` (its `num_matches`)."""
    original_get, original_update = (AssistedCandidateGenerator.get_candidates,
                                     AssistedCandidateGenerator.update_candidate_strategy)

    def get_candidates(self, input_ids, *args, **kwargs):
        candidate_ids, candidate_logits = original_get(self, input_ids, *args, **kwargs)
        counter.proposals.append(int(candidate_ids.shape[1] - input_ids.shape[1]))
        return candidate_ids, candidate_logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        counter.matches.append(int(num_matches))
        return original_update(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.get_candidates = get_candidates
    AssistedCandidateGenerator.update_candidate_strategy = update_candidate_strategy
    try:
        yield counter
    finally:
        AssistedCandidateGenerator.get_candidates = original_get
        AssistedCandidateGenerator.update_candidate_strategy = original_update


@contextlib.contextmanager
def draft_settings(draft, num_assistant_tokens: int, schedule: str):
    """The classic algorithm by default: a fixed number of draft tokens per step, no confidence early stop."""
    config = draft.generation_config
    saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule,
             getattr(config, "assistant_confidence_threshold", None))
    config.num_assistant_tokens = num_assistant_tokens
    config.num_assistant_tokens_schedule = schedule
    config.assistant_confidence_threshold = 0.0 if schedule == "constant" else saved[2]
    try:
        yield
    finally:
        config.num_assistant_tokens, config.num_assistant_tokens_schedule, config.assistant_confidence_threshold = saved


def _generate(model, ids: torch.Tensor, tokenizer, max_new_tokens: int, temperature: float, seed: int, **extra):
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  attention_mask=torch.ones_like(ids))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kwargs, **extra)
    return out[0, ids.shape[1]:], time.perf_counter() - start


def assisted_generate(teacher, draft, ids: torch.Tensor, tokenizer, *, max_new_tokens: int, temperature: float = 0.0,
                      seed: int = 0, num_assistant_tokens: int = 5, schedule: str = "constant"):
    """One assisted generation; returns (new token ids, seconds, teacher forward calls, proposed, accepted,
    rejections). A rejection is a teacher call that turned down one of the proposed tokens (the tokens after it
    are discarded unchecked), so accepted / (accepted + rejections) estimates the per-token acceptance rate,
    the quantity 1 - TVD (sampling) or the top-1 agreement (greedy) predicts."""
    counter = _Counter()
    with draft_settings(draft, num_assistant_tokens, schedule), count_calls(teacher) as calls, \
            count_proposals(counter):
        tokens, seconds = _generate(teacher, ids, tokenizer, max_new_tokens, temperature, seed, assistant_model=draft)
    if len(counter.matches) != len(counter.proposals):
        raise SpeculateError("transformers' assisted decoding did not report one match count per proposal; this "
                             "version's candidate generator is not supported by `distillm speculate`.")
    accepted = sum(counter.matches)
    rejections = sum(m < p for m, p in zip(counter.matches, counter.proposals))
    return tokens, seconds, calls.calls, sum(counter.proposals), accepted, rejections


@torch.inference_mode()
def top1_agreement(teacher, draft, rows: list[dict], *, vocab_size: int, pad_token_id: int, max_length: int,
                   batch_size: int = 8) -> float:
    """How often the draft's argmax equals the teacher's, over the response tokens of `rows`."""
    agree, count = 0, 0
    for batch in scoring_batches(rows, batch_size, max_length, pad_token_id, teacher.device):
        p_logits, targets = response_logits(teacher, batch, vocab_size)
        q_logits, _ = response_logits(draft, batch, vocab_size)
        mask = targets != IGNORE
        agree += int(((p_logits.argmax(-1) == q_logits.argmax(-1)) & mask).sum().item())
        count += int(mask.sum().item())
    return agree / max(count, 1)


def expected_tokens_per_call(acceptance: float, k: int) -> float:
    """Expected new tokens per teacher call with k draft tokens and an i.i.d. per-token acceptance rate."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


@dataclass
class DraftSpec:
    name: str
    source: str
    layers: str | None = None


def _load(spec: DraftSpec, dtype: str, cache: dict, tokenizer=None):
    if spec.source not in cache:
        cache[spec.source] = models.load_model(spec.source, dtype=dtype, tokenizer=tokenizer)
    model, tokenizer = cache[spec.source]
    if spec.layers:
        model = models.prune_layers(model, spec.layers)
    return model.eval(), tokenizer


def speculate(teacher_source: str, drafts: list[DraftSpec], *, prompts: str = "builtin:eval", num_prompts: int = 16,
              max_new_tokens: int = 64, max_prompt_length: int = 256, temperature: float = 0.0, seed: int = 0,
              num_assistant_tokens: int = 5, schedule: str = "constant", dtype: str = "auto",
              output_dir: str | Path | None = None, chat_template: bool = True) -> dict:
    """Measure every draft against the teacher (see the module docstring); writes results.json and report.md.
    `chat_template=False`: the plain prompt text (base models)."""
    if not drafts:
        raise SpeculateError("No draft model: give --draft NAME=SPEC (repeatable) or --run DIR.")
    if num_assistant_tokens < 1 or max_new_tokens < 1:
        raise SpeculateError("--num-assistant-tokens and --max-new-tokens must be >= 1.")
    start = time.time()
    cache: dict = {}
    tokenizer = models.load_tokenizer(teacher_source)  # alone, to check the prompt format before any weights are read
    check_chat_template(tokenizer, chat_template, model=teacher_source)
    records, _ = load_prompts(prompts, limit=num_prompts)
    teacher, tokenizer = _load(DraftSpec("teacher", teacher_source), dtype, cache, tokenizer)
    loaded = {}
    for spec in drafts:
        model, draft_tokenizer = _load(spec, dtype, cache)
        try:
            models.check_same_tokenizer(tokenizer, draft_tokenizer)
        except DistillmError as err:
            raise SpeculateError(f"Draft '{spec.name}' ({spec.source}) cannot draft for the teacher "
                                 f"({teacher_source}): {err}") from None
        loaded[spec.name] = model
    encoded, _ = encode_prompts(records, tokenizer, max_prompt_length=max_prompt_length,
                                use_chat_template=chat_template)

    plain_seconds, plain_tokens = 0.0, 0
    stats = {name: DraftStats() for name in loaded}
    rows = []
    # warm-up (not timed): the first generate of each model pays one-off costs
    warm = torch.tensor([encoded[0].input_ids])
    _generate(teacher, warm, tokenizer, 4, temperature, seed)
    for model in loaded.values():
        assisted_generate(teacher, model, warm, tokenizer, max_new_tokens=4, temperature=temperature,
                          num_assistant_tokens=num_assistant_tokens, schedule=schedule)
    for i, prompt in enumerate(tqdm(encoded, desc="plain vs assisted decoding", unit="prompt")):
        ids = torch.tensor([prompt.input_ids], device=teacher.device)
        plain, seconds = _generate(teacher, ids, tokenizer, max_new_tokens, temperature, seed + i)
        plain_seconds += seconds
        plain_tokens += len(plain)
        rows.append({"id": prompt.id, "prompt_ids": prompt.input_ids, "response_ids": plain.tolist()})
        for name, model in loaded.items():
            tokens, seconds, calls, proposed, accepted, rejections = assisted_generate(
                teacher, model, ids, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                seed=seed + i, num_assistant_tokens=num_assistant_tokens, schedule=schedule)
            s = stats[name]
            s.new_tokens += len(tokens)
            s.teacher_calls += calls
            s.proposed += proposed
            s.accepted += accepted
            s.rejections += rejections
            s.seconds += seconds
            s.prompts += 1
            s.identical += int(torch.equal(tokens, plain))

    vocab = models.real_vocab_size(tokenizer)
    max_length = max_prompt_length + max_new_tokens
    results = {"teacher": teacher_source, "prompts": prompts, "num_prompts": len(encoded),
               "chat_template": chat_template,
               "max_new_tokens": max_new_tokens, "temperature": temperature,
               "num_assistant_tokens": num_assistant_tokens, "schedule": schedule,
               "plain": {"new_tokens": plain_tokens, "seconds": round(plain_seconds, 2),
                         "tokens_per_second": plain_tokens / max(plain_seconds, 1e-9)},
               "drafts": {}}
    for spec in drafts:
        model = loaded[spec.name]
        div = teacher_student_divergence(teacher, model, rows, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                         max_length=max_length, desc=f"divergence ({spec.name})")
        agree = top1_agreement(teacher, model, rows, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                               max_length=max_length)
        predictor = agree if temperature == 0 else div["acceptance_rate"]
        results["drafts"][spec.name] = {
            "source": spec.source, "layers": spec.layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "expected_acceptance_rate": div["acceptance_rate"], "top1_agreement": agree, "kl": div["kl"],
            "predicted_tokens_per_teacher_call": expected_tokens_per_call(predictor, num_assistant_tokens),
            **stats[spec.name].summary(plain_seconds),
        }
        if temperature > 0:  # sampled outputs differ from the plain run's sample by design
            results["drafts"][spec.name]["identical_to_plain"] = "n/a"
    results["wall_seconds"] = round(time.time() - start, 1)
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "report.md", format_table(results) + "\n")
    return results


COLUMNS = [
    ("expected_acceptance_rate", "expected acceptance (1 - TVD)", "{:.3f}"),
    ("top1_agreement", "top-1 agreement", "{:.3f}"),
    ("measured_acceptance_rate", "measured acceptance", "{:.3f}"),
    ("accepted_of_proposed", "accepted / proposed", "{:.3f}"),
    ("tokens_per_teacher_call", "tokens / teacher call", "{:.2f}"),
    ("predicted_tokens_per_teacher_call", "predicted tokens / call", "{:.2f}"),
    ("tokens_per_second", "tokens/s", "{:.1f}"),
    ("speedup", "speed-up vs plain", "{:.2f}x"),
    ("identical_to_plain", "same output as plain", "{}"),
]


def format_table(results: dict) -> str:
    """A markdown table: one row for plain teacher decoding, one per draft."""
    header = "| draft | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [header, "| --- |" + " ---: |" * len(COLUMNS)]
    plain = results["plain"]
    lines.append("| none (plain teacher decoding) | " + " | ".join(
        f"{plain['tokens_per_second']:.1f}" if key == "tokens_per_second" else "1.00x" if key == "speedup"
        else "1.00" if key == "tokens_per_teacher_call" else "" for key, _, _ in COLUMNS) + " |")
    for name, d in results["drafts"].items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(d[key]) for key, _, fmt in COLUMNS) + " |")
    mode = "greedy" if results["temperature"] == 0 else f"sampling at temperature {results['temperature']}"
    lines.append("")
    lines.append(f"{results['num_prompts']} prompts from {results['prompts']}, up to {results['max_new_tokens']} new "
                 f"tokens, {mode}, {results['num_assistant_tokens']} draft tokens per step "
                 f"({results['schedule']} schedule), batch size 1; plain decoding: {plain['new_tokens']} tokens in "
                 f"{plain['seconds']} s.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line


def add_speculate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "speculate", help="A student as speculative-decoding draft for its teacher: acceptance and speed-up.",
        description="Measure drafts for a teacher: expected acceptance (1 - TVD) and top-1 agreement on the "
        "teacher's responses, and with transformers' assisted generation the measured acceptance rate, tokens per "
        "teacher call and wall-clock speed-up over plain teacher decoding. --run DIR measures a run's initial "
        "(pruned) student and its distilled student, i.e. before and after distillation.")
    p.add_argument("--teacher", help="The target model (default: the teacher of --run).")
    p.add_argument("--run", metavar="DIR", help="A `distillm run` directory: drafts NAME-initial (before) and NAME "
                   "(after distillation).")
    p.add_argument("--draft", action="append", default=[], metavar="NAME=SPEC",
                   help="A draft model (repeatable): alias, local directory, .gguf file or Hub id.")
    p.add_argument("--prompts", default="builtin:eval", help="Held-out prompts (same formats as `distillm run`).")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--no-chat-template", action="store_true", help="Feed the plain prompt text (base models, whose "
                   "tokenizer has no chat template). With --run: taken from the run's config unless given.")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0: speculative sampling.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-assistant-tokens", type=int, default=5, help="Draft tokens proposed per teacher call.")
    p.add_argument("--schedule", default="constant", choices=["constant", "heuristic", "heuristic_transient"],
                   help="transformers' num_assistant_tokens_schedule (default constant: the classic algorithm).")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--output-dir", default="runs/speculate", help="Where results.json and report.md go.")
    return p


def drafts_from_args(args) -> tuple[str, list[DraftSpec]]:
    drafts: list[DraftSpec] = []
    teacher = args.teacher
    if args.run:
        try:
            specs, run_teacher = run_dir_models(args.run, with_initial=True)
        except EvalError as err:
            raise SpeculateError(str(err)) from None
        teacher = teacher or run_teacher
        for spec in reversed(specs):  # initial (before) first, then the distilled student (after)
            drafts.append(DraftSpec(spec.name, spec.source, spec.layers))
    for value in args.draft:
        name, sep, source = value.partition("=")
        if not sep or not name or not source:
            raise SpeculateError(f"--draft {value!r}: give it as NAME=SPEC, e.g. --draft student=runs/demo/distillm2/student.")
        drafts.append(DraftSpec(name, source))
    if not teacher:
        raise SpeculateError("No teacher: give --teacher SPEC, or --run DIR to use the run's teacher.")
    names = [d.name for d in drafts]
    if len(set(names)) != len(names):
        raise SpeculateError(f"Draft names must be unique, got {', '.join(names)}.")
    return teacher, drafts


def chat_template_from_args(args) -> bool:
    """False with --no-chat-template, or when the --run was made without the chat template."""
    if args.no_chat_template or not args.run:
        return not args.no_chat_template
    try:
        return run_uses_chat_template(args.run)
    except EvalError as err:
        raise SpeculateError(str(err)) from None


def cmd_speculate(args) -> int:
    check_flags(args, {"--seed": "generation_seed", "--temperature": "temperature", "--num-prompts": "num_prompts",
                       "--max-new-tokens": "max_new_tokens", "--max-prompt-length": "max_prompt_length",
                       "--dtype": "dtype"})  # each flag has the range of the config option of the same role
    teacher, drafts = drafts_from_args(args)
    results = speculate(teacher, drafts, prompts=args.prompts, num_prompts=args.num_prompts,
                        chat_template=chat_template_from_args(args),
                        max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                        temperature=args.temperature, seed=args.seed, num_assistant_tokens=args.num_assistant_tokens,
                        schedule=args.schedule, dtype=args.dtype, output_dir=args.output_dir)
    print()
    print(format_table(results))
    out = Path(args.output_dir)
    print(f"\nResults: {out / 'results.json'}, {out / 'report.md'}; wall time {results['wall_seconds']} s")
    return 0
