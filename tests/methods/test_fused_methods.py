"""Every method trains through the fused chunked losses by default: on tiny models, the loss and the student's
gradients of a whole training micro-batch are those of the plain path (full logits), and no [tokens x vocab]
tensor is ever created in fused mode (a dispatch-mode probe over the forward and the backward pass)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainingArguments

from tolerances import batch_tokens, model_atol
from distillm.config import load_config
from distillm.methods import METHODS, build_method
from distillm.training.collate import DistillCollator, RowDataset
from distillm.training.trainer import DistillTrainer

# (method, extra options): every method, the ones with a choice of divergence once per divergence
CASES = [("distillm2", {}), ("distillm2", {"reduction": "token_mean", "loss_temperature": 2.0}),
         ("distillm", {"v1_loss": "skl"}), ("distillm", {"v1_loss": "srkl"}), ("kd", {}), ("seqkd", {}),
         ("imitkd", {}), ("gkd", {"jsd_beta": 0.3}), ("minillm", {}), ("dpkd", {}),
         ("speculative-kd", {"skd_loss": "tvd"}), ("speculative-kd", {"skd_loss": "jsd"}), ("step-by-step", {})]
assert {name for name, _ in CASES} == set(METHODS)


def rows_for_every_method(tokenizer, n=4, seed=0):
    """Rows carrying the fields of every method's `sequences` (single responses, pairs, step-by-step tasks)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, 250) for _ in range(rng.randint(lo, hi))]

    rows = []
    for i in range(n):
        prompt = ids(3, 12)
        rows.append({"id": str(i), "_index": i, "prompt_ids": prompt, "response_ids": ids(10, 20),
                     "chosen_ids": ids(10, 20), "rejected_ids": ids(8, 18),
                     "answer_prompt_ids": [7] + prompt, "answer_ids": ids(2, 6),
                     "rationale_prompt_ids": [8] + prompt, "rationale_ids": ids(10, 20)})
    return rows


def trainer_for(tmp_path, teacher, student, tokenizer, method, rows, loss_impl, chunk_size=None):
    args = TrainingArguments(output_dir=str(tmp_path / loss_impl), per_device_train_batch_size=len(rows),
                             max_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True)
    return DistillTrainer(model=student, teacher=teacher, method=method, vocab_size=len(tokenizer), args=args,
                          train_dataset=RowDataset(rows), loss_impl=loss_impl, loss_chunk_size=chunk_size,
                          data_collator=DistillCollator(tokenizer.pad_token_id, 256, method.sequences))


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def method_for(name, options):
    method = build_method(load_config(overrides={"method": name, **options}))
    if name == "distillm2":  # a reference gap, so the curriculum gives every pair its own skews
        method.gap_ref = {"t": 0.002, "s": 0.002}
    return method


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_fused_and_plain_give_the_same_loss_and_gradients(tmp_path, teacher, student, tokenizer, name, options):
    rows = rows_for_every_method(tokenizer)
    results = {}
    for impl in ("plain", "fused"):
        method = method_for(name, options)
        trainer = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method, rows, impl, chunk_size=7)
        batch = trainer.data_collator(rows)
        results[impl] = loss_and_grads(trainer, batch)
    (loss_p, grads_p), (loss_f, grads_f) = results["plain"], results["fused"]
    assert loss_p.item() > 0 or name == "dpkd"
    n = batch_tokens(batch)  # the same loss by two routes: fp32 rounding apart (tolerances.model_atol)
    torch.testing.assert_close(loss_f, loss_p, rtol=0, atol=model_atol(student.config, n, loss_p))
    assert grads_f.keys() == grads_p.keys() and len(grads_p) > 0
    for key in grads_p:
        torch.testing.assert_close(grads_f[key], grads_p[key], rtol=0, atol=model_atol(student.config, n, grads_p[key]),
                                   msg=key)
    assert any(g.abs().sum() > 0 for g in grads_p.values())


class ShapeProbe(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


def widest_vocab_tensor(shapes, vocab):
    """The most positions (numel / V) of any tensor with a vocabulary-sized dimension."""
    return max((torch.Size(s).numel() // vocab for s in shapes if vocab in s), default=0)


@pytest.mark.parametrize("name", ["distillm2", "gkd", "dpkd", "seqkd"])
def test_fused_training_step_never_builds_tokens_by_vocab_logits(tmp_path, teacher, student, tokenizer, name):
    rows = rows_for_every_method(tokenizer)
    vocab = student.get_output_embeddings().weight.shape[0]
    hidden = max(student.config.hidden_size, teacher.config.hidden_size)
    chunk = 4
    widest = {}
    for impl in ("plain", "fused"):
        trainer = trainer_for(tmp_path, teacher, copy.deepcopy(student), tokenizer, method_for(name, {}), rows, impl,
                              chunk_size=chunk)
        batch = trainer.data_collator(rows)
        tokens = int((batch["labels"] != -100).sum())
        with ShapeProbe() as probe:
            trainer.compute_loss(trainer.model, batch).backward()
        widest[impl] = widest_vocab_tensor(probe.shapes, vocab)
    assert tokens > max(chunk, hidden)  # so a [tokens, V] tensor could not hide below the bound
    # plain: the probe sees the full logits; fused: nothing wider than one chunk (or the [V, H] head matrices)
    assert widest["plain"] >= tokens
    assert widest["fused"] <= max(chunk, hidden)


def test_fused_path_sees_through_a_peft_lora_student(tmp_path, teacher, student, tokenizer):
    """The student's forward runs through its wrapper (here PEFT's LoRA), so adapters are in the fused path."""
    peft = pytest.importorskip("peft")
    rows = rows_for_every_method(tokenizer)
    results = {}
    for impl in ("plain", "fused"):
        torch.manual_seed(0)  # the same random (non-zero) adapters both times
        lora = peft.get_peft_model(copy.deepcopy(student), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        trainer = trainer_for(tmp_path, teacher, lora, tokenizer, method_for("distillm2", {}), rows, impl)
        results[impl] = loss_and_grads(trainer, trainer.data_collator(rows))
    (loss_p, grads_p), (loss_f, grads_f) = results["plain"], results["fused"]
    n = batch_tokens(trainer.data_collator(rows))
    torch.testing.assert_close(loss_f, loss_p, rtol=0, atol=model_atol(student.config, n, loss_p))
    assert grads_p and all("lora" in key for key in grads_p) and grads_f.keys() == grads_p.keys()
    for key in grads_p:
        torch.testing.assert_close(grads_f[key], grads_p[key], rtol=0, atol=model_atol(student.config, n, grads_p[key]),
                                   msg=key)
