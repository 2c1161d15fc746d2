"""LoRA / QLoRA students (PEFT), merge-and-save, gradient checkpointing and the bf16 flag."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trainer import make_pairs, make_trainer
from tolerances import forward_atol, update_atol
from transformers import AutoModelForCausalLM

from distillm.config import load_config
from distillm.models import ModelLoadError, add_lora, is_peft_model, merged_copy


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer("the cat sat on the mat").input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_student_trains_only_its_adapters_and_merges_exactly(tmp_path, teacher, student, tokenizer):
    model = add_lora(student, r=4, alpha=8, dropout=0.0)
    assert is_peft_model(model)
    lora_names = {name for name, p in model.named_parameters() if "lora_" in name}
    # all-linear: every projection of every decoder layer got an adapter, the output head did not
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    make_trainer(tmp_path, teacher, model, tokenizer, make_pairs(tokenizer), batch=4, accum=1, steps=3).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == lora_names  # every adapter weight moved, nothing else did

    model.eval()
    merged = merged_copy(model)
    assert not is_peft_model(merged) and is_peft_model(model)  # merging leaves the adapter model as it was
    # merged weights W + s*B@A (rounded once more in fp32) vs the adapter's W x + s*B(A x): the same function
    # evaluated in another order, so the logits agree to fp32 forward rounding
    adapted = _logits(model, tokenizer)
    atol = forward_atol(merged.config, adapted)
    torch.testing.assert_close(_logits(merged, tokenizer), adapted, rtol=0, atol=atol)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in key for key in reloaded.state_dict())
    # safetensors stores fp32 exactly: the reloaded model computes what the merged one does
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(merged, tokenizer), rtol=0, atol=0)


def test_lora_target_modules_list_and_bad_name(student):
    model = add_lora(copy.deepcopy(student), r=2, alpha=4, target_modules="q_proj, v_proj")
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_" in n}
    assert targets == {"q_proj", "v_proj"}
    with pytest.raises(ModelLoadError, match="lora-target-modules 'nope'"):
        add_lora(copy.deepcopy(student), target_modules="nope")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_update(tmp_path, teacher, student, tokenizer, lora, reentrant):
    rows = make_pairs(tokenizer)
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(student)
        if lora:
            torch.manual_seed(0)  # the same adapter initialisation in both runs
            # reentrant checkpointing needs enable_input_require_grads (all inputs of a block frozen otherwise)
            model = add_lora(model, r=4, alpha=8, dropout=0.0, gradient_checkpointing=checkpointing)
        # pipeline.training_arguments sets use_reentrant=False
        extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}} \
            if checkpointing else {}
        initial_weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        trainer = make_trainer(tmp_path / str(checkpointing), teacher, model, tokenizer, rows, batch=4, accum=2,
                               steps=1, **extra)
        trainer.train()
        if checkpointing:
            assert trainer.model.is_gradient_checkpointing
        results.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = results
    # the step's tokens: chosen and rejected sequence of each of the 8 rows (batch 4 x accumulation 2)
    n_tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert plain.keys() == checkpointed.keys() and plain
    moved = [name for name in plain if not torch.equal(plain[name], dict(student.named_parameters()).get(
        name, torch.full_like(plain[name], float("nan"))))]
    assert moved  # the step did update something
    for name in plain:
        # the same SGD step, its activations recomputed (possibly summed in another order): fp32 rounding apart
        initial = initial_weights[name]
        atol = update_atol(student.config, n_tokens, plain[name], plain[name] - initial)
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=atol, msg=name)


def test_qlora_on_cpu_is_a_clear_error(tmp_path, monkeypatch):
    from distillm.pipeline import load_models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = load_config(preset="tiny", overrides={"output_dir": str(tmp_path / "q"), "load_in_4bit": True})
    with pytest.raises(ModelLoadError, match="needs an NVIDIA GPU.*--lora"):
        load_models(config)


@pytest.mark.parametrize("dtype, bf16", [("auto", False), ("bfloat16", True), ("float32", False)])
def test_trainer_bf16_follows_the_model_dtype(tmp_path, dtype, bf16):
    from distillm.pipeline import RunPaths, training_arguments

    config = load_config(preset="tiny", overrides={"dtype": dtype, "gradient_checkpointing": True})
    args = training_arguments(config, RunPaths(tmp_path), num_rows=16)
    assert args.bf16 is bf16 and args.fp16 is False
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_lora_run_saves_the_adapter_and_a_merged_plain_student(tmp_path):
    """A whole tiny run with --lora: adapter/ holds the adapter, student/ a plain model that equals base + adapter."""
    from peft import PeftModel

    from distillm.models import prune_layers
    from distillm.pipeline import run
    from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

    out = tmp_path / "lora"
    config = load_config(preset="tiny", overrides={"output_dir": str(out), "lora": True, "lora_r": 4,
                                                   "lora_alpha": 16, "num_prompts": 8, "rounds": 1,
                                                   "evaluate": False})
    metrics = run(config)
    assert metrics["complete"] and metrics["training"]["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert not any("lora" in key for key in student.state_dict())
    tokenizer = build_tiny_tokenizer()
    base = prune_layers(build_tiny_model(tokenizer), [0, 3])  # the run's derived student, before training
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    # the saved student is base weights + s*B@A merged in fp32: the adapter's function evaluated in another order
    expected = _logits(adapted, tokenizer)
    atol = forward_atol(student.config, expected)
    torch.testing.assert_close(_logits(student, tokenizer), expected, rtol=0, atol=atol)
    # and the adapter moved the logits by far more than that rounding (not torch.allclose's default tolerance)
    untrained = _logits(base.get_base_model() if is_peft_model(base)
                        else prune_layers(build_tiny_model(tokenizer), [0, 3]), tokenizer)
    assert (_logits(student, tokenizer) - untrained).abs().max() > 10 * atol
