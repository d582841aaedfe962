"""MS-COCO from TensorFlow Datasets -> tf.data of (encoded JPEG bytes, multi-hot).

Images stay encoded (`SkipDecoding`) so the pipeline decodes them exactly as
it decodes files from the COCO JSON, folder and CSV sources. The label
conventions are those of `load_coco_json`: 80 labels in ascending COCO
category id order, crowd annotations count, images without labels dropped.
"""

import hashlib
import json
import logging
import os
import re
import tempfile

import tensorflow as tf

from hybridnet_tf.atomic_files import write_json_atomically

from hybridnet_tf.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from hybridnet_tf.vocabulary import LabelVocabulary

logger = logging.getLogger(__name__)

TFDS_COCO_NAMES = ("coco/2014", "coco/2017")


def tfds_builder(name, data_dir=None):
    """`tfds.builder(name, data_dir=data_dir)` without the temporary folder TFDS leaves behind.

    For a data set that is not prepared, the builder fills its `DatasetInfo`
    from GCS (`DatasetInfo.initialize_from_bucket`, TFDS 4.9.10), which makes a
    `tmp*tfds` folder with `tempfile.mkdtemp` and never removes it: an empty
    one per call offline, the info files with a network. Here `tempfile`
    points at a folder of ours for the call, removed after; the builder has
    read the files by then.
    """
    import tensorflow_datasets as tfds

    with tempfile.TemporaryDirectory(prefix="hybridnet_tfds_") as folder:
        previous, tempfile.tempdir = tempfile.tempdir, folder
        try:
            return tfds.builder(name, data_dir=data_dir)
        finally:
            tempfile.tempdir = previous


def load_tfds_coco(
    name="coco/2017",
    split="train",
    data_dir=None,
    download=False,
    manual_dir=None,
    include_crowd=True,
    keep_empty=False,
    shuffle_files=False,
    shuffle_seed=None,
):
    """Reads a prepared TFDS COCO split as `(encoded_jpeg, multi_hot)` pairs.

    Preparing COCO is a one-off, large job: TFDS downloads the image zips of
    *all* splits of the config (~27 GB for `coco/2017`, similar for 2014) even
    when you want one split, then writes TFRecords of about the same size.
    It is therefore never started unless `download=True`: offline it would
    retry and hang. Offline, either point `data_dir` at an already prepared
    TFDS folder or put the original zips (`train2017.zip`, `val2017.zip`,
    `test2017.zip`, `annotations_trainval2017.zip`, `image_info_test2017.zip`)
    in `manual_dir` and pass `download=True`. TFDS checks each zip against
    its registered checksum, so only the official files are accepted. On
    Python 3.11, preparing needs the `importlib_resources` package.

    Label frequencies and the number of examples left after dropping empty
    images are unknown without a pass over the data; the returned vocabulary
    has zero frequencies. `split_statistics` makes that pass once and caches
    its result.

    Args:
        name: "coco/2017" or "coco/2014" (optionally with ":version").
        split: a TFDS split, e.g. "train", "validation", "train[:10%]".
            "test" has no annotations: pass `keep_empty=True` for it.
        data_dir: the TFDS data folder (default: TFDS' own, ~/tensorflow_datasets).
        download: download and prepare the data if it is not prepared yet.
        manual_dir: folder with the original COCO zips, used by `download=True`
            instead of fetching them.
        include_crowd: whether `is_crowd` objects give labels (default True).
        keep_empty: keep images without labels as all-negative examples
            (default False: they are dropped, so the cardinality is unknown).
        shuffle_files: read the split's files in a random order (training);
            the pipeline's shuffle buffer then mixes examples across files.
        shuffle_seed: seed of the file order (None: a new order every run).

    Returns:
        `(dataset, vocabulary)`: a `tf.data.Dataset` of `(tf.string encoded
        image, float32 [80] multi-hot)` and the `LabelVocabulary` of the 80
        COCO classes.

    Example:
        >>> train, vocab = load_tfds_coco("coco/2017", "train", data_dir="/data/tfds")
        >>> counts = count_label_frequencies(train, len(vocab))
        >>> vocab = LabelVocabulary(vocab.names, counts, vocab.source_ids)
    """
    import tensorflow_datasets as tfds

    if name.split(":")[0] not in TFDS_COCO_NAMES:
        raise ValueError(f"unknown TFDS COCO name {name!r}; choose one of {list(TFDS_COCO_NAMES)}")
    builder = tfds_builder(name, data_dir=data_dir)
    if download:
        _download_and_prepare(builder, manual_dir)
    try:
        examples = builder.as_dataset(
            split=split,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=shuffle_files,
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
        )
    except AssertionError as e:  # TFDS' way of saying "not prepared"
        if "could not find data" not in str(e):
            raise
        raise FileNotFoundError(
            f"TFDS {name} is not prepared in {builder.data_dir}. Prepare it once with "
            f"load_tfds_coco({name!r}, data_dir=..., download=True) (downloads ~27 GB "
            "for all splits), or offline with the original COCO zips in a folder: "
            "download=True, manual_dir=<that folder>; or pass the data_dir of an "
            "already prepared copy."
        ) from None

    vocabulary = _coco_vocabulary(builder.info.features["objects"]["label"].names)
    num_labels = len(vocabulary)

    def to_multi_hot(example):
        labels = example["objects"]["label"]
        if not include_crowd:
            labels = tf.boolean_mask(labels, tf.logical_not(example["objects"]["is_crowd"]))
        # A label repeated for several objects is one positive.
        counts = tf.reduce_sum(tf.one_hot(labels, num_labels, dtype=tf.float32), axis=0)
        multi_hot = tf.ensure_shape(tf.minimum(counts, 1.0), [num_labels])
        return example["image"], multi_hot

    dataset = examples.map(to_multi_hot, num_parallel_calls=tf.data.AUTOTUNE)
    if not keep_empty:
        dataset = dataset.filter(lambda image, multi_hot: tf.reduce_any(multi_hot > 0))
    return dataset, vocabulary


def _download_and_prepare(builder, manual_dir):
    import tensorflow_datasets as tfds

    if manual_dir is not None and not os.path.isdir(manual_dir):
        raise FileNotFoundError(
            f"TFDS manual_dir {manual_dir} is not a folder; put the original COCO zips there "
            "(train2017.zip, val2017.zip, test2017.zip, annotations_trainval2017.zip, "
            "image_info_test2017.zip)"
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config)
    except tfds.download.download_manager.NonMatchingChecksumError as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(
            f"{first_line} Only the official COCO zips are accepted: download that file "
            "again from images.cocodataset.org (or remove it from manual_dir to let TFDS "
            "download it)."
        ) from None


def count_label_frequencies(dataset, num_labels, max_examples=None):
    """Counts how many examples carry each label, in one pass over `dataset`.

    Reads every example (for COCO train that is a full pass over ~18 GB of
    records; the images are not decoded). Pass `max_examples` for an estimate
    from the first examples.

    Args:
        dataset: a `tf.data.Dataset` of `(image, multi_hot)`, batched or not.
        num_labels: length of the multi-hot vectors.
        max_examples: stop after this many examples (None: all).

    Returns:
        A list of `num_labels` ints, usable as `LabelVocabulary.frequencies`.
    """
    return count_examples_and_labels(dataset, num_labels, max_examples)[1]


def count_examples_and_labels(dataset, num_labels, max_examples=None):
    """The number of examples and of examples per label, in one pass over `dataset`.

    Args:
        dataset: a `tf.data.Dataset` of `(image, multi_hot)`, batched or not.
        num_labels: length of the multi-hot vectors.
        max_examples: stop after this many examples (None: all).

    Returns:
        `(num_examples, label_counts)`: an int and a list of `num_labels` ints.
    """
    labels = dataset.map(lambda image, multi_hot: multi_hot)
    rank = labels.element_spec.shape.rank
    if rank == 2:
        labels = labels.unbatch()
    elif rank != 1:
        raise ValueError(
            f"expected multi-hot labels of shape [{num_labels}] or [batch, {num_labels}], "
            f"got {labels.element_spec.shape}"
        )
    if max_examples is not None:
        labels = labels.take(max_examples)

    def add(state, batch):
        examples, counts = state
        examples += tf.shape(batch, out_type=tf.int64)[0]
        return examples, counts + tf.reduce_sum(tf.cast(batch > 0, tf.int64), axis=0)

    initial = (tf.constant(0, tf.int64), tf.zeros([num_labels], tf.int64))
    examples, counts = labels.batch(1024).reduce(initial, add)
    return int(examples), counts.numpy().tolist()


def split_statistics(
    name="coco/2017",
    split="train",
    data_dir=None,
    include_crowd=True,
    keep_empty=False,
    cache_dir=None,
):
    """Examples and examples per label of a prepared TFDS COCO split, counted once and cached.

    The first call reads the whole split (labels only, images are not
    decoded) and writes the counts as a small JSON file next to the prepared
    data (`<data_dir>/coco/2017/<version>/hybridnet_tf-counts-<split>-...json`),
    or, where that folder is not writable, in `cache_dir` (default
    `~/.cache/hybridnet_tf/tfds_counts`). Later calls read that file. The file
    is keyed by the dataset version, the split, the crowd / empty options and
    the split's record counts, so re-prepared data is counted again.

    Args:
        name, split, data_dir, include_crowd, keep_empty: as for `load_tfds_coco`.
        cache_dir: fallback folder for the counts (None: `~/.cache/hybridnet_tf/tfds_counts`).

    Returns:
        `(num_examples, label_counts)`: the examples `load_tfds_coco` gives
        with these options, and how many of them carry each label.
    """
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir=data_dir)
    try:
        split_info = builder.info.splits[split]
    except KeyError:
        raise ValueError(
            f"TFDS {name} in {builder.data_dir} has no split {split!r}; "
            f"it has {sorted(builder.info.splits)}"
        ) from None
    key = {
        "dataset": builder.info.full_name,
        "split": split,
        "include_crowd": bool(include_crowd),
        "keep_empty": bool(keep_empty),
        "records": int(split_info.num_examples),
        "shard_lengths": [int(n) for n in split_info.shard_lengths],
    }
    split_tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
    if split_tag != split:  # "train[:10%]" and "train[:10]" must not share a file
        split_tag += "-" + hashlib.sha256(split.encode()).hexdigest()[:8]
    file_name = f"hybridnet_tf-counts-{split_tag}-crowd{int(include_crowd)}-empty{int(keep_empty)}.json"
    beside_data = os.path.join(os.fspath(builder.data_dir), file_name)
    folder_key = hashlib.sha256(os.path.abspath(os.fspath(builder.data_dir)).encode()).hexdigest()[:16]
    fallback_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hybridnet_tf", "tfds_counts")
    in_cache_dir = os.path.join(fallback_dir, folder_key, file_name)
    for path in (beside_data, in_cache_dir):
        counts = _read_counts(path, key)
        if counts is not None:
            return counts

    dataset, vocabulary = load_tfds_coco(
        name, split, data_dir=data_dir, include_crowd=include_crowd, keep_empty=keep_empty
    )
    logger.info("counting the labels of TFDS %s %s (one pass, cached)", name, split)
    num_examples, label_counts = count_examples_and_labels(dataset, len(vocabulary))
    content = dict(key, num_examples=num_examples, label_counts=label_counts)
    for path in (beside_data, in_cache_dir):
        try:
            write_json_atomically(path, content)
            break
        except OSError as error:
            logger.warning("could not cache the label counts in %s (%s)", path, error)
    return num_examples, label_counts


def _read_counts(path, key):
    """The cached `(num_examples, label_counts)` in `path` when it matches `key`, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
        if all(content.get(k) == v for k, v in key.items()):
            return int(content["num_examples"]), [int(n) for n in content["label_counts"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the unreadable label-count cache %s (%s); counting again", path, error)
        return None
    logger.info("label-count cache %s is for other data; counting again", path)
    return None


def _coco_vocabulary(builder_names):
    """The 80 COCO names: the builder's, or the project's when TFDS only has '0'..'79'."""
    names = list(builder_names)
    if names == [str(i) for i in range(len(names))]:
        # An unprepared or mocked builder has no names yet.
        names = list(COCO_CLASS_NAMES)
    if names == list(COCO_CLASS_NAMES):
        return LabelVocabulary(names, source_ids=COCO_CATEGORY_IDS)
    logger.warning(
        "TFDS COCO label names differ from the standard COCO-80 names; using TFDS' "
        "names (first: %s)",
        names[:5],
    )
    return LabelVocabulary(names)
