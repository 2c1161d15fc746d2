"""`distillm run --teacher-url` across tokenizers, end to end against a real loopback teacher server (tiny-random,
the teacher's tokenizer) and a student with another tokenizer: with --teacher-top-k = the whole teacher
vocabulary the first step's loss and the held-out figures are the local teacher's; the vocabulary check reads the
teacher's tokenizer; what a served teacher cannot do across tokenizers is refused with its reason."""

from __future__ import annotations

import json
import re

import pytest

from distillm import cli
from distillm.crosstok.testing import save_tiny_pair_student
from distillm.models import real_vocab_size
from distillm.pipeline.modality import CrossModality
from distillm.teacher.client import TeacherClient
from distillm.teacher.remote import RemoteBackend
from distillm.testing.tiny import build_tiny_tokenizer
from teacher_helpers import start_server, stop_server
from tolerances import model_atol, tiny_student_config

V_T = len(build_tiny_tokenizer())  # the served teacher's (tiny-random's) vocabulary: every id in the top-k


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def pair_student(tmp_path_factory):
    return save_tiny_pair_student(tmp_path_factory.mktemp("merged_student"))


def _args(out, student, *extra):
    return ["-q", "run", "--preset", "tiny", "--student", student, "--method", "distillm2", "--rounds", "1",
            "--num-prompts", "8", "--num-eval-prompts", "4", "--max-new-tokens", "12",
            "--per-device-train-batch-size", "4", "--save-steps", "100", "--output-dir", str(out), *extra]


def _log(out) -> list[float]:
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


@pytest.mark.slow
def test_served_teacher_across_tokenizers_equals_the_local_teacher_at_full_k(server, pair_student, tmp_path,
                                                                             monkeypatch):
    """Both runs take the teacher's responses from the server (the local run through the same RemoteBackend), so
    they train on the same rows; only the teacher's scores differ: the server's top-V_t log-probs (+ the actual
    tokens') through the top-k cross loss, against the local teacher's head through the full cross loss."""
    served = tmp_path / "served"
    assert cli.main(_args(served, pair_student, "--teacher-url", server, "--teacher-top-k", str(V_T))) == 0

    def remote_teacher_backend(self, config, models):
        return RemoteBackend(TeacherClient(server), real_vocab_size(self.teacher_tok))

    monkeypatch.setattr(CrossModality, "teacher_backend", remote_teacher_backend)
    local = tmp_path / "local"
    assert cli.main(_args(local, pair_student)) == 0
    for name in ("teacher_train.jsonl", "teacher_train.cross.jsonl"):  # the same teacher responses
        assert (served / "data" / name).read_text() == (local / "data" / name).read_text()
    served_losses, local_losses = _log(served), _log(local)
    assert len(served_losses) == len(local_losses) == 2
    # the server scores each sequence alone (float32 log_softmax of its full logits), the local run a padded batch
    # through the fused head: the same values up to the rounding of a teacher forward, summed over the step's
    # tokens (4 pairs x 2 sequences x max_length 128 per side at most)
    tol = model_atol(tiny_student_config(num_layers=4), 2 * 4 * 2 * 128, max(map(abs, local_losses)))
    assert served_losses[0] == pytest.approx(local_losses[0], rel=0, abs=tol)
    metrics = {name: json.loads((out / "metrics.json").read_text()) for name, out in (("s", served), ("l", local))}
    server_summary = metrics["s"]["training"]["teacher_server"]
    assert server_summary["top_k"] == V_T and server_summary["scored_sequences"] == 16  # 8 x (teacher, student)
    before_s, before_l = metrics["s"]["before"], metrics["l"]["before"]
    assert "top-%d" % V_T in before_s["teacher_scores"] and "lower bound" in before_s["teacher_scores"]
    assert "teacher_scores" not in before_l
    # the student has not trained yet: its NLL is the same; the teacher's figures from the server are the local
    # ones up to a forward's rounding (means over groups / bytes of values of size <= a few nats)
    for key in ("aligned_fkl_1to1", "aligned_uld_merged", "teacher_nll_per_byte", "student_nll_per_byte"):
        s, lo = before_s["on_teacher_responses"][key], before_l["on_teacher_responses"][key]
        assert s == pytest.approx(lo, rel=0, abs=model_atol(tiny_student_config(num_layers=4), 128, max(abs(lo), 1)))
    assert before_s["teacher_nll_per_byte_of_student_samples"] == pytest.approx(
        before_l["teacher_nll_per_byte_of_student_samples"], rel=0,
        abs=model_atol(tiny_student_config(num_layers=4), 128, before_l["teacher_nll_per_byte_of_student_samples"]))


@pytest.mark.slow
def test_served_teacher_across_tokenizers_with_a_small_top_k_trains(server, pair_student, tmp_path):
    out = tmp_path / "k5"
    assert cli.main(_args(out, pair_student, "--teacher-url", server, "--teacher-top-k", "5", "--no-evaluate")) == 0
    losses = _log(out)
    assert len(losses) == 2 and all(loss == loss and abs(loss) < 1e6 for loss in losses)
    summary = json.loads((out / "metrics.json").read_text())["training"]["teacher_server"]
    assert summary["top_k"] == 5 and summary["scored_tokens"] > 0


def test_served_teacher_refusals_across_tokenizers(server, pair_student, tmp_path, capsys):
    for extra, pattern in [(("--loss-temperature", "2"), "--loss-temperature 2.0 with --teacher-url .* temperature 1"),
                           (("--method", "speculative-kd"), "speculative-kd cannot run .* one vocabulary")]:
        assert cli.main(_args(tmp_path / "r", pair_student, "--teacher-url", server, *extra, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert re.search("distillm: error: .*" + pattern, err), err


def test_the_vocabulary_check_reads_the_teacher_tokenizer(server, pair_student, tmp_path, capsys):
    """A server whose tokenizer is not the --teacher's is refused before any weights are read, naming it: here the
    --teacher is the merged-tokenizer model while the server serves tiny-random."""
    args = _args(tmp_path / "v", "tiny-random", "--teacher-url", server, "--teacher", pair_student)
    assert cli.main(args) != 0
    err = capsys.readouterr().err
    assert "tokenizes differently from the teacher's (--teacher) tokenizer" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "gkd", "imitkd", "minillm", "distillm", "dpkd"])
def test_every_teacher_scored_method_trains_across_tokenizers_through_the_server(server, pair_student, tmp_path,
                                                                                 method):
    out = tmp_path / method
    args = _args(out, pair_student, "--teacher-url", server, "--teacher-top-k", "8", "--no-evaluate")
    args[args.index("distillm2")] = method
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["teacher_server"]["scored_tokens"] > 0
    assert all(loss == loss and abs(loss) < 1e6 for loss in _log(out))
