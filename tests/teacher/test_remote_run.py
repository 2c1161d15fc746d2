"""`distillm run --teacher-url` end to end against a real loopback teacher server process: the same losses and
student as the local teacher restricted to the same top-k; a server killed mid-run and restarted; a server down
at start-up; every teacher-scored method."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distillm.cli import main
from distillm.config import METHOD_NAMES
from distillm.methods import build_method
from distillm.config import load_config
from distillm.models import load_model
from distillm.teacher.loopback import topk_scores
from distillm.teacher.remote import RemoteScores
from teacher_helpers import start_server, stop_server

K = 20


def args(url: str, out, *extra) -> list[str]:
    return ["-q", "run", "--preset", "tiny", "--method", "distillm2", "--rounds", "1", "--num-prompts", "8",
            "--no-evaluate", "--max-new-tokens", "8", "--save-steps", "100", "--teacher-top-k", str(K),
            "--teacher-url", url, "--output-dir", str(out), *extra]


def losses(out) -> list[float]:
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in log if "loss" in entry]


def student(out) -> dict:
    return load_file(str(out / "student" / "model.safetensors"))


def assert_same_student(a, b) -> None:
    # the same operations on the same numbers (the teacher's scores cross JSON exactly, test_protocol): identical
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "run"
    assert main(args(server, out)) == 0
    return out


@pytest.mark.slow
def test_remote_teacher_run_equals_the_local_teacher_restricted_to_top_k(uninterrupted, server, tmp_path,
                                                                       monkeypatch):
    """The same run with each sequence's top-k computed here from the local teacher (the same single-sequence
    forward as the server, then top-k, ties ordered as the wire's parser orders them) instead of over HTTP."""
    model = load_model("tiny-random", dtype="float32")[0].eval()

    def local_row(self, item):
        ids, length = item
        if length == 0:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64), np.zeros(0, np.float32)
        logp = topk_scores(model, ids, self.k, self.vocab_size)[len(ids) - 1 - length:]
        top = logp.topk(self.k)
        values, indices = top.values.numpy(), top.indices.numpy()
        order = np.lexsort((indices, -values), axis=-1)
        own = logp.gather(-1, torch.tensor(ids[len(ids) - length:]).unsqueeze(-1)).squeeze(-1).numpy()
        return np.take_along_axis(values, order, -1), np.take_along_axis(indices, order, -1), own

    monkeypatch.setattr(RemoteScores, "_score_row", local_row)
    local = tmp_path / "local"
    assert main(args(server, local)) == 0
    remote_losses, local_losses = losses(uninterrupted), losses(local)
    assert len(remote_losses) == 2
    assert remote_losses == local_losses
    assert_same_student(student(uninterrupted), student(local))
    summary = json.loads((uninterrupted / "metrics.json").read_text())["training"]["teacher_server"]
    assert summary["scored_sequences"] == 16 and summary["retries"] == 0  # 8 prompts x (teacher, student) response


@pytest.mark.slow
def test_server_killed_mid_run_and_restarted_gives_the_same_student(uninterrupted, tmp_path, monkeypatch):
    """The server exits when its 15th completion request arrives (8 teacher responses, then scoring); it comes
    back on the same port a little later. The run waits with back-off, continues, and ends with the student of
    the uninterrupted run. The API key (from the environment) appears nowhere in the run directory."""
    key = "s3cret-KEY-for-test"
    monkeypatch.setenv("TEACHER_KEY", key)
    port = free_port()
    first, url = start_server(port=port, api_key=key, faults={"exit_after": 14})
    restarted = {}

    def restart():
        first.wait()
        time.sleep(1.0)
        restarted["proc"] = start_server(port=port, api_key=key)[0]

    watcher = threading.Thread(target=restart, daemon=True)
    watcher.start()
    out = tmp_path / "killed"
    try:
        assert main(args(url, out, "--teacher-api-key-env", "TEACHER_KEY", "--teacher-timeout", "30")) == 0
    finally:
        watcher.join(timeout=300)
        stop_server(first)
        if "proc" in restarted:
            stop_server(restarted["proc"])
    assert first.returncode == 3  # it did die mid-run
    summary = json.loads((out / "metrics.json").read_text())["training"]["teacher_server"]
    assert summary["retries"] >= 1 and summary["scored_sequences"] == 16
    assert losses(out) == losses(uninterrupted)
    assert_same_student(student(out), student(uninterrupted))
    for path in out.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert key.encode() not in path.read_bytes(), path


def test_a_server_down_at_start_up_is_named_before_any_model_loads(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(args(url, tmp_path / "down")) != 0
    err = capsys.readouterr().err
    assert f"teacher server {url} is not reachable" in err and "distillm: error:" in err


# distillm2 is the tests above; speculative-kd has its own below
TEACHER_METHODS = [m for m in METHOD_NAMES if build_method(load_config(overrides={"method": m})).needs_teacher
                   and m not in ("distillm2", "speculative-kd")]


@pytest.mark.slow
@pytest.mark.parametrize("name", TEACHER_METHODS)
def test_every_teacher_scored_method_trains_through_the_server(name, server, tmp_path):
    out = tmp_path / name
    run = args(server, out)
    run[run.index("distillm2")] = name
    assert main(run) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["teacher_server"]["scored_tokens"] > 0
    assert all(loss == loss and abs(loss) < 1e6 for loss in losses(out))


@pytest.mark.slow
def test_speculative_kd_decodes_jointly_through_the_server_as_with_the_local_teacher(server, tmp_path):
    """speculative-kd with --teacher-url: joint decoding block by block through the server (the drafts' ranks from
    prompt_logprobs=0, the teacher's own token where a draft is rejected). Greedy (--temperature 0), its first
    step decodes the same tokens as the local lockstep decoder, so the same fraction of tokens is replaced."""
    def spec(out, *extra):
        return ["-q", "run", "--preset", "tiny", "--method", "speculative-kd", "--rounds", "1", "--num-prompts", "8",
                "--no-evaluate", "--max-new-tokens", "8", "--save-steps", "100", "--temperature", "0",
                "--skd-top-k", "3", "--output-dir", str(out), *extra]

    served, local = tmp_path / "served", tmp_path / "local"
    assert main(spec(served, "--teacher-url", server, "--teacher-top-k", str(K))) == 0
    assert main(spec(local)) == 0
    log = {name: [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
           for name, out in (("served", served), ("local", local))}
    first = {name: next(e for e in entries if "loss" in e) for name, entries in log.items()}
    assert 0 < first["served"]["replaced_fraction"] < 1
    assert first["served"]["replaced_fraction"] == first["local"]["replaced_fraction"]
    summary = json.loads((served / "metrics.json").read_text())["training"]["teacher_server"]
    assert summary["ranked_draft_tokens"] > 0 and summary["sampled_tokens"] > 0 and summary["scored_tokens"] > 0
