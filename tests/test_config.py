"""Config loading: defaults, overrides, and errors that name the key and the file."""

import pytest

from hybridnet_tf.config import DEFAULTS, ConfigError, load_config, parse_override


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_when_no_file():
    config = load_config()
    assert config == DEFAULTS
    assert config is not DEFAULTS


def test_file_values_and_overrides_apply(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\nmodel:\n  backbone: efficientnet_b0\n")
    config = load_config(path, ["train.epochs=3", "train.learning_rate=1e-3", "model.weights=imagenet"])
    assert config["train"]["epochs"] == 3
    assert config["train"]["learning_rate"] == pytest.approx(1e-3)
    assert config["model"]["backbone"] == "efficientnet_b0"
    assert config["model"]["weights"] == "imagenet"
    assert config["train"]["batch_size"] == DEFAULTS["train"]["batch_size"]


def test_int_is_accepted_for_float():
    config = load_config(overrides=["train.learning_rate=1"])
    assert config["train"]["learning_rate"] == 1.0
    assert isinstance(config["train"]["learning_rate"], float)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "train.epoch" in str(error.value)
    assert path in str(error.value)
    assert "epochs" in str(error.value)  # the known keys are listed


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: three\n", "train.epochs must be an integer"),
        ("train:\n  epochs: 2.5\n", "train.epochs must be an integer"),
        ("train:\n  learning_rate: fast\n", "train.learning_rate must be a number"),
        ("train:\n  augment_flip: 1\n", "train.augment_flip must be true or false"),
        ("data:\n  source: imagenet\n", "data.source must be one of"),
        ("model:\n  weights: 3\n", "model.weights must be a string or null"),
    ],
)
def test_wrong_types_name_key_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert path in str(error.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("epochs=3")
    with pytest.raises(ConfigError, match="--set train.epochs=x"):
        load_config(overrides=["train.epochs=x"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert paths, "no configs shipped"
    for path in paths:
        load_config(path)
