"""Running a HybridNet over a dataset and collecting what evaluation needs."""

import weakref

import numpy as np
import tensorflow as tf

# One traced inference function per model: a new tf.function per call would
# retrace the unrolled decoder at every epoch's validation.
_PREDICT_FUNCTIONS = weakref.WeakKeyDictionary()


def predict_function(model):
    """`model(images, training=False)` as a `tf.function`, made once per model."""
    function = _PREDICT_FUNCTIONS.get(model)
    if function is None:
        # A weak reference, or the cached function would keep its model alive.
        model_ref = weakref.ref(model)
        function = tf.function(lambda images: model_ref()(images, training=False), reduce_retracing=True)
        _PREDICT_FUNCTIONS[model] = function
    return function


def decoded_to_multi_hot(label_ids, num_labels):
    """Turns decoded label ids [N, T] (-1 = none) into a 0/1 array [N, L]."""
    label_ids = np.asarray(label_ids)
    multi_hot = np.zeros((label_ids.shape[0], num_labels), dtype=np.float32)
    rows, cols = np.nonzero(label_ids >= 0)
    multi_hot[rows, label_ids[rows, cols]] = 1.0
    return multi_hot


def collect_predictions(model, dataset, max_batches=None, progress=False):
    """Runs `model` over a dataset of `(images, multi_hot)` batches.

    Args:
        model: an inference model from `build_model` (or loaded from `.keras`).
        dataset: batches of `(images, multi_hot)` (a third element, e.g. the
            names of `make_dataset(with_names=True)`, is ignored here; see
            `collect_named_predictions`).
        max_batches: stop after this many batches (None: all).
        progress: show a Keras progress bar.

    Returns:
        `(y_true [N, L], scores [N, L], decoded [N, L])`, numpy float32;
        `decoded` is the 0/1 decoded label set of each image.
    """
    y_true, scores, decoded, _ = collect_named_predictions(model, dataset, max_batches, progress)
    return y_true, scores, decoded


def collect_named_predictions(model, dataset, max_batches=None, progress=False):
    """`collect_predictions`, plus the name of each scored image.

    Returns:
        `(y_true, scores, decoded, names)`: `names` is a list of N strings
        from batches of `(images, multi_hot, names)`, else None.
    """
    predict = predict_function(model)
    if max_batches is not None:
        dataset = dataset.take(max_batches)
    total = max_batches
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        total = cardinality if total is None else min(total, cardinality)
    bar = None
    if progress:
        from hybridnet_tf.console import progress_bar

        bar = progress_bar(total)
    y_true, scores, label_ids, names = [], [], [], []
    for images, labels, *batch_names in dataset:
        outputs = predict(images)
        y_true.append(labels.numpy())
        scores.append(outputs["scores"].numpy())
        label_ids.append(outputs["label_ids"].numpy())
        if batch_names:
            names += [name.decode("utf-8", "replace") for name in batch_names[0].numpy()]
        if bar is not None:
            bar.add(1)
    if not y_true:
        raise ValueError("the evaluation data set is empty: no image could be read")
    y_true = np.concatenate(y_true).astype(np.float32)
    scores = np.concatenate(scores).astype(np.float32)
    decoded = decoded_to_multi_hot(np.concatenate(label_ids), y_true.shape[1])
    return y_true, scores, decoded, (names if len(names) == len(y_true) else None)
