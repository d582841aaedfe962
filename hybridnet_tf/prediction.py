"""Predicting labels for image files with a trained HybridNet."""

import os
import re

import numpy as np
import tensorflow as tf

from hybridnet_tf.data.pipeline import decode_and_resize

# What tf.io.decode_image reads (TF 2.21: JPEG, JPEG XL, PNG, GIF, BMP, WebP).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jxl")
# TF prefixes op errors with the function they ran in and appends the op:
# "{{function_node __wrapped__DecodeImage_device_/...}} Unknown image ... [Op:DecodeImage]".
_TF_ERROR_NOISE = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\]|\s*\[\[\{\{node [^\]]*\]\]")


def plain_error_message(error):
    """One plain line from an exception: TF's function-node prefix and op suffix removed.

    Example:
        >>> plain_error_message(tf.errors.InvalidArgumentError(None, None,
        ...     "{{function_node __wrapped__DecodeImage_device_/job:localhost}} Unknown image file format. [Op:DecodeImage]"))
        'Unknown image file format.'
    """
    message = getattr(error, "message", None) or str(error)
    message = _TF_ERROR_NOISE.sub("", message)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    # Eager op errors end in " name: " (the op had no name).
    lines = [re.sub(r"\s*name:\s*$", "", line) for line in lines]
    return lines[0] if lines else type(error).__name__


def expand_image_paths(inputs):
    """Expands files and folders (their image files, sorted) into a list of paths.

    A named path that does not exist is kept, so that it is reported as a failure.
    """
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in sorted(os.walk(item)):
                paths += [
                    os.path.join(root, f)
                    for f in sorted(files)
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                ]
        else:
            paths.append(item)
    return paths


def predict_files(model, paths, vocabulary, image_size, resize="squash", threshold=None, batch_size=32):
    """Predicts labels for image files; unreadable files are reported, not fatal.

    Args:
        model: an inference model from `build_model`.
        paths: image file paths.
        vocabulary: the model's `LabelVocabulary`.
        image_size: the model's input size.
        resize: the resize policy used in training.
        threshold: None to report the decoded label set; a float (or a
            per-label array) to report labels whose score reaches it.
        batch_size: images per model call.

    Returns:
        A list with one dict per path: `path`, and either `labels`
        (list of `{label, score}` sorted by score) or `error`.
    """
    results = []
    images, batch_paths = [], []

    def flush():
        if not images:
            return
        outputs = model(tf.stack(images), training=False)
        # np.asarray: Keras models return tensors, export predictors numpy arrays.
        scores = np.asarray(outputs["scores"])
        label_ids = np.asarray(outputs["label_ids"])
        for path, row_scores, row_ids in zip(batch_paths, scores, label_ids):
            if threshold is None:
                chosen = [int(i) for i in row_ids if i >= 0]
            else:
                chosen = np.nonzero(row_scores >= threshold)[0].tolist()
            labels = sorted(
                ({"label": vocabulary.names[i], "score": float(row_scores[i])} for i in chosen),
                key=lambda item: -item["score"],
            )
            results.append({"path": path, "labels": labels})
        images.clear()
        batch_paths.clear()

    for path in paths:
        try:
            encoded = tf.io.read_file(path)
            images.append(decode_and_resize(encoded, image_size, resize))
            batch_paths.append(path)
        except (tf.errors.OpError, ValueError) as error:
            results.append({"path": path, "error": plain_error_message(error)})
            continue
        if len(images) == batch_size:
            flush()
    flush()
    order = {p: i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r["path"]])
    return results


def write_results_csv(results, path):
    """Writes `predict_files` results as CSV: path, labels (";"-joined), scores, error."""
    import csv

    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "labels", "scores", "error"])
        for result in results:
            labels = result.get("labels", [])
            writer.writerow([
                result["path"],
                ";".join(item["label"] for item in labels),
                ";".join(f"{item['score']:.4f}" for item in labels),
                result.get("error", ""),
            ])
    return path
