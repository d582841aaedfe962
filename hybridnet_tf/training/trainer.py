"""Training a HybridNet with `model.fit` on tf.data.

Scale and faults are handled by TensorFlow's and Keras' own engines: XLA
(`compile(jit_compile=...)`), `keras.mixed_precision`, `tf.distribute`
(build the model inside `strategy.scope()`; see `distribution`), and
`keras.callbacks.BackupAndRestore` for resuming a killed run.
"""

import contextlib
import math
import os

import keras

from hybridnet_tf.console import fit_verbosity
from hybridnet_tf.model.hybridnet import build_training_model, training_loss, with_training_targets
from hybridnet_tf.training import distribution
from hybridnet_tf.training.callbacks import (
    AtomicBackupAndRestore,
    InferenceModelCheckpoint,
    RunHistoryLogger,
    StopOnNonFiniteLoss,
    ValidationMetrics,
    history_of,
)
from hybridnet_tf.training.compute import dtype_policy, resolve_jit_compile
from hybridnet_tf.training.settings import Checkpointing, Optimization
from hybridnet_tf.training.tensorboard_summaries import summaries_for_run

EPOCH_LOG = "history.csv"
HISTORY_FILE = "history.json"


def warmup_cosine_schedule(learning_rate, total_steps, warmup_steps):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to 0 (Keras' own schedule)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def adamw_optimizer(optimization, total_steps, warmup_steps):
    """The AdamW of an `Optimization`: warmup then cosine decay over `total_steps`, gradients clipped at norm 5."""
    return keras.optimizers.AdamW(
        warmup_cosine_schedule(optimization.learning_rate, total_steps, warmup_steps),
        weight_decay=optimization.weight_decay,
        clipnorm=5.0,
        use_ema=optimization.use_ema,
        ema_momentum=optimization.ema_momentum,
    )


def train(
    model,
    train_data,
    val_data,
    label_rank,
    run_dir,
    steps_per_epoch,
    epochs=10,
    optimization=None,
    checkpointing=None,
    extra_callbacks=(),
    initial_epoch=0,
):
    """Fits a HybridNet with teacher forcing and writes checkpoints and logs to `run_dir`.

    Running the same call again after a crash or kill resumes from the last
    backup in `run_dir/<checkpointing.backup_name>` (Keras'
    `BackupAndRestore`: weights, optimizer state and epoch) and finishes the
    planned epochs; the epoch log and `history.json` then hold every epoch
    once. Keras 3 restarts an interrupted epoch from its first batch, with
    the weights of the last backup.

    Distribution: build `model` inside `strategy.scope()` (and shard the
    data with `distribution.shard_for_worker`); the training model is
    built and compiled in the same scope. With several workers only the
    chief writes `run_dir`.

    Mixed precision: build `model` under the dtype policy
    (`compute.dtype_policy`); the training model follows it, and under
    mixed_float16 Keras wraps the optimizer in a `LossScaleOptimizer`.

    Args:
        model: the inference model from `build_model`; its weights are trained.
        train_data: batches of `(images, multi_hot)` (see `make_dataset`).
        val_data: batches of `(images, multi_hot)`, or None.
        label_rank: [L] decoding order of the labels (`LabelVocabulary.label_rank`).
        run_dir: folder for `best.keras`, `last.keras`, `logs/`, `history.csv`,
            `history.json` and the backups.
        steps_per_epoch: batches in one epoch of `train_data`.
        epochs: passes over the training data.
        optimization: a `settings.Optimization` (default: its defaults).
        checkpointing: a `settings.Checkpointing` (default: its defaults).
        extra_callbacks: more Keras callbacks (e.g. a fine-tuning schedule);
            they run after the validation metrics and before the
            checkpoints and TensorBoard, so their logs are recorded.
        initial_epoch: the epoch to start at (a later training phase);
            `epochs` is then the index of the last epoch + 1, as in `fit`.

    Returns:
        The `keras.callbacks.History` of the fit, whose `history` and
        `epoch` cover every epoch of the run, earlier interrupted processes
        included.
    """
    optimization = optimization or Optimization()
    checkpointing = checkpointing or Checkpointing()
    strategy = model.distribute_strategy
    jit = resolve_jit_compile(optimization.jit_compile, strategy)
    multi_worker = distribution.is_multi_worker(strategy)
    training_model = compile_training_model(
        model,
        total_steps=steps_per_epoch * (epochs - initial_epoch),
        warmup_steps=int(round(optimization.warmup_epochs * steps_per_epoch)),
        optimization=optimization,
    )
    train_sequences = training_batches(
        train_data, model, label_rank, static_batch_size=optimization.batch_size if jit else None
    )
    monitor = checkpointing.monitor
    if val_data is None and monitor.startswith("val_"):
        monitor = "loss"

    with distribution.output_dir(run_dir, strategy) as out_dir:
        history_logger = RunHistoryLogger(os.path.join(out_dir, EPOCH_LOG), os.path.join(out_dir, HISTORY_FILE))
        callbacks = _callbacks(
            model, val_data, label_rank, out_dir, history_logger,
            backup=distribution.backup_dir(run_dir, strategy, checkpointing.backup_name),
            monitor=monitor, threshold=checkpointing.threshold,
            val_max_batches=checkpointing.val_max_batches,
            backup_steps=checkpointing.backup_steps, extra_callbacks=extra_callbacks,
        )
        with strategy.scope():
            # No validation_data: ValidationMetrics computes val_loss in its own
            # pass with the metrics, so the val set is read once per epoch.
            history = training_model.fit(
                train_sequences,
                shuffle=False,  # tf.data already shuffles
                epochs=epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                callbacks=callbacks,
                verbose=fit_verbosity(checkpointing.verbose),
            )
        rows = history_logger.rows()
    if multi_worker:
        with contextlib.suppress(OSError):  # the per-worker backups are gone: drop their folder
            os.rmdir(os.path.join(run_dir, checkpointing.backup_name))
    history.history = {
        key: [float("nan") if value is None else value for value in values]
        for key, values in history_of(rows).items()
    }
    history.epoch = [row["epoch"] for row in rows]
    return history


def _callbacks(model, val_data, label_rank, out_dir, history_logger, backup, monitor, threshold,
               val_max_batches, backup_steps, extra_callbacks):
    """The callbacks of `train`, in the order that matters.

    The NaN stop comes before any per-step backup; the metrics before what
    logs them; the epoch's log row before the backup that marks the epoch
    done (else a kill in between loses the row).
    """
    callbacks = [StopOnNonFiniteLoss()]
    if val_data is not None:
        callbacks.append(ValidationMetrics(
            model, val_data, threshold=threshold, max_batches=val_max_batches, label_rank=label_rank
        ))
    callbacks += list(extra_callbacks)
    callbacks += [
        InferenceModelCheckpoint(model, out_dir, monitor=monitor, epoch_log=history_logger.filename),
        history_logger,
        AtomicBackupAndRestore(backup, save_freq=backup_steps if backup_steps > 0 else "epoch"),
        keras.callbacks.TensorBoard(os.path.join(out_dir, "logs"), write_graph=False),
    ]
    # PR curves, val images with predictions, hparams (TensorBoard's plugins).
    callbacks += summaries_for_run(
        model, val_data, out_dir, os.path.join(out_dir, "logs"), callbacks, val_max_batches
    )
    return callbacks


def compile_training_model(model, total_steps, warmup_steps=0, optimization=None, from_features=False):
    """Builds and compiles the teacher-forcing model that `train` fits.

    Uses the strategy `model` was built under and its dtype policy, so under
    mixed_float16 Keras wraps the AdamW optimizer in a `LossScaleOptimizer`.

    Args:
        model: the inference model from `build_model`.
        total_steps: training steps in all (the length of the cosine decay).
        warmup_steps: steps of linear warmup.
        optimization: a `settings.Optimization` (its `jit_compile` is
            resolved by `compute.resolve_jit_compile`).
        from_features: train the heads on pooled features
            (`build_training_model(from_features=True)`).

    Returns:
        The compiled training model, its optimizer built.
    """
    optimization = optimization or Optimization()
    strategy = model.distribute_strategy
    with dtype_policy(model.dtype_policy.name):
        if distribution.is_multi_worker(strategy):
            # Made outside the scope on purpose: see MultiWorkerModel.
            training_model = distribution.MultiWorkerModel(build_training_model(model, from_features))
            training_model(training_model.wrapped.input)  # builds it
        else:
            with strategy.scope():
                training_model = build_training_model(model, from_features)
    with strategy.scope(), dtype_policy(model.dtype_policy.name):
        optimizer = adamw_optimizer(optimization, total_steps, warmup_steps)
        training_model.compile(
            optimizer=optimizer,
            loss=training_loss(model),
            jit_compile=resolve_jit_compile(optimization.jit_compile, strategy),
            steps_per_execution=optimization.steps_per_execution,
        )
        # Optimizer variables are made here, under the strategy, not inside the first step.
        training_model.optimizer.build(training_model.trainable_variables)
    return training_model


def training_batches(train_data, model, label_rank, static_batch_size=None):
    """The endless teacher-forcing batches `fit` reads.

    Args:
        train_data: batches of `(images, multi_hot)`.
        model: the inference model (see `with_training_targets`).
        label_rank: [L] decoding order of the labels.
        static_batch_size: if given, the repeated stream is re-cut into
            batches of exactly this size, so XLA sees one static shape and
            no example is dropped (a pass's last, smaller batch is topped up
            from the next pass).

    Returns:
        A dataset of `({"image", "decoder_inputs"}, targets)` batches.
    """
    batches = with_training_targets(train_data, model, label_rank).repeat()
    if static_batch_size:
        batches = batches.rebatch(static_batch_size, drop_remainder=True)
    return batches


def steps_for(num_examples, batch_size):
    """Batches needed to see `num_examples` once."""
    return max(1, math.ceil(num_examples / batch_size))
