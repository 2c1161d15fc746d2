"""The run directory's safety: only a marked run is ever removed, one process at a time works in it, its inputs are
fingerprinted, and disk errors (full, read-only, a file in the way) are clear errors naming the path."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distillm import rundir
from distillm.cli import main
from distillm.config import load_config
from distillm.io import JsonlAppender, WriteError, atomic_write_text
from distillm.pipeline import RunDirError, prepare_run_dir

TINY = ["run", "--preset", "tiny", "--num-prompts", "4", "--num-eval-prompts", "2", "--rounds", "1"]
SRC = Path(__file__).resolve().parents[2] / "src"


def fails(capsys, argv: list[str]) -> str:
    """Run the CLI, expect the clean error exit (2, no traceback), return the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("distillm: error: ") and "Traceback" not in err, err
    return last


def tiny(out: Path, **overrides):
    return load_config(preset="tiny", overrides={"output_dir": str(out), **overrides})


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- --overwrite


def test_overwrite_never_deletes_a_directory_with_a_foreign_config_yaml(tmp_path, capsys, monkeypatch):
    """The issue's reproduction: a project with its own config.yaml survives `--overwrite`."""
    monkeypatch.chdir(tmp_path)
    proj = Path("proj")
    (proj / "src").mkdir(parents=True)
    (proj / "config.yaml").write_text("lr: 1\n")
    (proj / "src" / "main.py").write_text("code\n")
    before = tree(proj)
    message = fails(capsys, ["run", "--preset", "tiny", "--output-dir", "proj", "--overwrite"])
    assert "no distillm run marker" in message and "does not delete" in message
    message = fails(capsys, ["run", "--preset", "tiny", "--output-dir", "proj"])
    assert "not this run's" in message and "--overwrite" not in message
    assert tree(proj) == before  # nothing added, nothing removed


def test_overwrite_empties_a_marked_run_and_keeps_its_marker(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(tiny(out))
    assert rundir.is_marked(out)
    (out / "data").mkdir()
    (out / "data" / "teacher_train.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="different config.*--overwrite"):
        prepare_run_dir(tiny(out, learning_rate=0.5))
    prepare_run_dir(tiny(out, learning_rate=0.5), overwrite=True)
    assert not (out / "data").exists() and rundir.is_marked(out) and "0.5" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("where", ["cwd", "home", "parent of cwd"])
def test_overwrite_never_deletes_the_current_or_home_directory_even_if_marked(tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    prepare_run_dir(tiny(out))
    (out / "data").mkdir()
    (out / "data" / "teacher_train.jsonl").write_text("{}\n")
    rundir.unlock(out)
    if where == "cwd":
        monkeypatch.chdir(out)
    elif where == "home":
        monkeypatch.setenv("HOME", str(out))
    else:
        (out / "sub").mkdir()
        monkeypatch.chdir(out / "sub")
    before = tree(out)
    with pytest.raises(RunDirError, match="does not delete .*(current directory|home directory)"):
        prepare_run_dir(tiny(out, learning_rate=0.5), overwrite=True)
    assert tree(out) == before


def test_a_run_made_before_the_marker_continues_with_the_same_config_and_is_refused_otherwise(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.yaml").write_text(tiny(out).to_yaml())  # what an older version left: no marker
    (out / "data").mkdir()
    (out / "data" / "teacher_train.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="no distillm run marker.*does not delete"):
        prepare_run_dir(tiny(out, learning_rate=0.5), overwrite=True)
    with pytest.raises(RunDirError, match="not this run's.*differs in: training.learning_rate"):
        prepare_run_dir(tiny(out, learning_rate=0.5))
    assert (out / "data" / "teacher_train.jsonl").is_file() and not rundir.is_marked(out)
    prepare_run_dir(tiny(out))  # its own config: continued, and marked from now on
    assert rundir.is_marked(out) and (out / "data" / "teacher_train.jsonl").is_file()


# ----------------------------------------------------------------------------------------------- lock


def test_a_second_process_on_the_same_directory_gets_a_clear_error_and_a_killed_one_frees_it(tmp_path, capsys):
    out = tmp_path / "run"
    prepare_run_dir(tiny(out))
    rundir.unlock(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from distillm import rundir; rundir.lock(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = fails(capsys, [*TINY, "--output-dir", str(out)])
        assert f"in use by another distillm process (pid {holder.pid})" in message and "--output-dir" in message
        message = fails(capsys, [*TINY, "--output-dir", str(out), "--overwrite"])
        assert "in use by another distillm process" in message  # nothing is removed under a running process
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops a killed process's flock
        holder.wait()
    prepare_run_dir(tiny(out))
    rundir.unlock(out)


# ----------------------------------------------------------------------------------------------- inputs


def write_prompts(path: Path, texts: list[str], *, indent=None) -> None:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}, indent=indent).replace("\n", "") + "\n"
                            for i, t in enumerate(texts)))


@pytest.fixture
def finished_run(tmp_path):
    from distillm.pipeline import run

    prompts = tmp_path / "prompts.jsonl"
    texts = ["Name a colour.", "What is two plus two?", "Say hi.", "Count to three."]
    write_prompts(prompts, texts)
    config = tiny(tmp_path / "run", prompts=str(prompts), num_prompts=4, rounds=1, evaluate=False)
    metrics = run(config)
    assert metrics["complete"] and (tmp_path / "run" / rundir.INPUTS).is_file()
    return config, prompts, texts, metrics


def test_edited_prompts_are_refused_and_restoring_them_continues(finished_run, monkeypatch):
    from distillm import pipeline

    config, prompts, texts, metrics = finished_run
    out = Path(config.output_dir)
    original = prompts.read_bytes()
    write_prompts(prompts, [t + " Answer briefly." for t in texts])  # same ids, other texts
    with pytest.raises(RunDirError, match=r"training prompts as encoded \(data.prompts = .*prompts.jsonl\) changed"
                                          r".*--overwrite.*--output-dir"):
        pipeline.run(config)
    # the same refusal for an unfinished run (the case where a rerun used to get stuck): nothing is produced first
    (out / "metrics.json").unlink()
    before = tree(out)
    with pytest.raises(RunDirError, match="training prompts as encoded"):
        pipeline.run(config)
    assert tree(out) == before
    prompts.write_bytes(original)  # restored: the run continues from what it had
    assert pipeline.run(config)["training"] == metrics["training"]


def test_a_reformatted_prompt_file_with_the_same_prompts_is_accepted(finished_run):
    from distillm import pipeline

    config, prompts, texts, metrics = finished_run
    write_prompts(prompts, texts, indent=1)  # other bytes, the same prompts
    assert pipeline.run(config) == metrics


def test_a_changed_teacher_responses_file_is_refused_before_loading_models(tmp_path, monkeypatch):
    from distillm import pipeline

    responses = tmp_path / "teacher.jsonl"
    responses.write_text('{"id": "a", "response": "one"}\n')
    config = tiny(tmp_path / "run", teacher_responses=str(responses))
    paths = prepare_run_dir(config)
    rundir.unlock(paths.root)
    rundir.record_inputs(paths.root, rundir.file_digests(config))
    responses.write_text('{"id": "a", "response": "two"}\n')
    monkeypatch.setattr(pipeline.modality, "load_text_models", lambda config: pytest.fail("models loaded before the check"))
    with pytest.raises(RunDirError, match=r"teacher-responses file \(data.teacher_responses = .*teacher.jsonl\) "
                                          "changed"):
        pipeline.run(config)


# ----------------------------------------------------------------------------------------------- disk errors


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("mine")
    assert "is a file, not a directory" in fails(capsys, [*TINY, "--output-dir", str(file)])
    assert "is a file, not a directory" in fails(capsys, [*TINY, "--output-dir", str(file / "run")])
    assert file.read_text() == "mine"


def test_an_unwritable_output_dir_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # (the tests may run as root, for whom chmod does not make a directory read-only: the OS's refusal is simulated)
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    message = fails(capsys, [*TINY, "--output-dir", str(tmp_path / "new")])
    assert f"Cannot create the output directory {tmp_path / 'new'} (Permission denied)" in message
    monkeypatch.undo()

    existing = tmp_path / "ro"
    existing.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir.os, "open", read_only)  # the lock file is the first thing written
    assert "Cannot create the lock file" in fails(capsys, [*TINY, "--output-dir", str(existing)])
    monkeypatch.undo()
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    message = fails(capsys, [*TINY, "--output-dir", str(existing)])
    assert f"Cannot write {existing / rundir.MARKER}: read-only file system (EROFS)" in message


class _FullDisk:
    """A file handle whose writes fail the way a full disk does."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, text):
        self.handle.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_full_disk_during_an_atomic_write_names_the_file_and_leaves_no_partial(tmp_path, monkeypatch):
    import distillm.io as io

    path = tmp_path / "metrics.json"
    path.write_text("old\n")
    real_fdopen = os.fdopen
    monkeypatch.setattr(io.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(WriteError, match=f"Cannot write {path}: no space left on the device \\(ENOSPC\\)\\. Free "
                                         "space there.*rerun the same command"):
        atomic_write_text(path, "new\n" * 1000)
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_a_full_disk_while_appending_rows_names_the_partial_file_and_keeps_its_rows(tmp_path, monkeypatch):
    appender = JsonlAppender(tmp_path / "teacher_train.jsonl")
    appender.append([{"id": "a"}])
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return _FullDisk(handle) if "a" in mode else handle

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(WriteError, match=r"teacher_train\.jsonl\.partial: no space left on the device"):
        appender.append([{"id": "b"}])
    monkeypatch.undo()
    assert appender.existing_rows() == [{"id": "a"}]  # the torn half row is dropped, the whole one kept


def test_a_full_disk_anywhere_in_a_command_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from distillm import pipeline

    def full(*args, **kwargs):  # e.g. the Trainer saving a checkpoint: not distillm's own writer
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints" / "x"))

    monkeypatch.setattr(pipeline.modality, "load_text_models", full)
    message = fails(capsys, [*TINY, "--output-dir", str(tmp_path / "run")])
    assert f"Cannot write {tmp_path / 'run' / 'checkpoints' / 'x'}: no space left on the device" in message
