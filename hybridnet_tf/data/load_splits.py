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
    return files_splits(train, val)


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


def _load_tfds_splits(data):
    from hybridnet_tf.data.tfds_coco import count_label_frequencies, load_tfds_coco

    options = dict(name=data["tfds_name"], data_dir=data["tfds_data_dir"], download=data["tfds_download"])
    train, vocabulary = load_tfds_coco(split=data["tfds_train_split"], **options)
    val = None
    if data["tfds_val_split"]:
        val, _ = load_tfds_coco(split=data["tfds_val_split"], **options)
    frequencies = count_label_frequencies(train, len(vocabulary))
    vocabulary = LabelVocabulary(vocabulary.names, list(frequencies), vocabulary.source_ids)
    return Splits(train, val, vocabulary, False, int(train.cardinality()))


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
