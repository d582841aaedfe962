"""Turns a validated config into library calls: data, model, train, evaluate.

This is the command line's half of "only the CLI reads configs": every
function here takes the config dict and passes plain arguments on. Data
loading lives in `data/load_splits.py`, evaluation in
`evaluation/evaluate_run.py`, the run directory's files in `run_files.py`.
"""

import functools
import logging
import os

import keras
import tensorflow as tf

from hybridnet_tf.config import load_config, save_config
from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.data.load_splits import load_split, load_splits
from hybridnet_tf.data.pipeline import make_dataset
from hybridnet_tf.model.backbones import BACKBONES, default_image_size
from hybridnet_tf.run_files import (
    CONFIG_FILE,
    LAST_MODEL,
    THRESHOLDS_FILE,
    VOCABULARY_FILE,
    clear_training_outputs,
    load_run,
    load_run_thresholds,
    mark_complete,
    plan_training,
)
from hybridnet_tf.training.settings import Checkpointing, Optimization, PhaseSchedule

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
        else default_image_size(model["backbone"], model["hub_preset"])
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
        deterministic=True if config["train"]["deterministic"] else None,
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
    "min_label_score", "score_mix", "sigmoid_fusion", "aux_loss_weight", "sigmoid_loss", "asl_gamma_neg",
    "asl_gamma_pos", "asl_clip", "decoder", "attention_units", "attention_gate", "pla_rule", "hub_preset",
    "label_scores", "image_logits", "decoders",
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
        label_threshold=config["eval"]["threshold"],
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


def optimization_of(config):
    """The `settings.Optimization` of the config's `train` section."""
    train_cfg = config["train"]
    return Optimization(
        learning_rate=train_cfg["learning_rate"],
        weight_decay=train_cfg["weight_decay"],
        warmup_epochs=train_cfg["warmup_epochs"],
        jit_compile=train_cfg["jit_compile"],
        steps_per_execution=train_cfg["steps_per_execution"],
        batch_size=train_cfg["batch_size"],
        use_ema=train_cfg["use_ema"],
        ema_momentum=train_cfg["ema_momentum"],
    )


def schedule_of(config, feature_cache=None):
    """The `settings.PhaseSchedule` of the config's `train` section."""
    train_cfg = config["train"]
    return PhaseSchedule(
        frozen_epochs=train_cfg["frozen_epochs"],
        unfreeze_blocks=train_cfg["unfreeze_blocks"],
        learning_rate_factor=train_cfg["fine_tune_lr_factor"],
        frozen_steps=train_cfg["frozen_steps"],
        min_steps=train_cfg["min_steps"],
        warm_start_epochs=train_cfg["warm_start_epochs"],
        warm_start_seed=train_cfg["seed"],
        freeze_batch_norm=freeze_batch_norm_of(config),
        feature_cache=feature_cache,
    )


def run_train(config, run_dir, verbose="auto", overwrite=False):
    """Trains a HybridNet as configured and writes everything into `run_dir`.

    A rerun with the same config of a run that finished does nothing (it
    prints so); with a larger `train.epochs` it continues from the last
    weights; an interrupted run resumes from its backup. `overwrite=True`
    removes what an earlier `train` wrote and starts over (see
    `run_files.plan_training`).

    Returns:
        The fit history dict (of a finished run: its `history.json`).
    """
    from hybridnet_tf.training.distribution import make_strategy

    if overwrite:
        removed = clear_training_outputs(run_dir)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {run_dir}")
    plan = plan_training(run_dir, config)  # reads files only: nothing is touched yet
    if plan.action == "complete":
        print(plan.message)
        return _saved_history(run_dir)
    # First of all: MultiWorkerMirroredStrategy must be set up before other TF work.
    strategy = make_strategy(config["train"]["strategy"], tpu=config["train"]["tpu"])
    return train_on_splits(config, run_dir, load_splits(config["data"]), strategy, verbose=verbose)


def _saved_history(run_dir):
    import json

    path = os.path.join(run_dir, "history.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def train_on_splits(config, run_dir, splits, strategy=None, verbose="auto"):
    """Trains on already loaded `Splits` as `config` says (the body of `run_train`).

    Callers that cut their own splits (cross-validation) come in here. A
    run dir that holds a finished run is handled as `run_train` says.

    Returns:
        The fit history dict.
    """
    from hybridnet_tf.model.label_sequences import rank_ordering
    from hybridnet_tf.training.compute import describe_devices, dtype_policy, resolve_mixed_precision
    from hybridnet_tf.training.distribution import is_chief, shard_for_worker
    from hybridnet_tf.training.fine_tuning import continue_training, train_in_phases
    from hybridnet_tf.training.trainer import steps_for

    train_cfg, model_cfg = config["train"], config["model"]
    plan = plan_training(run_dir, config)
    if plan.action == "complete":
        print(plan.message)
        return _saved_history(run_dir)
    if train_cfg["deterministic"]:
        # Same seed, same weights on CPU (GPU: as far as the kernels allow);
        # make_dataset orders its parallel maps for the same reason.
        tf.config.experimental.enable_op_determinism()
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
    schedule = schedule_of(config, feature_cache_of(config, splits.train, strategy, from_files))
    optimization = optimization_of(config)
    checkpointing = Checkpointing(
        monitor=train_cfg["monitor"],
        val_max_batches=val_batches,
        threshold=config["eval"]["threshold"],
        backup_steps=train_cfg["backup_steps"],
        verbose=verbose,
    )
    run = train_in_phases
    if plan.action == "continue":
        print(plan.message)
        _load_last_weights(model, run_dir, plan.epochs_done, schedule)
        run = functools.partial(continue_training, initial_epoch=plan.epochs_done)
    history = run(
        model,
        train_data,
        val_data,
        # random / orderless build on a vocabulary ranking (label_sequences.rank_ordering).
        vocabulary.label_rank(rank_ordering(model_cfg["label_order"])),
        run_dir,
        steps_per_epoch=steps_for(splits.num_train, train_cfg["batch_size"]),
        epochs=train_cfg["epochs"],
        optimization=optimization,
        checkpointing=checkpointing,
        schedule=schedule,
    )
    if val_data is not None and chief:
        from hybridnet_tf.evaluation.evaluate_run import tune_and_save_thresholds

        _, _, best = load_run(run_dir)
        tuned = tune_and_save_thresholds(best, val_data, vocabulary.names, os.path.join(run_dir, THRESHOLDS_FILE))
        _label_sets_follow_thresholds(best, tuned, run_dir)
    if chief:
        # Last of all: a rerun now knows this run is finished (BackupAndRestore
        # deleted its backup when fit ended).
        mark_complete(run_dir, config, train_cfg["epochs"])
    return history.history


def _label_sets_follow_thresholds(model, tuned, run_dir):
    """A `bce` model's label set uses the thresholds tuned on val: set them in best.keras."""
    from hybridnet_tf.model.hybridnet import set_label_thresholds
    from hybridnet_tf.run_files import BEST_MODEL
    from hybridnet_tf.training.callbacks import save_model_atomically

    if set_label_thresholds(model, tuned["per_class"]):
        save_model_atomically(model, os.path.join(run_dir, BEST_MODEL))
        print("best.keras: the bce head's label sets now use the per-label thresholds tuned on val")


def _load_last_weights(model, run_dir, epochs_done, schedule):
    """Loads the last weights of a finished run that `continue_training` lengthens."""
    if 0 < schedule.frozen_epochs and epochs_done < schedule.frozen_epochs:
        raise ValueError(
            f"{run_dir} finished {epochs_done} epochs inside its frozen phase "
            f"(train.frozen_epochs={schedule.frozen_epochs}); a run is lengthened after that "
            "phase only: pass --overwrite to train it again"
        )
    model.load_weights(os.path.join(run_dir, LAST_MODEL))


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


def run_evaluate(run_dir, data_config=None, split=None, threshold=None, out_dir=None, strict=False):
    """Evaluates a run's best model on a split; writes metrics.json, report.md and plots.

    Report the "test" split: val chose `best.keras` and tuned the
    thresholds, so numbers on val are in-sample (marked so in metrics.json
    and the report). Images that could not be scored are listed there too.

    Args:
        run_dir: a run directory from `run_train`.
        data_config: optional config file whose `data` section replaces the run's.
        split: "test", "val" or "train" (default: the config's `eval.split`).
        threshold: score threshold (default: the config's `eval.threshold`).
        out_dir: where to write (default `run_dir/eval`).
        strict: fail (`UnscoredImagesError`) when an image could not be scored.

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
    from_files = chosen.from_files
    source = chosen.examples.to_dataset() if isinstance(chosen.examples, LabeledImages) else chosen.examples
    dataset = make_dataset(
        source, image_size_of(config), config["eval"]["batch_size"], from_files=from_files,
        resize=config["data"]["resize"], with_names=True,
    )
    expected = chosen.num_examples if chosen.num_examples and chosen.num_examples > 0 else None
    if from_files:
        skipped = {path for path, _ in chosen.unreadable}
        expected = sorted(set(chosen.examples.paths) | skipped)
    return evaluate_model(
        model,
        dataset,
        vocabulary.names,
        out_dir or os.path.join(run_dir, "eval"),
        threshold=threshold,
        tuned_thresholds=load_run_thresholds(run_dir, vocabulary),
        split=split,
        expected=expected,
        unreadable=chosen.unreadable,
        strict=strict,
    )
