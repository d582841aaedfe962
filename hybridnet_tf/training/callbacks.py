"""Keras callbacks: validation mAP/F1 each epoch, atomic checkpoints of the inference model."""

import os

import keras

from hybridnet_tf.evaluation.metrics import mean_average_precision, set_metrics, threshold_metrics
from hybridnet_tf.evaluation.predictions import collect_predictions


class ValidationMetrics(keras.callbacks.Callback):
    """Computes val mAP, CF1 and OF1 at the end of each epoch and adds them to the logs.

    Put it before `TensorBoard` and checkpoint callbacks in the list: they
    then log the metrics and can monitor `val_mAP`, and `fit`'s history
    holds them.

    Args:
        inference_model: the model from `build_model` (weights shared with
            the model being fitted).
        dataset: batches of `(images, multi_hot)`.
        threshold: score threshold for CF1 / OF1.
        max_batches: evaluate on at most this many batches (None: all).
    """

    def __init__(self, inference_model, dataset, threshold=0.5, max_batches=None):
        super().__init__()
        self.inference_model = inference_model
        self.dataset = dataset
        self.threshold = threshold
        self.max_batches = max_batches

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        y_true, scores, decoded = collect_predictions(
            self.inference_model, self.dataset, max_batches=self.max_batches
        )
        mean_ap, _ = mean_average_precision(y_true, scores)
        at_threshold = threshold_metrics(y_true, scores, self.threshold)
        decoded_metrics = set_metrics(y_true, decoded)
        logs["val_mAP"] = float(mean_ap)
        logs["val_CF1"] = float(at_threshold["CF1"])
        logs["val_OF1"] = float(at_threshold["OF1"])
        logs["val_decoded_OF1"] = float(decoded_metrics["OF1"])
        print(
            f"\nepoch {epoch + 1}: val_mAP {mean_ap:.4f}  val_CF1 {at_threshold['CF1']:.4f}  "
            f"val_OF1 {at_threshold['OF1']:.4f}  decoded OF1 {decoded_metrics['OF1']:.4f}"
        )


def save_model_atomically(model, path):
    """Saves a `.keras` file through a temporary file, so a kill never leaves half a file."""
    tmp = f"{path[: -len('.keras')]}.tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


class InferenceModelCheckpoint(keras.callbacks.Callback):
    """Writes `last.keras` every epoch and `best.keras` when `monitor` improves.

    The inference model is saved (not the teacher-forcing wrapper being
    fitted), so the files load straight into evaluation, prediction and export.

    Args:
        inference_model: the model to save.
        run_dir: folder for `best.keras` and `last.keras`.
        monitor: a key of the epoch logs, e.g. "val_mAP" or "val_loss".
        mode: "max" or "min"; by default "min" for losses, else "max".
    """

    def __init__(self, inference_model, run_dir, monitor="val_mAP", mode=None):
        super().__init__()
        self.inference_model = inference_model
        self.run_dir = run_dir
        self.monitor = monitor
        self.mode = mode or ("min" if "loss" in monitor else "max")
        self.best = None

    def _improved(self, value):
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        save_model_atomically(self.inference_model, os.path.join(self.run_dir, "last.keras"))
        value = logs.get(self.monitor)
        if value is None:
            raise ValueError(
                f"checkpoint monitor {self.monitor!r} is not in the epoch logs "
                f"{sorted(logs)}; set train.monitor to one of them"
            )
        if self._improved(value):
            self.best = float(value)
            save_model_atomically(self.inference_model, os.path.join(self.run_dir, "best.keras"))
