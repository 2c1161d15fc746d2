"""Cross-tokenizer wiring: the collator's two sides and alignment columns, the method losses through
`methods.base` equal the one-tokenizer losses when both tokenizers are the same, refusals with reasons, and
`distillm run` end to end on two tiny models with different tokenizers."""

from __future__ import annotations

import json
import re

import pytest
import torch

from distillm import cli
from distillm.crosstok.data import CrossSetup, groups_from_batch, teacher_batch
from distillm.crosstok.losses import CrossTeacher
from distillm.crosstok.testing import build_merged_tokenizer, save_tiny_pair_student
from distillm.crosstok.trainer import teacher_scores
from distillm.crosstok.vocab import CrossTokenizerError, vocab_map
from distillm.errors import DistillmError
from distillm.training.fused_inputs import fused_inputs
from distillm.methods.base import LossInputs, divergence_loss, token_log_probs
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer
from distillm.training.collate import DistillCollator, pair_sequences
from tolerances import model_atol, sum_atol, tiny_student_config


def _setup(teacher_tok, student_tok):
    return CrossSetup(teacher_tok, student_tok, vocab_map(teacher_tok, student_tok))


def _rows(tok, texts, prompt="Say something."):
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    return [{"id": str(i), "prompt_ids": prompt_ids,
             "chosen_ids": tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id],
             "rejected_ids": tok(t[::-1], add_special_tokens=False).input_ids + [tok.eos_token_id]}
            for i, t in enumerate(texts)]


TEXTS = ["the cat sat on the mat", "Hello there, café", "in order to test"]


def test_collator_columns_point_at_aligned_tokens():
    t_tok, s_tok = build_tiny_tokenizer(), build_merged_tokenizer()
    setup = _setup(t_tok, s_tok)
    rows = _rows(s_tok, TEXTS)
    for r in rows:  # the teacher's side of each prompt
        setup.teacher_prompts[tuple(r["prompt_ids"])] = t_tok("Say something.", add_special_tokens=False).input_ids
    batch = setup.collator(128, pair_sequences)(rows)
    g = groups_from_batch(batch)
    s_labels = batch["labels"][:, -int((batch["labels"] != -100).sum(-1).max()):]
    t_lab = batch["teacher_labels"]
    t_labels = t_lab[:, -int((t_lab != -100).sum(-1).max()):]
    for k in range(g.row.numel()):
        row = int(g.row[k])
        s_span = s_labels[row, g.s_start[k]:g.s_end[k]].tolist()
        t_span = t_labels[row, g.t_start[k]:g.t_end[k]].tolist()
        assert -100 not in s_span and -100 not in t_span
        if s_span == [s_tok.eos_token_id]:
            assert t_span == [t_tok.eos_token_id]
        else:  # the two spans spell the same bytes
            assert s_tok.decode(s_span) == t_tok.decode(t_span)
    # every response token of every sequence is in exactly one group (the texts are valid UTF-8)
    assert int((g.s_end - g.s_start).sum()) == int((batch["labels"] != -100).sum())
    assert int((g.t_end - g.t_start).sum()) == int((t_lab != -100).sum())


@pytest.mark.parametrize("name,weight", [("fkl", None), ("skl", 0.1), ("srkl", 0.2)])
def test_method_losses_equal_one_tokenizer_losses_for_the_same_tokenizer(name, weight):
    """Both sides the tiny tokenizer: divergence_loss and token_log_probs through a CrossTeacher give the plain
    fused losses (values and student gradients)."""
    tok = build_tiny_tokenizer()
    setup = _setup(tok, tok)
    rows = _rows(tok, TEXTS)
    for r in rows:
        setup.teacher_prompts[tuple(r["prompt_ids"])] = r["prompt_ids"]
    teacher, student = build_tiny_model(tok, seed=0), build_tiny_model(tok, num_layers=2, seed=1)
    cross_batch = setup.collator(128, pair_sequences)(rows)
    batch = DistillCollator(tok.pad_token_id, 128, pair_sequences)(rows)
    assert torch.equal(cross_batch["input_ids"], batch["input_ids"])
    assert torch.equal(teacher_batch(cross_batch)["input_ids"], batch["input_ids"])
    s_out = fused_inputs(student, batch)
    with torch.no_grad():
        t_plain = fused_inputs(teacher, batch).head
    cross = teacher_scores(teacher, cross_batch, setup)
    assert isinstance(cross, CrossTeacher)
    counts = torch.tensor([3.0, 1.0, 1.0, 3.0, 3.0, 3.0])
    n = 3
    w = torch.rand(s_out.labels[:n].shape, generator=torch.Generator().manual_seed(0))
    results = []
    for teacher_scores_ in (t_plain, cross):
        inputs = LossInputs(s_out.head, teacher_scores_, s_out.labels, n, counts, vocab_size=len(tok))
        loss, values = divergence_loss(inputs, name, slice(0, n), w * inputs.mask[:n], weight=weight)
        grad = torch.autograd.grad(loss, s_out.head.hidden, retain_graph=True)[0]
        seq = token_log_probs(inputs, "teacher", slice(n, 2 * n)).sum(-1)
        results.append((loss.detach(), values, grad, seq))
    (l1, v1, g1, s1), (l2, v2, g2, s2) = results
    tol = sum_atol(len(tok), 10.0)
    assert torch.allclose(v1, v2, atol=tol) and torch.allclose(l1, l2, atol=tol * 10)
    assert torch.allclose(g1, g2, atol=tol * 10)
    # sequence log-probs: per token vs per aligned span, the same sums (the chain rule)
    assert torch.allclose(s1.detach(), s2.detach(), atol=sum_atol(40, 200.0))


@pytest.fixture(scope="module")
def pair_student(tmp_path_factory):
    return save_tiny_pair_student(tmp_path_factory.mktemp("merged_student"))


def _run(tmp_path, student, *extra):
    args = ["-q", "run", "--preset", "tiny", "--student", student, "--output-dir", str(tmp_path / "run"),
            "--num-prompts", "8", "--num-eval-prompts", "4", "--rounds", "2", "--max-new-tokens", "12",
            "--per-device-train-batch-size", "4", *extra]
    return cli.main(args)


@pytest.mark.slow
def test_eval_samples_across_tokenizers_average_the_sets(tmp_path, pair_student):
    from distillm.evaluation.degeneracy import set_figures

    assert _run(tmp_path, pair_student, "--rounds", "1", "--eval-samples", "2") == 0
    root = tmp_path / "run"
    metrics = json.loads((root / "metrics.json").read_text())

    def responses(path):
        return [json.loads(line)["response"] for line in path.read_text().splitlines()]

    teacher = [responses(root / "data" / name) for name in ("teacher_eval.jsonl", "teacher_eval_1.jsonl")]
    for tag in ("before", "after"):
        sets = [responses(root / "eval" / name) for name in (f"{tag}_samples.jsonl", f"{tag}_samples_1.jsonl")]
        assert all(len(rows) == 4 for rows in sets) and sets[0] != sets[1]  # each set from its own seed
        assert metrics[tag]["eval_samples"] == 2
        assert metrics[tag]["distinct_2"] == set_figures(sets)["distinct_2"]
        assert metrics[tag]["teacher_distinct_2"] == set_figures(teacher)["distinct_2"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["distillm2", "gkd", "dpkd"])
def test_cli_run_across_tokenizers(tmp_path, pair_student, method):
    assert _run(tmp_path, pair_student, "--method", method) == 0
    root = tmp_path / "run"
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["complete"] and metrics["cross_tokenizer"]["shared_vocab"] == 257
    for tag in ("before", "after"):
        figures = metrics[tag]["on_teacher_responses"]
        assert all(torch.isfinite(torch.tensor(v)) for v in figures.values())
    log = [json.loads(line) for line in (root / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log)
    rows = [json.loads(line) for line in (root / "data" / "teacher_train.cross.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    s_tok, t_tok = build_merged_tokenizer(), build_tiny_tokenizer()
    for row in rows:  # both sides' ids and the alignment are stored; the ids are each side's
        assert max(row["teacher_response_ids"]) < len(t_tok) and "alignment" in row
        # each side's prompt in its own chat template (the long ones cut from the left)
        assert row["prompt_ids"][-1] == s_tok.convert_tokens_to_ids("<|assistant|>")
        assert t_tok.decode(row["teacher_prompt_ids"]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_cli_run_across_tokenizers_with_the_exact_teacher_cache(tmp_path, pair_student):
    """distillm2 over 2 rounds with --teacher-cache exact trains as the same run without it; the teacher's 8 own
    responses (its tokens) are scored once to build the cache, read from it every round after, and only the
    student responses go through the teacher."""
    logs = {}
    for cache in ("off", "exact"):
        out = tmp_path / cache
        assert _run(out, pair_student, "--method", "distillm2", "--teacher-cache", cache, "--no-evaluate",
                    "--save-steps", "100") == 0
        lines = (out / "run" / "logs" / "train_log.jsonl").read_text().splitlines()
        logs[cache] = [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]
        training = json.loads((out / "run" / "metrics.json").read_text())["training"]
    # 2 rounds x 2 steps x 4 pairs: the teacher responses from the cache, the student responses through the teacher
    assert training["teacher_cache"] == {"mode": "exact", "cached_sequences": 16, "teacher_sequences": 16,
                                         "built_sequences": 8}
    assert len(logs["off"]) == 4 and "teacher_cache" not in json.loads(
        (tmp_path / "off" / "run" / "metrics.json").read_text())["training"]
    # the cache holds the teacher's exact hidden states: the same steps up to fp32 rounding of a step's loss over its
    # tokens (4 pairs x 2 sequences x max_length 128 per side at most), bounded by the deeper, wider teacher
    teacher_config = tiny_student_config(num_layers=4)  # the tiny-random teacher: 4 layers, width 64 (student: 2, 48)
    assert logs["exact"] == pytest.approx(logs["off"], rel=0,
                                          abs=model_atol(teacher_config, 2 * 4 * 2 * 128, max(logs["off"])))
    cached = sorted(p.suffix for p in (tmp_path / "exact" / "run" / "teacher_cache").iterdir())
    assert cached == [".json", ".npy"]


@pytest.mark.slow
def test_cli_run_across_tokenizers_with_the_topk_teacher_cache(tmp_path, pair_student):
    """distillm2 over 2 rounds with --teacher-cache topk at k = the teacher's whole vocabulary trains as the same
    run without a cache (the top-k aligned loss is the full one there); the cache (log-probs, ids, the actual
    tokens' log-probs) is built once over the teacher's 8 own responses and read every round after."""
    v_t = len(build_tiny_tokenizer())  # the tiny-random teacher's vocabulary
    logs = {}
    for cache in ("off", "topk"):
        out = tmp_path / cache
        assert _run(out, pair_student, "--method", "distillm2", "--teacher-cache", cache, "--teacher-cache-k",
                    str(v_t), "--no-evaluate", "--save-steps", "100") == 0
        lines = (out / "run" / "logs" / "train_log.jsonl").read_text().splitlines()
        logs[cache] = [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]
    training = json.loads((tmp_path / "topk" / "run" / "metrics.json").read_text())["training"]
    assert training["teacher_cache"] == {"mode": f"top{v_t}", "cached_sequences": 16, "teacher_sequences": 16,
                                         "built_sequences": 8}
    assert len(logs["off"]) == len(logs["topk"]) == 4
    teacher_config = tiny_student_config(num_layers=4)
    assert logs["topk"] == pytest.approx(logs["off"], rel=0,
                                         abs=model_atol(teacher_config, 2 * 4 * 2 * 128, max(logs["off"])))
    cached = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "topk" / "run" / "teacher_cache").iterdir())
    assert cached == ["ids.npy", "json", "npy", "target.npy"]


@pytest.mark.slow
def test_a_killed_cross_run_reads_the_teacher_cache_back_on_resume(tmp_path, pair_student):
    """Killed after optimizer step 3 of 4 (checkpoint-2 on disk), the same command again: the cache built by the
    first attempt is read from disk (built_sequences 0), steps 3-4 take the teacher responses from it and run only
    the student responses through the teacher, and they train as the uninterrupted run's steps 3-4."""
    import signal

    from reliability_helpers import read_rows, run_distillm

    command = ["run", "--preset", "tiny", "--student", pair_student, "--method", "distillm2", "--num-prompts", "8",
               "--rounds", "2", "--max-new-tokens", "12", "--per-device-train-batch-size", "4", "--no-evaluate",
               "--save-steps", "2", "--teacher-cache", "exact"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert run_distillm([*command, "--output-dir", str(reference)]).returncode == 0
    killed = run_distillm([*command, "--output-dir", str(out)], fault="train_step@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    cache_files = sorted((out / "teacher_cache").iterdir())
    assert [p.suffix for p in cache_files] == [".json", ".npy"]
    resumed = run_distillm([*command, "--output-dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted((out / "teacher_cache").iterdir()) == cache_files
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert training["teacher_cache"] == {"mode": "exact", "cached_sequences": 8, "teacher_sequences": 8,
                                         "built_sequences": 0}
    losses = {d: [e["loss"] for e in read_rows(d / "logs" / "train_log.jsonl") if "loss" in e]
              for d in (reference, out)}
    assert len(losses[out]) == len(losses[reference]) == 4
    assert losses[out] == pytest.approx(losses[reference], rel=0, abs=model_atol(
        tiny_student_config(num_layers=4), 2 * 4 * 2 * 128, max(losses[reference])))


def test_refusals_name_the_reason(tmp_path, pair_student, capsys):
    for extra, pattern in [(("--method", "speculative-kd"), "speculative-kd cannot run .* one vocabulary"),
                           (("--method", "kd", "--teacher-cache", "topk", "--loss-temperature", "2"),
                            "--loss-temperature 2.0 with --teacher-cache topk .* temperature 1.* not supported"),
                           (("--method", "kd", "--cross-tokenizer", "off"), "vocabularies differ.*--cross-tokenizer auto")]:
        assert _run(tmp_path, pair_student, *extra, "--overwrite") == 2
        err = capsys.readouterr().err
        assert re.search("distillm: error: .*" + pattern, err), err


def test_prompts_rendered_per_side_base_model_teacher(tmp_path):
    """A teacher tokenizer without a chat template (a base model) gets the plain text after its special prefix;
    the student keeps its chat template; both are registered by the student's ids."""
    from distillm.config import load_config
    from distillm.pipeline.cross import paired_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Question: why?\nAnswer:"}) + "\n")
    config = load_config(None, preset="tiny", overrides={"prompts": str(prompts), "num_prompts": 1})
    teacher_tok = build_tiny_tokenizer(chat_template=None)
    setup = _setup(teacher_tok, build_merged_tokenizer())
    student, teacher = paired_prompts(config, setup, "train")
    assert setup.student_tok.decode(student[0].input_ids) == "<|user|>Question: why?\nAnswer:\n<|assistant|>"
    t_ids = teacher["a"].input_ids
    from distillm.data.prompts import special_prefix

    plain = teacher_tok("Question: why?\nAnswer:", add_special_tokens=False).input_ids
    assert t_ids == special_prefix(teacher_tok) + plain  # no template: its own prefix (none here) + the plain text
    assert setup.teacher_prompt(student[0].input_ids) == t_ids
