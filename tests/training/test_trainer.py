"""DistillTrainer invariants: exact gradient accumulation, padded vocabularies, a frozen teacher, logging."""

import copy
import random

import pytest
import torch
from transformers import TrainingArguments

from tolerances import batch_tokens, forward_atol, model_atol, update_atol
from distillm.config import load_config
from distillm.methods.distillm2 import DistiLLM2
from distillm.training.collate import DistillCollator, RowDataset, pad_left
from distillm.training.trainer import DistillTrainer


def distillm2(**options):
    """A DistiLLM-2 method with these loss options (curriculum, b_ramp, reduction, ...)."""
    return DistiLLM2(load_config(overrides=options))


def make_pairs(tokenizer, n=8, seed=0):
    rng = random.Random(seed)
    vocab = list(range(0, 256))
    rows = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"question {i} " + "x" * rng.randint(0, 9)}],
                                               add_generation_prompt=True, tokenize=True)
        if hasattr(prompt, "input_ids"):
            prompt = prompt["input_ids"]
        rows.append({
            "prompt_ids": list(prompt),
            "chosen_ids": [rng.choice(vocab) for _ in range(rng.randint(1, 7))] + [tokenizer.eos_token_id],
            "rejected_ids": [rng.choice(vocab) for _ in range(rng.randint(1, 7))],
        })
    return rows


def make_trainer(tmp_path, teacher, student, tokenizer, rows, *, batch, accum, steps=1, options=None, vocab=None,
                 **extra):
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ckpt-{batch}-{accum}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=steps, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", seed=0, report_to=[], save_strategy="no", logging_steps=1,
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, **extra,
    )
    method = options or distillm2(curriculum=False, b_ramp=False)
    return DistillTrainer(model=student, teacher=teacher, method=method, vocab_size=vocab or len(tokenizer),
                          args=args, train_dataset=RowDataset(rows),
                          data_collator=DistillCollator(tokenizer.pad_token_id, 256))


def test_collator_marks_only_response_tokens(tokenizer):
    rows = make_pairs(tokenizer, n=2)
    batch = DistillCollator(tokenizer.pad_token_id, 256)(rows)
    assert batch["input_ids"].shape[0] == 4
    for i, row in enumerate(rows + rows):
        response = row["chosen_ids"] if i < 2 else row["rejected_ids"]
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == response  # exactly the response, at the end (left padding)
        assert batch["input_ids"][i, -len(response):].tolist() == response
        n_real = len(row["prompt_ids"]) + len(response)
        assert batch["attention_mask"][i].sum().item() == n_real
        assert batch["position_ids"][i, -n_real:].tolist() == list(range(n_real))


def test_left_padding_does_not_change_logits(teacher, tokenizer):
    """position_ids from the attention mask make a left-padded row equal to the same row alone."""
    short = pad_left([([5, 6, 7, 8], 2)], tokenizer.pad_token_id)
    both = pad_left([([5, 6, 7, 8], 2), (list(range(20, 32)), 3)], tokenizer.pad_token_id)
    fwd = lambda b: teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=b["position_ids"]).logits
    alone = fwd(short)[0]  # the same row in a batch of two: fp32 rounding apart (tolerances.forward_atol)
    torch.testing.assert_close(alone, fwd(both)[0, -4:], atol=forward_atol(teacher.config, alone), rtol=0)


def _grads_after_accumulation(trainer, micro_batches):
    """Run the trainer's own loss over micro-batches as its loop does, and return the accumulated gradient."""
    model = trainer.model
    model.zero_grad()
    counts = trainer._get_num_items_in_batch(micro_batches, torch.device("cpu"))
    total = 0.0
    for batch in micro_batches:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=counts)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean"])
def test_loss_and_gradients_do_not_depend_on_micro_batching(tmp_path, teacher, student, tokenizer, reduction):
    rows = make_pairs(tokenizer, n=8)
    collate = DistillCollator(tokenizer.pad_token_id, 256)
    options = distillm2(curriculum=False, b_ramp=False, reduction=reduction)
    trainer = make_trainer(tmp_path, teacher, student, tokenizer, rows, batch=8, accum=1, options=options)
    whole_loss, whole_grads = _grads_after_accumulation(trainer, [collate(rows)])
    n = batch_tokens(collate(rows))  # the same sums over the same tokens, in another grouping
    for size in (4, 2, 1):
        split = [collate(rows[i:i + size]) for i in range(0, 8, size)]
        loss, grads = _grads_after_accumulation(trainer, split)
        assert loss == pytest.approx(whole_loss, rel=0, abs=model_atol(student.config, n, whole_loss))
        for name, grad in whole_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=model_atol(student.config, n, grad), rtol=0,
                                       msg=f"{name} with micro-batch {size}")


def test_training_loop_gives_same_weights_for_any_accumulation(tmp_path, teacher, student, tokenizer):
    """Through Trainer.train (SGD, two steps, curriculum and b ramp on): 8x1, 4x2 and 2x4 agree."""
    rows = make_pairs(tokenizer, n=16)
    results = []
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        model = copy.deepcopy(student)
        trainer = make_trainer(tmp_path, teacher, model, tokenizer, rows, batch=batch, accum=accum, steps=2,
                               options=distillm2(curriculum=True, b_ramp=True))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()},
                        dict(trainer.method.gap_ref)))
    ref_losses, ref_weights, ref_gaps = results[0]
    assert any((ref_weights[n] != p).any() for n, p in student.named_parameters())  # it did train
    collate = DistillCollator(tokenizer.pad_token_id, 256)
    n = batch_tokens(collate(rows[:8]))  # tokens of one step (the larger of the two is taken)
    n = max(n, batch_tokens(collate(rows[8:])))
    initial = dict(student.named_parameters())
    for losses, weights, gaps in results[1:]:
        assert losses == pytest.approx(ref_losses, rel=0, abs=model_atol(student.config, n, max(ref_losses)))
        assert gaps["t"] == pytest.approx(ref_gaps["t"], rel=0, abs=model_atol(student.config, n, ref_gaps["t"]))
        for name, value in ref_weights.items():
            # two SGD steps: each step's error (tolerances.update_atol) over the steps' tokens
            atol = update_atol(student.config, 2 * n, value, value - initial[name].detach())
            torch.testing.assert_close(weights[name], value, atol=atol, rtol=0)


def _padded_copy(model, rows, seed):
    """Same model with its embedding/output matrix padded by `rows` extra rows of large random values."""
    padded = copy.deepcopy(model)
    old = padded.get_input_embeddings().weight.data
    torch.manual_seed(seed)
    extra = torch.randn(rows, old.shape[1]) * 5
    padded.resize_token_embeddings(old.shape[0] + rows, mean_resizing=False)
    padded.get_input_embeddings().weight.data[old.shape[0]:] = extra
    return padded


def test_padded_embedding_matrices_compare_over_the_real_vocabulary(tmp_path, teacher, student, tokenizer):
    rows = make_pairs(tokenizer, n=4)
    batch = DistillCollator(tokenizer.pad_token_id, 256)(rows)
    base = make_trainer(tmp_path, teacher, student, tokenizer, rows, batch=4, accum=1)
    padded = make_trainer(tmp_path, _padded_copy(teacher, 13, 1), _padded_copy(student, 29, 2), tokenizer, rows,
                          batch=4, accum=1)
    assert padded.model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 29
    expected = base.compute_loss(base.model, batch).item()
    atol = model_atol(student.config, batch_tokens(batch), expected)  # the same softmaxes, other matrix shapes
    assert padded.compute_loss(padded.model, batch).item() == pytest.approx(expected, rel=0, abs=atol)
    wrong = make_trainer(tmp_path, _padded_copy(teacher, 13, 1), _padded_copy(student, 29, 2), tokenizer, rows,
                         batch=4, accum=1, vocab=len(tokenizer) + 13)  # comparing padding rows changes the loss
    assert abs(wrong.compute_loss(wrong.model, batch).item() - expected) > 10 * atol


def test_teacher_is_frozen_and_holds_no_optimizer_state(tmp_path, teacher, student, tokenizer):
    rows = make_pairs(tokenizer, n=8)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer = make_trainer(tmp_path, teacher, student, tokenizer, rows, batch=4, accum=1, steps=2)
    trainer.train()
    assert not trainer.teacher.training
    for name, param in trainer.teacher.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.equal(param, before[name])
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised == {id(p) for p in student.parameters() if p.requires_grad}


def test_each_step_logs_loss_parts_skews_and_b(tmp_path, teacher, student, tokenizer):
    rows = make_pairs(tokenizer, n=8)
    trainer = make_trainer(tmp_path, teacher, student, tokenizer, rows, batch=4, accum=1, steps=2,
                           options=distillm2())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"loss", "skl", "srkl", "skew_t", "skew_s", "b", "learning_rate"} <= set(entry)
        assert entry["skl"] >= 0 and entry["srkl"] >= 0
        assert 0.01 <= entry["skew_t"] <= 0.5
    assert logs[0]["b"] < logs[1]["b"]  # the ramp moves weight to SRKL
    # loss = (2 - b) SKL + b SRKL of the same step
    first = logs[0]
    # skl, srkl and b are logged rounded to 6 decimals (half a unit of 1e-6 each), the loss in full: the combination
    # is off by that rounding times its coefficients, plus the fp32 sums of the step (tolerances.model_atol)
    rounding = 0.5e-6 * (abs(2 - first["b"]) + abs(first["b"]) + abs(first["skl"]) + abs(first["srkl"]))
    n = batch_tokens(DistillCollator(tokenizer.pad_token_id, 256)(rows[:4]))
    assert first["loss"] == pytest.approx((2 - first["b"]) * first["skl"] + first["b"] * first["srkl"], rel=0,
                                          abs=rounding + model_atol(student.config, n, first["loss"]))


class PoisonedKD:
    """KD whose loss is NaN on any batch holding the response token 250 (a stand-in for a numerical blow-up)."""

    def __new__(cls, config):
        from distillm.methods.kd import KD

        class _Poisoned(KD):
            def compute_loss(self, batch):
                loss, metrics, gauges = super().compute_loss(batch)
                if (batch.targets == 250).any():
                    loss = loss * float("nan")
                return loss, metrics, gauges

        return _Poisoned(config)


def kd_rows(tokenizer, bad_ids):
    rows = []
    for i in range(8):
        response = [250, 250, 251] if i in bad_ids else [65 + i, 66, tokenizer.eos_token_id]
        rows.append({"id": f"row{i}", "prompt_ids": [257, 80 + i, 258], "response_ids": response})
    return rows


def guarded_trainer(tmp_path, teacher, student, tokenizer, rows, *, steps, max_nonfinite=3):
    args = TrainingArguments(
        output_dir=str(tmp_path / "guard"), per_device_train_batch_size=2, max_steps=steps, learning_rate=0.05,
        lr_scheduler_type="constant", seed=0, report_to=[], save_strategy="no", logging_steps=1,
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, data_seed=0,
    )
    method = PoisonedKD(load_config(overrides={"method": "kd"}))
    return DistillTrainer(model=student, teacher=teacher, method=method, vocab_size=len(tokenizer), args=args,
                          train_dataset=RowDataset(rows), max_nonfinite_steps=max_nonfinite,
                          data_collator=DistillCollator(tokenizer.pad_token_id, 64, method.sequences))


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tmp_path, teacher, student, tokenizer):
    rows = kd_rows(tokenizer, bad_ids={0, 1, 2, 3, 4, 5, 6, 7})
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = guarded_trainer(tmp_path, teacher, student, tokenizer, rows, steps=2, max_nonfinite=5)
    trainer.train()
    assert trainer.nonfinite_guard.skipped == 2 and trainer.nonfinite_stop is None
    for name, param in student.named_parameters():  # nothing applied: every step was poisoned
        assert torch.equal(param, before[name]), name
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["skipped_nonfinite"] for e in logs] == [1, 2]

    # one poisoned pair of rows among good ones: only its step is skipped, the others train, weights stay finite
    good = copy.deepcopy(student)
    trainer = guarded_trainer(tmp_path, teacher, good, tokenizer, kd_rows(tokenizer, bad_ids={3}), steps=4)
    trainer.train()
    assert trainer.nonfinite_guard.skipped == 1 and trainer.nonfinite_stop is None
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in good.named_parameters())  # the good steps trained


def test_too_many_nan_steps_in_a_row_stop_with_a_checkpoint_naming_the_batch(tmp_path, teacher, student, tokenizer):
    rows = kd_rows(tokenizer, bad_ids=set(range(8)))
    trainer = guarded_trainer(tmp_path, teacher, student, tokenizer, rows, steps=4, max_nonfinite=3)
    trainer.train()
    stop = trainer.nonfinite_stop
    assert stop["step"] == 3 and stop["in_a_row"] == 3 and trainer.state.global_step == 3
    assert len(stop["batch_ids"]) == 2 and all(i.startswith("row") for i in stop["batch_ids"])
    assert (tmp_path / "guard" / "checkpoint-3").is_dir()  # saved before stopping
