"""Pipeline pieces: the run directory guard and the TRL-style pairing."""

import pytest

from distillm.config import load_config
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
