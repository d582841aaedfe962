"""Turns a validated config into library calls: data, model, train, evaluate.

This is the command line's half of "only the CLI reads configs": every
function here takes the config dict and passes plain arguments on.
"""

import json
import logging
import os

import keras
import numpy as np

from hybridnet_tf.config import load_config, save_config
from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.data.pipeline import make_dataset
from hybridnet_tf.model.backbones import BACKBONES
from hybridnet_tf.vocabulary import LabelVocabulary

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
VOCABULARY_FILE = "vocabulary.json"
THRESHOLDS_FILE = "thresholds.json"
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"


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


def _require(data, *keys):
    missing = [k for k in keys if not data.get(k)]
    if missing:
        raise ValueError(
            f"data.source={data['source']!r} needs {', '.join('data.' + k for k in missing)}"
        )


def _drop_unreadable(images, split):
    """Drops files that cannot be decoded, with one warning naming a few of them."""
    from hybridnet_tf.data.image_check import find_unreadable_images

    bad = find_unreadable_images(images.paths)
    if not bad:
        return images
    bad_paths = {path for path, _ in bad}
    examples = "; ".join(f"{p} ({why})" for p, why in bad[:5])
    logger.warning(
        "%s: skipping %d unreadable image file(s) of %d, e.g. %s",
        split, len(bad), len(images), examples,
    )
    keep = [i for i, p in enumerate(images.paths) if p not in bad_paths]
    return images.subset(keep)


def load_splits(data):
    """Loads the train and val splits named by a config's `data` section.

    Returns:
        `(train, val, vocabulary, from_files)` where train / val are
        `LabeledImages` (file sources) or datasets of `(bytes, multi_hot)`
        with their sizes (TFDS), and val may be None.
    """
    source = data["source"]
    val = None
    if source in ("demo", "coco_json"):
        from hybridnet_tf.data.coco_json import load_coco_json

        if source == "demo":
            paths = ensure_demo_data(data)
        else:
            _require(data, "train_annotations", "train_images")
            paths = data
        options = dict(
            include_crowd=data["include_crowd"],
            keep_empty=data["keep_empty"],
            missing_files=data["missing_files"],
        )
        train = load_coco_json(paths["train_annotations"], paths["train_images"], **options)
        if paths.get("val_annotations"):
            val = load_coco_json(
                paths["val_annotations"],
                paths["val_images"] or paths["train_images"],
                vocabulary=train.vocabulary,
                **options,
            )
    elif source in ("folder", "csv"):
        from hybridnet_tf.data import folder_csv

        _require(data, "train_path")
        separator = data["label_separator"]
        if source == "folder":
            load = lambda path, vocabulary=None: folder_csv.load_folder(  # noqa: E731
                path, label_separator=separator or "_", vocabulary=vocabulary
            )
        else:
            load = lambda path, vocabulary=None: folder_csv.load_csv(  # noqa: E731
                path, label_separator=separator or " ", vocabulary=vocabulary
            )
        train = load(data["train_path"])
        if data["val_path"]:
            val = load(data["val_path"], vocabulary=train.vocabulary)
    elif source == "tfds":
        return _load_tfds_splits(data)
    else:
        raise ValueError(f"unknown data.source {source!r}")

    if val is None and data["val_fraction"] > 0:
        from hybridnet_tf.data.splits import split_train_val

        train, val = split_train_val(train, data["val_fraction"], seed=data["split_seed"])
    train = _drop_unreadable(train, "train")
    vocabulary = train.vocabulary.with_frequencies(train.labels)
    train = LabeledImages(train.paths, train.labels, vocabulary)
    if val is not None:
        val = _drop_unreadable(val, "val")
        val = LabeledImages(val.paths, val.labels, vocabulary)
    return train, val, vocabulary, True


def _load_tfds_splits(data):
    from hybridnet_tf.data.tfds_coco import count_label_frequencies, load_tfds_coco

    options = dict(name=data["tfds_name"], data_dir=data["tfds_data_dir"], download=data["tfds_download"])
    train, vocabulary = load_tfds_coco(split=data["tfds_train_split"], **options)
    val = None
    if data["tfds_val_split"]:
        val, _ = load_tfds_coco(split=data["tfds_val_split"], **options)
    frequencies = count_label_frequencies(train, len(vocabulary))
    vocabulary = LabelVocabulary(vocabulary.names, list(frequencies), vocabulary.source_ids)
    return train, val, vocabulary, False


def ensure_demo_data(data):
    """Generates the demo data set into `data.demo_dir` unless it is already there."""
    from hybridnet_tf.data.demo_scenes import write_demo_dataset

    out_dir = data["demo_dir"]
    paths = {
        "train_annotations": os.path.join(out_dir, "annotations", "instances_train.json"),
        "train_images": os.path.join(out_dir, "train"),
        "val_annotations": os.path.join(out_dir, "annotations", "instances_val.json"),
        "val_images": os.path.join(out_dir, "val"),
    }
    stamp = os.path.join(out_dir, "demo.json")
    wanted = {k: data[k] for k in ("demo_seed", "demo_train", "demo_val", "demo_image_size")}
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == wanted:
                return paths
    print(f"writing the demo data set to {out_dir} ...")
    write_demo_dataset(
        out_dir,
        seed=data["demo_seed"],
        num_train=data["demo_train"],
        num_val=data["demo_val"],
        image_size=data["demo_image_size"],
    )
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(wanted, f)
    return paths


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
        cache=data["cache"] if training else False,
        seed=config["train"]["seed"],
    )


def augmentation_of(config):
    """The training augmentation named by `data.augment_flip`, `rand_augment`, `mixup_alpha`, `cutmix_alpha`."""
    from hybridnet_tf.data.augment import build_augmentation

    data = config["data"]
    return build_augmentation(
        # train.augment_flip is the older switch, kept so old configs still load.
        flip=data["augment_flip"] and config["train"]["augment_flip"],
        rand_augment=data["rand_augment"],
        mixup_alpha=data["mixup_alpha"],
        cutmix_alpha=data["cutmix_alpha"],
        seed=config["train"]["seed"],
    )


def run_train(config, run_dir, verbose="auto"):
    """Trains a HybridNet as configured and writes everything into `run_dir`.

    Returns:
        The fit history dict.
    """
    from hybridnet_tf.model.hybridnet import build_model
    from hybridnet_tf.model.label_sequences import rank_ordering
    from hybridnet_tf.training.compute import describe_devices, dtype_policy, resolve_mixed_precision
    from hybridnet_tf.training.distribution import is_chief, make_strategy, shard_for_worker
    from hybridnet_tf.training.fine_tuning import train_in_phases
    from hybridnet_tf.training.trainer import steps_for

    train_cfg, model_cfg = config["train"], config["model"]
    # First of all: MultiWorkerMirroredStrategy must be set up before other TF work.
    strategy = make_strategy(train_cfg["strategy"], tpu=train_cfg["tpu"])
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

    train_split, val_split, vocabulary, from_files = load_splits(config["data"])
    if chief:
        vocabulary.save(os.path.join(run_dir, VOCABULARY_FILE))
    num_train = len(train_split) if from_files else int(train_split.cardinality())
    print(
        f"train: {num_train} images, val: {len(val_split) if val_split is not None and from_files else 'n/a'}, "
        f"{len(vocabulary)} labels"
    )
    _report_truncation(train_split, model_cfg["max_length"], from_files)

    # Variables are created under the strategy, layers take the dtype policy.
    with strategy.scope(), dtype_policy(precision):
        model = build_model(
            len(vocabulary),
            backbone=model_cfg["backbone"],
            image_size=image_size_of(config),
            weights=model_cfg["weights"],
            max_length=model_cfg["max_length"],
            embedding_dim=model_cfg["embedding_dim"],
            gru_units=model_cfg["gru_units"],
            dropout=model_cfg["dropout"],
            head=model_cfg["head"],
            label_order=model_cfg["label_order"],
            beam_width=model_cfg["beam_width"],
            min_label_score=model_cfg["min_label_score"],
            score_mix=model_cfg["score_mix"],
            aux_loss_weight=model_cfg["aux_loss_weight"],
            sigmoid_loss=model_cfg["sigmoid_loss"],
            asl_gamma_neg=model_cfg["asl_gamma_neg"],
            asl_gamma_pos=model_cfg["asl_gamma_pos"],
            asl_clip=model_cfg["asl_clip"],
        )
    # Each worker reads only its own files (see distribution.shard_for_worker).
    train_source = shard_for_worker(train_split.to_dataset(), strategy) if from_files else train_split
    train_data = as_dataset(train_source, config, training=True, from_files=from_files)
    val_data = None
    val_batches = None
    if val_split is not None:
        eval_batch = config["eval"]["batch_size"]
        val_data = as_dataset(val_split, config, False, batch_size=eval_batch, from_files=from_files)
        val_batches = steps_for(train_cfg["val_max_images"], eval_batch)
    history = train_in_phases(
        model,
        train_data,
        val_data,
        # random / orderless build on a vocabulary ranking (label_sequences.rank_ordering).
        vocabulary.label_rank(rank_ordering(model_cfg["label_order"])),
        run_dir,
        steps_per_epoch=steps_for(num_train, train_cfg["batch_size"]),
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
        verbose=verbose,
    )
    if val_data is not None and chief:
        tune_run_thresholds(run_dir, val_data, vocabulary)
    return history.history


def tune_run_thresholds(run_dir, val_data, vocabulary):
    """Tunes global and per-label thresholds of the run's best model on val data.

    Writes `run_dir/thresholds.json` (used by evaluate, predict and exports)
    and prints what they gain over 0.5.
    """
    from hybridnet_tf.evaluation.predictions import collect_predictions
    from hybridnet_tf.evaluation.thresholds import save_thresholds, tune_thresholds

    _, _, model = load_run(run_dir)
    y_true, scores, _ = collect_predictions(model, val_data)
    tuned = tune_thresholds(y_true, scores)
    save_thresholds(os.path.join(run_dir, THRESHOLDS_FILE), tuned, vocabulary.names)
    gain = tuned["gain"]
    print(
        "thresholds tuned on val: global {:.2f}; OF1 {:.4f} -> {:.4f} (global) -> {:.4f} "
        "(per label); CF1 {:.4f} -> {:.4f} -> {:.4f}".format(
            tuned["global"],
            gain["at_0.5"]["OF1"], gain["global"]["OF1"], gain["per_class"]["OF1"],
            gain["at_0.5"]["CF1"], gain["global"]["CF1"], gain["per_class"]["CF1"],
        )
    )
    return tuned


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


def load_run(run_dir, checkpoint=BEST_MODEL):
    """Loads a run's config, vocabulary and model (`safe_mode=True`).

    Returns:
        `(config, vocabulary, model)`.
    """
    # Importing registers the custom layers before the model is deserialised.
    import hybridnet_tf.model.label_decoder  # noqa: F401

    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: is {run_dir} a run directory written by "
            "`hybridnet-tf train`?"
        )
    config = load_config(config_path)
    vocabulary = LabelVocabulary.load(os.path.join(run_dir, VOCABULARY_FILE))
    model_path = os.path.join(run_dir, checkpoint)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path} not found; has training finished an epoch?")
    model = keras.models.load_model(model_path, safe_mode=True)
    return config, vocabulary, model


def load_run_thresholds(run_dir, vocabulary):
    """The run's tuned thresholds as a per-label array, or None when not tuned."""
    from hybridnet_tf.evaluation.thresholds import load_thresholds

    path = os.path.join(run_dir, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return None
    loaded = load_thresholds(path, names=vocabulary.names)
    return np.asarray(loaded["per_class"], dtype=np.float32)


def run_evaluate(run_dir, data_config=None, split=None, threshold=None, out_dir=None):
    """Evaluates a run's best model on a split; writes metrics.json, report.md and plots.

    The headline metrics use the fixed threshold (`eval.threshold`, 0.5 by
    default) so they compare with published tables; when the run has tuned
    thresholds, `metrics["tuned_thresholds"]` holds the same six numbers
    with them.

    Args:
        run_dir: a run directory from `run_train`.
        data_config: optional config file whose `data` section replaces the run's.
        split: "val" or "train" (default: the config's `eval.split`).
        threshold: score threshold (default: the config's `eval.threshold`).
        out_dir: where to write (default `run_dir/eval`).

    Returns:
        The metrics dict.
    """
    from hybridnet_tf.evaluation.metrics import evaluate_scores, threshold_metrics
    from hybridnet_tf.evaluation.predictions import collect_predictions
    from hybridnet_tf.evaluation.report import write_report

    config, vocabulary, model = load_run(run_dir)
    if data_config is not None:
        config["data"] = load_config(data_config)["data"]
    split = split or config["eval"]["split"]
    threshold = config["eval"]["threshold"] if threshold is None else threshold
    train_split, val_split, _, from_files = load_splits(config["data"])
    chosen = val_split if split == "val" else train_split
    if chosen is None:
        raise ValueError(
            f"the data config has no {split} split; set data.val_annotations / data.val_path "
            "or data.val_fraction"
        )
    if from_files:
        chosen = _onto_vocabulary(chosen, vocabulary)
    dataset = as_dataset(chosen, config, False, batch_size=config["eval"]["batch_size"], from_files=from_files)
    y_true, scores, decoded = collect_predictions(model, dataset, progress=True)
    metrics = evaluate_scores(y_true, scores, threshold=threshold, names=vocabulary.names, decoded=decoded)
    tuned = load_run_thresholds(run_dir, vocabulary)
    if tuned is not None:
        metrics["tuned_thresholds"] = {
            k: float(v) for k, v in threshold_metrics(y_true, scores, tuned).items()
        }
    out_dir = out_dir or os.path.join(run_dir, "eval")
    write_report(out_dir, metrics, y_true, scores, vocabulary.names)
    np.savez(os.path.join(out_dir, "predictions.npz"), y_true=y_true, scores=scores, decoded=decoded)
    return metrics


def _onto_vocabulary(split, vocabulary):
    """Checks that an evaluation split uses the model's label columns."""
    if split.vocabulary.names != vocabulary.names:
        raise ValueError(
            "the evaluation data's labels differ from the model's vocabulary "
            f"({len(split.vocabulary)} vs {len(vocabulary)} labels); evaluate on data "
            "with the same categories"
        )
    return split
