"""Config: presets, YAML (flat and sectioned), command-line overrides, clear errors for bad keys and values."""

import pytest

from distillm.config import ConfigError, PRESETS, RunConfig, load_config, option_fields


def test_defaults_follow_method_md():
    c = RunConfig()
    assert (c.method.skew, c.method.skew_min, c.method.skew_max) == (0.1, 0.01, 0.5)
    assert c.method.curriculum and c.method.b_ramp
    assert (c.method.b_start, c.method.b_end, c.method.ramp_fraction) == (1.0, 1.5, 0.5)
    assert (c.generation.temperature, c.generation.top_p) == (0.8, 0.95)
    assert (c.training.learning_rate, c.training.lr_scheduler_type, c.training.warmup_ratio) == (5e-5, "cosine", 0.1)
    assert c.loss.reduction == "seq_mean" and not c.model.trust_remote_code


def test_option_names_are_unique_and_documented():
    fields = option_fields()
    assert len(fields) == sum(1 for _ in fields)  # dict: a duplicate name would have collapsed
    for name, (_, f) in fields.items():
        assert f.metadata.get("help"), f"option {name} has no help text"


def test_yaml_flat_and_sectioned_then_overrides(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("teacher: my/teacher\nlearning_rate: 2e-5\ncurriculum: false\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("model:\n  teacher: my/teacher\ntraining:\n  learning_rate: 2.0e-5\nmethod:\n  curriculum: no\n")
    for path in (flat, nested):
        c = load_config(path, preset="demo", overrides={"rounds": "4", "max_new_tokens": 8})
        assert c.model.teacher == "my/teacher" and c.training.learning_rate == 2e-5 and c.method.curriculum is False
        assert c.training.rounds == 4 and c.generation.max_new_tokens == 8
        assert c.data.num_prompts == PRESETS["demo"]["num_prompts"]  # the preset stays under the file


def test_unknown_key_suggests_the_closest_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rte: 1e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown option 'learning_rte'.*Did you mean 'learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"section 'model'.*'teachr'.*'teacher'"):
        load_config(overrides={"model": {"teachr": "x"}})
    with pytest.raises(ConfigError, match="section 'loss'"):
        load_config(overrides={"loss": {"teacher": "x"}})  # a real option, but in the wrong section


def test_bad_values_name_the_option():
    with pytest.raises(ConfigError, match="'rounds' expects int"):
        load_config(overrides={"rounds": "two"})
    with pytest.raises(ConfigError, match="'rounds' expects int"):
        load_config(overrides={"rounds": 1.5})
    with pytest.raises(ConfigError, match="'curriculum' expects bool"):
        load_config(overrides={"curriculum": "maybe"})
    with pytest.raises(ConfigError, match="skew_min <= skew <= skew_max"):
        load_config(overrides={"skew_max": 0.05})  # below skew
    with pytest.raises(ConfigError, match="eval_samples 4 with temperature 0: greedy answers are the same"):
        load_config(overrides={"eval_samples": 4, "temperature": 0.0})
    assert load_config(overrides={"eval_samples": 4}).evaluation.eval_samples == 4
    with pytest.raises(ConfigError, match="preset"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_earlier_option_names_load_with_a_warning(tmp_path, caplog):
    """A config.yaml written before the skew's one name (loss: alpha0, ...; method: v1_alpha) still loads, each
    earlier name mapped to today's with a warning that names both; the values land where today's names are."""
    old = tmp_path / "config.yaml"
    old.write_text("method:\n  method: distillm\n  v1_alpha: 0.3\nloss:\n  alpha0: 0.2\n  alpha_min: 0.05\n"
                   "  alpha_max: 0.4\n  curriculum: false\n  reduction: token_mean\n")
    with caplog.at_level("WARNING", logger="distillm"):
        c = load_config(old, preset="none")
    assert (c.method.skew, c.method.skew_min, c.method.skew_max, c.method.v1_skew) == (0.2, 0.05, 0.4, 0.3)
    assert c.method.curriculum is False and c.loss.reduction == "token_mean"
    warned = caplog.text
    for old_name, new_name in (("loss: alpha0", "method: skew"), ("method: v1_alpha", "method: v1_skew"),
                               ("loss: curriculum", "method: curriculum")):
        assert f"'{old_name}' is now '{new_name}'" in warned
    assert "reduction" not in warned
    flat = load_config(overrides={"alpha0": 0.3, "alpha-max": 0.45})
    assert (flat.method.skew, flat.method.skew_max) == (0.3, 0.45)
    with pytest.raises(ConfigError, match="section 'loss'"):  # only where an option lived before
        load_config(overrides={"loss": {"jsd_beta": 0.1}})


def test_optional_fields_accept_empty(tmp_path):
    c = load_config(overrides={"student": "", "eval_prompts": "none", "num_prompts": None})
    assert c.model.student is None and c.data.eval_prompts is None and c.data.num_prompts is None


def test_yaml_round_trip():
    c = load_config(preset="tiny", overrides={"learning_rate": 0.01})
    import yaml

    again = load_config(preset=None, overrides=yaml.safe_load(c.to_yaml()))
    assert again.flat() == c.flat()


@pytest.mark.parametrize("key,value,message", [
    ("loss_temperature", 0, "loss_temperature"),
    ("lr_scheduler_type", "cosin", "lr_scheduler_type must be one of"),
    ("warmup_ratio", 1.0, "warmup_ratio"),
    ("b_end", 2.5, r"'b_end' = 2.5 is out of range. Set --b-end \(YAML key b_end\) to a value >= 0 and <= 2"),
    ("gap_momentum", 1.0, "gap_momentum"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("num_prompts", 0, "num_prompts"),
    ("dtype", "int8", "dtype"),
])
def test_values_are_validated_before_any_work(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={key: value})


def test_a_run_directory_saved_with_earlier_names_is_the_same_config(tmp_path):
    """A config.yaml written before the renames (loss: alpha0, ...; method: v1_alpha) names the same run as today's
    config with the same values: rerunning the command continues it instead of refusing a 'different' config."""
    import yaml

    from distillm.pipeline import config_changes

    config = load_config(preset="tiny", overrides={"skew": 0.2, "curriculum": False})
    old = yaml.safe_load(config.to_yaml())
    method = old["method"]
    old["loss"].update({"alpha0": method.pop("skew"), "alpha_min": method.pop("skew_min"),
                        "alpha_max": method.pop("skew_max"), "curriculum": method.pop("curriculum")})
    method["v1_alpha"] = method.pop("v1_skew")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(old))
    assert config_changes(saved, config.to_yaml()) == []
    other = load_config(preset="tiny", overrides={"skew": 0.3, "curriculum": False})
    assert config_changes(saved, other.to_yaml()) == ["method.skew"]
