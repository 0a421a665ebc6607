"""Config errors name the key and the fix; load + overrides + dump round-trips."""

import pathlib
import re

import pytest

import flaxformer_lite as ffl
from flaxformer_lite.config import ConfigError

PRESETS = sorted(p.stem for p in ffl.config.CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_layer=2"], "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
        (["modle.d_model=64"], "unknown config key 'modle'; did you mean 'model'?"),
        (["model.d_model=abc"], "model.d_model must be int, got str 'abc'"),
        (["model.d_model=true"], "model.d_model must be int, got bool True"),
        (["model.head_dim=abc"], "model.head_dim must be int, got str 'abc' or null"),
        (["model.position=rotary"], "model.position='rotary' is not one of 'learned' | 'sinusoidal'"),
        (["model.num_heads=5"], "model.d_model=96 is not divisible by model.num_heads=5: pick num_heads "
                                "dividing d_model, or set model.head_dim explicitly"),
        (["model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide model.num_heads=4"),
        (["model.position=rope", "model.head_dim=7"], "model.position=rope needs an even head dim, got 7"),
        (["model.sliding_window=0"], "model.sliding_window must be positive or null"),
        (["model.attention_types=[local, global]"], "model.attention_types has local layers but model.sliding_window"),
        (["model.attention_types=[local, nearby]"], "model.attention_types[1]='nearby' is not one of 'global' | 'local'"),
        (["model.rope_scaling={kind: yarn}"], "model.rope_scaling.kind='yarn' is not one of 'linear' | 'llama3'"),
        (["model.rope_scaling.factor=8"], "model.rope_scaling / model.rope_local_theta need model.position=rope"),
        (["model.logits_softcap=0"], "model.logits_softcap=0.0 must be positive or null"),
        (["model.remat_policy=dots_saveble"], "(did you mean 'dots_saveable'?)"),
        # A policy factory that needs arguments is not a policy.
        (["model.remat_policy=save_only_these_names"], "model.remat_policy='save_only_these_names' is not none"),
        (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_len=128"),
    ],
)
def test_bad_config_value_is_named_with_its_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        ffl.load_config("gpt_tiny", overrides=overrides)
    assert "gpt_tiny.yaml" in str(err.value)  # the file the value ends up in


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layers", "override 'model.num_layers' must look like key.sub=value, e.g. model.num_layers=2"),
        ("model.d_model=[1", "override 'model.d_model=[1': value is not valid YAML"),
        ("name.first=x", "override 'name.first=x': name is a value, not a section"),
    ],
)
def test_bad_override_string(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ffl.load_config("gpt_tiny", overrides=[override])


def test_missing_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match=re.escape("config file 'gpt_tinyy' not found; did you mean 'gpt_tiny'?")):
        ffl.load_config("gpt_tinyy")


def test_extends_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: `extends:` cycle through .*a\.yaml.*b\.yaml"):
        ffl.load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="extends 'nowhere.yaml', which does not exist next to it"):
        ffl.load_config(tmp_path / "c.yaml")


def test_errors_inside_a_yaml_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    unknown = r"bad\.yaml: unknown config key 'model\.d_modle'; did you mean 'model\.d_model'"
    with pytest.raises(ConfigError, match=unknown):
        ffl.load_config(bad)
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model must be a mapping, got list"):
        ffl.load_config(bad)
    bad.write_text("model: {d_model: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        ffl.load_config(bad)


@pytest.mark.parametrize("preset", PRESETS)
def test_load_override_dump_round_trip(preset, tmp_path):
    overrides = ["model.num_layers=3", "model.dropout_rate=0.25", "train.clip_norm=null", "data.batch_size=12"]
    cfg = ffl.load_config(preset, overrides=overrides)
    got = (cfg.model.num_layers, cfg.model.dropout_rate, cfg.train.clip_norm, cfg.data.batch_size)
    assert got == (3, 0.25, None, 12)
    path = tmp_path / "config.yaml"
    ffl.dump_config(cfg, path)
    again = ffl.load_config(path)
    assert again == cfg
    ffl.dump_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_presets_are_found_by_name_and_by_path():
    assert ffl.load_config("t5_tiny") == ffl.load_config(pathlib.Path(ffl.config.CONFIG_DIR) / "t5_tiny.yaml")


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-3 as a string; a float field takes it as the number.
    (tmp_path / "lr.yaml").write_text("name: lr\ntrain:\n  learning_rate: 2e-3\n")
    assert ffl.load_config(tmp_path / "lr.yaml").train.learning_rate == 2e-3
    cfg = ffl.load_config("gpt_tiny", overrides=["train.learning_rate=5e-3", "train.clip_norm=1E+1"])
    assert (cfg.train.learning_rate, cfg.train.clip_norm) == (5e-3, 10.0)
    with pytest.raises(ConfigError, match=r"train.learning_rate must be float, got str '5e-x'"):
        ffl.load_config("gpt_tiny", overrides=["train.learning_rate=5e-x"])
