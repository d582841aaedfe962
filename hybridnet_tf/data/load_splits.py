"""A config's `data` section -> the train / val splits and the label vocabulary.

The one place where a source name (`demo`, `coco_json`, `folder`, `csv`,
`tfds`) becomes loader calls; everything after it sees `LabeledImages`
(file sources) or datasets of `(jpeg bytes, multi_hot)` (TFDS).
"""

import json
import logging
import os
from dataclasses import dataclass

from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.vocabulary import LabelVocabulary

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """What `load_splits` returns.

    Attributes:
        train: `LabeledImages` (file sources) or a dataset of `(bytes, multi_hot)` (TFDS).
        val: the same for val, or None.
        vocabulary: label names with training frequencies.
        from_files: True for file sources (`LabeledImages`), False for TFDS.
        num_train: images in `train`.
        num_val: images in `val` (None when unknown or no val).
    """

    train: object
    val: object
    vocabulary: LabelVocabulary
    from_files: bool
    num_train: int
    num_val: int = None


def _require(data, *keys):
    missing = [k for k in keys if not data.get(k)]
    if missing:
        raise ValueError(
            f"data.source={data['source']!r} needs {', '.join('data.' + k for k in missing)}"
        )


def drop_unreadable(images, split):
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

    Args:
        data: the `data` mapping of a config (keys and defaults in `config.DEFAULTS`).

    Returns:
        A `Splits`.
    """
    if data["source"] == "tfds":
        return _load_tfds_splits(data)
    train = _load_files(data, "train")
    val = None
    if _has_own_val(data):
        val = _load_files(data, "val", vocabulary=train.vocabulary)
    elif data["val_fraction"] > 0:
        from hybridnet_tf.data.splits import split_train_val

        train, val = split_train_val(train, data["val_fraction"], seed=data["split_seed"])
    return files_splits(train, val)


def _has_own_val(data):
    """Whether a file source names its own val data (else val, if any, is cut from train)."""
    source = data["source"]
    if source == "demo":
        return True
    if source == "coco_json":
        return bool(data["val_annotations"])
    return bool(data["val_path"])


def files_splits(train, val=None):
    """`Splits` of file-source `LabeledImages`: unreadable files dropped, frequencies from train.

    Also the way in for callers that cut their own splits (e.g. cross-validation folds).
    """
    train = drop_unreadable(train, "train")
    vocabulary = train.vocabulary.with_frequencies(train.labels)
    train = LabeledImages(train.paths, train.labels, vocabulary)
    if val is not None:
        val = drop_unreadable(val, "val")
        val = LabeledImages(val.paths, val.labels, vocabulary)
    return Splits(train, val, vocabulary, True, len(train), None if val is None else len(val))


def _tfds_options(data):
    return dict(
        name=data["tfds_name"],
        data_dir=data["tfds_data_dir"],
        include_crowd=data["include_crowd"],
        keep_empty=data["keep_empty"],
    )


def _load_tfds_split(data, split, training):
    """One TFDS split as `(dataset, vocabulary, num_examples)`; counts cached by `split_statistics`."""
    from hybridnet_tf.data import tfds_coco

    options = _tfds_options(data)
    dataset, vocabulary = tfds_coco.load_tfds_coco(
        split=split,
        download=data["tfds_download"],
        manual_dir=data["tfds_manual_dir"],
        shuffle_files=training,
        **options,
    )
    num_examples, label_counts = tfds_coco.split_statistics(split=split, **options)
    vocabulary = LabelVocabulary(vocabulary.names, list(label_counts), vocabulary.source_ids)
    return dataset, vocabulary, num_examples


def _load_tfds_splits(data):
    train, vocabulary, num_train = _load_tfds_split(data, data["tfds_train_split"], training=True)
    val, num_val = None, None
    if data["tfds_val_split"]:
        val, _, num_val = _load_tfds_split(data, data["tfds_val_split"], training=False)
    return Splits(train, val, vocabulary, False, num_train, num_val)


@dataclass
class OneSplit:
    """What `load_split` returns.

    Attributes:
        examples: `LabeledImages` (file sources) or a dataset of `(bytes, multi_hot)` (TFDS).
        from_files: True for file sources, False for TFDS.
        num_examples: images in `examples`.
        names: the label names the data's multi-hot columns refer to.
    """

    examples: object
    from_files: bool
    num_examples: int
    names: list


def load_split(data, split="val", vocabulary=None):
    """Loads only the train or the val split of a config's `data` section.

    For evaluation and int8 calibration: unlike `load_splits`, it reads no
    more than the chosen split (no check of the other split's files, no
    pass over TFDS train for label frequencies). A val split cut from train
    by `data.val_fraction` still needs the whole train list to cut it.

    Args:
        data: the `data` mapping of a config.
        split: "train" or "val".
        vocabulary: a `LabelVocabulary` to map file sources' labels onto,
            usually the run's `vocabulary.json` (None: built from the data).

    Returns:
        A `OneSplit`.

    Raises:
        ValueError: when the config has no such split.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'val'")
    source = data["source"]
    if source == "tfds":
        name = data["tfds_train_split"] if split == "train" else data["tfds_val_split"]
        if not name:
            raise ValueError("the data config has no val split; set data.tfds_val_split")
        dataset, vocab, count = _load_tfds_split(data, name, training=False)
        return OneSplit(dataset, False, count, vocab.names)
    if _has_own_val(data):
        images = drop_unreadable(_load_files(data, split, vocabulary), split)
        return OneSplit(images, True, len(images), images.vocabulary.names)
    if data["val_fraction"] > 0:
        # Val is a seeded cut of train: both come from the whole train list.
        splits = load_splits(data)
        chosen = splits.val if split == "val" else splits.train
        return OneSplit(chosen, True, len(chosen), splits.vocabulary.names)
    if split == "val":
        raise ValueError(
            "the data config has no val split; set data.val_annotations / data.val_path "
            "or data.val_fraction"
        )
    images = drop_unreadable(_load_files(data, split, vocabulary), split)
    return OneSplit(images, True, len(images), images.vocabulary.names)


def _load_files(data, split, vocabulary=None):
    """The `LabeledImages` of one split of a file source, mapped onto `vocabulary` when given."""
    source = data["source"]
    if source in ("demo", "coco_json"):
        from hybridnet_tf.data.coco_json import load_coco_json

        if source == "demo":
            paths = ensure_demo_data(data)
        else:
            _require(data, "train_annotations", "train_images")
            paths = data
        if split == "train":
            annotations, images = paths["train_annotations"], paths["train_images"]
        else:
            annotations = paths["val_annotations"]
            images = paths["val_images"] or paths["train_images"]
        return load_coco_json(
            annotations,
            images,
            vocabulary=vocabulary,
            include_crowd=data["include_crowd"],
            keep_empty=data["keep_empty"],
            missing_files=data["missing_files"],
        )
    if source in ("folder", "csv"):
        from hybridnet_tf.data import folder_csv

        _require(data, "train_path")
        path = data["train_path"] if split == "train" else data["val_path"]
        separator = data["label_separator"]
        if source == "folder":
            return folder_csv.load_folder(path, label_separator=separator or "_", vocabulary=vocabulary)
        return folder_csv.load_csv(path, label_separator=separator or " ", vocabulary=vocabulary)
    raise ValueError(f"unknown data.source {source!r}")


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
