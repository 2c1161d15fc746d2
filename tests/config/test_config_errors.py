"""Clear errors instead of tracebacks (issue 16, item 6): every option is type- and range-checked from its field's
metadata before any work starts; hostile config files (non-UTF-8, absurdly nested, a YAML alias bomb) are refused
quickly with a message naming the file."""

import math

import pytest

from distillm.cli import main
from distillm.config import AlignConfig, ConfigError, RunConfig, load_config, option_fields


def _kind(f):
    return str(f.type).split(" ")[0]


def _numeric_options(config_cls=RunConfig):
    return [(name, f) for name, (_, f) in option_fields(config_cls).items() if _kind(f) in ("int", "float")]


@pytest.mark.parametrize("key", ["seed", "generation_seed"])
@pytest.mark.parametrize("value", [-1, 4294967296, "-1", "4294967296"])
def test_seeds_out_of_numpy_range_are_refused(key, value):
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"'{key}' = -?\d+ is out of range\. Set {flag} \(YAML key {key}\) to a "
                                          r"value >= 0 and <= 4294967295"):
        load_config(overrides={key: value})
    assert load_config(overrides={key: 4294967295}).flat()[key] == 4294967295  # the top of the range is fine


@pytest.mark.parametrize("key,value", [("learning_rate", "inf"), ("weight_decay", "nan"), ("max_grad_norm", "nan"),
                                       ("learning_rate", float("inf")), ("temperature", "-inf"),
                                       ("max_grad_norm", "1e400")])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number.*Set --{key.replace('_', '-')} "
                                          rf"\(YAML key {key}\)"):
        load_config(overrides={key: value})


@pytest.mark.parametrize("name,f", _numeric_options(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_numeric_option_is_finite_and_within_its_range(name, f):
    meta = f.metadata
    assert {"ge", "gt", "le", "lt"} & set(meta), f"{name} declares no range (add ge/gt/le/lt to its opt())"
    bad = [float("nan"), float("inf")] if _kind(f) == "float" else [2**63, -(2**63) - 1]
    for key, step in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if key in meta:
            # the nearest value outside the range: the next int, or the adjacent float (not a guessed 1e-9 step)
            bad.append(meta[key] + step if _kind(f) == "int" else
                       math.nextafter(meta[key], step * math.inf) if step else meta[key])
    for value in bad:
        with pytest.raises(ConfigError, match=rf"'{name}'.*--{name.replace('_', '-')} \(YAML key {name}\)"):
            load_config(overrides={name: value})


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, [["nested"]]])
def test_non_scalar_values_are_refused_for_every_option(value):
    for name in option_fields(RunConfig):
        if isinstance(value, dict) and name in RunConfig.sections():  # 'method' is an option and a section
            continue
        with pytest.raises(ConfigError, match=rf"'{name}' expects a single .* got a (list|mapping)"):
            load_config(overrides={name: value})


def test_a_list_for_a_string_option_in_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  system_prompt: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: 'system_prompt' expects a single str .* got a list \[1, 2\]"):
        load_config(path)


def test_a_yaml_boolean_for_a_string_option_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("system_prompt: yes\n")
    with pytest.raises(ConfigError, match=r"'system_prompt' expects a string, got True.*Quote"):
        load_config(path)


def test_a_non_text_key_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="option names are text"):
        load_config(path)
    path.write_text("model:\n  1: 2\n")
    with pytest.raises(ConfigError, match="option names are text"):
        load_config(path)


def test_align_options_are_range_checked_too():
    with pytest.raises(ConfigError, match=r"'dpo_beta' = 0.0 is out of range"):
        load_config(overrides={"dpo_beta": 0}, config_cls=AlignConfig)
    with pytest.raises(ConfigError, match=r"'seed' = -1 is out of range"):
        load_config(overrides={"seed": -1}, config_cls=AlignConfig)


def test_non_utf8_config_file_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("rounds: 2\nsystem_prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c.yaml:2: not UTF-8 text \(byte 0xe9 at column 19\)"):
        load_config(path)


def test_deeply_nested_config_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("system_prompt: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="c.yaml: the YAML is nested too deeply"):
        load_config(path)


BOMB = """\
data:
  system_prompt:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _bomb(levels: int) -> str:
    """A billion-laughs YAML under system_prompt: `levels` lists, each holding the previous one 9 times."""
    lines = ["data:", "  system_prompt:", '    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly_in_little_memory(tmp_path):
    import tracemalloc

    # 7 levels expand to 9**7 (4.8 million) strings, over 30 MB as text: refused before any of it is built
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(7))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB to refuse the bomb"
    assert "bomb.yaml: 'system_prompt' expects a single str or empty value, got a mapping" in str(caught.value)
    assert len(str(caught.value)) < 500
    # the full bomb (9**10 strings, tens of gigabytes as text) is refused the same way
    path.write_text(_bomb(10))
    with pytest.raises(ConfigError, match="'system_prompt' expects a single str or empty value, got a mapping"):
        load_config(path)


def _run_main(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "'seed' = -1 is out of range. Set --seed (YAML key seed)"),
    (["--generation-seed", "4294967296"], "'generation_seed' = 4294967296 is out of range"),
    (["--learning-rate", "inf"], "'learning_rate' must be a finite number, got inf"),
    (["--weight-decay", "nan"], "'weight_decay' must be a finite number, got nan"),
    (["--max-grad-norm", "nan"], "'max_grad_norm' must be a finite number, got nan"),
])
def test_cli_bad_numbers_are_errors_not_tracebacks(tmp_path, capsys, args, message):
    code, err = _run_main(capsys, "train", "--preset", "tiny", "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2 and err.startswith("distillm: error: command line: ") and message in err
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "--seed = -1 is out of range. Set --seed to a value >= 0 and <= 4294967295"),
    (["--seed", "4294967296"], "--seed = 4294967296 is out of range. Set --seed to"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan. Set --temperature to"),
    (["--top-p", "1.5"], "--top-p = 1.5 is out of range. Set --top-p to"),
    (["--batch-size", "0"], "--batch-size = 0 is out of range. Set --batch-size to"),
])
def test_generate_checks_its_numbers_before_loading_the_model(tmp_path, capsys, monkeypatch, args, message):
    import distillm.models

    monkeypatch.setattr(distillm.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = _run_main(capsys, "generate", "--model", "tiny-random", "--output", str(tmp_path / "r.jsonl"), *args)
    assert code == 2 and message in err


@pytest.mark.parametrize("command,args,message", [
    (["speculate", "--draft", "d=tiny-random", "--teacher", "tiny-random"], ["--seed", "-1"],
     "--seed = -1 is out of range. Set --seed to a value >= 0 and <= 4294967295."),
    (["speculate", "--draft", "d=tiny-random", "--teacher", "tiny-random"], ["--temperature", "inf"],
     "--temperature must be a finite number, got inf."),
    (["eval", "--model", "m=tiny-random"], ["--seed", "4294967296"], "--seed = 4294967296 is out of range."),
    (["eval", "--model", "m=tiny-random"], ["--top-p", "nan"], "--top-p must be a finite number, got nan."),
])
def test_eval_and_speculate_check_their_numbers_before_any_work(tmp_path, capsys, command, args, message):
    code, err = _run_main(capsys, *command, "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2 and message in err and not (tmp_path / "o").exists()
