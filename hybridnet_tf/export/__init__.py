"""Exporting a trained HybridNet (SavedModel, TFLite) and loading any artefact for prediction.

- `saved_model.export_saved_model`: TF Serving SavedModel (image bytes or pixels in).
- `tflite.export_tflite`: builtins-only `.tflite` (pixels in), float32 / float16 /
  dynamic-range / int8.
- `artifacts.load_predictor`: a run dir, `.keras`, SavedModel or `.tflite` as one
  callable `Predictor`.
- `export_run`: the command line's `hybridnet-tf export`, from a run directory.
"""

import os

import numpy as np

from hybridnet_tf.data.pipeline import eval_resize_policy

FORMATS = ("saved_model", "tflite")


def default_export_path(run_dir, format, quantize="none"):
    """Where `export_run` writes by default.

    `run_dir/export/hybridnet/1` for a SavedModel (a TF Serving model base
    path with version 1) and `run_dir/export/hybridnet_<quantize>.tflite`.
    """
    if format == "saved_model":
        return os.path.join(run_dir, "export", "hybridnet", "1")
    suffix = "fp32" if quantize == "none" else quantize
    return os.path.join(run_dir, "export", f"hybridnet_{suffix}.tflite")


def representative_images(config, count=100, seed=0):
    """`count` training images (seeded random choice), decoded and resized as in training.

    Returns:
        float32 [N, S, S, 3] pixels 0..255, N <= count.
    """
    from hybridnet_tf.data.load_splits import load_split
    from hybridnet_tf.experiment import as_dataset

    # Only the train split is read (no val files, no label-frequency pass).
    chosen = load_split(config["data"], "train")
    train, from_files = chosen.examples, chosen.from_files
    if from_files:
        chosen = np.random.default_rng(seed).choice(len(train), min(count, len(train)), replace=False)
        train = train.subset(np.sort(chosen))
    else:
        train = train.shuffle(10 * count, seed=seed).take(count)
    dataset = as_dataset(train, config, training=False, batch_size=count, from_files=from_files)
    return np.concatenate([images.numpy() for images, _ in dataset])[:count]


def export_run(
    run_dir,
    format="saved_model",
    out=None,
    quantize="none",
    checkpoint="best.keras",
    overwrite=False,
    num_representative=100,
    tflite_batch_size=1,
):
    """Exports a run's model with its labels and thresholds (`hybridnet-tf export`).

    Args:
        run_dir: a run directory written by `hybridnet-tf train`.
        format: "saved_model" or "tflite".
        out: output path (default: `default_export_path`).
        quantize: TFLite only: "none", "float16", "dynamic" or "int8".
        checkpoint: the run's model file to export.
        overwrite: replace an existing export.
        num_representative: int8 calibration images drawn from the training split.
        tflite_batch_size: fixed TFLite batch size (None: dynamic).

    Returns:
        The path written.
    """
    from hybridnet_tf.run_files import load_run
    from hybridnet_tf.experiment import image_size_of
    from hybridnet_tf.export.artifacts import run_thresholds

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    if format == "saved_model" and quantize != "none":
        raise ValueError("--quantize applies to --format tflite only")
    config, vocabulary, model = load_run(run_dir, checkpoint=checkpoint)
    thresholds = run_thresholds(run_dir, config, vocabulary)
    resize = eval_resize_policy(config["data"]["resize"])
    out = out or default_export_path(run_dir, format, quantize)
    if format == "saved_model":
        from hybridnet_tf.export.saved_model import export_saved_model

        return export_saved_model(
            model, vocabulary, out, image_size_of(config), resize=resize,
            thresholds=thresholds, overwrite=overwrite,
        )
    from hybridnet_tf.export.tflite import export_tflite

    calibration = representative_images(config, num_representative) if quantize == "int8" else None
    return export_tflite(
        model, out, quantize=quantize, representative_images=calibration, vocabulary=vocabulary,
        thresholds=thresholds, resize=resize, batch_size=tflite_batch_size, overwrite=overwrite,
    )
