"""A config's `data` section -> the train / val splits and the label vocabulary.

The one place where a source name (`demo`, `coco_json`, `folder`, `csv`,
`tfds`) becomes loader calls; everything after it sees `LabeledImages`
(file sources) or datasets of `(jpeg bytes, multi_hot)` (TFDS).
"""

import json
import logging
import os
from dataclasses import dataclass, field

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
        unreadable: `{split: [(path, reason), ...]}` of the files left out
            because they cannot be decoded (file sources).
    """

    train: object
    val: object
    vocabulary: LabelVocabulary
    from_files: bool
    num_train: int
    num_val: int = None
    unreadable: dict = field(default_factory=dict)


def _require(data, *keys):
    missing = [k for k in keys if not data.get(k)]
    if missing:
        raise ValueError(
            f"data.source={data['source']!r} needs {', '.join('data.' + k for k in missing)}"
        )


def drop_unreadable(images, split, bad=None):
    """Drops files that cannot be decoded, with one warning naming a few of them.

    `bad`: the `find_unreadable_images` result when already known.
    """
    from hybridnet_tf.data.image_check import find_unreadable_images

    bad = find_unreadable_images(images.paths) if bad is None else bad
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
    train, _ = _train_and_test_cut(data)
    val = None
    if _has_own_val(data):
        val = _load_files(data, "val", vocabulary=train.vocabulary)
    elif data["val_fraction"] > 0:
        from hybridnet_tf.data.splits import split_train_val

        train, val = split_train_val(train, data["val_fraction"], seed=data["split_seed"])
    return files_splits(train, val)


def _has_own_test(data):
    """Whether a file source names its own test data (else test, if any, is cut from train)."""
    if data["source"] == "coco_json":
        return bool(data["test_annotations"])
    if data["source"] in ("folder", "csv"):
        return bool(data["test_path"])
    return False


def _train_and_test_cut(data):
    """The train images less a `data.test_fraction` cut (seeded, made before val is cut), and the cut.

    Loaded without a given vocabulary on purpose: the stratified cut depends
    on the label columns, which must be the same at training and evaluation.
    """
    train = _load_files(data, "train")
    if data["test_fraction"] <= 0 or _has_own_test(data):
        return train, None
    from hybridnet_tf.data.splits import split_train_val

    # Another seed than the val cut's, so the two cuts are not alike.
    return split_train_val(train, data["test_fraction"], seed=data["split_seed"] + 1)


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
    from hybridnet_tf.data.image_check import find_unreadable_images

    unreadable = {"train": find_unreadable_images(train.paths)}
    train = drop_unreadable(train, "train", unreadable["train"])
    vocabulary = train.vocabulary.with_frequencies(train.labels)
    train = LabeledImages(train.paths, train.labels, vocabulary)
    if val is not None:
        unreadable["val"] = find_unreadable_images(val.paths)
        val = drop_unreadable(val, "val", unreadable["val"])
        val = LabeledImages(val.paths, val.labels, vocabulary)
    return Splits(train, val, vocabulary, True, len(train), None if val is None else len(val),
                  unreadable)


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
        unreadable: `(path, reason)` of the files left out because they cannot
            be decoded (`image_check.find_unreadable_images`).
    """

    examples: object
    from_files: bool
    num_examples: int
    names: list
    unreadable: list = field(default_factory=list)


def load_split(data, split="val", vocabulary=None):
    """Loads only the train, val or test split of a config's `data` section.

    For evaluation and int8 calibration: unlike `load_splits`, it reads no
    more than the chosen split (no check of the other split's files, no
    pass over TFDS train for label frequencies). A split cut from train
    by `data.val_fraction` / `data.test_fraction` still needs the whole
    train list to cut it.

    The test split (`data.test_annotations` / `test_images`, `test_path`,
    `tfds_test_split`, or `test_fraction` of train) is never trained on nor
    used to choose `best.keras` or tune thresholds: the split to report.

    Files that cannot be read are left out and listed in `unreadable`.

    Args:
        data: the `data` mapping of a config.
        split: "train", "val" or "test".
        vocabulary: a `LabelVocabulary` to map file sources' labels onto,
            usually the run's `vocabulary.json` (None: built from the data).

    Returns:
        A `OneSplit`.

    Raises:
        ValueError: when the config has no such split.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train', 'val' or 'test'")
    source = data["source"]
    if source == "tfds":
        name = data[f"tfds_{split}_split"]
        if not name:
            raise ValueError(f"the data config has no {split} split; set data.tfds_{split}_split")
        dataset, vocab, count = _load_tfds_split(data, name, training=False)
        return OneSplit(dataset, False, count, vocab.names)
    if split == "test":
        if _has_own_test(data):
            return _readable_split(_load_files(data, "test", vocabulary), "test")
        if data["test_fraction"] <= 0:
            raise ValueError(
                "the data config has no test split; set data.test_annotations (coco_json) / "
                "data.test_path (folder, csv) / data.tfds_test_split, or data.test_fraction"
            )
        _, test = _train_and_test_cut(data)
        return _readable_split(test, "test")
    cut_test = data["test_fraction"] > 0 and not _has_own_test(data)
    if _has_own_val(data) and not (split == "train" and cut_test):
        return _readable_split(_load_files(data, split, vocabulary), split)
    if data["val_fraction"] > 0 or (split == "train" and cut_test):
        # Val (and test) are seeded cuts of train: all come from the whole train list.
        splits = load_splits(data)
        chosen = splits.val if split == "val" else splits.train
        return OneSplit(chosen, True, len(chosen), splits.vocabulary.names,
                        unreadable=splits.unreadable.get(split, []))
    if split == "val":
        raise ValueError(
            "the data config has no val split; set data.val_annotations / data.val_path "
            "or data.val_fraction"
        )
    return _readable_split(_load_files(data, split, vocabulary), split)


def _readable_split(images, split):
    """A `OneSplit` of the readable files of `images`; the others in `unreadable`."""
    from hybridnet_tf.data.image_check import find_unreadable_images

    bad = find_unreadable_images(images.paths)
    kept = drop_unreadable(images, split, bad)
    return OneSplit(kept, True, len(kept), kept.vocabulary.names, unreadable=bad)


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
            annotations = paths[f"{split}_annotations"]
            images = paths[f"{split}_images"] or paths["train_images"]
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
        path = data[f"{split}_path"]
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
