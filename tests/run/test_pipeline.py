"""Pipeline pieces: the run directory guard and the TRL-style pairing."""

import pytest

from distillm.config import load_config
from distillm.data.prompts import encode_prompts, load_prompts
from distillm.methods import build_method
from distillm.pipeline import RunDirError, pair_rows, prepare_run_dir


def test_run_dir_guard(tmp_path):
    out = tmp_path / "run"
    first = load_config(preset="tiny", overrides={"output_dir": str(out)})
    prepare_run_dir(first)
    assert (out / "config.yaml").is_file()
    # nothing produced yet (e.g. the first attempt stopped on a typo): a corrected config simply replaces it
    second = load_config(preset="tiny", overrides={"output_dir": str(out), "learning_rate": 0.01})
    prepare_run_dir(second)
    assert "0.01" in (out / "config.yaml").read_text()
    (out / "data").mkdir()
    (out / "data" / "teacher_train.jsonl.partial").write_text("{}\n")
    with pytest.raises(RunDirError, match="different config.*learning_rate.*--overwrite"):
        prepare_run_dir(first)
    prepare_run_dir(second)  # the same config continues
    prepare_run_dir(first, overwrite=True)  # --overwrite wipes the old run
    assert not (out / "data").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no distillm run"):
        prepare_run_dir(load_config(preset="tiny", overrides={"output_dir": str(foreign)}))


def test_pair_rows_use_trl_dpo_columns():
    teacher = [{"id": "a", "prompt": "P", "response": "T", "prompt_ids": [1], "response_ids": [2, 9]}]
    student = [{"id": "a", "prompt": "P", "response": "S", "prompt_ids": [1], "response_ids": [3]}]
    (row,) = pair_rows(teacher, student)
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("P", "T", "S")
    assert (row["chosen_ids"], row["rejected_ids"]) == ([2, 9], [3])


def test_overwrite_never_wipes_a_directory_that_is_not_a_run(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="holds no distillm run"):
        prepare_run_dir(load_config(preset="tiny", overrides={"output_dir": str(foreign)}), overwrite=True)
    assert (foreign / "important.txt").read_text() == "keep me"


def test_resume_skips_a_checkpoint_cut_off_mid_write(tmp_path):
    from distillm.training.trainer import METHOD_STATE_FILE, last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / METHOD_STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")


def test_pairs_must_share_prompt_tokens():
    from distillm.errors import DistillmError

    teacher = [{"id": "a", "prompt": "P", "response": "T", "prompt_ids": [1, 2], "response_ids": [5]}]
    student = [{"id": "a", "prompt": "P", "response": "S", "prompt_ids": [2], "response_ids": [6]}]
    with pytest.raises(DistillmError, match="different prompt tokens"):
        pair_rows(teacher, student)


def test_import_teacher_responses_matches_prompts_by_id(tmp_path, tokenizer, encoded_prompts):
    import json

    from distillm.errors import DistillmError
    from distillm.pipeline import import_teacher_responses

    with pytest.raises(DistillmError, match="not found"):
        import_teacher_responses(str(tmp_path / "missing.jsonl"), encoded_prompts, tokenizer, tmp_path / "out.jsonl")
    source = tmp_path / "teacher.jsonl"
    rows = [{"id": p.id, "prompt": "other rendering", "response": f"answer {i}"} for i, p in enumerate(encoded_prompts)]
    source.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    out = tmp_path / "out.jsonl"
    import_teacher_responses(str(source), encoded_prompts, tokenizer, out)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [p.id for p in encoded_prompts]  # prompt order, not file order
    assert got[0]["prompt_ids"] == encoded_prompts[0].input_ids  # the run's own prompt tokens
    assert got[0]["response_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(got[0]["response_ids"], skip_special_tokens=True) == "answer 0"
    source.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DistillmError, match="no response for"):
        import_teacher_responses(str(source), encoded_prompts, tokenizer, tmp_path / "out2.jsonl")


def test_fixed_responses_from_the_data_set_for_kd(tmp_path, tokenizer):
    from distillm.errors import DistillmError
    from distillm.pipeline import DataContext, RunPaths

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"id": "a", "prompt": "2+2?", "response": "4"}\n'
                            '{"id": "b", "messages": [{"role": "user", "content": "Hi"}, '
                            '{"role": "assistant", "content": "Hello!"}]}\n')
    config = load_config(overrides={"method": "kd", "fixed_responses": "dataset", "prompts": str(prompts_file)})
    records, _ = load_prompts(str(prompts_file))
    prompts, _ = encode_prompts(records, tokenizer, max_prompt_length=64)
    ctx = DataContext(config, tokenizer, prompts, RunPaths(tmp_path / "run"), teacher_backend=None)
    rows = build_method(config).build_rows(ctx)  # no teacher needed: the backend is never touched
    assert [tokenizer.decode(r["response_ids"]) for r in rows] == ["4<|im_end|>", "Hello!<|im_end|>"]
    assert rows[0]["prompt_ids"] == prompts[0].input_ids

    prompts_file.write_text('{"id": "a", "prompt": "2+2?", "response": "4"}\n{"id": "b", "prompt": "Hi"}\n')
    records, _ = load_prompts(str(prompts_file))
    ctx.prompts, _ = encode_prompts(records, tokenizer, max_prompt_length=64)
    with pytest.raises(DistillmError, match=r"p\.jsonl.*1 of 2 have none \(e\.g\. id 'b'\).*--fixed-responses teacher"):
        build_method(config).build_rows(ctx)


def test_the_modality_is_chosen_once_from_the_models(tmp_path):
    """Text and cross-tokenizer runs get their variant of the stages (pipeline.modality); a vision-language teacher
    gets VisionModality (tests/vision)."""
    from distillm.crosstok.testing import save_tiny_pair_student
    from distillm.pipeline import CrossModality, TextModality, VisionModality, modality_for

    text = modality_for(load_config(preset="tiny", overrides={"output_dir": str(tmp_path / "a")}))
    assert type(text) is TextModality and text.image_inputs() is None
    student = save_tiny_pair_student(tmp_path / "pair_student")
    cross = modality_for(load_config(preset="tiny", overrides={"output_dir": str(tmp_path / "b"), "student": student}))
    assert isinstance(cross, CrossModality) and not isinstance(cross, VisionModality)
    assert len(cross.teacher_tok) != len(cross.student_tok)
    off = load_config(preset="tiny", overrides={"output_dir": str(tmp_path / "c"), "student": student,
                                                 "cross_tokenizer": "off"})
    assert type(modality_for(off)) is TextModality  # and the one-tokenizer loader refuses the pair, saying why
