"""Keras callbacks: validation metrics, checkpoints, the epoch log, backups and the NaN stop.

Each is a Keras callback or a thin subclass of one; `train` puts them in
an order that matters (see there).
"""

import contextlib
import csv
import math
import os

import keras
import tensorflow as tf

from hybridnet_tf.atomic_files import write_json_atomically
from hybridnet_tf.evaluation.metrics import mean_average_precision, set_metrics, threshold_metrics
from hybridnet_tf.evaluation.predictions import collect_predictions


def uses_ema(model):
    """True when `model`'s optimizer keeps an exponential moving average of the weights."""
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    return bool(getattr(optimizer, "use_ema", False))


@contextlib.contextmanager
def ema_weights(model):
    """Inside the block `model` holds its optimizer's EMA weights; outside, the trained ones.

    Uses Keras' own `SwapEMAWeights` (its evaluation hooks), so the swap is
    in place and works under `tf.distribute`. Without EMA it does nothing.
    """
    if not uses_ema(model):
        yield
        return
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()
    try:
        yield
    finally:
        swap.on_test_end()


class ValidationMetrics(keras.callbacks.Callback):
    """Computes val mAP, CF1 and OF1 at the end of each epoch and adds them to the logs.

    Put it before `TensorBoard` and checkpoint callbacks in the list: they
    then log the metrics and can monitor `val_mAP`, and `fit`'s history
    holds them. With an EMA optimizer the metrics are those of the EMA weights.

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
        with ema_weights(self.model):
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
    fitted), so the files load straight into evaluation, prediction and
    export. With an EMA optimizer the saved weights are the EMA weights,
    the ones `fit` leaves in the model at the end.

    Args:
        inference_model: the model to save.
        run_dir: folder for `best.keras` and `last.keras`.
        monitor: a key of the epoch logs, e.g. "val_mAP" or "val_loss".
        mode: "max" or "min"; by default "min" for losses, else "max".
        epoch_log: the run's CSV epoch log; when training resumes at epoch
            k, the best `monitor` of epochs before k is read from it, so a
            worse resumed epoch does not replace `best.keras`.
    """

    def __init__(self, inference_model, run_dir, monitor="val_mAP", mode=None, epoch_log=None):
        super().__init__()
        self.inference_model = inference_model
        self.run_dir = run_dir
        self.monitor = monitor
        self.mode = mode or ("min" if "loss" in monitor else "max")
        self.epoch_log = epoch_log
        self.best = None
        self._first_epoch = None

    def _improved(self, value):
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is not None or self.epoch_log is None:
            return
        self._first_epoch = epoch
        _, rows = read_epoch_log(self.epoch_log)
        for row in each_epoch_once(r for r in rows if r["epoch"] < epoch):
            value = row.get(self.monitor)
            if value is not None and self._improved(value):
                self.best = value

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            raise ValueError(
                f"checkpoint monitor {self.monitor!r} is not in the epoch logs "
                f"{sorted(logs)}; set train.monitor to one of them"
            )
        with ema_weights(self.model):
            save_model_atomically(self.inference_model, os.path.join(self.run_dir, "last.keras"))
            if self._improved(value):
                self.best = float(value)
                save_model_atomically(
                    self.inference_model, os.path.join(self.run_dir, "best.keras")
                )


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the message names the epoch and batch."""


class StopOnNonFiniteLoss(keras.callbacks.TerminateOnNaN):
    """Keras' `TerminateOnNaN(raise_error=True)`, with the epoch in the message.

    Raising (not `stop_training`) ends `fit` before any epoch-end or
    train-end callback runs: checkpoints, logs and the backup keep the last
    good state instead of the diverged weights. Put it first in the list, so
    a per-step backup never saves the step that produced the NaN.
    """

    def __init__(self):
        super().__init__(raise_error=True)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        steps = (self.params or {}).get("steps")
        epochs = (self.params or {}).get("epochs")
        raise NonFiniteLossError(
            f"training loss became {float(loss)} at epoch {self.epoch + 1}"
            f"{f' of {epochs}' if epochs else ''}, batch {batch + 1}"
            f"{f' of {steps}' if steps else ''}; training stopped and nothing was saved "
            "from it: best.keras, last.keras, the epoch log and the backup (those written "
            "so far) hold the last good state. Check the data of that step, or lower "
            "train.learning_rate, and run the same command again to resume"
        )


def _replace(source, target):
    # tf.io.gfile also handles gs:// run directories (TPU); locally it is rename(2).
    tf.io.gfile.rename(source, target, overwrite=True)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore`, with each backup file replaced atomically.

    Keras writes `latest.weights.h5` and `training_metadata.json` in place,
    so a kill during a save can leave a truncated file that cannot be
    restored. Here both go to temporary names first and are renamed over
    the old ones, weights first: a kill between the two renames at worst
    repeats one epoch with the newer weights. Restoring is Keras' own.

    With `save_freq=N` steps it also saves at each epoch end: Keras alone
    would record the finished epoch only at the next step's save, so a kill
    just after an epoch would run that whole epoch again.
    """

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.save_freq != "epoch":
            self._save_model()

    def _save_model(self):
        weights, metadata = self._weights_path, self._training_metadata_path
        temporary = (
            os.path.join(self.backup_dir, "latest.tmp.weights.h5"),
            f"{metadata}.tmp",
        )
        self._weights_path, self._training_metadata_path = temporary
        try:
            super()._save_model()
        finally:
            self._weights_path, self._training_metadata_path = weights, metadata
        _replace(temporary[0], weights)
        _replace(temporary[1], metadata)


def read_epoch_log(path):
    """Reads a `CSVLogger` file.

    Returns:
        `(header, rows)`: the column names, and one dict per complete row
        with an int `epoch` and float values (columns logged as "NA" are
        left out). A truncated last line is skipped.
    """
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    if not lines:
        return [], []
    header, rows = lines[0], []
    for line in lines[1:]:
        if len(line) != len(header):
            continue
        row = dict(zip(header, line))
        try:
            row["epoch"] = int(row["epoch"])
        except (KeyError, ValueError):
            continue
        for key, value in list(row.items()):
            if key != "epoch":
                try:
                    row[key] = float(value)
                except ValueError:
                    del row[key]
        rows.append(row)
    return header, rows


def each_epoch_once(rows):
    """The last row of each epoch, in epoch order."""
    latest = {}
    for row in rows:
        latest[row["epoch"]] = row
    return [latest[epoch] for epoch in sorted(latest)]


def history_of(rows):
    """`{metric: [value per epoch]}` (None where an epoch lacks the metric)."""
    keys = sorted({key for row in rows for key in row if key != "epoch"})
    return {key: [row.get(key) for row in rows] for key in keys}


def _write_epoch_log(path, header, rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="NA")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in header if key in row})
    os.replace(tmp, path)


class RunHistoryLogger(keras.callbacks.CSVLogger):
    """Keras' `CSVLogger` in append mode, plus `history.json`; every epoch once across restarts.

    After a restart `BackupAndRestore` resumes at epoch k and Keras'
    `History` holds only epochs k, k+1, ...; the CSV file keeps the rows of
    the earlier processes. The run's history is then the earlier rows of
    epochs before k, followed by this fit's rows (a row of an epoch that
    is run again is dropped, as the weights now descend from the rerun).
    `history.json` is rewritten after every epoch, and at the end of
    training the CSV file too, so both hold each epoch exactly once.

    Args:
        csv_path: the CSV epoch log (kept across restarts).
        json_path: `history.json`, `{metric: [value per epoch]}`.
    """

    def __init__(self, csv_path, json_path):
        super().__init__(csv_path, append=True)
        self.json_path = json_path
        self._earlier = []
        self._first_epoch = None
        self._final_rows = None

    def on_train_begin(self, logs=None):
        header, self._earlier = read_epoch_log(self.filename)
        if header:
            # Drops a line a kill may have cut short, so appending starts on a new line.
            _write_epoch_log(self.filename, header, self._earlier)
        self._first_epoch = None
        self._final_rows = None
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch

    def rows(self):
        """The run's epoch rows so far, each epoch once, in order."""
        if self._final_rows is not None:
            return self._final_rows
        _, rows = read_epoch_log(self.filename)
        this_fit = rows[len(self._earlier):]
        resumed_at = self._first_epoch
        if resumed_at is None:  # resumed after the last epoch: nothing left to run
            resumed_at = (self.params or {}).get("epochs", math.inf)
        earlier = [row for row in self._earlier if row["epoch"] < resumed_at]
        return each_epoch_once(earlier + this_fit)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        write_json_atomically(self.json_path, history_of(self.rows()))

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        rows = self._final_rows = self.rows()
        header, _ = read_epoch_log(self.filename)
        if header:
            _write_epoch_log(self.filename, header, rows)
        write_json_atomically(self.json_path, history_of(rows))
