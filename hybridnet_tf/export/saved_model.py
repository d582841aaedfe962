"""SavedModel export for TF Serving: encoded image bytes or pixels -> scores and label names.

Signatures of the exported SavedModel (all share the outputs below):

- `serving_default`: `image_bytes` string [B] of encoded JPEG / PNG / GIF /
  BMP files (what TF Serving's REST API sends for `{"b64": ...}`). Each
  image is decoded and resized exactly as in evaluation (`decode_and_resize`).
- `predict_images`: `image` float32 [B, S, S, 3], pixels 0..255, already
  decoded and resized to the model's size S.
- `predict_images_uint8`: `image` uint8 [B, S, S, 3], the same as uint8.

Outputs:

- `scores` float32 [B, L]: each label's score (its highest decoding probability).
- `labels` string [B, T]: the decoded label set, in decoding order, padded
  with "" (T = the decoder's `max_length`). This is the model's own answer,
  the same as `hybridnet-tf predict` prints by default; clients that prefer
  a score threshold apply `thresholds.json` to `scores` instead.
- `label_ids` int32 [B, T]: the same labels as vocabulary indices, -1 = none.
- `num_labels_predicted` int32 [B]: how many labels were decoded.

Beside `saved_model.pb` the export folder holds `labels.json` (the label
vocabulary), `thresholds.json` (global and per-label score thresholds) and
`export.json` (image size, resize policy, signatures, how many
BatchNormalization layers were folded).

The exported graph has each BatchNormalization folded into the convolution
before it (`fold_batch_norm`): at inference that is the same function, and
it saved ~20 % of the time of a Lite0 call on CPU (docs/performance.md).
"""

import os

import keras
import tensorflow as tf

from hybridnet_tf.data.pipeline import RESIZE_POLICIES, decode_and_resize
from hybridnet_tf.export.artifacts import (
    LABELS_FILE,
    THRESHOLDS_FILE,
    replace_atomically,
    write_export_metadata,
    write_labels,
    write_thresholds,
)
from hybridnet_tf.export.fold_batch_norm import fold_batch_norm
from hybridnet_tf.export.precision import float32_model

SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"
PREDICT_IMAGES_UINT8 = "predict_images_uint8"


def model_image_size(model):
    """The square input size of an inference model from `build_model`."""
    height, width = model.input_shape[1:3]
    if height is None or height != width:
        raise ValueError(f"expected a square, fixed-size image input, got {model.input_shape}")
    return int(height)


def _label_outputs(model, images, names):
    """Runs the model and adds label names; the output dict of every signature."""
    outputs = model(images, training=False)
    label_ids = tf.cast(outputs["label_ids"], tf.int32)
    # Index L is the "" padding for -1 (no label).
    vocabulary = tf.constant(list(names) + [""])
    padded_ids = tf.where(label_ids >= 0, label_ids, len(names))
    return {
        "scores": tf.cast(outputs["scores"], tf.float32),
        "labels": tf.gather(vocabulary, padded_ids),
        "label_ids": label_ids,
        "num_labels_predicted": tf.cast(outputs["num_labels"], tf.int32),
    }


def export_saved_model(
    model,
    vocabulary,
    out_dir,
    image_size=None,
    resize="squash",
    thresholds=None,
    overwrite=False,
):
    """Exports an inference model as a SavedModel with image-bytes and pixel signatures.

    The folder is written to a temporary sibling first and renamed into
    place, so `out_dir` is either complete or absent (TF Serving may be
    watching its parent).

    A model trained under mixed precision is exported as a float32 rebuild
    with its weights (`precision.float32_model`).

    Args:
        model: an inference model from `build_model` (or loaded from `.keras`).
        vocabulary: a `LabelVocabulary` or a list of label names.
        out_dir: the SavedModel folder to create. For TF Serving use a
            numbered version folder, e.g. `models/hybridnet/1`.
        image_size: the model's input size (default: read from the model).
        resize: the resize policy used in training ("squash" or "center_crop").
        thresholds: None, a float, or a dict with "global" and "per_class"
            (as `tune_thresholds` / `load_thresholds` return); written to
            `thresholds.json`. None writes 0.5 for every label.
        overwrite: replace an existing `out_dir`.

    Returns:
        `out_dir`.

    Example:
        >>> export_saved_model(model, vocabulary, "models/hybridnet/1", image_size=64)
        >>> served = tf.saved_model.load("models/hybridnet/1")
        >>> served.signatures["serving_default"](image_bytes=tf.constant([jpeg_bytes]))["labels"]
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {resize!r}; choose one of {list(RESIZE_POLICIES)}")
    # A mixed_float16 model is exported as its float32 rebuild (CPU serving, TFLite).
    model = float32_model(model)
    # BatchNorm folded into the convolutions: the same answers in ~0.8x the time.
    model, folded = fold_batch_norm(model)
    names = list(getattr(vocabulary, "names", vocabulary))
    num_labels = int(model.output["scores"].shape[-1])
    if len(names) != num_labels:
        raise ValueError(f"the vocabulary has {len(names)} labels but the model scores {num_labels}")
    size = model_image_size(model)
    if image_size is not None and int(image_size) != size:
        raise ValueError(f"image_size={image_size} but the model takes {size}x{size} images")

    def from_bytes(image_bytes):
        images = tf.map_fn(
            lambda encoded: decode_and_resize(encoded, size, resize),
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
        )
        return _label_outputs(model, images, names)

    def from_pixels(image):
        return _label_outputs(model, image, names)

    def from_uint8_pixels(image):
        return _label_outputs(model, tf.cast(image, tf.float32), names)

    archive = keras.export.ExportArchive()
    archive.track(model)
    pixels = [size, size, 3]
    archive.add_endpoint(
        SERVING_DEFAULT, from_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")]
    )
    archive.add_endpoint(
        PREDICT_IMAGES, from_pixels, [tf.TensorSpec([None, *pixels], tf.float32, name="image")]
    )
    archive.add_endpoint(
        PREDICT_IMAGES_UINT8,
        from_uint8_pixels,
        [tf.TensorSpec([None, *pixels], tf.uint8, name="image")],
    )

    def write(temp_dir):
        archive.write_out(temp_dir, verbose=False)
        write_labels(os.path.join(temp_dir, LABELS_FILE), vocabulary)
        write_thresholds(os.path.join(temp_dir, THRESHOLDS_FILE), thresholds, names)
        write_export_metadata(
            temp_dir,
            format="saved_model",
            image_size=size,
            resize=resize,
            max_length=int(model.output["label_ids"].shape[-1]),
            signatures={
                SERVING_DEFAULT: "image_bytes: string [B] (encoded JPEG/PNG/GIF/BMP)",
                PREDICT_IMAGES: f"image: float32 [B, {size}, {size}, 3] (0..255)",
                PREDICT_IMAGES_UINT8: f"image: uint8 [B, {size}, {size}, 3]",
            },
            outputs=["scores", "labels", "label_ids", "num_labels_predicted"],
            batch_norm_folded=folded,
        )

    return replace_atomically(out_dir, write, overwrite=overwrite)


def export_pixels_saved_model(model, out_dir, batch_size=None):
    """Writes a plain SavedModel `serving_default`: float32 image [B, S, S, 3] -> model outputs.

    The input of TFLite conversion: numbers only (scores, label_ids,
    num_labels), no string ops and no image decoding. `batch_size` fixes B
    (None: any batch).
    """
    model = float32_model(model)
    size = model_image_size(model)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(image):
        outputs = model(image, training=False)
        return {
            "scores": tf.cast(outputs["scores"], tf.float32),
            "label_ids": tf.cast(outputs["label_ids"], tf.int32),
            "num_labels": tf.cast(outputs["num_labels"], tf.int32),
        }

    archive.add_endpoint(
        SERVING_DEFAULT, serve, [tf.TensorSpec([batch_size, size, size, 3], tf.float32, name="image")]
    )
    archive.write_out(out_dir, verbose=False)
    return out_dir
