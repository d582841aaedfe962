"""MS-COCO from TensorFlow Datasets -> tf.data of (encoded JPEG bytes, multi-hot).

Images stay encoded (`SkipDecoding`) so the pipeline decodes them exactly as
it decodes files from the COCO JSON, folder and CSV sources. The label
conventions are those of `load_coco_json`: 80 labels in ascending COCO
category id order, crowd annotations count, images without labels dropped.
"""

import logging

import tensorflow as tf

from hybridnet_tf.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from hybridnet_tf.vocabulary import LabelVocabulary

logger = logging.getLogger(__name__)

TFDS_COCO_NAMES = ("coco/2014", "coco/2017")


def load_tfds_coco(
    name="coco/2017",
    split="train",
    data_dir=None,
    download=False,
    manual_dir=None,
    include_crowd=True,
    keep_empty=False,
):
    """Reads a prepared TFDS COCO split as `(encoded_jpeg, multi_hot)` pairs.

    Preparing COCO is a one-off, large job: TFDS downloads the image zips of
    *all* splits of the config (~27 GB for `coco/2017`, similar for 2014) even
    when you want one split, then writes TFRecords of about the same size.
    It is therefore never started unless `download=True`: offline it would
    retry and hang. Offline, either point `data_dir` at an already prepared
    TFDS folder or put the original zips (`train2017.zip`, `val2017.zip`,
    `test2017.zip`, `annotations_trainval2017.zip`, ...) in `manual_dir` and
    pass `download=True`. On Python 3.11, preparing needs the
    `importlib_resources` package.

    Label frequencies are unknown without a pass over the data; the returned
    vocabulary has zero frequencies. Use `count_label_frequencies` once (e.g.
    on the train split) when the label order depends on them.

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
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=download_config)
    try:
        examples = builder.as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
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

    def add(total, batch):
        return total + tf.reduce_sum(tf.cast(batch > 0, tf.int64), axis=0)

    counts = labels.batch(1024).reduce(tf.zeros([num_labels], tf.int64), add)
    return counts.numpy().tolist()


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
