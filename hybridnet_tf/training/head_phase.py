"""Training the heads on cached backbone features (the frozen phase, fast).

`train_heads_on_features` fits the label heads of a HybridNet on
`feature_cache.CachedFeatures` with the same losses, optimizer, schedule,
validation metrics and epoch log as `trainer.train`, but every step costs
only the heads. The phase takes seconds to minutes, so it keeps its best
weights in memory (Keras' `EarlyStopping(restore_best_weights=True)` with
unbounded patience) instead of backing up every epoch: a run killed in
this phase repeats it.

At the end it writes `last.keras` (the last weights) and `best.keras` (the
best weights by `monitor`, which it leaves in the model) for the whole model.
"""

import os

import keras

from hybridnet_tf.console import fit_verbosity
from hybridnet_tf.model.hybridnet import FEATURES, with_training_targets
from hybridnet_tf.training.callbacks import (
    RunHistoryLogger,
    StopOnNonFiniteLoss,
    ValidationMetrics,
    save_model_atomically,
)
from hybridnet_tf.training.settings import Checkpointing, Optimization
from hybridnet_tf.training.tensorboard_summaries import summaries_for_run, write_val_scalars
from hybridnet_tf.training.trainer import EPOCH_LOG, HISTORY_FILE, compile_training_model


class _SaveAtTrainEnd(keras.callbacks.Callback):
    """Saves the inference model when `fit` ends (before a later callback restores other weights)."""

    def __init__(self, inference_model, path):
        super().__init__()
        self.inference_model = inference_model
        self.path = path

    def on_train_end(self, logs=None):
        save_model_atomically(self.inference_model, self.path)


def cached_batch_size(optimization):
    """`optimization.batch_size`, which training on cached features needs (an error without it)."""
    if not optimization.batch_size:
        raise ValueError("training on cached features needs optimization.batch_size")
    return optimization.batch_size


def train_heads_on_features(
    model,
    train_features,
    val_features,
    label_rank,
    run_dir,
    epochs,
    steps_per_epoch,
    optimization,
    checkpointing=None,
    seed=None,
    extra_callbacks=(),
    val_images=None,
):
    """Fits `model`'s heads on cached features; writes best.keras, last.keras and the epoch log.

    Args:
        model: the inference model from `build_model` (backbone frozen).
        train_features: `CachedFeatures` of the training images.
        val_features: `CachedFeatures` of the val images, or None.
        label_rank: [L] decoding order of the labels.
        run_dir: the run directory.
        epochs: epochs of this phase.
        steps_per_epoch: optimiser steps per epoch (the cached features repeat).
        optimization: a `settings.Optimization` with `batch_size` set. Its
            learning rate, weight decay and warmup are used; the heads train
            without XLA and one batch per call, whatever it says (XLA ran
            0.37x as fast per step on CPU, docs/performance.md), and without
            EMA (this phase keeps its best weights itself).
        checkpointing: a `settings.Checkpointing`; `monitor`, `threshold`
            and `verbose` are used (no backups: see the module docstring).
        seed: shuffle seed.
        extra_callbacks: more Keras callbacks, run after the validation metrics.
        val_images: the val split's `(images, multi_hot)` batches, or None: the
            whole model (frozen backbone and heads) draws its predictions on
            the first of them for TensorBoard, as a run through the backbone does.

    Returns:
        The `keras.callbacks.History` of the fit.
    """
    checkpointing = checkpointing or Checkpointing()
    batch_size = cached_batch_size(optimization)
    monitor = checkpointing.monitor
    training_model = compile_training_model(
        model,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=int(round(optimization.warmup_epochs * steps_per_epoch)),
        optimization=Optimization(
            learning_rate=optimization.learning_rate,
            weight_decay=optimization.weight_decay,
            jit_compile=False,
        ),
        from_features=True,
    )
    targets = lambda dataset: with_training_targets(  # noqa: E731
        dataset, model, label_rank, seed=seed, input_key=FEATURES
    )
    train_batches = targets(train_features.to_dataset(batch_size, training=True, seed=seed)).repeat()
    callbacks = [StopOnNonFiniteLoss()]
    if val_features is not None:
        # val_loss comes from the metrics' own pass (no validation_data for fit).
        val_batches = val_features.to_dataset(max(batch_size, 64))
        callbacks.append(ValidationMetrics(
            model, val_batches, threshold=checkpointing.threshold, label_rank=label_rank,
            from_features=True, seed=seed,
        ))
        # PR curves (from the metrics' predictions) and hparams; val images when the
        # images are given (features cannot be drawn).
        callbacks += summaries_for_run(
            model, val_batches if val_images is None else val_images, run_dir, os.path.join(run_dir, "logs"),
            callbacks, images=val_images is not None,
        )
    elif monitor.startswith("val_"):
        monitor = "loss"
    callbacks += list(extra_callbacks)
    callbacks += [
        RunHistoryLogger(os.path.join(run_dir, EPOCH_LOG), os.path.join(run_dir, HISTORY_FILE)),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
        _SaveAtTrainEnd(model, os.path.join(run_dir, "last.keras")),
        keras.callbacks.EarlyStopping(
            monitor=monitor,
            mode="min" if "loss" in monitor else "max",
            patience=epochs + 1,
            restore_best_weights=True,
        ),
    ]
    history = training_model.fit(
        train_batches,
        shuffle=False,  # tf.data already shuffles (Keras warns otherwise)
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=fit_verbosity(checkpointing.verbose),
    )
    save_model_atomically(model, os.path.join(run_dir, "best.keras"))
    return history


def save_fixed_heads(model, val_features, label_rank, run_dir, epoch, threshold=0.5, seed=None):
    """Writes best.keras and last.keras of a model whose heads are set already (by a linear probe),
    and its val metrics as row `epoch` of the epoch log and as TensorBoard's epoch scalars.

    With the row, a later phase's `best.keras` must beat the probe's val
    metrics to replace it (its checkpoint reads the earlier rows), and
    `history.json` shows what the probe scored.

    Args:
        model: the inference model, heads set.
        val_features: `CachedFeatures` of the val images, or None (then no row).
        label_rank: [L] decoding order of the labels (for `val_loss`).
        run_dir: the run directory.
        epoch: the index the row gets: the last epoch of the phase it ends.
        threshold: score threshold for CF1 / OF1.
        seed: seed of the `random` label order's val sequences.

    Returns:
        A `keras.callbacks.History` with the row (empty without val features).
    """
    for name in ("best.keras", "last.keras"):
        save_model_atomically(model, os.path.join(run_dir, name))
    history = keras.callbacks.History()
    history.history, history.epoch = {}, []
    if val_features is None:
        return history
    metrics = ValidationMetrics(model, val_features.to_dataset(64), threshold=threshold, label_rank=label_rank,
                                from_features=True, seed=seed)
    logger = RunHistoryLogger(os.path.join(run_dir, EPOCH_LOG), os.path.join(run_dir, HISTORY_FILE))
    logs = {}
    for callback in (metrics, logger):
        callback.set_model(model)
    logger.on_train_begin()
    logger.on_epoch_begin(epoch)
    metrics.on_epoch_end(epoch, logs)
    logger.on_epoch_end(epoch, logs)
    logger.on_train_end()
    write_val_scalars(os.path.join(run_dir, "logs"), logs, epoch)
    history.history, history.epoch = {key: [value] for key, value in logs.items()}, [epoch]
    return history
