"""The exact teacher cache: same losses and gradients as a live teacher, no teacher pass on cached sequences,
reuse from disk, invalidation when the teacher or the data change, and a corrupted cache rebuilt."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tolerances import batch_tokens, model_atol
from distillm.training.teacher_cache import TeacherCache

from test_fused_methods import loss_and_grads, method_for, rows_for_every_method, trainer_for


class RowCounter:
    """Counts the sequences (batch rows) a model's forward runs on."""

    def __init__(self, model):
        self.rows = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.rows += kwargs["input_ids"].shape[0]


def build(cache_dir, teacher, method, rows, tokenizer):
    return TeacherCache(cache_dir).build(teacher, [method.sequences(r)[0] for r in rows], max_length=256,
                                        pad_token_id=tokenizer.pad_token_id, batch_size=3)


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("name", ["distillm2", "kd"])
def test_cached_teacher_gives_the_live_teachers_loss_and_gradients(tmp_path, teacher, student, tokenizer, impl,
                                                                    name):
    rows = rows_for_every_method(tokenizer)
    live = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method_for(name, {}), rows, impl)
    batch = live.data_collator(rows)
    loss_live, grads_live = loss_and_grads(live, batch)

    method = method_for(name, {})
    cached = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method, rows, impl)
    cached.teacher_cache = build(tmp_path / "cache", teacher, method, rows, tokenizer)
    counter = RowCounter(teacher)
    loss_cached, grads_cached = loss_and_grads(cached, batch)
    # the teacher ran on the student responses of the pairs only (kd: not at all)
    assert counter.rows == (len(rows) if name == "distillm2" else 0)
    assert cached.teacher_cache.cached_rows == len(rows)
    # the cache holds the teacher's exact final hidden states: the same loss, fp32 rounding apart
    n = batch_tokens(batch)
    torch.testing.assert_close(loss_cached, loss_live, rtol=0, atol=model_atol(student.config, n, loss_live))
    for key in grads_live:
        torch.testing.assert_close(grads_cached[key], grads_live[key], rtol=0,
                                   atol=model_atol(student.config, n, grads_live[key]))


def test_cache_is_reused_from_disk_and_invalidated_by_teacher_or_data(tmp_path, teacher, tokenizer):
    rows, method = rows_for_every_method(tokenizer), method_for("kd", {})
    counter = RowCounter(teacher)
    first = build(tmp_path, teacher, method, rows, tokenizer)
    assert counter.rows == len(rows) and len(first.index) == len(rows)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(name.startswith("exact-") for name in files)  # array + manifest

    again = build(tmp_path, teacher, method, rows, tokenizer)  # a later round or a resumed run
    assert counter.rows == len(rows)  # read from disk: the teacher did not run
    np.testing.assert_array_equal(np.asarray(again.hidden), np.asarray(first.hidden))

    changed_data = copy.deepcopy(rows)
    changed_data[0]["response_ids"][0] += 1
    build(tmp_path, teacher, method, changed_data, tokenizer)
    assert counter.rows == 2 * len(rows)  # different data: rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) != files and len(list(tmp_path.iterdir())) == 2  # stale gone

    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.get_output_embeddings().weight[0, 0] += 1e-3  # the head feeds nothing the cache stores, yet it is
    other_counter = RowCounter(other)                         # another teacher: the cache is rebuilt
    build(tmp_path, other, method, changed_data, tokenizer)
    assert other_counter.rows == len(rows)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_corrupted_or_partial_cache_is_detected_and_rebuilt(tmp_path, teacher, tokenizer, damage, caplog):
    rows, method = rows_for_every_method(tokenizer), method_for("kd", {})
    good = np.asarray(build(tmp_path, teacher, method, rows, tokenizer).hidden).copy()
    array = next(tmp_path.glob("*.npy"))
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(array.read_bytes())
        data[-7] ^= 0xFF
        array.write_bytes(bytes(data))
    else:
        next(tmp_path.glob("*.json")).write_text('{"mode": "exact", "sha')
    counter = RowCounter(teacher)
    rebuilt = build(tmp_path, teacher, method, rows, tokenizer)
    assert counter.rows == len(rows)  # the teacher ran again
    assert "rebuilding" in caplog.text
    np.testing.assert_allclose(np.asarray(rebuilt.hidden), good, rtol=0, atol=0)


def test_topk_cache_is_exact_at_k_equal_vocab_and_approximate_below(tmp_path, teacher, student, tokenizer):
    rows, vocab = rows_for_every_method(tokenizer), len(tokenizer)
    live = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method_for("distillm2", {}), rows, "fused")
    batch = live.data_collator(rows)
    loss_live, grads_live = loss_and_grads(live, batch)
    losses = {}
    for k in (vocab, 4):
        for impl in ("fused", "plain"):
            method = method_for("distillm2", {})
            trainer = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method, rows, impl)
            trainer.teacher_cache = TeacherCache(tmp_path / f"top{k}", "topk", k=k, vocab_size=vocab).build(
                teacher, [method.sequences(r)[0] for r in rows], max_length=256,
                pad_token_id=tokenizer.pad_token_id, batch_size=3)
            counter = RowCounter(teacher)
            losses[k, impl] = loss_and_grads(trainer, batch)
            assert counter.rows == len(rows)  # only the student responses went through the teacher
    n = batch_tokens(batch)
    loss_atol = model_atol(student.config, n, loss_live)
    for impl in ("fused", "plain"):
        loss, grads = losses[vocab, impl]
        torch.testing.assert_close(loss, loss_live, rtol=0, atol=loss_atol)
        for key in grads_live:
            torch.testing.assert_close(grads[key], grads_live[key], rtol=0,
                                       atol=model_atol(student.config, n, grads_live[key]))
    # k = 4 of ~300 tokens: a different loss (far beyond rounding), the same under both paths
    assert abs(losses[4, "fused"][0].item() - loss_live.item()) > 10 * loss_atol
    torch.testing.assert_close(losses[4, "fused"][0], losses[4, "plain"][0], rtol=0, atol=loss_atol)


@pytest.mark.slow
def test_a_run_with_the_teacher_cache_trains_as_one_without(tmp_path):
    import json

    from distillm.cli import main

    args = ["-q", "run", "--preset", "tiny", "--method", "distillm2", "--rounds", "2", "--num-prompts", "8",
            "--no-evaluate", "--max-new-tokens", "8", "--save-steps", "100"]
    logs = {}
    for cache in ("off", "exact"):
        out = tmp_path / cache
        assert main([*args, "--teacher-cache", cache, "--output-dir", str(out)]) == 0
        lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
        logs[cache] = [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]
        training = json.loads((out / "metrics.json").read_text())["training"]
    # 4 steps x 4 pairs: every teacher response came from the cache, only the student responses met the teacher
    # (the 8 teacher responses were scored once, to build the cache)
    assert training["teacher_cache"] == {"mode": "exact", "cached_sequences": 16, "teacher_sequences": 16,
                                         "built_sequences": 8}
    assert len(logs["off"]) == 4
    # the cache holds the teacher's exact hidden states: the same steps up to fp32 rounding of a step's loss over
    # its tokens (4 pairs x 2 sequences x max_length 128 at most; tolerances.model_atol)
    from tolerances import tiny_student_config

    assert logs["exact"] == pytest.approx(logs["off"], rel=0,
                                          abs=model_atol(tiny_student_config(), 4 * 2 * 128, max(logs["off"])))
    cached = sorted(p.suffix for p in (tmp_path / "exact" / "teacher_cache").iterdir())
    assert cached == [".json", ".npy"]
    assert not (tmp_path / "off" / "teacher_cache").exists()


def test_plain_path_cuts_a_padded_teacher_head_to_the_vocabulary(tmp_path, tokenizer):
    """A teacher whose head has more rows than the tokenizer has tokens (padded, as Qwen's): the cached plain
    scores are cut to the real vocabulary as a live teacher's are, so the loss is the live one."""
    from distillm.testing.tiny import build_tiny_model

    teacher = build_tiny_model(tokenizer, num_layers=4, seed=0, vocab_size=len(tokenizer) + 5)
    student = build_tiny_model(tokenizer, num_layers=2, seed=1)
    rows = rows_for_every_method(tokenizer)
    live = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method_for("distillm2", {}), rows, "plain")
    batch = live.data_collator(rows)
    loss_live, grads_live = loss_and_grads(live, batch)
    method = method_for("distillm2", {})
    cached = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method, rows, "plain")
    cached.teacher_cache = build(tmp_path / "cache", teacher, method, rows, tokenizer)
    scores = cached.teacher_scores(batch)
    assert scores.shape[-1] == len(tokenizer) < teacher.get_output_embeddings().weight.shape[0]
    loss_cached, grads_cached = loss_and_grads(cached, batch)
    assert cached.teacher_cache.cached_rows > 0
    n = batch_tokens(batch)
    torch.testing.assert_close(loss_cached, loss_live, rtol=0, atol=model_atol(teacher.config, n, loss_live))
    for key in grads_live:
        torch.testing.assert_close(grads_cached[key], grads_live[key], rtol=0,
                                   atol=model_atol(teacher.config, n, grads_live[key]), msg=key)
