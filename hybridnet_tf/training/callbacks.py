"""Keras callbacks: validation metrics, checkpoints, the epoch log, backups and the NaN stop.

Each is a Keras callback or a thin subclass of one; `train` puts them in
an order that matters (see there).
"""

import contextlib
import csv
import math
import os

import keras
import numpy as np
import tensorflow as tf

from hybridnet_tf.atomic_files import write_json_atomically
from hybridnet_tf.console import interactive
from hybridnet_tf.evaluation.metrics import mean_average_precision, set_metrics, threshold_metrics
from hybridnet_tf.evaluation.predictions import decoded_to_multi_hot, predict_function
from hybridnet_tf.model.hybridnet import IMAGE_ENCODER, build_head_model


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
    """Computes val loss, mAP, CF1 and OF1 at the end of each epoch in one pass; adds them to the logs.

    Logs `val_mAP`, `val_CF1`, `val_OF1` (scores at `threshold`), and
    `val_decoded_OF1`, `val_decoded_exact` (OF1 and whole sets right of the
    label sets the model returns).

    With `label_rank` it also computes `val_loss` (the loss `fit` would
    report for `validation_data`) in the same pass over the val batches and
    the same traced function as the predictions, so `fit` needs no
    `validation_data`: each val image is read, decoded and sent through the
    backbone once per epoch. The function is traced once (its input
    signature is the dataset's element spec) and reused every epoch.

    Put it before `TensorBoard` and checkpoint callbacks in the list: they
    then log the metrics and can monitor `val_mAP` / `val_loss`, and `fit`'s
    history holds them. With an EMA optimizer the metrics (and the loss) are
    those of the EMA weights.

    Args:
        inference_model: the model from `build_model` (weights shared with
            the model being fitted); without `label_rank` any model from
            inputs to `scores` and `label_ids` (e.g. `build_head_model`).
        dataset: batches of `(images, multi_hot)`, or of
            `(features, multi_hot)` with `from_features=True`.
        threshold: score threshold for CF1 / OF1.
        max_batches: evaluate on at most this many batches (None: all);
            `val_loss` is then over the same batches.
        label_rank: [L] decoding order of the labels, to compute `val_loss`
            (None: no `val_loss`).
        from_features: `dataset` holds cached backbone features
            (`build_head_model`'s input), not images.
        seed: seed of the `random` label order's val sequences.

    Attributes:
        last_predictions: `(y_true, scores, decoded)` of the last epoch's
            pass (None before the first), for later callbacks to reuse.
    """

    def __init__(self, inference_model, dataset, threshold=0.5, max_batches=None,
                 label_rank=None, from_features=False, seed=None):
        super().__init__()
        self.inference_model = inference_model
        self.dataset = dataset
        self.threshold = threshold
        self.max_batches = max_batches
        self.label_rank = label_rank
        self.from_features = from_features
        self.seed = seed
        self.last_predictions = None
        self._pass = None

    def _one_pass(self):
        """(dataset, traced step) of the validation pass, made once."""
        if self._pass is not None:
            return self._pass
        dataset = self.dataset
        if self.max_batches is not None:
            dataset = dataset.take(self.max_batches)
        if self.label_rank is None:
            predict = predict_function(self.inference_model)
            step = tf.function(
                lambda images, multi_hot: (*_scores_and_ids(predict(images)), tf.constant(0.0)),
                input_signature=list(dataset.element_spec),
            )
            dataset = dataset.map(lambda images, multi_hot: ((images, multi_hot),))
        else:
            dataset, step = validation_step(
                self.inference_model, dataset, self.label_rank, self.from_features, self.seed
            )
        self._pass = dataset, step
        return self._pass

    def trace_count(self):
        """How many times the validation step was traced (1 after any number of epochs)."""
        return 0 if self._pass is None else self._pass[1].experimental_get_tracing_count()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        dataset, step = self._one_pass()
        y_true, scores, label_ids, loss_sum, count = [], [], [], 0.0, 0
        with ema_weights(self.model):
            for element in dataset:
                (images, multi_hot), *rest = element
                batch_scores, batch_ids, batch_loss = step(images, multi_hot, *rest)
                y_true.append(multi_hot.numpy())
                scores.append(batch_scores.numpy())
                label_ids.append(batch_ids.numpy())
                # Keras averages the loss over batches weighted by their size.
                loss_sum += float(batch_loss) * len(y_true[-1])
                count += len(y_true[-1])
        if not y_true:
            raise ValueError("the validation data set is empty: no val image could be read")
        y_true = np.concatenate(y_true).astype(np.float32)
        scores = np.concatenate(scores).astype(np.float32)
        decoded = decoded_to_multi_hot(np.concatenate(label_ids), y_true.shape[1])
        # Later callbacks (TensorBoard's PR curves) reuse this epoch's pass.
        self.last_predictions = (y_true, scores, decoded)
        mean_ap, _ = mean_average_precision(y_true, scores)
        at_threshold = threshold_metrics(y_true, scores, self.threshold)
        decoded_metrics = set_metrics(y_true, decoded)
        if self.label_rank is not None:
            logs["val_loss"] = loss_sum / count
        logs["val_mAP"] = float(mean_ap)
        logs["val_CF1"] = float(at_threshold["CF1"])
        logs["val_OF1"] = float(at_threshold["OF1"])
        logs["val_decoded_OF1"] = float(decoded_metrics["OF1"])
        # Whole label sets right: what a decoder is for (docs/decoder.md); also in TensorBoard.
        logs["val_decoded_exact"] = float(decoded_metrics["exact"])
        loss_text = f"val_loss {logs['val_loss']:.4f}  " if "val_loss" in logs else ""
        # On a terminal the line starts below Keras' live bar; a log has no bar to leave.
        line_start = "\n" if interactive() else ""
        print(
            f"{line_start}epoch {epoch + 1}: {loss_text}val_mAP {mean_ap:.4f}  val_CF1 {at_threshold['CF1']:.4f}  "
            f"val_OF1 {at_threshold['OF1']:.4f}  decoded OF1 {decoded_metrics['OF1']:.4f}  "
            f"exact {decoded_metrics['exact']:.4f}"
        )


def _scores_and_ids(outputs):
    return outputs["scores"], outputs["label_ids"]


def _head_input_model(model):
    """image -> what `build_head_model(model)` reads, through `model`'s own image encoder; or None.

    The heads read the image encoder's output (its last one when it has
    several, e.g. the spatial map of an attention decoder). None when the
    shapes say otherwise: the validation step then runs the whole model twice.
    """
    encoder = model.get_layer(IMAGE_ENCODER)
    heads = build_head_model(model)
    encoded = encoder.output
    head_input = encoded[-1] if isinstance(encoded, (list, tuple)) else encoded
    if tuple(head_input.shape[1:]) != tuple(heads.input.shape[1:]):
        return None, heads
    return keras.Model(encoder.input, head_input, name="head_input"), heads


def validation_step(model, dataset, label_rank, from_features=False, seed=None):
    """The one-pass validation: a dataset and a traced step giving scores, label ids and the loss.

    The loss is `training_loss(model)` of the teacher-forcing outputs (the
    loss `fit` reports), computed from the same backbone features as the
    predictions: the backbone runs once per batch.

    Args:
        model: the inference model from `build_model`.
        dataset: batches of `(images, multi_hot)` (or `(features, multi_hot)`
            with `from_features`).
        label_rank: [L] decoding order of the labels.
        from_features: the batches hold `build_head_model`'s input features.
        seed: seed of the `random` label order's sequences.

    Returns:
        `(pass_dataset, step)`: iterate `pass_dataset`; each element is
        `((inputs, multi_hot), decoder_inputs, targets)`, and
        `step(inputs, multi_hot, decoder_inputs, targets)` returns
        `(scores [B, L], label_ids [B, T], mean loss of the batch)`.
    """
    from hybridnet_tf.model.hybridnet import FEATURES, build_training_model, training_loss, with_training_targets

    losses = training_loss(model)
    head_input, heads = (None, build_head_model(model)) if from_features else _head_input_model(model)
    shared = from_features or head_input is not None
    loss_model = build_training_model(model, from_features=shared)
    loss_key = FEATURES if shared else "image"
    # `with_training_targets` puts its first element under the input key as
    # it is: a pair (inputs, multi_hot) travels through it unchanged.
    with_targets = with_training_targets(
        dataset.map(lambda images, multi_hot: ((images, multi_hot), multi_hot)),
        model, label_rank, seed=seed,
    )
    pass_dataset = with_targets.map(
        lambda inputs, targets: (
            inputs["image"], {k: v for k, v in inputs.items() if k != "image"}, targets
        )
    )

    def step(images, multi_hot, decoder_inputs, targets):
        if from_features:
            encoded = images
        elif head_input is not None:
            encoded = head_input(images, training=False)
        else:
            encoded = None
        outputs = heads(encoded, training=False) if encoded is not None else model(images, training=False)
        teacher_forced = loss_model(
            {loss_key: encoded if shared else images, **decoder_inputs}, training=False
        )
        loss = tf.add_n([
            tf.cast(fn(targets[key], teacher_forced[key]), tf.float32) for key, fn in losses.items()
        ])
        return (*_scores_and_ids(outputs), loss)

    element_spec = pass_dataset.element_spec
    signature = [element_spec[0][0], element_spec[0][1], element_spec[1], element_spec[2]]
    return pass_dataset, tf.function(step, input_signature=signature)


class CheckpointWriteError(OSError):
    """A checkpoint or backup could not be written (e.g. a full disk); the previous one is intact."""


def _write_failed(path, error, temporary):
    for name in temporary:
        with contextlib.suppress(OSError):
            os.remove(name)
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
    return CheckpointWriteError(
        error.errno, f"could not write {path}: {error.strerror or error}; {kept}. Free space "
        "(or fix the folder's permissions) and run the same command again to resume"
    )


def save_model_atomically(model, path):
    """Saves a `.keras` file through a temporary file, so a kill never leaves half a file.

    Raises:
        CheckpointWriteError: the file could not be written (e.g. no space
            left); `path` is as it was and the temporary file is removed.
    """
    tmp = f"{path[: -len('.keras')]}.tmp.keras"
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise _write_failed(path, error, [tmp]) from error


def save_weights_atomically(model, path):
    """Saves `model`'s weights to a `.weights.h5` file through a temporary file, so a kill never leaves half a file."""
    tmp = f"{path[: -len('.weights.h5')]}.tmp.weights.h5"
    model.save_weights(tmp)
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

    RUN_STATE = (
        "training stopped and nothing was saved from it: best.keras, last.keras, the epoch log and "
        "the backup (those written so far) hold the last good state"
    )

    def __init__(self, what="training", state=RUN_STATE):
        """`what` names the training in the message; `state` says what was kept."""
        super().__init__(raise_error=True)
        self.epoch = 0
        self.what = what
        self.state = state

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        steps = (self.params or {}).get("steps")
        epochs = (self.params or {}).get("epochs")
        raise NonFiniteLossError(
            f"{self.what} loss became {float(loss)} at epoch {self.epoch + 1}"
            f"{f' of {epochs}' if epochs else ''}, batch {batch + 1}"
            f"{f' of {steps}' if steps else ''}; {self.state}. Check the data of that step, or lower "
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
        except OSError as error:
            raise _write_failed(weights, error, temporary) from error
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
        self._header = []
        self._first_epoch = None
        self._final_rows = None

    def on_train_begin(self, logs=None):
        self._header, self._earlier = read_epoch_log(self.filename)
        if self._header:
            # Drops a line a kill may have cut short, so appending starts on a new line.
            _write_epoch_log(self.filename, self._header, self._earlier)
        self._first_epoch = None
        self._final_rows = None
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch

    def _match_columns(self, logs):
        """Writes this fit's rows under the file's header, widened by any new column.

        `CSVLogger` appends rows in the sorted order of this fit's keys under
        a header it does not read: a fit that logs other keys than the
        earlier one (the probe's row of val metrics, then a fine-tuning
        phase that also logs its loss) would write rows that do not match it.
        """
        # The file holds what on_train_begin wrote: `_header` and `_earlier`.
        header = self._header
        if not header:
            return
        columns = header[1:] + [key for key in sorted(logs) if key not in header]
        if len(columns) > len(header) - 1:
            self.csv_file.close()
            _write_epoch_log(self.filename, ["epoch"] + columns, self._earlier)
            self.csv_file = open(self.filename, "a", newline="", encoding="utf-8")
        self.keys = columns
        self.append_header = False

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
        if self.writer is None:
            self._match_columns(logs or {})
        super().on_epoch_end(epoch, logs)
        write_json_atomically(self.json_path, history_of(self.rows()))

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        rows = self._final_rows = self.rows()
        header, _ = read_epoch_log(self.filename)
        if header:
            _write_epoch_log(self.filename, header, rows)
        write_json_atomically(self.json_path, history_of(rows))
