"""Batch planning, the transformers backend and the resumable generation driver, on the tiny models."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from distillm.generation.base import Completion, SamplingParams
from distillm.generation.hf import HFBackend
from distillm.generation.runner import generate_responses, plan_batches
from distillm.io import read_jsonl

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)


class CountingBackend:
    """Forwards to a real backend and records every batch it is asked for (prompts and seed)."""

    def __init__(self, inner, *, max_batch_size: int | None = None):
        self.inner = inner
        self.name = "counting"
        self.max_batch_size = max_batch_size or inner.max_batch_size
        self.max_batch_tokens = inner.max_batch_tokens
        self.calls: list[tuple[list[list[int]], int]] = []

    def generate_batch(self, prompts, params, *, seed):
        self.calls.append(([list(p) for p in prompts], seed))
        return self.inner.generate_batch(prompts, params, seed=seed)


class RefusingBackend:
    name = "refusing"
    max_batch_size = 3
    max_batch_tokens = None

    def generate_batch(self, prompts, params, *, seed):
        raise AssertionError("the backend must not be called")


# ---------------------------------------------------------------------------------------------- plan_batches


def test_plan_batches_hand_computed():
    lengths = [5, 10, 3, 10, 7]
    assert plan_batches(lengths, max_batch_size=2, max_batch_tokens=None, max_new_tokens=5) == [[1, 3], [4, 0], [2]]
    # 10 + 5 new tokens = 15 wide: two fit in 30, a third would not; then 7 + 5 = 12 wide: two fit in 30.
    assert plan_batches(lengths, max_batch_size=10, max_batch_tokens=30, max_new_tokens=5) == [[1, 3], [4, 0], [2]]
    assert plan_batches(lengths, max_batch_size=10, max_batch_tokens=None, max_new_tokens=5) == [[1, 3, 4, 0, 2]]
    assert plan_batches([], max_batch_size=4, max_batch_tokens=None, max_new_tokens=5) == []


@pytest.mark.parametrize("max_batch_size", [1, 3, 8, 100])
@pytest.mark.parametrize("max_batch_tokens", [None, 50, 300, 1000])
def test_plan_batches_properties(max_batch_size, max_batch_tokens):
    rng = random.Random(max_batch_size * 7919 + (max_batch_tokens or 0))
    lengths = [rng.randint(1, 120) for _ in range(97)]
    max_new = 16
    batches = plan_batches(lengths, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                           max_new_tokens=max_new)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first, across and within batches
    for batch in batches:
        assert 1 <= len(batch) <= max_batch_size
        width = max(lengths[i] for i in batch) + max_new
        if max_batch_tokens is not None and len(batch) > 1:  # a lone prompt over budget still has to run
            assert len(batch) * width <= max_batch_tokens
    again = plan_batches(list(lengths), max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                         max_new_tokens=max_new)
    assert again == batches


def test_plan_batches_ties_are_broken_by_index():
    assert plan_batches([4, 4, 4, 4], max_batch_size=3, max_batch_tokens=None, max_new_tokens=1) == [[0, 1, 2], [3]]


# ------------------------------------------------------------------------------------------------ HFBackend


def test_greedy_batch_with_left_padding_equals_each_prompt_alone(teacher, tokenizer, encoded_prompts):
    backend = HFBackend(teacher, tokenizer)
    prompts = [p.input_ids for p in encoded_prompts]
    assert len({len(p) for p in prompts}) > 3  # lengths vary, so most rows are padded
    batched = backend.generate_batch(prompts, GREEDY, seed=0)
    assert len(batched) == len(prompts)
    for prompt, completion in zip(prompts, batched):
        alone = backend.generate_batch([prompt], GREEDY, seed=123)[0]
        assert completion.token_ids == alone.token_ids
        assert completion.finish_reason == alone.finish_reason
    assert len({tuple(c.token_ids) for c in batched}) == len(batched)


def _check_stop_or_length(completions: list[Completion], eos_ids: set[int], max_new: int) -> Counter:
    for c in completions:
        if c.finish_reason == "stop":
            assert c.token_ids and c.token_ids[-1] in eos_ids
            assert not eos_ids & set(c.token_ids[:-1])
            assert len(c.token_ids) <= max_new
        else:
            assert c.finish_reason == "length"
            assert len(c.token_ids) == max_new
            assert not eos_ids & set(c.token_ids)
    return Counter(c.finish_reason for c in completions)


def test_sampled_completions_stop_at_eos_or_run_to_the_length_limit(teacher, tokenizer, encoded_prompts):
    # Nearly uniform sampling over 259 tokens: some of the 64-token responses meet <|im_end|>, some do not.
    params = SamplingParams(temperature=50.0, top_p=1.0, max_new_tokens=64, seed=0)
    completions = HFBackend(teacher, tokenizer).generate_batch([p.input_ids for p in encoded_prompts], params, seed=0)
    reasons = _check_stop_or_length(completions, {tokenizer.eos_token_id}, 64)
    assert reasons["stop"] >= 1 and reasons["length"] >= 1


def test_greedy_completions_are_cut_after_an_eos_from_the_generation_config(teacher, tokenizer, encoded_prompts):
    prompts = [p.input_ids for p in encoded_prompts]
    plain = HFBackend(teacher, tokenizer).generate_batch(prompts, GREEDY, seed=0)
    assert all(c.finish_reason == "length" and len(c.token_ids) == GREEDY.max_new_tokens for c in plain)
    # Declare as a second end-of-sequence id a token that some (not all) greedy responses produce.
    seen_in = Counter(t for c in plain for t in set(c.token_ids))
    extra = next(t for t, n in seen_in.most_common() if n < len(plain) and t != tokenizer.eos_token_id)
    teacher.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]
    cut = HFBackend(teacher, tokenizer).generate_batch(prompts, GREEDY, seed=0)
    reasons = _check_stop_or_length(cut, {tokenizer.eos_token_id, extra}, GREEDY.max_new_tokens)
    assert reasons["stop"] == seen_in[extra] and reasons["length"] == len(plain) - seen_in[extra]
    for before, after in zip(plain, cut):
        if extra in before.token_ids:
            assert after.token_ids == before.token_ids[: before.token_ids.index(extra) + 1]
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == before.token_ids and after.finish_reason == "length"


def test_sampling_is_reproducible_per_seed(student, tokenizer, encoded_prompts):
    backend = HFBackend(student, tokenizer)
    prompts = [p.input_ids for p in encoded_prompts]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16)
    first = backend.generate_batch(prompts, params, seed=11)
    torch.manual_seed(999)  # the global RNG state before the call must not matter
    second = backend.generate_batch(prompts, params, seed=11)
    other = backend.generate_batch(prompts, params, seed=12)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_integer_temperature_is_accepted(teacher, tokenizer, encoded_prompts):
    params = SamplingParams(temperature=2, top_p=1, max_new_tokens=4)
    out = HFBackend(teacher, tokenizer).generate_batch([encoded_prompts[0].input_ids], params, seed=0)
    assert len(out[0].token_ids) >= 1


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_is_restored_and_generation_runs_in_eval_mode(student, tokenizer, encoded_prompts, training):
    student.train(training)
    modes_during = []
    handles = [m.register_forward_pre_hook(lambda mod, args: modes_during.append(mod.training))
               for m in student.modules()]
    try:
        HFBackend(student, tokenizer).generate_batch([encoded_prompts[0].input_ids], GREEDY, seed=0)
    finally:
        for h in handles:
            h.remove()
    assert modes_during and not any(modes_during)
    assert all(m.training == training for m in student.modules())


def test_train_mode_is_restored_when_generation_fails(student, tokenizer, encoded_prompts, monkeypatch):
    student.train()

    def broken(**kwargs):
        assert not student.training
        raise RuntimeError("boom")

    monkeypatch.setattr(student, "generate", broken)
    with pytest.raises(RuntimeError, match="boom"):
        HFBackend(student, tokenizer).generate_batch([encoded_prompts[0].input_ids], GREEDY, seed=0)
    assert student.training


# ---------------------------------------------------------------------------------------- generate_responses


def _backend(teacher, tokenizer) -> CountingBackend:
    return CountingBackend(HFBackend(teacher, tokenizer), max_batch_size=3)


def test_generate_responses_writes_rows_in_prompt_order(tmp_path, teacher, tokenizer, encoded_prompts):
    backend = _backend(teacher, tokenizer)
    out = tmp_path / "responses.jsonl"
    rows = generate_responses(backend, encoded_prompts, out, SAMPLED, tokenizer)
    n_batches = len(plan_batches([len(p.input_ids) for p in encoded_prompts], max_batch_size=3,
                                 max_batch_tokens=None, max_new_tokens=SAMPLED.max_new_tokens))
    assert len(backend.calls) == n_batches == 4
    assert sorted(tuple(p) for call, _ in backend.calls for p in call) == sorted(
        tuple(p.input_ids) for p in encoded_prompts)
    assert out.is_file() and not (tmp_path / "responses.jsonl.partial").exists()
    assert read_jsonl(out) == rows
    assert [r["id"] for r in rows] == [p.id for p in encoded_prompts]
    for row, prompt in zip(rows, encoded_prompts):
        assert set(row) == {"id", "prompt", "response", "prompt_ids", "response_ids", "finish_reason"}
        assert row["prompt"] == prompt.text
        assert row["prompt_ids"] == prompt.input_ids
        assert 1 <= len(row["response_ids"]) <= SAMPLED.max_new_tokens
        assert row["response"] == tokenizer.decode(row["response_ids"], skip_special_tokens=True)
        assert row["finish_reason"] == ("stop" if row["response_ids"][-1] == tokenizer.eos_token_id else "length")
    # each response is the one its own prompt got from the backend
    by_prompt = {}
    for call, seed in backend.calls:
        for prompt_ids, completion in zip(call, HFBackend(teacher, tokenizer).generate_batch(call, SAMPLED, seed=seed)):
            by_prompt[tuple(prompt_ids)] = completion.token_ids
    assert all(by_prompt[tuple(r["prompt_ids"])] == r["response_ids"] for r in rows)
    assert len({s for _, s in backend.calls}) == n_batches  # every batch has its own seed


def test_a_finished_file_is_reused_without_generating(tmp_path, teacher, tokenizer, encoded_prompts):
    out = tmp_path / "responses.jsonl"
    rows = generate_responses(_backend(teacher, tokenizer), encoded_prompts, out, SAMPLED, tokenizer)
    mtime = out.stat().st_mtime_ns
    counting = _backend(teacher, tokenizer)
    assert generate_responses(counting, encoded_prompts, out, SAMPLED, tokenizer) == rows
    assert counting.calls == []
    assert generate_responses(RefusingBackend(), encoded_prompts, out, SAMPLED, tokenizer) == rows
    assert out.stat().st_mtime_ns == mtime


def _batch_ids(call_prompts, id_of) -> list[str]:
    return [id_of[tuple(p)] for p in call_prompts]


@pytest.mark.parametrize("crash_after", ["first_rows_of_the_file", "whole_batches_as_appended"])
def test_resume_after_a_crash_regenerates_only_the_missing_batches(
    tmp_path, teacher, tokenizer, encoded_prompts, crash_after
):
    id_of = {tuple(p.input_ids): p.id for p in encoded_prompts}
    assert len(id_of) == len(encoded_prompts)
    reference_backend = _backend(teacher, tokenizer)
    reference_file = tmp_path / "reference.jsonl"
    reference = generate_responses(reference_backend, encoded_prompts, reference_file, SAMPLED, tokenizer)
    ref_batches = [(_batch_ids(call, id_of), seed) for call, seed in reference_backend.calls]

    by_id = {r["id"]: r for r in reference}
    if crash_after == "first_rows_of_the_file":
        kept = reference[:7]
        torn = reference[7]
    else:  # what the appender had written when the crash hit: the first two batches, in generation order
        kept = [by_id[i] for ids, _ in ref_batches[:2] for i in ids]
        torn = by_id[ref_batches[2][0][0]]
    out = tmp_path / "resumed.jsonl"
    torn_text = json.dumps(torn)
    (tmp_path / "resumed.jsonl.partial").write_text(
        "".join(json.dumps(r) + "\n" for r in kept) + torn_text[: len(torn_text) // 2]
    )

    backend = _backend(teacher, tokenizer)
    rows = generate_responses(backend, encoded_prompts, out, SAMPLED, tokenizer)

    assert rows == reference
    assert out.read_text() == reference_file.read_text()
    assert not (tmp_path / "resumed.jsonl.partial").exists()
    done = {r["id"] for r in kept}
    expected = [(ids, seed) for ids, seed in ref_batches if not set(ids) <= done]
    assert [(_batch_ids(call, id_of), seed) for call, seed in backend.calls] == expected
    assert 0 < len(expected) < len(ref_batches)  # some batches were skipped, some regenerated


def test_a_file_from_another_run_is_refused(tmp_path, teacher, tokenizer, encoded_prompts):
    out = tmp_path / "responses.jsonl"
    generate_responses(_backend(teacher, tokenizer), encoded_prompts, out, SAMPLED, tokenizer)
    with pytest.raises(ValueError, match="belongs to another run"):
        generate_responses(RefusingBackend(), encoded_prompts[:-1], out, SAMPLED, tokenizer)
    # the same for an unfinished file
    partial = tmp_path / "other.jsonl.partial"
    partial.write_text(json.dumps({"id": "from-elsewhere", "response_ids": [1]}) + "\n")
    with pytest.raises(ValueError, match="belongs to another run") as info:
        generate_responses(RefusingBackend(), encoded_prompts, tmp_path / "other.jsonl", SAMPLED, tokenizer)
    assert "from-elsewhere" in str(info.value)


def test_duplicate_prompt_ids_are_rejected(tmp_path, encoded_prompts, tokenizer):
    prompts = [*encoded_prompts, encoded_prompts[0]]
    out = tmp_path / "responses.jsonl"
    with pytest.raises(ValueError, match="unique"):
        generate_responses(RefusingBackend(), prompts, out, SAMPLED, tokenizer)
    assert not out.exists() and not (tmp_path / "responses.jsonl.partial").exists()


def test_generation_leaves_the_global_random_state_alone(teacher, tokenizer, encoded_prompts):
    """Sampling uses a private RNG: the training loop's random stream is the same with or without it."""
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    HFBackend(teacher, tokenizer).generate_batch([encoded_prompts[0].input_ids], params, seed=7)
    assert torch.equal(torch.rand(3), expected)
