"""`distillm compare`: every variant x seed trained and evaluated on the same budget, one table, resumable."""

import json
import logging
import math
import re

import pytest

from distillm.compare import (
    CompareError, CompareSettings, Comparison, generated_tokens, mean_std, ranking, summarise, write_results,
)
from distillm.evaluation.degeneracy import degeneracy_figures


def tiny_settings(out, **kwargs) -> CompareSettings:
    values = dict(output_dir=str(out), size="tiny", teacher="tiny-random", student_layers="0,3",
                  variants=["distillm2", "kd", "contrastive+b_ramp"], seeds=[0, 1], learning_rate=3e-3)
    return CompareSettings(**{**values, **kwargs})


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


@pytest.mark.slow
def test_comparison_end_to_end_then_resume_reruns_only_the_missing_cell(tmp_path, caplog):
    out = tmp_path / "cmp"
    summary = Comparison(tiny_settings(out), command="distillm compare --size tiny").run()
    text = (out / "results.md").read_text()
    keys = summary["metric_keys"]
    assert keys[:4] == ["teacher_nll", "kl", "tvd", "rouge_l"] and "math_accuracy" in keys
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert sorted((c["variant"], c["seed"]) for c in cells) == sorted(
        (v, s) for v in ("distillm2", "kd", "contrastive+b_ramp") for s in (0, 1))
    for cell in cells:  # the same budget: same steps; generation recorded
        assert cell["steps"] == 4 and cell["teacher_tokens"] > 0
        assert (cell["student_tokens"] > 0) == (cell["variant"] != "kd")
    for label in ("distillm2", "kd", "+ b ramp", "all (DistiLLM-2)"):
        row = table_row(text, label)
        values = row[:len(keys)]
        assert all(re.fullmatch(r"-?\d+\.\d+ ± \d+\.\d+", v) for v in values), (label, row)
    # each mean ± std is the mean and sample std of that variant's cells
    for variant in ("distillm2", "kd"):
        kls = [c["metrics"]["kl"] for c in cells if c["variant"] == variant]
        assert table_row(text, variant)[keys.index("kl")] == f"{sum(kls) / 2:.3f} ± {abs(kls[0] - kls[1]) / math.sqrt(2):.3f}"
    teacher, initial = table_row(text, "teacher"), table_row(text, "initial student (pruned, untrained)")
    assert teacher[keys.index("kl")] == "—" and re.fullmatch(r"\d+\.\d+", initial[keys.index("kl")])
    assert "distinct_2" in keys and re.fullmatch(r"\d\.\d+", teacher[keys.index("distinct_2")])
    # degeneracy and the preference over the initial student's answers, from the teacher's per-answer scores
    for label in ("distillm2", "kd"):
        row = table_row(text, label)
        assert re.fullmatch(r"no|\*\*yes\*\* \(\d/2 seeds\)", row[len(keys)])
        assert re.fullmatch(r"(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]", row[len(keys) + 1]), row
    preference = summary["variants"]["kd"]["preference"]
    assert preference["prompts"] == 3 and preference["seeds"] == 2 and preference["low"] <= preference["rate"] <= preference["high"]
    assert all((out / "eval" / "generations" / name / "teacher_scores.json").is_file()
               for name in ("teacher", "initial", "kd-seed0", "distillm2-seed1"))
    assert "distinct-2 ≈" in text
    # the answers behind the figures: per held-out prompt, teacher, initial student and each variant's first seed
    from distillm.data.builtin import load_builtin
    from distillm.io import read_jsonl

    answers = summary["answers"]
    assert answers["seed"] == 0 and len(answers["prompts"]) == 3
    instructions = {r["id"]: r["prompt"] for r in load_builtin("eval")}
    for entry in answers["prompts"]:
        assert list(entry["answers"]) == ["teacher", "initial student", "distillm2", "kd", "contrastive+b_ramp"]
        assert entry["prompt"] == instructions[entry["id"]]
        for label, name in (("teacher", "teacher"), ("kd", "kd-seed0"),
                            ("contrastive+b_ramp", "contrastive_b_ramp-seed0")):
            rows = read_jsonl(out / "eval" / "generations" / name / "responses.jsonl")
            assert entry["answers"][label] == next(r["response"] for r in rows if str(r["id"]) == entry["id"])
    assert "## Answers (greedy, held-out, first 3 prompts; each variant's seed 0" in text
    assert f"**{' '.join(answers['prompts'][0]['prompt'].split())}**" in text
    assert not list(out.glob("cells/*/seed_*/run/checkpoints"))  # finished cells keep their student, not checkpoints
    assert all((out / c["run_dir"] / "student" / "model.safetensors").is_file() for c in cells)
    assert (out / "comparison.png").stat().st_size > 0 and (out / "ablation.png").stat().st_size > 0
    # the teacher's scores on the shared teacher responses: built by each method's first cell, read by the others
    for variant in ("kd", "distillm2"):
        first, second = (json.loads((out / "cells" / variant / f"seed_{s}" / "run" / "metrics.json").read_text())
                         ["training"]["teacher_cache"] for s in (0, 1))
        assert first["mode"] == second["mode"] == "exact"
        assert first["built_sequences"] == 8 and second["built_sequences"] == 0  # the tiny size's 8 prompts
        assert first["cached_sequences"] == second["cached_sequences"] == 8 * 2  # every row, both rounds
        # kd scores nothing else; distillm2 still runs the teacher on its fresh student responses
        assert first["teacher_sequences"] == second["teacher_sequences"] == (0 if variant == "kd" else 8 * 2)
    assert len(list((out / "shared" / "teacher_cache" / "kd").glob("*.npy"))) == 1

    # a cell finished before distinct-2 existed: the report computes it from the cell's stored generations
    old_cell = out / "cells" / "kd" / "seed_0" / "cell.json"
    record = json.loads(old_cell.read_text())
    expected = {key: record["metrics"].pop(key) for key in ("distinct_2", "loop_rate", "empty_rate")}
    old_cell.write_text(json.dumps(record))
    backfilled = Comparison(tiny_settings(out)).run(report_only=True)
    backfilled_metrics = next(c for c in backfilled["cells"] if (c["variant"], c["seed"]) == ("kd", 0))["metrics"]
    # the same function of the same stored texts (JSON keeps a float exactly)
    assert {key: backfilled_metrics[key] for key in expected} == expected
    assert "distinct_2" not in json.loads(old_cell.read_text())["metrics"]  # the cell's own record is kept

    # resume: one cell's final file gone -> only that cell is redone (its run is finished: evaluated again)
    gone = out / "cells" / "kd" / "seed_1" / "cell.json"
    gone.unlink()
    others = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/seed_*/cell.json")}
    partial = Comparison(tiny_settings(out)).run(report_only=True)  # the finished cells only, nothing run
    assert len(partial["cells"]) == 5 and not gone.is_file()
    assert "Partial results: 5 of 6 cells finished" in (out / "results.md").read_text()
    assert table_row((out / "results.md").read_text(), "kd")[len(keys) + 2] == "0"  # kd's seeds column (after degenerate, preference)
    again = Comparison(tiny_settings(out)).run()
    assert again["cells_skipped"] == 5 and gone.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    reported = next(c["metrics"] for c in cells if (c["variant"], c["seed"]) == ("kd", 1))
    reported.pop("distinct_2_gap")  # the report derives it from the teacher's distinct-2
    assert json.loads(gone.read_text())["metrics"] == reported

    # an unfinished cell whose run was started with other run settings (an older version of the comparison):
    # started again under the current ones, not refused
    cell_dir = out / "cells" / "distillm2" / "seed_1"
    (cell_dir / "cell.json").unlink()
    saved = cell_dir / "run" / "config.yaml"
    saved.write_text(saved.read_text().replace("teacher_cache: exact", "teacher_cache: 'off'"))
    with caplog.at_level(logging.WARNING, logger="distillm"):
        redone = Comparison(tiny_settings(out)).run()
    assert redone["cells_skipped"] == 5 and (cell_dir / "cell.json").is_file()
    assert "teacher_cache: exact" in saved.read_text()
    assert any("started with other settings" in r.getMessage() and "training.teacher_cache" in r.getMessage()
               for r in caplog.records)

    # more seeds or variants continue the same comparison; another protocol is refused
    with pytest.raises(CompareError, match="differs in: learning_rate"):
        Comparison(tiny_settings(out, learning_rate=1e-3)).run()


@pytest.mark.slow
def test_the_quantized_regime_starts_every_cell_from_round_to_nearest(tmp_path):
    """--student-quant: each cell's student is the whole teacher fake-quantized (not a pruned copy), and the
    reference "initial" student is the round-to-nearest model that every cell starts from."""
    import torch

    from distillm.evaluation.suite import EvalSettings, ModelSpec, _load
    from distillm.models import load_model

    out = tmp_path / "cmp"
    settings = tiny_settings(out, student_quant="int4", variants=["kd"], seeds=[0])
    comparison = Comparison(settings, command="distillm compare --size tiny --student-quant int4")
    config = comparison.run_config("kd", 0, tmp_path / "unused")
    assert (config.model.student_quant, config.model.student_quant_group_size) == ("int4", 32)
    summary = comparison.run()
    text = (out / "results.md").read_text()
    assert "initial student (int4 round-to-nearest, groups of 32, untrained)" in text
    assert "fake-quantized to int4 in groups of 32" in text
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    assert cell["steps"] == 4
    # the initial student: every linear weight of the decoder on the int4 grid, embeddings untouched, all layers
    teacher = load_model("tiny-random", dtype="float32")[0]
    initial = _load(ModelSpec("initial", "tiny-random", quant="int4"), EvalSettings(dtype="float32"), {}).model
    assert initial.config.num_hidden_layers == teacher.config.num_hidden_layers
    weight = initial.model.layers[0].self_attn.q_proj.weight.detach()
    groups = weight.reshape(weight.shape[0], -1, 32)
    assert all(len(torch.unique(g)) <= 16 for g in groups.reshape(-1, 32))  # int4: at most 16 levels per group
    assert not torch.equal(weight, teacher.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(initial.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert summary["reference"]["initial"]["kl"] > 0


@pytest.mark.slow
def test_every_cell_starts_from_a_given_student_and_the_reference_is_that_student(tmp_path):
    """--student PATH (e.g. a warm-up's student): each cell's run starts from that saved model, and the reference
    row "initial" -- and so the preference figure -- is that model, not the pruned teacher."""
    from distillm.models import load_model, prune_layers

    teacher, tokenizer = load_model("tiny-random", dtype="float32")
    warm = tmp_path / "warm"
    prune_layers(teacher, [1, 2]).save_pretrained(warm)  # not the pruned default's layers 0,3
    tokenizer.save_pretrained(warm)
    given = Comparison(tiny_settings(tmp_path / "given", student=str(warm), variants=["kd"], seeds=[0]),
                       command="distillm compare --size tiny --student warm")
    assert given.run_config("kd", 0, tmp_path / "unused").model.student == str(warm)
    summary = given.run()
    pruned = Comparison(tiny_settings(tmp_path / "pruned", variants=["kd"], seeds=[0])).reference()
    assert summary["reference"]["initial"]["kl"] != pytest.approx(pruned["initial"]["kl"])
    run_metrics = json.loads((tmp_path / "given" / "cells" / "kd" / "seed_0" / "run" / "metrics.json").read_text())
    assert run_metrics["student"] == str(warm)
    text = (tmp_path / "given" / "results.md").read_text()
    assert f"initial student (`{warm}`, untrained)" in text and f"the saved model `{warm}`" in text
    assert summary["variants"]["kd"]["preference"]["prompts"] == 3
    with pytest.raises(CompareError, match="--student .*nowhere: no model there"):
        Comparison(tiny_settings(tmp_path / "bad", student=str(tmp_path / "nowhere"))).check_directory()
    with pytest.raises(CompareError, match="exclude each other"):
        tiny_settings(tmp_path, student=str(warm), student_quant="int4")


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(CompareError, match="Unknown variant.*gdk"):
        tiny_settings(tmp_path, variants=["distillm2", "gdk"])
    with pytest.raises(CompareError, match="distinct"):
        tiny_settings(tmp_path, seeds=[0, 0])
    with pytest.raises(CompareError, match="judge-model"):
        tiny_settings(tmp_path, judge_url="http://localhost:8000/v1")
    with pytest.raises(CompareError, match="Unknown --student-quant 'int5'"):
        tiny_settings(tmp_path, student_quant="int5")
    with pytest.raises(CompareError, match="multiple of 32"):
        tiny_settings(tmp_path, student_quant="int4", student_quant_group_size=48)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.txt").write_text("mine")
    with pytest.raises(CompareError, match="holds no comparison"):
        Comparison(tiny_settings(tmp_path / "x")).check_directory()


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_generated_tokens_adds_rounds_train_log_and_used_teacher_responses(tmp_path):
    run = tmp_path / "run"
    for k, lengths in enumerate([[3, 4], [5]]):
        (run / "rounds" / f"round_{k}").mkdir(parents=True)
        (run / "rounds" / f"round_{k}" / "student.jsonl").write_text(
            "".join(json.dumps({"response_ids": [1] * n}) + "\n" for n in lengths))
    (run / "logs").mkdir()
    (run / "logs" / "train_log.jsonl").write_text(
        json.dumps({"loss": 1, "generated_student_tokens": 10, "generated_teacher_tokens": 2}) + "\n"
        + json.dumps({"loss": 1}) + "\n")
    shared = tmp_path / "teacher.jsonl"
    shared.write_text(json.dumps({"response_ids": [1] * 7}) + "\n")
    assert generated_tokens(run, uses_teacher_rows=True, shared_teacher_file=shared) == {
        "student_tokens": 3 + 4 + 5 + 10, "teacher_tokens": 2 + 7}
    assert generated_tokens(run, uses_teacher_rows=False, shared_teacher_file=shared)["teacher_tokens"] == 2


def test_a_cell_claimed_by_a_live_process_is_skipped_and_a_stale_claim_taken_over(tmp_path):
    import os
    import subprocess
    import sys

    from distillm.compare import CellClaim

    with CellClaim(tmp_path / "a") as first:
        assert first and (tmp_path / "a" / "running.pid").read_text() == str(os.getpid())
        with CellClaim(tmp_path / "a") as second:
            assert not second  # held by this (live) process
    assert not (tmp_path / "a" / "running.pid").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "running.pid").write_text(gone.stdout.strip())  # a finished process: a stale claim
    with CellClaim(tmp_path / "b") as claimed:
        assert claimed


def test_a_collapsed_student_ranked_first_on_teacher_nll_is_flagged_and_ranked_last(tmp_path):
    """The figures of docs/results/full: minillm's answers, one token repeated, got the best teacher NLL (0.626,
    the teacher's own is 0.610). Ranked by that column alone (the rule before the degenerate flag) it came first;
    now it is flagged from its answers' figures and ranked after every working variant, marked."""
    teacher_texts = ["Paris is the capital of France.", "Two plus two is four, so the answer is 4.",
                     "Blue is a calm colour often linked with the sea.", "Apples, bananas and cherries are fruits."]
    answers = {"kd": [t.replace("the", "a") for t in teacher_texts],
               "seqkd": [" ".join(reversed(t.split())) for t in teacher_texts],
               "minillm": ["the the the the the the the the the the the the"] * 4}
    nll = {"kd": (2.281, 2.2), "seqkd": (2.446, 2.5), "minillm": (0.626, 0.7)}  # two seeds each

    def cell(variant, seed):
        metrics = {"teacher_nll": nll[variant][seed], "kl": 5.0 + seed, **degeneracy_figures(answers[variant])}
        return {"variant": variant, "seed": seed, "metrics": metrics, "steps": 40, "student_tokens": 0,
                "teacher_tokens": 10, "wall_seconds": 1.0}

    cells = [cell(v, s) for v in answers for s in (0, 1)]
    reference = {"teacher": {"teacher_nll": 0.610, **degeneracy_figures(teacher_texts)},
                 "initial": {"teacher_nll": 7.3, "kl": 13.0, **degeneracy_figures(["x y z w"] * 2 + ["a b c d"])}}
    preferences = {"minillm": {"rate": 0.75, "low": 0.5, "high": 1.0}}
    summary = summarise(cells, reference, tiny_settings(tmp_path), preferences=preferences)

    means = {v: e["metrics"]["teacher_nll"][0] for v, e in summary["variants"].items()}
    assert sorted(means, key=means.get)[0] == "minillm"  # the rule before: the collapsed student first
    assert ranking(summary, "teacher_nll") == ["kd", "seqkd", "minillm"]
    assert summary["variants"]["minillm"]["degenerate_seeds"] == [0, 1]
    assert not summary["variants"]["kd"]["degenerate_seeds"] and not summary["variants"]["seqkd"]["degenerate_seeds"]
    d2 = degeneracy_figures(answers["minillm"])["distinct_2"]
    assert d2 < 0.1  # (both seeds' answers are the same: their mean is exact)
    assert summary["variants"]["minillm"]["metrics"]["distinct_2_gap"][0] == abs(d2 - reference["teacher"]["distinct_2"])

    text = write_results(summary, tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    assert header.count("|") == len(table_row(text, "kd")) + 2  # one column per cell: no '|' inside a label
    assert "teacher NLL of responses: kd > seqkd > minillm (degenerate)" in text
    assert re.search(r"- minillm: seed 0: repetition .*distinct_2 .* < ", text)
    keys = summary["metric_keys"]
    assert {"repetition", "loop_rate", "empty_rate", "distinct_2_gap"} <= set(keys)
    row = table_row(text, "minillm")
    assert row[len(keys)] == "**yes** (2/2 seeds)" and row[len(keys) + 1] == "0.750 [0.500, 1.000]"
    assert table_row(text, "kd")[len(keys):len(keys) + 2] == ["no", "—"]
    assert table_row(text, "teacher")[keys.index("distinct_2_gap")] == "0.000"


def test_answer_scores_are_kept_for_the_same_answers_and_redone_for_new_ones(tmp_path):
    from distillm.evaluation.divergence import sequence_log_likelihoods
    from distillm.io import write_jsonl
    from distillm.models import real_vocab_size

    comparison = Comparison(tiny_settings(tmp_path))
    folder = tmp_path / "eval" / "generations" / "kd-seed0"
    folder.mkdir(parents=True)
    rows = [{"id": "a", "prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10]},
            {"id": "b", "prompt_ids": [11, 12], "response_ids": [13]}]
    write_jsonl(folder / "responses.jsonl", rows)
    teacher, tokenizer = comparison.teacher_model()
    expected = sequence_log_likelihoods(teacher, rows, vocab_size=real_vocab_size(tokenizer),
                                        pad_token_id=tokenizer.pad_token_id,
                                        max_length=comparison.eval_settings().max_length)
    assert comparison.answer_scores("kd-seed0") == {"a": expected[0], "b": expected[1]}
    saved = json.loads((folder / "teacher_scores.json").read_text())
    saved["scores"]["a"] = [-1.0, 3]  # the kept file is what a rerun reads
    (folder / "teacher_scores.json").write_text(json.dumps(saved))
    assert comparison.answer_scores("kd-seed0")["a"] == (-1.0, 3)
    rows[0]["response_ids"] = [8, 9]  # new answers: scored again
    write_jsonl(folder / "responses.jsonl", rows)
    assert comparison.answer_scores("kd-seed0")["a"][1] == 2


@pytest.mark.slow
def test_an_archived_comparison_continues_on_a_new_machine_with_only_the_missing_cells(tmp_path):
    """--archive: the small records of a comparison (shared work, reference, finished cells) are kept in a folder
    of their own; a new output directory restored from it reports the same results and runs only new cells."""
    archive = tmp_path / "archive"
    first = Comparison(tiny_settings(tmp_path / "a", variants=["kd", "contrastive"], seeds=[0]), archive=archive).run()
    for rel in ("compare.json", "shared/prompts.jsonl", "shared/teacher_train.jsonl", "shared/reference.json",
                "cells/kd/seed_0/cell.json", "cells/kd/seed_0/run/logs/train_log.jsonl",
                "eval/generations/teacher/responses.jsonl", "eval/generations/initial/teacher_scores.json",
                "eval/generations/kd-seed0/responses.jsonl", "eval/generations/kd-seed0/teacher_scores.json",
                "cells/contrastive/seed_0/run/rounds/round_1/student.jsonl"):  # what the student wrote, per round
        assert (archive / rel).is_file(), rel
    assert not list(archive.rglob("*.safetensors")) and not (archive / "shared" / "teacher_cache").exists()

    # "another machine": an empty output directory, restored from the archive; nothing is trained again
    again = Comparison(tiny_settings(tmp_path / "b", variants=["kd", "contrastive"], seeds=[0]), archive=archive).run()
    assert again["cells_skipped"] == 2
    assert not (tmp_path / "b" / "cells" / "kd" / "seed_0" / "run").exists()
    assert again["cells"] == first["cells"] and again["reference"] == first["reference"]
    assert again["variants"] == first["variants"]  # every figure, the preference intervals among them

    # one more seed: only that cell runs, and the archive gains it
    more = Comparison(tiny_settings(tmp_path / "b", variants=["kd"], seeds=[0, 1]), archive=archive).run()
    assert more["cells_skipped"] == 1 and len(more["cells"]) == 2  # kd seed 0 restored, kd seed 1 run
    assert (archive / "cells" / "kd" / "seed_1" / "cell.json").is_file()
    assert (tmp_path / "b" / "cells" / "kd" / "seed_1" / "run" / "student").is_dir()

    # another protocol, or an output directory made from other shared work, is refused before any work
    with pytest.raises(CompareError, match=r"--archive .* \(differs in: learning_rate"):
        Comparison(tiny_settings(tmp_path / "c", variants=["kd"], seeds=[0], learning_rate=1e-3),
                   archive=archive).run()
    other = tmp_path / "d"
    Comparison(tiny_settings(other, variants=["kd"], seeds=[0])).check_directory()
    (other / "shared").mkdir()
    (other / "shared" / "prompts.jsonl").write_text('{"id": "x", "prompt": "other"}\n')
    with pytest.raises(CompareError, match=r"prompts.jsonl differs from the archive's"):
        Comparison(tiny_settings(other, variants=["kd"], seeds=[0]), archive=archive).run()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    with pytest.raises(CompareError, match="holds no compare.json"):
        Comparison(tiny_settings(tmp_path / "e", variants=["kd"], seeds=[0]), archive=stray).run()
