"""What TensorBoard shows of a run beyond scalars: PR curves, val images with predictions, hparams.

All three are written with TensorBoard's own plugins, so its PR Curves,
Images and HParams dashboards read them:

- `logs/val_predictions`: per-label precision-recall curves of the val
  predictions every epoch (`tensorboard.plugins.pr_curve.summary.pb`), and
  every `images_every` epochs a fixed set of val images, each drawn with
  its true labels, predicted labels and scores, and a heat map per
  predicted label (`tf.summary.image`).
- `logs` (the session root): the run's hyperparameters and the metrics to
  compare runs by (`tensorboard.plugins.hparams.api`). Point TensorBoard at
  a folder of run directories and the HParams tab lists one row per run.

Keras' own `TensorBoard` callback keeps `logs/train` and `logs/validation`;
a second writer in one of its folders would make TensorBoard skip events
(it reads one event file per folder at a time), hence the own folder.
`write_val_scalars` adds an epoch that no fit ran (the probe's) to
`logs/validation`, with a writer closed before the next fit opens its own.
"""

import logging
import os

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "val_predictions"
PR_THRESHOLDS = 101
# Metrics the HParams dashboard shows per run: (tag, folder under logs/, display name).
HPARAM_METRICS = (
    ("epoch_mAP", "validation", "val mAP"),
    ("epoch_OF1", "validation", "val OF1"),
    ("epoch_CF1", "validation", "val CF1"),
    ("epoch_decoded_OF1", "validation", "val OF1 of the returned label sets"),
    ("epoch_decoded_exact", "validation", "val whole label sets right"),
    ("epoch_loss", "train", "train loss"),
)


def flat_hparams(config):
    """A nested config as `{"section.key": value}` with TensorBoard's types (bool, int, float, str).

    None becomes "none" (the HParams plugin has no null); other types their `str`.
    """
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            if value is None:
                value = "none"
            elif not isinstance(value, (bool, int, float, str)):
                value = str(value)
            flat[f"{section}.{key}"] = value
    return flat


def write_hparams(log_dir, hparams, trial_id=None):
    """Writes the HParams plugin's experiment and session summaries into `log_dir`.

    Args:
        log_dir: the run's TensorBoard root (`run_dir/logs`).
        hparams: `{name: bool | int | float | str}` (see `flat_hparams`).
        trial_id: the run's name in the dashboard (default: the hash the plugin makes).
    """
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in hparams],
            metrics=[hp.Metric(tag, group=group, display_name=name) for tag, group, name in HPARAM_METRICS],
        )
        hp.hparams(hparams, trial_id=trial_id)
    writer.close()


def write_val_scalars(log_dir, logs, epoch):
    """Writes `logs`' val metrics as Keras' `TensorBoard` callback writes an epoch's: `validation/epoch_<name>`.

    For an epoch that no `fit` ran (the probe's): the callback cannot write
    it, as it reads the learning rate from `model.optimizer`, which a model
    that was never compiled lacks. The writer is closed before it returns,
    so it is never beside the callback's own writer in that folder.

    Args:
        log_dir: the run's TensorBoard root (`run_dir/logs`).
        logs: `{name: value}`; the `val_` ones are written.
        epoch: the step.
    """
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
    with writer.as_default():
        for key, value in logs.items():
            if key.startswith("val_"):
                tf.summary.scalar("epoch_" + key[len("val_"):], value, step=epoch)
    writer.close()


def write_pr_curves(y_true, scores, names, step, num_thresholds=PR_THRESHOLDS):
    """One `pr_curve` summary per label (tag `pr/<label>/pr_curves`) into the default writer.

    Labels without a positive in `y_true` are skipped: their curve is undefined.

    Returns:
        The names of the labels written.
    """
    from tensorboard.plugins.pr_curve import summary as pr_summary

    written = []
    for index, name in enumerate(names):
        labels = np.asarray(y_true[:, index]) > 0.5
        if not labels.any():
            continue
        summary = pr_summary.pb(
            f"pr/{name}", labels=labels, predictions=np.asarray(scores[:, index], np.float32),
            num_thresholds=num_thresholds, display_name=name,
            description=f"precision-recall of '{name}' on val",
        )
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)
        written.append(name)
    return written


def example_figure(image, true_names, explained, index):
    """An image with its true labels, predicted labels and scores, and a heat map per predicted label."""
    from hybridnet_tf.explanation.heat_maps import overlay_figure, peak_of

    height, width = np.asarray(image).shape[:2]
    panels = []
    for item in explained:
        heat_map = item.get("heat_map")
        panels.append({
            "title": f"{item['label']} {item['score']:.2f}",
            "heat_map": heat_map,
            "peak": peak_of(heat_map, height, width) if heat_map is not None else None,
        })
    figure = overlay_figure(image, panels, title=f"val #{index}", columns=min(4, 1 + len(panels)))
    predicted = ", ".join(f"{item['label']} {item['score']:.2f}" for item in explained) or "none"
    figure.suptitle(f"true: {', '.join(true_names) or 'none'}\npredicted: {predicted}", fontsize=8)
    return figure


class TensorBoardSummaries(keras.callbacks.Callback):
    """Keras callback: PR curves each epoch, val images every N epochs, hparams at the start.

    Put it after `ValidationMetrics` (whose predictions it reuses).

    Args:
        inference_model: the model from `build_model` (weights shared with
            the model being fitted).
        val_data: batches of `(images, multi_hot)`, or None (then only hparams).
        names: the label names.
        log_dir: the run's TensorBoard root (`run_dir/logs`).
        hparams: `{name: value}` for the HParams plugin, or None.
        images_every: write the image summary after the first epoch and
            every this many epochs; 0 writes none.
        num_images: how many val images (the first ones) the summary shows.
        max_batches: PR curves over at most this many val batches (None: all).
        validation: the run's `ValidationMetrics` callback; the predictions
            it made this epoch are reused instead of a second pass over val.
        trial_id: the run's name in the HParams dashboard.
    """

    def __init__(self, inference_model, val_data, names, log_dir, hparams=None, images_every=5,
                 num_images=8, max_batches=None, validation=None, trial_id=None):
        super().__init__()
        self.inference_model = inference_model
        self.val_data = val_data
        self.names = list(names)
        self.log_dir = log_dir
        self.hparams = hparams
        self.images_every = images_every
        self.num_images = num_images
        self.max_batches = max_batches
        self.validation = validation
        self.trial_id = trial_id
        self._writer = None
        self._examples = None
        self._explainer = None

    def on_train_begin(self, logs=None):
        if self.hparams:
            write_hparams(self.log_dir, self.hparams, trial_id=self.trial_id)
        if self.val_data is not None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, PREDICTIONS_DIR))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _predictions(self):
        """`(y_true, scores)` of val for this epoch: the metrics callback's, or a pass of our own."""
        from hybridnet_tf.evaluation.predictions import collect_predictions

        last = getattr(self.validation, "last_predictions", None)
        if last is not None:
            return last[0], last[1]
        y_true, scores, _ = collect_predictions(self.inference_model, self.val_data, self.max_batches)
        return y_true, scores

    def _write_examples(self, step):
        from hybridnet_tf.explanation.explain_images import Explainer
        from hybridnet_tf.explanation.heat_maps import figure_png

        if self._examples is None:
            images, labels = [], []
            # Elements are (image, multi_hot) or (image, multi_hot, name).
            for element in self.val_data.unbatch().take(self.num_images):
                images.append(element[0].numpy())
                labels.append(element[1].numpy())
            self._examples = np.stack(images), np.stack(labels)
            self._explainer = Explainer(self.inference_model, self.names)
        images, labels = self._examples
        explained = self._explainer.explain(images)
        for index, (image, multi_hot, items) in enumerate(zip(images, labels, explained)):
            true_names = [self.names[i] for i in np.nonzero(multi_hot > 0.5)[0]]
            png = figure_png(example_figure(image, true_names, items, index), dpi=80)
            tf.summary.image(f"val_examples/{index:03d}", tf.image.decode_png(png, channels=3)[None],
                             step=step, description="true labels, predicted labels with scores and "
                             "heat maps (Grad-CAM, or the attention decoder's weights)")

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is None:
            return
        from hybridnet_tf.training.callbacks import ema_weights

        with self._writer.as_default(), ema_weights(self.model):
            y_true, scores = self._predictions()
            write_pr_curves(y_true, scores, self.names, step=epoch)
            if self.images_every and (epoch == 0 or (epoch + 1) % self.images_every == 0):
                try:
                    self._write_examples(epoch)
                except (ValueError, tf.errors.OpError) as error:
                    # A picture must never stop training: say why and stop drawing them.
                    logger.warning("TensorBoard val images turned off: %s", error)
                    self.images_every = 0
        self._writer.flush()


def summaries_for_run(inference_model, val_data, run_dir, log_dir, callbacks=(), max_batches=None, images=True):
    """The `TensorBoardSummaries` of a run directory written by `hybridnet-tf train`, as a list.

    Label names come from the run's `vocabulary.json`, hyperparameters and
    the image settings (`train.tensorboard_images_every`,
    `train.tensorboard_images`) from its `config.yaml`; without them (a
    `train` call outside a run directory) labels are numbered, and only
    the PR curves are written (no hparams, no images). `callbacks` may hold the run's `ValidationMetrics`,
    whose predictions are then reused. `images=False` draws no val images
    (when `val_data` holds cached features, not pictures; the frozen phase on
    cached features passes the val images for the pictures and takes its PR
    curves from the `ValidationMetrics` in `callbacks`).

    Returns:
        `[TensorBoardSummaries]`.
    """
    from hybridnet_tf.config import load_config
    from hybridnet_tf.run_files import CONFIG_FILE, VOCABULARY_FILE
    from hybridnet_tf.training.callbacks import ValidationMetrics
    from hybridnet_tf.vocabulary import LabelVocabulary

    config_path = os.path.join(run_dir, CONFIG_FILE)
    config = load_config(config_path) if os.path.isfile(config_path) else None
    vocabulary_path = os.path.join(run_dir, VOCABULARY_FILE)
    if os.path.isfile(vocabulary_path):
        names = LabelVocabulary.load(vocabulary_path).names
    else:
        names = [f"label_{i}" for i in range(int(inference_model.output["scores"].shape[-1]))]
    every = config["train"]["tensorboard_images_every"] if config and images else 0
    validation = next((c for c in callbacks if isinstance(c, ValidationMetrics)), None)
    return [TensorBoardSummaries(
        inference_model, val_data, names, log_dir,
        hparams=flat_hparams(config) if config else None,
        images_every=every,
        num_images=config["train"]["tensorboard_images"] if config else 8,
        max_batches=max_batches,
        validation=validation,
        trial_id=os.path.basename(os.path.abspath(run_dir)),
    )]
