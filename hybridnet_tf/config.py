"""Experiment config files: defaults, YAML loading, `--set` overrides, validation.

Only the command line reads configs; library functions take arguments.
A config is a YAML mapping of sections (`data`, `model`, `train`, `eval`)
whose keys and value types are fixed by `DEFAULTS`: an unknown key or a
wrong type fails before any work starts, naming the key and the file.
"""

import copy
import json
import os

import yaml

# A key whose default is None accepts a string (a path, a name) or null.
DEFAULTS = {
    "data": {
        # demo | coco_json | tfds | folder | csv
        "source": "demo",
        "demo_dir": "demo_data",
        "demo_seed": 0,
        "demo_train": 2000,
        "demo_val": 500,
        "demo_image_size": 96,
        # coco_json: annotation file and image folder per split
        "train_annotations": None,
        "train_images": None,
        "val_annotations": None,
        "val_images": None,
        # folder / csv: a folder of label-named sub-folders or a CSV per split
        "train_path": None,
        "val_path": None,
        "label_separator": None,
        # tfds
        "tfds_name": "coco/2017",
        "tfds_data_dir": None,
        "tfds_download": False,
        "tfds_train_split": "train",
        "tfds_val_split": "validation",
        # sources with one split: hold back this fraction as val (seeded)
        "val_fraction": 0.0,
        "split_seed": 0,
        "include_crowd": True,
        "keep_empty": False,
        "missing_files": "error",
        "resize": "squash",
        "cache": False,
    },
    "model": {
        "backbone": "small_cnn",
        "weights": None,
        "image_size": None,
        "max_length": 6,
        "embedding_dim": 64,
        "gru_units": 256,
        "dropout": 0.2,
        "label_order": "freq2rare",
    },
    "train": {
        "epochs": 10,
        "batch_size": 32,
        "learning_rate": 0.002,
        "weight_decay": 0.0001,
        "warmup_epochs": 1,
        "seed": 0,
        "jit_compile": "auto",
        "steps_per_execution": 1,
        "augment_flip": True,
        "monitor": "val_mAP",
        "val_max_images": 2000,
    },
    "eval": {
        "threshold": 0.5,
        "split": "val",
        "batch_size": 64,
    },
}

# Keys that take one of a few strings.
CHOICES = {
    ("data", "source"): ("demo", "coco_json", "tfds", "folder", "csv"),
    ("data", "missing_files"): ("error", "skip"),
    ("data", "resize"): ("squash", "center_crop"),
    ("model", "label_order"): ("freq2rare", "rare2freq", "fixed"),
    ("train", "jit_compile"): ("auto", True, False),
    ("eval", "split"): ("train", "val"),
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where."""


def _check_value(section, key, value, where):
    default = DEFAULTS[section][key]
    name = f"{section}.{key}"
    choices = CHOICES.get((section, key))
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{where}: {name} must be one of {list(choices)}, got {value!r}")
        return value
    if default is None:
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string or null, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string: accept it as the number it is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, type(default)):
        raise ConfigError(
            f"{where}: {name} must be a {type(default).__name__}, got {value!r}"
        )
    return value


def merge_config(base, overrides, where):
    """Returns `base` updated by a nested mapping `overrides`, validating each key."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: a config must be a mapping of sections, got {type(overrides).__name__}")
    merged = copy.deepcopy(base)
    for section, values in overrides.items():
        if section not in DEFAULTS:
            raise ConfigError(
                f"{where}: unknown section {section!r}; choose one of {sorted(DEFAULTS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(
                    f"{where}: unknown key {section}.{key}; "
                    f"known keys of {section!r}: {sorted(DEFAULTS[section])}"
                )
            merged[section][key] = _check_value(section, key, value, where)
    return merged


def parse_override(text):
    """Parses `section.key=value` (value in YAML syntax) into a nested mapping."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=3")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {error}") from None
    return {section: {key: value}}


def load_config(path=None, overrides=()):
    """Loads a YAML config over the defaults and applies `--set` overrides.

    Args:
        path: a YAML file, or None for the defaults alone.
        overrides: strings `section.key=value`.

    Returns:
        The full nested config dict.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from None
        config = merge_config(config, data or {}, where=path)
    for text in overrides:
        config = merge_config(config, parse_override(text), where=f"--set {text}")
    return config


def save_config(config, path):
    """Writes the resolved config as YAML (atomically)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(json.loads(json.dumps(config)), f, sort_keys=False)
    os.replace(tmp, path)
