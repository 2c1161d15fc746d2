"""`distillm run` for a teacher and a student with different tokenizers (`--cross-tokenizer auto`).

The same stages as `pipeline.driver`, with two tokenizers: prompts rendered per side, teacher responses generated
by the teacher with its own prompt format and carried over to the student's tokens (both kept, with the
alignment), training through `pipeline.train` with the `CrossCollator` and `CrossDistillTrainer`, and a
held-out evaluation before and after in the aligned space and on the text (`cross_evaluate`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .. import rundir
from ..config import RunConfig
from ..data.prompts import DataError, EncodedPrompt, encode_prompts, load_prompts
from ..distributed import process_state
from ..errors import DistillmError
from ..io import atomic_write_json, read_jsonl, write_jsonl
from ..methods import build_method
from ..models import add_lora, load_model, load_tokenizer, real_vocab_size, resolve_model_source
from ..crosstok.data import CrossSetup
from ..crosstok.losses import aligned_divergence, aligned_span_log_probs
from ..crosstok.trainer import teacher_scores
from ..crosstok.vocab import CrossTokenizerError, check_tokenizer, vocab_map
from ..evaluation.text import distinct_n
from ..generation.factory import generate_once, make_backend, release, sampling_params
from ..models import ModelPair, eval_mode
from ..training.fused_inputs import fused_inputs
from ..vision import uses_images
from .data import DataContext
from .modality import CrossModality
from .setup import check_context_length
from .training import check_step_plan, read_json_or_none, sharded_engine, train

logger = logging.getLogger("distillm")

#: methods that cannot work across tokenizers, and why
UNSUPPORTED = {
    "speculative-kd": "its joint decoding lets the teacher replace the student's proposed token by one of its own "
                      "top-k tokens, which needs one vocabulary",
    "step-by-step": "its rationale prompts are re-rendered with a task prefix on one tokenizer only (not wired for "
                    "two yet)",
}


def same_vocabulary(teacher_tok, student_tok) -> bool:
    if len(teacher_tok) != len(student_tok) or teacher_tok.eos_token_id != student_tok.eos_token_id:
        return False
    return teacher_tok.get_vocab() == student_tok.get_vocab()


def cross_tokenizers(config: RunConfig):
    """(teacher tokenizer, student tokenizer) when the run has a --student whose vocabulary differs from the
    teacher's and --cross-tokenizer is auto; None otherwise (the one-tokenizer pipeline, which refuses a
    differing pair under --cross-tokenizer off)."""
    m = config.model
    if not m.student or m.cross_tokenizer == "off":
        return None
    if uses_images(config):
        return None
    if resolve_model_source(m.teacher).kind == "tiny" and resolve_model_source(m.student).kind == "tiny":
        return None
    t_tok = load_tokenizer(m.teacher, trust_remote_code=m.trust_remote_code)
    s_tok = load_tokenizer(m.student, trust_remote_code=m.trust_remote_code)
    if same_vocabulary(t_tok, s_tok):
        return None
    logger.info("Teacher and student tokenizers differ (%d vs %d tokens): cross-tokenizer distillation "
                "(docs/cross-tokenizer.md)", len(t_tok), len(s_tok))
    return t_tok, s_tok


def check_supported(config: RunConfig, method_name: str) -> None:
    """Refuse, before any model is loaded, what cross-tokenizer runs do not support, saying why."""
    m, t, g, d = config.model, config.training, config.generation, config.data
    why = UNSUPPORTED.get(method_name)
    if why:
        raise CrossTokenizerError(f"--method {method_name} cannot run with a teacher and a student that have different "
                                  f"tokenizers: {why}. Use distillm2, kd, gkd, imitkd, minillm, distillm, dpkd or "
                                  "seqkd, or a student sharing the teacher's tokenizer.")
    checks = [
        (m.student_quant != "none", "--student-quant (a quantized copy of the teacher shares its tokenizer anyway)"),
        (m.load_in_4bit, "--load-in-4bit"),
        (t.teacher_cache != "off", "--teacher-cache (its rows are keyed by the student's tokens; the teacher reads "
                                   "its own)"),
        (bool(d.teacher_responses), "--teacher-responses (the teacher's responses are generated in the run, in the "
                                    "teacher's tokens)"),
        (g.backend == "vllm", "--backend vllm (generation uses transformers in cross-tokenizer runs)"),
    ]
    for bad, what in checks:
        if bad:
            raise CrossTokenizerError(f"{what} is not supported when the teacher and the student have different "
                                      "tokenizers; drop it, or use --cross-tokenizer off with a student that shares "
                                      "the teacher's tokenizer.")


def side_prompts(config: RunConfig, tokenizer, which: str, who: str) -> list[EncodedPrompt]:
    """The prompts as `who` sees them: its chat template when it has one (and --chat-template), else the plain
    text after its own special prefix (a base model, docs/base-models.md)."""
    d = config.data
    path, limit = (d.prompts, d.num_prompts) if which == "train" else (d.eval_prompts, d.num_eval_prompts)
    records, _ = load_prompts(path, prompt_field=d.prompt_field, messages_field=d.messages_field,
                              response_field=d.response_field, id_field=d.id_field, system_prompt=d.system_prompt,
                              limit=limit)
    use_template = d.chat_template and getattr(tokenizer, "chat_template", None) is not None
    if d.chat_template and not use_template:
        logger.warning("The %s's tokenizer has no chat template (a base model): its prompts are the plain message "
                       "text after its special prefix", who)
    encoded, _ = encode_prompts(records, tokenizer, max_prompt_length=d.max_prompt_length,
                                use_chat_template=use_template)
    return encoded


def build_setup(config: RunConfig, t_tok, s_tok) -> CrossSetup:
    check_tokenizer(t_tok, "teacher")
    check_tokenizer(s_tok, "student")
    vm = vocab_map(t_tok, s_tok)
    logger.info("Shared vocabulary: %d tokens (teacher %d, student %d)", vm.teacher_ids.numel(), vm.teacher_size,
                vm.student_size)
    return CrossSetup(t_tok, s_tok, vm, uld_weight=config.loss.uld_weight)


def paired_prompts(config, setup: CrossSetup, which: str) -> tuple[list[EncodedPrompt], dict[str, EncodedPrompt]]:
    """Student prompts (the rows') and the teacher's rendering of each, by id; registered in the setup."""
    student = side_prompts(config, setup.student_tok, which, "student")
    teacher = {p.id: p for p in side_prompts(config, setup.teacher_tok, which, "teacher")}
    student = [p for p in student if p.id in teacher]
    for p in student:
        setup.teacher_prompts[tuple(p.input_ids)] = list(teacher[p.id].input_ids)
    return student, teacher


def _make_context(config, setup, student_prompts, teacher_prompts, paths, backend):
    class CrossDataContext(DataContext):
        """DataContext in the student's tokens, whose teacher responses come from the teacher's own prompts."""

        def teacher_generate(self, prompts, filename, desc):
            teacher_side = [teacher_prompts[p.id] for p in prompts]
            rows = generate_once(self.backend, teacher_side, self.paths.root / "data" / filename,
                                 sampling_params(self.config), setup.teacher_tok, desc=desc)
            by_id = {p.id: p for p in prompts}
            out = [setup.student_row(row, by_id[row["id"]]) for row in rows]
            cross_file = self.paths.root / "data" / (Path(filename).stem + ".cross.jsonl")
            if process_state().is_main_process:
                write_jsonl(cross_file, out)  # text + both sides' ids + the byte alignment, per row
            return out

        def encode(self, transform):
            raise CrossTokenizerError("This method re-renders the prompts, which cross-tokenizer runs do not do yet.")

    return CrossDataContext(config, setup.student_tok, student_prompts, paths, backend)


def run_cross(config: RunConfig, paths, started: float, t_tok, s_tok) -> dict:

    state = process_state()
    if sharded_engine():
        raise CrossTokenizerError("Cross-tokenizer runs are not supported under FSDP / DeepSpeed ZeRO-3 yet; run in "
                                  "one process or with DDP.")
    check_supported(config, config.method.method)
    if config.training.teacher_url:
        raise CrossTokenizerError("--teacher-url is not supported across tokenizers yet: the server's top-k scores "
                                  "are in the teacher's vocabulary; run the teacher locally.")
    setup = build_setup(config, t_tok, s_tok)
    evaluating = bool(config.evaluation.evaluate and config.data.eval_prompts)
    train_prompts, train_teacher = paired_prompts(config, setup, "train")
    if not train_prompts:
        raise DataError(f"No training prompt could be rendered for both models from {config.data.prompts}.")
    check_step_plan(config, len(train_prompts), state.num_processes)
    eval_prompts, eval_teacher = paired_prompts(config, setup, "eval") if evaluating else ([], {})
    inputs = {**rundir.file_digests(config), "train_encoded": rundir.encoded_digest(train_prompts),
              "eval_encoded": rundir.encoded_digest(eval_prompts) if evaluating else None,
              "teacher_train_encoded": rundir.encoded_digest(list(train_teacher.values()))}
    rundir.check_inputs(paths.root, config, inputs, keys=("train_encoded", "eval_encoded", "teacher_train_encoded"))
    if state.is_main_process:
        rundir.record_inputs(paths.root, inputs)

    m = config.model
    device = state.device
    teacher, _ = load_model(m.teacher, dtype=m.dtype, trust_remote_code=m.trust_remote_code, tokenizer=t_tok)
    student, _ = load_model(m.student, dtype="float32", trust_remote_code=m.trust_remote_code, tokenizer=s_tok)
    check_context_length(config, teacher=teacher, student=student)
    teacher, student = teacher.to(device), student.to(device)
    if m.lora:
        student = add_lora(student, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           target_modules=m.lora_target_modules,
                           gradient_checkpointing=config.training.gradient_checkpointing)
    models = ModelPair(teacher, student, s_tok, real_vocab_size(s_tok), None, cross=setup)
    method = build_method(config)
    backend = make_backend(config, teacher, t_tok, model_dir=None)
    try:
        ctx = _make_context(config, setup, train_prompts, train_teacher, paths, backend)
        rows = method.build_rows(ctx)
        teacher_eval = []
        if evaluating:
            ctx_eval = _make_context(config, setup, eval_prompts, eval_teacher, paths, backend)
            raw = generate_once(backend, [eval_teacher[p.id] for p in eval_prompts], paths.teacher_eval,
                                sampling_params(config, seed_offset=99), t_tok, desc="teacher responses (held-out)")
            by_id = {p.id: p for p in eval_prompts}
            teacher_eval = [setup.student_row(row, by_id[row["id"]]) for row in raw]
            del ctx_eval
    finally:
        release(backend)
    metrics: dict = {"method": method.name, "teacher": m.teacher, "student": m.student, "cross_tokenizer": {
        "teacher_vocab": setup.vmap.teacher_size, "student_vocab": setup.vmap.student_size,
        "shared_vocab": int(setup.vmap.teacher_ids.numel())},
        "num_train_prompts": len(train_prompts), "num_eval_prompts": len(eval_prompts)}
    if evaluating:
        before_file = paths.root / "eval" / "before.json"
        before = read_json_or_none(before_file)
        if before is None:
            before = cross_evaluate(config, models, eval_prompts, teacher_eval, paths, "before")
            atomic_write_json(before_file, before)
        metrics["before"] = before
    validation = teacher_eval or (rows[:32] if method.uses_validation else [])
    metrics["training"] = train(config, models, method, rows, paths, train_prompts=train_prompts,
                                validation_rows=validation, modality=CrossModality())
    if evaluating:
        metrics["after"] = cross_evaluate(config, models, eval_prompts, teacher_eval, paths, "after")
    metrics["wall_seconds"] = round(time.time() - started, 1)
    metrics["complete"] = True
    if state.is_main_process:
        atomic_write_json(paths.metrics, metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- evaluation

#: the before/after table of a cross-tokenizer run (cli.format_metrics): key, label, which way is better
CROSS_METRIC_ROWS = [
    ("aligned_fkl_1to1", "aligned KL(p||q) on teacher responses, 1:1 spans", "lower"),
    ("aligned_uld_merged", "ULD on merged spans of teacher responses", "lower"),
    ("student_nll_per_byte", "student NLL/byte of teacher responses", "lower"),
    ("teacher_nll_per_byte_of_student_samples", "teacher NLL/byte of student samples", "lower"),
]


def flat_metrics(result: dict) -> dict:
    return {**result, **result.get("on_teacher_responses", {})}



@torch.no_grad()
def aligned_scores(teacher, student, setup: CrossSetup, rows: list[dict], *, max_length: int,
                   batch_size: int = 8) -> dict[str, float]:
    """Held-out figures of the student against the teacher on `rows` (prompt_ids + response_ids, student side):
    the aligned forward KL (shared vocabulary + ULD, per 1:1 group) and the merged-span ULD (per merged group),
    both means over groups; and the log-probability per byte of the responses' text under each model (nats)."""

    collate = setup.collator(max_length, lambda r: [(r["prompt_ids"], r["response_ids"])])
    sums = {"one": 0.0, "n_one": 0, "merged": 0.0, "n_merged": 0, "t_lp": 0.0, "s_lp": 0.0, "bytes": 0}
    device = next(student.parameters()).device
    with eval_mode(teacher, student):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            cross = teacher_scores(teacher, batch, setup)
            out = fused_inputs(student, batch)
            values = aligned_divergence("fkl", out.head, cross.scores, out.labels, cross.targets, cross.groups,
                                        cross.vmap, uld_weight=setup.uld_weight, merge_weight=setup.uld_weight)
            g = cross.groups
            at = values[g.row, g.s_start]
            sums["one"] += float(at[g.one_to_one].sum())
            sums["n_one"] += int(g.one_to_one.sum())
            sums["merged"] += float(at[~g.one_to_one].sum())
            sums["n_merged"] += int((~g.one_to_one).sum())
            sums["t_lp"] += float(aligned_span_log_probs(cross.scores, cross.targets, g, "teacher", out.labels.shape,
                                                         vocab_size=setup.vmap.teacher_size).sum())
            sums["s_lp"] += float(aligned_span_log_probs(out.head, out.labels, g, "student", out.labels.shape,
                                                         vocab_size=setup.vmap.student_size).sum())
            sums["bytes"] += sum(len(setup.text_of(setup.student_tok, r["response_ids"])[0].encode()) for r in chunk)
    return {"aligned_fkl_1to1": sums["one"] / max(sums["n_one"], 1),
            "aligned_uld_merged": sums["merged"] / max(sums["n_merged"], 1),
            "one_to_one_fraction": sums["n_one"] / max(sums["n_one"] + sums["n_merged"], 1),
            "teacher_nll_per_byte": -sums["t_lp"] / max(sums["bytes"], 1),
            "student_nll_per_byte": -sums["s_lp"] / max(sums["bytes"], 1)}


def cross_evaluate(config: RunConfig, models, eval_prompts, teacher_eval_rows, paths, tag: str) -> dict:
    """Before/after figures: on the teacher's held-out responses, the aligned divergences and the student's NLL
    per byte; on the student's own samples, the teacher's NLL per byte of their text (re-tokenized); distinct-2."""
    start = time.time()
    setup = models.cross
    backend = make_backend(config, models.student, setup.student_tok, model_dir=None)
    samples = generate_once(backend, eval_prompts, paths.eval_samples(tag),
                            sampling_params(config, seed_offset=7_777,
                                            max_new_tokens=config.evaluation.eval_max_new_tokens),
                            setup.student_tok, desc=f"student samples ({tag})")
    max_length = config.data.max_length
    on_teacher = aligned_scores(models.teacher, models.student, setup, teacher_eval_rows, max_length=max_length)
    on_student = aligned_scores(models.teacher, models.student, setup, samples, max_length=max_length)
    result = {"on_teacher_responses": on_teacher,
              "teacher_nll_per_byte_of_student_samples": on_student["teacher_nll_per_byte"],
              "distinct_2": distinct_n([row["response"] for row in samples]),
              "teacher_distinct_2": distinct_n([row["response"] for row in teacher_eval_rows]),
              "seconds": round(time.time() - start, 1)}
    return result
