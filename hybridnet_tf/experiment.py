"""Turns a validated config into library calls: data, model, train, evaluate.

This is the command line's half of "only the CLI reads configs": every
function here takes the config dict and passes plain arguments on. Data
loading lives in `data/load_splits.py`, evaluation in
`evaluation/evaluate_run.py`, the run directory's files in `run_files.py`.
"""

import logging
import os

import keras
import tensorflow as tf

from hybridnet_tf.config import load_config, save_config
from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.data.load_splits import load_split, load_splits
from hybridnet_tf.data.pipeline import make_dataset
from hybridnet_tf.model.backbones import BACKBONES
from hybridnet_tf.run_files import (
    CONFIG_FILE,
    THRESHOLDS_FILE,
    VOCABULARY_FILE,
    load_run,
    load_run_thresholds,
)

logger = logging.getLogger(__name__)


def image_size_of(config):
    """The model input size: `model.image_size` or the backbone's default."""
    model = config["model"]
    if model["backbone"] not in BACKBONES:
        raise ValueError(
            f"unknown backbone {model['backbone']!r}; choose one of {sorted(BACKBONES)}"
        )
    return model["image_size"] or (
        config["data"]["demo_image_size"]
        if config["data"]["source"] == "demo"
        else BACKBONES[model["backbone"]].default_size
    )


def as_dataset(split, config, training, batch_size=None, from_files=True):
    """A batched `(images, multi_hot)` dataset for a split from `load_splits`."""
    data = config["data"]
    source = split.to_dataset() if isinstance(split, LabeledImages) else split
    return make_dataset(
        source,
        image_size_of(config),
        batch_size or config["train"]["batch_size"],
        training=training,
        from_files=from_files,
        resize=data["resize"],
        augment=augmentation_of(config) if training else None,
        cache=data["cache"] if training else None,
        shuffle_buffer=data["shuffle_buffer"],
        seed=config["train"]["seed"],
    )


def flips_of(config):
    """Whether training flips images left-right: `data.augment_flip` and `train.augment_flip`."""
    # train.augment_flip is the older switch, kept so old configs still load.
    return config["data"]["augment_flip"] and config["train"]["augment_flip"]


def augmentation_of(config):
    """The training augmentation named by `data.augment_flip`, `rand_augment`, `mixup_alpha`, `cutmix_alpha`."""
    from hybridnet_tf.data.augment import build_augmentation

    data = config["data"]
    return build_augmentation(
        flip=flips_of(config),
        rand_augment=data["rand_augment"],
        mixup_alpha=data["mixup_alpha"],
        cutmix_alpha=data["cutmix_alpha"],
        seed=config["train"]["seed"],
    )


MODEL_KEYS = (
    "max_length", "embedding_dim", "gru_units", "dropout", "head", "label_order", "beam_width",
    "min_label_score", "score_mix", "aux_loss_weight", "sigmoid_loss", "asl_gamma_neg",
    "asl_gamma_pos", "asl_clip",
)


def freeze_batch_norm_of(config):
    """`model.freeze_batch_norm` resolved: "auto" is True for a pretrained backbone."""
    value = config["model"]["freeze_batch_norm"]
    return config["model"]["weights"] is not None if value == "auto" else value


def build_model_from_config(config, num_labels):
    """`build_model` with the arguments of a config's `model` section."""
    from hybridnet_tf.model.hybridnet import build_model

    model_cfg = config["model"]
    return build_model(
        num_labels,
        backbone=model_cfg["backbone"],
        image_size=image_size_of(config),
        weights=model_cfg["weights"],
        freeze_batch_norm=freeze_batch_norm_of(config),
        **{key: model_cfg[key] for key in MODEL_KEYS},
    )


def feature_cache_of(config, train_split, strategy, from_files=True):
    """The frozen phase's `FeatureCacheInputs`, or None (with the reason printed) when it cannot cache.

    Features can be cached when the backbone is frozen for a phase and no
    augmentation but flips changes the pixels (flips become a second view).
    """
    from hybridnet_tf.training.distribution import is_multi_worker
    from hybridnet_tf.training.feature_cache import FeatureCacheInputs

    data, train_cfg = config["data"], config["train"]
    if not train_cfg["feature_cache"] or train_cfg["frozen_epochs"] <= 0:
        return None
    changes_pixels = [
        name
        for name, on in (
            ("data.rand_augment", data["rand_augment"]),
            ("data.mixup_alpha", data["mixup_alpha"] > 0),
            ("data.cutmix_alpha", data["cutmix_alpha"] > 0),
            ("data.resize=random_resized_crop", data["resize"] == "random_resized_crop"),
        )
        if on
    ]
    if changes_pixels or is_multi_worker(strategy):
        why = ", ".join(changes_pixels) or "several workers"
        print(f"frozen phase without the feature cache ({why}): the backbone runs on every step")
        return None
    return FeatureCacheInputs(
        as_dataset(train_split, config, False, batch_size=config["eval"]["batch_size"], from_files=from_files),
        flip_views=flips_of(config),
        seed=train_cfg["seed"],
        probe_init=train_cfg["probe_init"],
    )


def run_train(config, run_dir, verbose="auto"):
    """Trains a HybridNet as configured and writes everything into `run_dir`.

    Returns:
        The fit history dict.
    """
    from hybridnet_tf.training.distribution import make_strategy

    # First of all: MultiWorkerMirroredStrategy must be set up before other TF work.
    strategy = make_strategy(config["train"]["strategy"], tpu=config["train"]["tpu"])
    return train_on_splits(config, run_dir, load_splits(config["data"]), strategy, verbose=verbose)


def train_on_splits(config, run_dir, splits, strategy=None, verbose="auto"):
    """Trains on already loaded `Splits` as `config` says (the body of `run_train`).

    Callers that cut their own splits (cross-validation) come in here.

    Returns:
        The fit history dict.
    """
    from hybridnet_tf.model.label_sequences import rank_ordering
    from hybridnet_tf.training.compute import describe_devices, dtype_policy, resolve_mixed_precision
    from hybridnet_tf.training.distribution import is_chief, shard_for_worker
    from hybridnet_tf.training.fine_tuning import train_in_phases
    from hybridnet_tf.training.trainer import steps_for

    train_cfg, model_cfg = config["train"], config["model"]
    strategy = strategy or tf.distribute.get_strategy()
    precision = resolve_mixed_precision(train_cfg["mixed_precision"], strategy)
    print(
        f"{describe_devices()}; {type(strategy).__name__} with "
        f"{strategy.num_replicas_in_sync} replica(s); dtype policy {precision}"
    )
    chief = is_chief(strategy)
    keras.utils.set_random_seed(train_cfg["seed"])
    os.makedirs(run_dir, exist_ok=True)
    if chief:
        save_config(config, os.path.join(run_dir, CONFIG_FILE))

    vocabulary, from_files = splits.vocabulary, splits.from_files
    if chief:
        vocabulary.save(os.path.join(run_dir, VOCABULARY_FILE))
    print(
        f"train: {splits.num_train} images, val: "
        f"{splits.num_val if splits.num_val is not None else 'n/a'}, {len(vocabulary)} labels"
    )
    _report_truncation(splits.train, model_cfg["max_length"], from_files)

    # Variables are created under the strategy, layers take the dtype policy.
    with strategy.scope(), dtype_policy(precision):
        model = build_model_from_config(config, len(vocabulary))
    # Each worker reads only its own files (see distribution.shard_for_worker).
    train_source = shard_for_worker(splits.train.to_dataset(), strategy) if from_files else splits.train
    train_data = as_dataset(train_source, config, training=True, from_files=from_files)
    val_data = None
    val_batches = None
    if splits.val is not None:
        eval_batch = config["eval"]["batch_size"]
        val_data = as_dataset(splits.val, config, False, batch_size=eval_batch, from_files=from_files)
        val_batches = steps_for(train_cfg["val_max_images"], eval_batch)
    history = train_in_phases(
        model,
        train_data,
        val_data,
        # random / orderless build on a vocabulary ranking (label_sequences.rank_ordering).
        vocabulary.label_rank(rank_ordering(model_cfg["label_order"])),
        run_dir,
        steps_per_epoch=steps_for(splits.num_train, train_cfg["batch_size"]),
        epochs=train_cfg["epochs"],
        learning_rate=train_cfg["learning_rate"],
        weight_decay=train_cfg["weight_decay"],
        warmup_epochs=train_cfg["warmup_epochs"],
        jit_compile=train_cfg["jit_compile"],
        steps_per_execution=train_cfg["steps_per_execution"],
        monitor=train_cfg["monitor"],
        val_max_batches=val_batches,
        threshold=config["eval"]["threshold"],
        batch_size=train_cfg["batch_size"],
        use_ema=train_cfg["use_ema"],
        ema_momentum=train_cfg["ema_momentum"],
        backup_steps=train_cfg["backup_steps"],
        frozen_epochs=train_cfg["frozen_epochs"],
        unfreeze_blocks=train_cfg["unfreeze_blocks"],
        learning_rate_factor=train_cfg["fine_tune_lr_factor"],
        frozen_steps=train_cfg["frozen_steps"],
        min_steps=train_cfg["min_steps"],
        feature_cache=feature_cache_of(config, splits.train, strategy, from_files),
        freeze_batch_norm=freeze_batch_norm_of(config),
        verbose=verbose,
    )
    if val_data is not None and chief:
        from hybridnet_tf.evaluation.evaluate_run import tune_and_save_thresholds

        _, _, best = load_run(run_dir)
        tune_and_save_thresholds(best, val_data, vocabulary.names, os.path.join(run_dir, THRESHOLDS_FILE))
    return history.history


def _report_truncation(split, max_length, from_files):
    if not from_files:
        return
    counts = split.labels.sum(axis=1)
    too_long = int((counts > max_length - 1).sum())
    if too_long:
        logger.warning(
            "%d of %d training images have more than model.max_length-1=%d labels; "
            "their rarest labels are left out of the target sequences "
            "(raise model.max_length to keep them)",
            too_long, len(counts), max_length - 1,
        )


def run_evaluate(run_dir, data_config=None, split=None, threshold=None, out_dir=None):
    """Evaluates a run's best model on a split; writes metrics.json, report.md and plots.

    Args:
        run_dir: a run directory from `run_train`.
        data_config: optional config file whose `data` section replaces the run's.
        split: "val" or "train" (default: the config's `eval.split`).
        threshold: score threshold (default: the config's `eval.threshold`).
        out_dir: where to write (default `run_dir/eval`).

    Returns:
        The metrics dict (see `evaluation.evaluate_run.evaluate_model`).
    """
    from hybridnet_tf.evaluation.evaluate_run import evaluate_model

    config, vocabulary, model = load_run(run_dir)
    if data_config is not None:
        config["data"] = load_config(data_config)["data"]
    split = split or config["eval"]["split"]
    threshold = config["eval"]["threshold"] if threshold is None else threshold
    # Only the evaluated split is read; the labels are the run's vocabulary.
    chosen = load_split(config["data"], split, vocabulary=vocabulary)
    if chosen.names != vocabulary.names:
        raise ValueError(
            "the evaluation data's labels differ from the model's vocabulary "
            f"({len(chosen.names)} vs {len(vocabulary)} labels); evaluate on data "
            "with the same categories"
        )
    dataset = as_dataset(
        chosen.examples, config, False, batch_size=config["eval"]["batch_size"],
        from_files=chosen.from_files,
    )
    return evaluate_model(
        model,
        dataset,
        vocabulary.names,
        out_dir or os.path.join(run_dir, "eval"),
        threshold=threshold,
        tuned_thresholds=load_run_thresholds(run_dir, vocabulary),
        split=split,
    )
