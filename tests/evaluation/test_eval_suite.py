"""`distillm eval` end to end on tiny random models: known answers where they exist (a model identical to the
teacher has zero divergence and reproduces its greedy responses), the run-directory path with training curves,
cached generations on a rerun, and clear errors."""

from __future__ import annotations

import json

import pytest

from tolerances import model_atol, sum_atol
from distillm.cli import main
from distillm.evaluation.judge import VerdictCache
from distillm.evaluation.suite import EvalError, EvalSettings, ModelSpec, run_evaluation
from distillm.models import prune_layers
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

FAST = dict(num_prompts=3, max_new_tokens=6, max_prompt_length=256, max_length=256, num_math=2)


class CountingJudge:
    """Prefers the longer answer (ties on equal length); counts its calls."""

    identity = "counting-judge"

    def __init__(self):
        self.calls = 0

    def complete(self, messages):
        self.calls += 1
        text = messages[-1]["content"]
        a = text.split("[Answer A]")[1].split("[Answer B]")[0]
        b = text.split("[Answer B]")[1].split("Ignore the order")[0]
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"


def test_identical_model_has_zero_divergence_and_pruned_one_does_not(tmp_path):
    models = [ModelSpec("teacher", "tiny-random"), ModelSpec("copy", "tiny-random"),
              ModelSpec("pruned", "tiny-random", layers="0,3")]
    settings = EvalSettings(tasks=("divergence", "rouge", "perplexity", "math", "judge"), teacher="teacher", **FAST)
    judge = CountingJudge()
    results = run_evaluation(models, settings, tmp_path, judge=judge)
    copy, pruned, teacher = (results["models"][n]["metrics"] for n in ("copy", "pruned", "teacher"))
    # the same weights: p = q up to fp32 rounding, so each per-token sum over the vocabulary is 0 (KL, TVD) or
    # sum(p) = 1 (acceptance) up to the rounding of a sum of V probabilities
    from distillm.testing.tiny import build_tiny_tokenizer

    atol = sum_atol(len(build_tiny_tokenizer()), 1.0)
    assert copy["kl"] == pytest.approx(0.0, abs=atol) and copy["tvd"] == pytest.approx(0.0, abs=atol)
    assert copy["acceptance_rate"] == pytest.approx(1.0, abs=atol)
    assert copy["rouge_l"] == 1.0  # same weights, same greedy decoding, same prompts: the same responses
    assert copy["win_rate"] == 0.5  # identical answers: every comparison a tie
    assert pruned["kl"] > 0.01 and pruned["tvd"] > 0.01 and pruned["perplexity"] > copy["perplexity"]
    assert "rouge_l" not in teacher and "kl" not in teacher  # no score against itself
    assert copy["distinct_2"] == teacher["distinct_2"] > 0  # reference-free: the teacher has one too
    assert results["models"]["teacher"]["details"]["math"]["total"] == 2
    # two candidates, three prompts, both orders; identical requests (the copy's answers equal the teacher's,
    # so both orders read the same) are asked once
    calls = judge.calls
    assert 3 <= calls <= 12 and calls == len(VerdictCache(tmp_path / "judge_verdicts.jsonl"))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["settings"]["seed"] == 0 and on_disk["models"]["copy"]["metrics"] == copy
    report = (tmp_path / "report.md").read_text()
    assert "| copy |" in report and (tmp_path / "metrics.png").stat().st_size > 1000
    # a rerun reuses the generations and every verdict: no judge call, the same figures
    again = run_evaluation(models, settings, tmp_path, judge=judge)
    assert judge.calls == calls and again["models"]["pruned"]["metrics"] == pruned
    # other settings never silently reuse generations made with these
    with pytest.raises(EvalError, match="other settings"):
        run_evaluation(models, EvalSettings(tasks=("rouge",), teacher="teacher", **{**FAST, "max_new_tokens": 7}),
                       tmp_path)


def _fake_run(root):
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_model(tokenizer, num_layers=4, seed=0)
    student = prune_layers(teacher, [0, 3])
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    (root / "config.yaml").write_text("output_dir: x\nmodel:\n  teacher: tiny-random\n  student: null\n"
                                      "  student_layers: '0,3'\n")
    (root / "logs").mkdir()
    (root / "logs" / "train_log.jsonl").write_text("".join(
        json.dumps({"loss": 3.0 - 0.5 * s, "skl": 1.0 / s, "srkl": 2.0 / s, "skew_t": 0.1, "skew_s": 0.1,
                    "b": 1.0 + 0.1 * s, "learning_rate": 1e-3, "epoch": s / 4, "step": s}) + "\n" for s in range(1, 5)))


def test_cli_eval_of_a_run_directory(tmp_path, capsys):
    run = tmp_path / "myrun"
    run.mkdir()
    _fake_run(run)
    out = tmp_path / "eval"
    code = main(["-q", "eval", "--run", str(run), "--tasks", "divergence,rouge", "--num-prompts", "2",
                 "--max-new-tokens", "5", "--output-dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "myrun", "myrun-initial"]
    # the saved student is the teacher pruned to layers 0 and 3, exactly the run's initial student
    distilled, initial = results["models"]["myrun"]["metrics"], results["models"]["myrun-initial"]["metrics"]
    # the same weights loaded two ways: the same KL up to fp32 rounding over the held-out tokens (2 x 5 at most)
    from distillm.testing.tiny import build_tiny_tokenizer, tiny_llama_config

    config = tiny_llama_config(len(build_tiny_tokenizer()), num_layers=2)
    assert distilled["kl"] == pytest.approx(initial["kl"], rel=0, abs=model_atol(config, 10, initial["kl"]))
    assert distilled["kl"] > 0
    assert (out / "training_curves.png").stat().st_size > 1000
    assert "## Training curves" in (out / "report.md").read_text()
    assert "| myrun |" in capsys.readouterr().out
    assert results["command"].startswith("distillm -q eval --run")


def test_cli_eval_errors_name_the_option(tmp_path, capsys):
    assert main(["eval", "--model", "a=tiny-random", "--tasks", "rouge,blue", "--output-dir", str(tmp_path)]) == 2
    assert "Unknown task(s) blue" in capsys.readouterr().err
    assert main(["eval", "--model", "a=tiny-random", "--tasks", "divergence", "--output-dir", str(tmp_path)]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "nope"), "--output-dir", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert main(["eval", "--teacher", "tiny-random", "--tasks", "judge", "--output-dir", str(tmp_path)]) == 2
    assert "needs a judge" in capsys.readouterr().err
