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
        # a held-out test split (evaluate --split test): never trained on, nor used to pick
        # best.keras or tune thresholds
        "test_annotations": None,
        "test_images": None,
        # folder / csv: a folder of label-named sub-folders or a CSV per split
        "train_path": None,
        "val_path": None,
        "test_path": None,
        "label_separator": None,
        # tfds
        "tfds_name": "coco/2017",
        "tfds_data_dir": None,
        "tfds_download": False,
        # folder with the original COCO zips (official files: TFDS checks their checksums)
        "tfds_manual_dir": None,
        "tfds_train_split": "train",
        "tfds_val_split": "validation",
        "tfds_test_split": None,
        # sources with one split: hold back this fraction as val (seeded)
        "val_fraction": 0.0,
        # file sources without test_* paths: hold back this fraction of train as test (seeded, cut first)
        "test_fraction": 0.0,
        "split_seed": 0,
        "include_crowd": True,
        "keep_empty": False,
        "missing_files": "error",
        # squash | center_crop | random_resized_crop (training; squash in eval)
        "resize": "squash",
        # memory | none | a file path prefix (uint8 images after resize); true/false: memory/none
        "cache": "none",
        # buffer of the shuffles holding image data (TFDS bytes, cached images); file lists shuffle whole
        "shuffle_buffer": 2048,
        # training augmentation (data/augment.py); flips need train.augment_flip too
        "augment_flip": True,
        "rand_augment": False,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
    },
    "model": {
        "backbone": "small_cnn",
        "weights": None,
        # backbone hub: a KerasHub preset name, hf://..., kaggle://... or a local preset
        # directory (pip install -e ".[hub]"); weights: preset (its weights) or null (random)
        "hub_preset": None,
        "image_size": None,
        "max_length": 6,
        "embedding_dim": 64,
        "gru_units": 256,
        "dropout": 0.2,
        # orderless (PLA) won on real photos (coco128 yardstick, docs/real_data.md)
        "label_order": "orderless",
        # label_order orderless: PLA rule of the loss, paper (Yazici et al.) | sorted
        "pla_rule": "paper",
        # decoder heads' per-label scores: softmax (p) | against_end (p / (p + p_END):
        # ranks better on coco128 but saturates, so thresholds pick too much;
        # docs/real_data.md)
        "label_scores": "softmax",
        # decoder heads: a linear map of the pooled image feature added to every
        # step's label logits, set from the linear probe when the frozen phase
        # fits one (train.probe_init); the decoder learns corrections to it
        "image_logits": True,
        # hybrid (GRU decoder for label sets + sigmoid head for scores) | hybrid_rnn
        # (GRU decoder alone) | bce (sigmoid head alone); see hybridnet.py
        "head": "hybrid",
        # decoder heads: pooled (the pooled image feature at every step) | attention
        # (attends over the backbone's spatial map at every step; attention_decoder.py)
        "decoder": "pooled",
        # decoder heads: K decoders trained side by side and decoded together
        # (each step: the mean of their log-softmax; decoder_ensemble.py); on
        # small data a decoder's random start moves its label sets a lot
        "decoders": 1,
        "attention_units": 128,
        "attention_gate": False,
        # decoding: 1 = greedy; labels below min_label_score are not emitted
        "beam_width": 1,
        "min_label_score": 0.0,
        # hybrid head: scores = score_mix * sigmoid + (1 - score_mix) * decoder
        "score_mix": 1.0,
        # hybrid head: weight of log(sigmoid score) in the decoder's label
        # logits when decoding (0: the decoder alone picks the label set;
        # docs/decoder.md has what 1 gave on coco128 and on the demo)
        "sigmoid_fusion": 0.0,
        "aux_loss_weight": 1.0,
        # loss of the sigmoid head (bce, hybrid): bce | asl (Ridnik et al. 2021)
        "sigmoid_loss": "bce",
        "asl_gamma_neg": 4.0,
        "asl_gamma_pos": 0.0,
        "asl_clip": 0.05,
        # BatchNorm of the backbone non-trainable (inference mode) in every phase;
        # auto: when model.weights is set (pretrained), not for a backbone from scratch
        "freeze_batch_norm": "auto",
    },
    "train": {
        "epochs": 10,
        "batch_size": 32,
        "learning_rate": 0.002,
        "weight_decay": 0.0001,
        "warmup_epochs": 1,
        "seed": 0,
        # same seed, same weights: TF op determinism and an ordered tf.data pipeline (slower;
        # on a GPU only as deterministic as its kernels; on a busy CPU bit-identical only with
        # TF_NUM_INTEROP_THREADS=1 TF_NUM_INTRAOP_THREADS=1, docs/training_at_scale.md)
        "deterministic": False,
        # compute: "auto" is XLA / mixed_float16 on a (Tensor Core) GPU, off / float32 on CPU
        "jit_compile": "auto",
        "mixed_precision": "auto",
        "steps_per_execution": 1,
        # tf.distribute: auto | default | mirrored | multi_worker (TF_CONFIG) | tpu
        "strategy": "auto",
        # TPU name, grpc:// address or "local" (TPU VM); null: TPU_NAME / metadata
        "tpu": None,
        # BackupAndRestore in run_dir/backup every N steps; 0: at each epoch end
        "backup_steps": 0,
        # optimizer weight EMA; checkpoints and val metrics then use the EMA weights
        "use_ema": False,
        "ema_momentum": 0.99,
        # kept for older configs; prefer data.augment_flip (flips only when both are true)
        "augment_flip": True,
        "monitor": "val_mAP",
        "val_max_images": 2000,
        # fine-tuning a pretrained backbone: epochs with it frozen first (0: none),
        # then the top K blocks unfrozen (-1: all) at learning_rate * fine_tune_lr_factor
        "frozen_epochs": 0,
        "unfreeze_blocks": -1,
        "fine_tune_lr_factor": 0.1,
        # optimiser steps of the frozen phase / of the trainable phase at the least:
        # epochs of a small data set are lengthened to reach them (0: one pass per epoch)
        "frozen_steps": 0,
        "min_steps": 0,
        # epochs of BCE on the backbone and a temporary sigmoid layer before anything else
        # (the CNN-RNN papers' warm start, for a backbone trained from scratch; 0: none)
        "warm_start_epochs": 0,
        # frozen phase on backbone features computed once (when no augmentation
        # but flips changes pixels); false runs the backbone on every step
        "feature_cache": True,
        # on cached features: the sigmoid head (bce, hybrid) starts as a logistic-regression
        # probe (scikit-learn, C by cross-validation) and stays fixed while the decoder trains
        "probe_init": True,
        # TensorBoard (logs/val_predictions): val images with true/predicted labels and heat
        # maps after the first epoch and every N epochs (0: none), how many of them
        "tensorboard_images_every": 5,
        "tensorboard_images": 8,
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
    ("data", "resize"): ("squash", "center_crop", "random_resized_crop"),
    ("model", "label_order"): ("freq2rare", "rare2freq", "fixed", "random", "orderless"),
    ("model", "head"): ("hybrid_rnn", "bce", "hybrid"),
    ("model", "decoder"): ("pooled", "attention"),
    ("model", "pla_rule"): ("paper", "sorted"),
    ("model", "label_scores"): ("softmax", "against_end", "sigmoid"),
    ("model", "sigmoid_loss"): ("bce", "asl"),
    ("model", "freeze_batch_norm"): ("auto", True, False),
    ("train", "jit_compile"): ("auto", True, False),
    ("train", "mixed_precision"): ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    ("train", "strategy"): ("auto", "default", "mirrored", "multi_worker", "tpu"),
    ("eval", "split"): ("train", "val", "test"),
}

# Keys whose default is None (derived elsewhere) but that take an integer.
OPTIONAL_INTEGERS = {("model", "image_size")}
# Keys that take a string and, as older configs wrote them, true/false.
STRINGS_OR_BOOLEANS = {("data", "cache")}


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
    if (section, key) in STRINGS_OR_BOOLEANS:
        if not isinstance(value, (str, bool)):
            raise ConfigError(f"{where}: {name} must be a string or true/false, got {value!r}")
        return value
    if default is None and (section, key) in OPTIONAL_INTEGERS:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {name} must be an integer or null, got {value!r}")
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
