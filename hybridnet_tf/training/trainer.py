"""Training a HybridNet with `model.fit` on tf.data."""

import json
import math
import os

import keras

from hybridnet_tf.model.hybridnet import build_training_model, training_loss, with_training_targets
from hybridnet_tf.training.callbacks import InferenceModelCheckpoint, ValidationMetrics


def warmup_cosine_schedule(learning_rate, total_steps, warmup_steps):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to 0 (Keras' own schedule)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def train(
    model,
    train_data,
    val_data,
    label_rank,
    run_dir,
    steps_per_epoch,
    epochs=10,
    learning_rate=2e-3,
    weight_decay=1e-4,
    warmup_epochs=1,
    jit_compile="auto",
    steps_per_execution=1,
    monitor="val_mAP",
    val_max_batches=None,
    threshold=0.5,
    verbose="auto",
):
    """Fits a HybridNet with teacher forcing and writes checkpoints and logs to `run_dir`.

    Args:
        model: the inference model from `build_model`; its weights are trained.
        train_data: batches of `(images, multi_hot)` (see `make_dataset`).
        val_data: batches of `(images, multi_hot)`, or None.
        label_rank: [L] decoding order of the labels (`LabelVocabulary.label_rank`).
        run_dir: folder for `best.keras`, `last.keras`, `logs/` and `history.json`.
        steps_per_epoch: batches in one epoch of `train_data`.
        epochs: passes over the training data.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup length before cosine decay.
        jit_compile: passed to `compile`; "auto" uses XLA where Keras thinks
            it pays (never on CPU).
        steps_per_execution: batches per `tf.function` call.
        monitor: epoch log key that picks `best.keras` (e.g. "val_mAP", "loss").
        val_max_batches: cap on val batches for the per-epoch metrics.
        threshold: score threshold of the per-epoch CF1 / OF1.
        verbose: Keras `fit` verbosity.

    Returns:
        The `keras.callbacks.History` of the fit.
    """
    os.makedirs(run_dir, exist_ok=True)
    training_model = build_training_model(model)
    total_steps = steps_per_epoch * epochs
    schedule = warmup_cosine_schedule(
        learning_rate, total_steps, int(round(warmup_epochs * steps_per_epoch))
    )
    training_model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=weight_decay, clipnorm=5.0),
        loss=training_loss(model),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    train_sequences = with_training_targets(train_data, model, label_rank)

    callbacks = []
    validation = None
    if val_data is not None:
        validation = with_training_targets(val_data, model, label_rank)
        callbacks.append(
            ValidationMetrics(model, val_data, threshold=threshold, max_batches=val_max_batches)
        )
    elif monitor.startswith("val_"):
        monitor = "loss"
    callbacks += [
        InferenceModelCheckpoint(model, run_dir, monitor=monitor),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
        keras.callbacks.TerminateOnNaN(),
    ]
    history = training_model.fit(
        train_sequences.repeat(),
        validation_data=validation,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        verbose=verbose,
    )
    with open(os.path.join(run_dir, "history.json"), "w", encoding="utf-8") as f:
        json.dump({k: [float(v) for v in vals] for k, vals in history.history.items()}, f, indent=1)
    return history


def steps_for(num_examples, batch_size):
    """Batches needed to see `num_examples` once."""
    return max(1, math.ceil(num_examples / batch_size))
