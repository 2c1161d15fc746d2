"""The `distillm` command end to end on tiny models, and its errors on bad input."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tolerances import sum_atol
from distillm.cli import _overrides, build_parser, main
from distillm.config import load_config
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

DISTILLM = str(Path(sys.executable).parent / "distillm")


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([DISTILLM, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = run_cli("run", "--preset", "tiny", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_tiny_run_produces_student_pairs_and_metrics(tiny_run):
    out, result = tiny_run
    assert (out / "student" / "model.safetensors").is_file() and (out / "student" / "config.json").is_file()
    assert (out / "student" / "tokenizer.json").is_file()
    assert (out / "config.yaml").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["training"]["steps"] == 24  # 32 prompts / batch 4 x 3 rounds
    # training loss went down: mean of the last round's steps below the first round's
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and mean(losses[-8:]) < mean(losses[:8])
    per_round = metrics["training"]["mean_loss_per_round"]
    assert len(per_round) == 3 and per_round[-1] < per_round[0]
    # the distilled student is closer to the teacher on held-out teacher responses
    assert metrics["after"]["kl"] < metrics["before"]["kl"]
    # per token sum(min(p, q)) and 1 - sum|p - q| / 2 over the vocabulary (probabilities <= 1): two fp32 sums
    vocab = len(build_tiny_tokenizer())
    assert metrics["after"]["acceptance_rate"] == pytest.approx(1 - metrics["after"]["tvd"], rel=0,
                                                                abs=2 * sum_atol(vocab, 1.0))
    assert "held-out metric" in result.stdout and "Distilled student" in result.stdout
    # the models' next-token entropies on the teacher's responses: the teacher's is the same before and after
    import math
    assert metrics["before"]["teacher_entropy"] == metrics["after"]["teacher_entropy"]
    assert all(0 < metrics[tag][key] <= math.log(vocab) for tag in ("before", "after")
               for key in ("student_entropy", "teacher_entropy"))
    assert "entropy on teacher responses (teacher:" in result.stdout
    # the degeneracy figures of the evaluation's samples, beside the teacher's, and the flag printed
    from distillm.evaluation.degeneracy import degeneracy_figures, degenerate

    for tag in ("before", "after"):
        samples = [json.loads(line)["response"] for line in (out / "eval" / f"{tag}_samples.jsonl").read_text().splitlines()]
        teacher = [json.loads(line)["response"] for line in (out / "data" / "teacher_eval.jsonl").read_text().splitlines()]
        figures, teacher_figures = degeneracy_figures(samples), degeneracy_figures(teacher)
        for key in ("distinct_2", "repetition", "loop_rate", "empty_rate"):
            assert metrics[tag][key] == figures[key] and metrics[tag][f"teacher_{key}"] == teacher_figures[key]
        assert metrics[tag]["degenerate"] == degenerate(figures, teacher_figures).flagged
        assert (f"DEGENERATE student samples ({tag})" in result.stdout) == metrics[tag]["degenerate"]


def test_eval_samples_average_several_sampled_sets_for_the_diversity_figures(tmp_path):
    from distillm.evaluation.degeneracy import set_figures

    out = tmp_path / "multi"
    result = run_cli("run", "--preset", "tiny", "--output-dir", str(out), "--num-prompts", "8", "--num-eval-prompts",
                     "4", "--rounds", "1", "--eval-samples", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())

    def responses(path):
        return [json.loads(line)["response"] for line in path.read_text().splitlines()]

    teacher = [responses(out / "data" / name) for name in ("teacher_eval.jsonl", "teacher_eval_1.jsonl",
                                                             "teacher_eval_2.jsonl")]
    assert all(len(rows) == 4 for rows in teacher) and len({tuple(rows) for rows in teacher}) == 3  # own seeds
    for tag in ("before", "after"):
        sets = [responses(out / "eval" / name) for name in (f"{tag}_samples.jsonl", f"{tag}_samples_1.jsonl",
                                                              f"{tag}_samples_2.jsonl")]
        assert all(len(rows) == 4 for rows in sets) and len({tuple(rows) for rows in sets}) == 3
        figures, teacher_figures = set_figures(sets), set_figures(teacher)  # means over the 3 sets
        assert metrics[tag]["eval_samples"] == 3
        for key in ("distinct_2", "repetition", "loop_rate", "empty_rate"):
            assert metrics[tag][key] == figures[key] and metrics[tag][f"teacher_{key}"] == teacher_figures[key]
    # the permutation test pairs (set, prompt): 12 pairs, so all 2 ** 12 swap patterns are enumerated
    assert metrics["after"]["distinct_2_change"]["patterns"] == 2 ** 12
    assert "distinct-2, 3 samples/prompt (teacher:" in result.stdout


def test_paired_data_uses_trl_dpo_columns_and_fresh_student_responses(tiny_run):
    out, _ = tiny_run
    teacher = {r["id"]: r for r in map(json.loads, (out / "data" / "teacher_train.jsonl").read_text().splitlines())}
    rounds = []
    for k in range(3):
        rows = [json.loads(line) for line in (out / "rounds" / f"round_{k}" / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == 32
        for row in rows:
            assert {"prompt", "chosen", "rejected"} <= set(row)
            assert row["chosen"] == teacher[row["id"]]["response"]  # teacher responses are generated once
        rounds.append([row["rejected"] for row in rows])
    assert rounds[0] != rounds[1] != rounds[2]  # the student's responses are regenerated every round
    assert not list(out.rglob("*.partial"))


def test_rerun_of_a_finished_run_is_a_no_op(tiny_run):
    out, _ = tiny_run
    before = (out / "metrics.json").read_text()
    result = run_cli("run", "--preset", "tiny", "--output-dir", str(out))
    assert result.returncode == 0 and (out / "metrics.json").read_text() == before


def test_run_dir_with_a_different_config_is_refused(tiny_run):
    out, _ = tiny_run
    result = run_cli("run", "--preset", "tiny", "--output-dir", str(out), "--learning-rate", "0.5")
    assert result.returncode == 2
    assert "different config" in result.stderr and "learning_rate" in result.stderr and "--overwrite" in result.stderr


def test_resume_from_checkpoint_after_losing_the_end_of_training(tmp_path, tiny_run):
    """Delete everything after a mid-run checkpoint: the rerun resumes from it and reaches the same step count."""
    out, _ = tiny_run
    import shutil

    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    for name in ("student", "metrics.json"):
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    checkpoints = sorted((copy / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "the tiny preset saves checkpoints"
    for extra in checkpoints[1:]:
        shutil.rmtree(extra)
    result = run_cli("run", "--preset", "tiny", "--output-dir", str(copy))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 24
    assert "Resuming training from" in result.stderr


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher", "--student-layers", "--prompts", "--max-new-tokens", "--rounds", "--skew",
                 "--v1-skew", "--jsd-beta", "--curriculum", "--b-ramp", "--reduction", "--output-dir", "--overwrite", "--preset"):
        assert flag in text
    assert "--alpha0" not in text  # an earlier name: accepted (test_earlier_flag_names_still_work), not listed


def test_earlier_flag_names_still_work(caplog):
    args = build_parser().parse_args(["run", "--alpha0", "0.2", "--v1-alpha", "0.3", "--skew-max", "0.4"])
    with caplog.at_level("WARNING", logger="distillm"):
        config = load_config(overrides=_overrides(args))
    assert (config.method.skew, config.method.v1_skew, config.method.skew_max) == (0.2, 0.3, 0.4)
    assert "'alpha0' is now 'skew'" in caplog.text and "'v1_alpha' is now 'v1_skew'" in caplog.text


def _run_main(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_malformed_jsonl_prompt_line_is_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    code, err = _run_main(capsys, "run", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--prompts",
                          str(prompts))
    assert code == 2 and "prompts.jsonl:2" in err


def test_missing_prompt_field_is_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "what?"}\n')
    code, err = _run_main(capsys, "run", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--prompts",
                          str(prompts))
    assert code == 2 and "prompts.jsonl:1" in err and "'prompt'" in err and "question" in err
    assert "--prompt-field" in err


def test_vocabulary_mismatch_is_a_clear_error(tmp_path, capsys):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra-token>"])
    model = build_tiny_model(tokenizer, num_layers=2)
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    # (--cross-tokenizer auto, the default, distils such a pair across tokenizers: tests/crosstok)
    code, err = _run_main(capsys, "run", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--student",
                          str(tmp_path / "student"), "--cross-tokenizer", "off")
    assert code == 2 and "vocabularies differ" in err and "--cross-tokenizer auto" in err


def test_unknown_model_name_is_a_clear_error(tmp_path, capsys):
    code, err = _run_main(capsys, "run", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), "--teacher",
                          "smollm3-huge")
    assert code == 2 and "Unknown model 'smollm3-huge'" in err and "smollm2-135m-instruct" in err


def test_mistyped_option_in_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_new_tokns: 5\n")
    code, err = _run_main(capsys, "run", "--config", str(config), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "max_new_tokns" in err and "max_new_tokens" in err


def test_generate_then_train_from_teacher_responses(tmp_path):
    responses = tmp_path / "teacher.jsonl"
    result = run_cli("generate", "--model", "tiny-random", "--prompts", "builtin:train", "--num-prompts", "8",
                     "--max-new-tokens", "8", "--output", str(responses))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(rows) == 8 and all({"id", "prompt", "response", "response_ids"} <= set(r) for r in rows)
    out = tmp_path / "train"
    result = run_cli("train", "--preset", "tiny", "--output-dir", str(out), "--teacher-responses", str(responses),
                     "--num-prompts", "8", "--rounds", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    copied = [json.loads(line) for line in (out / "data" / "teacher_train.jsonl").read_text().splitlines()]
    assert [r["response"] for r in copied] == [r["response"] for r in rows]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "before" not in metrics and metrics["training"]["steps"] == 2


def test_global_flags_before_run_options_imply_run(monkeypatch):
    import distillm.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_cmd_run", lambda args, evaluate_default: seen.update(vars(args)) or 0)
    assert cli.main(["-q", "--rounds", "2"]) == 0
    assert seen["command"] == "run" and seen["rounds"] == "2" and seen["quiet"]


def test_run_summary_prints_repetition_and_the_degenerate_flag():
    from distillm.cli import format_metrics

    figures = {"teacher_nll_of_student_samples": 1.0, "kl": 1.0, "tvd": 0.5, "acceptance_rate": 0.5,
               "distinct_2": 0.5, "teacher_distinct_2": 0.8, "teacher_repetition": 0.02}
    before = {**figures, "repetition": 0.1, "degenerate": False, "degenerate_reasons": []}
    after = {**figures, "repetition": 0.9, "degenerate": True,
             "degenerate_reasons": ["repetition 0.900 > 0.510 (teacher 0.020)"]}
    table = format_metrics({"before": before, "after": after})
    assert re.search(r"repetition of samples \(teacher: 0\.0200\) +0\.1000 +0\.9000  NO", table)
    assert "DEGENERATE student samples (after): repetition 0.900 > 0.510 (teacher 0.020)" in table
    assert "(before)" not in table
    table = format_metrics({"before": after, "after": before})
    assert "DEGENERATE student samples (before)" in table and "after: not degenerate" in table
    # the students' next-token entropy on the teacher's responses, beside the teacher's
    before_h, after_h = {**before, "student_entropy": 2.5}, {**after, "student_entropy": 1.3, "teacher_entropy": 1.27}
    assert re.search(r"entropy on teacher responses \(teacher: 1\.2700\) +2\.5000 +1\.3000  yes",
                     format_metrics({"before": before_h, "after": after_h}))
    assert "entropy" not in table  # a run evaluated before this figure existed: no line
    # a run evaluated before these figures existed (a resumed run's before.json): no repetition line, no flag
    old = {key: value for key, value in figures.items() if key != "teacher_repetition"}
    assert "repetition" not in format_metrics({"before": old, "after": old})


def test_run_summary_gives_the_permutation_p_value_of_a_diversity_change():
    from distillm.cli import format_metrics

    figures = {"teacher_nll_of_student_samples": 1.0, "kl": 1.0, "tvd": 0.5, "acceptance_rate": 0.5,
               "teacher_distinct_2": 0.9076}
    before, after = {**figures, "distinct_2": 0.9037}, {**figures, "distinct_2": 0.86}
    after["distinct_2_change"] = {"before_gap": 0.0039, "after_gap": 0.0476, "p_farther": 0.002, "p_closer": 0.998,
                                  "patterns": 4097}
    table = format_metrics({"before": before, "after": after})
    assert re.search(r"distinct-2 of samples \(teacher: 0\.9076\) +0\.9037 +0\.8600  NO \(closer to the "
                     r"teacher's is better; p = 0\.002\)", table)
    assert "paired permutation test" in table
    after["eval_samples"] = 4  # --eval-samples 4: the figures pool four sampled sets
    assert re.search(r"distinct-2, 4 samples/prompt \(teacher: 0\.9076\) +0\.9037 +0\.8600  NO",
                     format_metrics({"before": before, "after": after}))
    after.update(distinct_2=0.9045, distinct_2_change={**after["distinct_2_change"], "p_closer": 0.53})
    assert "yes (closer to the teacher's is better; p = 0.53, within noise)" in format_metrics(
        {"before": before, "after": after})
