"""`distillm run --preset tiny --method M` completes for every method (at a reduced size), through the CLI."""

import json

import pytest

from distillm.cli import main
from distillm.config import METHOD_NAMES


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_end_to_end_from_the_cli(name, tmp_path, capsys):
    out = tmp_path / name
    code = main(["-q", "run", "--preset", "tiny", "--method", name, "--output-dir", str(out), "--rounds", "2",
                 "--num-prompts", "8", "--num-eval-prompts", "2", "--max-new-tokens", "8", "--save-steps", "100"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["method"] == name and metrics["training"]["method"] == name
    assert metrics["training"]["steps"] == 4  # 8 prompts / batch 4 x 2 rounds
    assert (out / "student" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss and abs(loss) < 1e6 for loss in losses)  # finite
    assert "Distilled student" in capsys.readouterr().out
