"""`--teacher-cache exact` across tokenizers: the cache holds the teacher's hidden states on its own responses in
its own tokens (keyed by the teacher's ids), a training step with it gives the live teacher's loss and gradients,
only the student responses (re-tokenized for the teacher) go through the teacher, the cache is read back from disk
on a later round or a resumed run, and a cache made for another teacher is not read."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from distillm.crosstok.data import CrossSetup, teacher_batch
from distillm.crosstok.testing import build_merged_tokenizer
from distillm.crosstok.trainer import CrossDistillTrainer
from distillm.crosstok.vocab import vocab_map
from distillm.pipeline.modality import CrossModality
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer
from distillm.training.collate import RowDataset
from distillm.training.teacher_cache import TeacherCache, sequence_keys
from tolerances import batch_tokens, eps, model_atol

from test_fused_methods import loss_and_grads, method_for
from test_teacher_cache import RowCounter

TEXTS = ["the cat sat on the mat", "Hello there, café", "in order to test", "then the other one sat in the sun"]


@pytest.fixture
def pair():
    """(setup, teacher, student): a 4-layer teacher on the merged tokenizer (byte tokens plus BPE merges), a 2-layer
    student of another width on the tiny byte-level tokenizer (other ids, more tokens for the same text)."""
    t_tok, s_tok = build_merged_tokenizer(), build_tiny_tokenizer()
    setup = CrossSetup(t_tok, s_tok, vocab_map(t_tok, s_tok))
    return setup, build_tiny_model(t_tok, num_layers=4, seed=0), build_tiny_model(s_tok, num_layers=2,
                                                                                   hidden_size=48, seed=1)


def cross_rows(setup: CrossSetup) -> list[dict]:
    """Student-side rows as the cross pipeline holds them: each prompt rendered per side (registered in the setup),
    the teacher's response in the student's ids with the teacher's own sampled ids registered -- here not its
    canonical tokenization of the text (the first word spelt byte by byte, as a sampler may produce it), so a cache
    keyed by the text re-tokenized would miss -- and a student response (`rejected_ids`) the teacher reads
    re-tokenized from its bytes."""
    t_tok, s_tok = setup.teacher_tok, setup.student_tok
    rows = []
    for i, text in enumerate(TEXTS):
        s_prompt = s_tok(f"Say something, {i}.", add_special_tokens=False).input_ids
        setup.teacher_prompts[tuple(s_prompt)] = t_tok(f"<|user|>Say something, {i}.\n<|assistant|>",
                                                       add_special_tokens=False).input_ids
        s_resp = s_tok(text, add_special_tokens=False).input_ids + [s_tok.eos_token_id]
        first, rest = text.split(" ", 1)
        t_resp = t_tok.convert_tokens_to_ids(list(first)) + t_tok(" " + rest, add_special_tokens=False).input_ids \
            + [t_tok.eos_token_id]
        assert t_resp != t_tok(text, add_special_tokens=False).input_ids + [t_tok.eos_token_id]
        assert t_tok.decode(t_resp[:-1]) == text
        setup.response_map[tuple(s_resp)] = t_resp
        rejected = s_tok(text[::-1], add_special_tokens=False).input_ids + [s_tok.eos_token_id]
        rows.append({"id": str(i), "_index": i, "prompt_ids": s_prompt, "response_ids": s_resp,
                     "chosen_ids": s_resp, "rejected_ids": rejected})
    return rows


def cross_trainer(tmp_path, setup, teacher, student, method, rows, impl):
    args = TrainingArguments(output_dir=str(tmp_path / impl), per_device_train_batch_size=len(rows), max_steps=1,
                             report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
                             disable_tqdm=True)
    return CrossDistillTrainer(cross=setup, model=student, teacher=teacher, method=method,
                               vocab_size=len(setup.student_tok), args=args, train_dataset=RowDataset(rows),
                               loss_impl=impl, data_collator=setup.collator(256, method.sequences))


def build_cache(directory, setup, teacher, method, rows) -> TeacherCache:
    """The cache as `pipeline.training.train` builds it: the fixed sequences through the cross modality (the
    teacher's prompt rendering and its own response ids, its pad id)."""
    modality = CrossModality(setup.teacher_tok, setup.student_tok)
    sequences, pad = modality.teacher_cache_sequences(SimpleNamespace(cross=setup),
                                                      [method.sequences(row)[0] for row in rows])
    return TeacherCache(directory).build(teacher, sequences, max_length=256, pad_token_id=pad, batch_size=3)


def live_step_and_twin(tmp_path, setup, teacher, student, name, rows, impl):
    """A training step with the live teacher -- (batch, its loss, its gradients) -- and a twin trainer from the same
    student weights, without a cache yet: (batch, loss, grads, twin, the twin's method)."""
    live = cross_trainer(tmp_path, setup, teacher, copy.deepcopy(student), method_for(name, {}), rows, impl)
    batch = live.data_collator(rows)
    loss, grads = loss_and_grads(live, batch)
    method = method_for(name, {})
    twin = cross_trainer(tmp_path, setup, teacher, copy.deepcopy(student), method, rows, impl)
    return batch, loss, grads, twin, method


@pytest.mark.parametrize("impl", ["fused", "plain"])
@pytest.mark.parametrize("name", ["distillm2", "kd"])
def test_cached_teacher_gives_the_live_teachers_loss_and_gradients_across_tokenizers(tmp_path, pair, impl, name):
    setup, teacher, student = pair
    rows = cross_rows(setup)
    batch, loss_live, grads_live, cached, method = live_step_and_twin(tmp_path, setup, teacher, student, name, rows,
                                                                      impl)
    cached.teacher_cache = build_cache(tmp_path / "cache", setup, teacher, method, rows)
    # keyed by the teacher's ids: the keys of the teacher's side of the batch's first group (the fixed responses)
    assert set(cached.teacher_cache.index) == set(sequence_keys(
        {k: v[:len(rows)] for k, v in teacher_batch(batch).items()}))
    counter = RowCounter(teacher)
    loss_cached, grads_cached = loss_and_grads(cached, batch)
    # the teacher ran on the student responses of the pairs only (re-tokenized for it); kd: not at all
    assert counter.rows == (len(rows) if name == "distillm2" else 0)
    assert cached.teacher_cache.cached_rows == len(rows)
    assert cached.teacher_cache.teacher_rows == (len(rows) if name == "distillm2" else 0)
    # the cache holds the teacher's exact final hidden states, computed over other batches: fp32 rounding apart.
    # The bound takes the deeper, wider of the two networks (the teacher: 4 layers, width 64), over the tokens of
    # both sides of the batch.
    assert teacher.config.num_hidden_layers >= student.config.num_hidden_layers
    assert teacher.config.hidden_size >= student.config.hidden_size
    n = batch_tokens(batch) + int(batch["teacher_attention_mask"].sum())
    assert loss_live.abs() > 0
    torch.testing.assert_close(loss_cached, loss_live, rtol=0, atol=model_atol(teacher.config, n, loss_live))
    assert grads_cached.keys() == grads_live.keys() and grads_live
    for key in grads_live:
        torch.testing.assert_close(grads_cached[key], grads_live[key], rtol=0,
                                   atol=model_atol(teacher.config, n, grads_live[key]), msg=key)


def test_cache_built_once_read_back_and_not_read_for_another_teacher(tmp_path, pair):
    setup, teacher, _ = pair
    rows, method = cross_rows(setup), method_for("distillm2", {})
    counter = RowCounter(teacher)
    first = build_cache(tmp_path, setup, teacher, method, rows)
    assert counter.rows == len(rows) and first.built_rows == len(rows)
    # its width is the teacher's hidden size (its states, in its tokens)
    assert first.hidden.shape == (sum(length for _, length in first.index.values()), teacher.config.hidden_size)
    files = sorted(p.name for p in tmp_path.iterdir())

    again = build_cache(tmp_path, setup, teacher, method, rows)  # a later round, or a resumed run
    assert counter.rows == len(rows) and again.built_rows == 0  # read from disk: the teacher did not run
    np.testing.assert_array_equal(np.asarray(again.hidden), np.asarray(first.hidden))

    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)  # another teacher: other final hidden states
    other_counter = RowCounter(other)
    rebuilt = build_cache(tmp_path, setup, other, method, rows)
    assert other_counter.rows == len(rows) and rebuilt.built_rows == len(rows)  # the stale cache was not read
    assert sorted(p.name for p in tmp_path.iterdir()) != files and len(list(tmp_path.iterdir())) == 2
    # the new teacher's states: the same body, its norm's weight 1.5x (two roundings, the weight and the product,
    # and one in 1.5 * first: 3 half-ulps)
    np.testing.assert_allclose(np.asarray(rebuilt.hidden), 1.5 * np.asarray(first.hidden), rtol=1.5 * eps(), atol=0)
