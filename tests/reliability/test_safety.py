"""Safety defaults: no model repository code runs unless asked (trust_remote_code off), weights load from
safetensors only (a pickle file is never unpickled), and model-written code for pass@k runs only in the
evaluation sandbox, never in the distillm process."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest

from distillm.cli import build_parser
from distillm.config import RunConfig
from distillm.evaluation.code import CodeProblem, check_completion
from distillm.evaluation.sandbox import SandboxLimits
from distillm.models import ModelLoadError, load_model
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

SRC = Path(__file__).resolve().parents[2] / "src" / "distillm"


class Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def saved_model(folder: Path) -> Path:
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, num_layers=2, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_trust_remote_code_is_off_by_default_everywhere():
    assert RunConfig().model.trust_remote_code is False
    parser = build_parser()
    for command in (["run"], ["train"], ["generate", "--model", "m", "--output", "o"]):
        args = parser.parse_args(command)
        assert getattr(args, "trust_remote_code", False) is False


def test_a_repository_with_its_own_code_does_not_run_it(tmp_path):
    folder = saved_model(tmp_path / "model")
    marker = tmp_path / "remote_code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig as "
                                    "EvilConfig, LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(str(folder))  # the built-in Llama class is used
    assert type(model).__module__.startswith("transformers.") and not marker.exists()
    # a model type only its own code knows is refused rather than run
    config["model_type"] = "evil_llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="Could not load model"):
        load_model(str(folder))
    assert not marker.exists()


def test_weights_load_from_safetensors_only_and_a_pickle_is_never_unpickled(tmp_path):
    folder = saved_model(tmp_path / "model")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "pickle_was_loaded"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder))
    assert "safetensors" in str(info.value)
    assert not marker.exists()


def test_model_written_code_runs_in_the_sandbox_not_in_this_process(tmp_path):
    outside = tmp_path / "written_by_the_model"
    problem = CodeProblem(id="p", kind="mbpp", prompt="Write f.", tests="assert f() == 1\n")
    response = ("```python\nimport os\nprint(os.getpid())\n"
                f"open({str(outside)!r}, 'w').write('escaped')\ndef f():\n    return 1\n```")
    result = check_completion(problem, response, SandboxLimits(timeout_s=20))
    assert not result.passed and not outside.exists()
    assert "PermissionError" in result.stderr or "refused" in result.stderr.lower()
    assert str(os.getpid()) not in result.stdout.split()
    # and the same program without the escape passes: the sandbox runs ordinary code
    ok = check_completion(problem, "```python\ndef f():\n    return 1\n```", SandboxLimits(timeout_s=20))
    assert ok.passed, ok.stderr


def test_only_the_sandbox_executes_code_or_starts_processes():
    """No exec/eval/compile of text, no pickle, no subprocess anywhere in distillm but the sandbox module."""
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval",
                                                                                                  "compile"):
                name = node.func.id
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                name = next((m for m in modules if m.split(".")[0] in ("pickle", "subprocess", "dill")), None)
            elif isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                name = "torch.load"
            if name and path.name != "sandbox.py":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}")
    assert not offenders, offenders
