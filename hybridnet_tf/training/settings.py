"""The settings of a training run, grouped by what they control.

`trainer.train`, `fine_tuning.train_in_phases` and `head_phase` take these
instead of two dozen keyword arguments: how the weights are updated
(`Optimization`), what the run watches and writes (`Checkpointing`) and how
a pretrained backbone is frozen and then fine-tuned (`PhaseSchedule`). Each
is a frozen dataclass; a phase that changes one field makes a copy with
`dataclasses.replace`. Only the CLI reads configs (`experiment`).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Optimization:
    """How the weights are updated: AdamW with linear warmup and cosine decay.

    Attributes:
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup length, in epochs, before cosine decay.
        jit_compile: "auto", True or False (`compute.resolve_jit_compile`):
            XLA on a single GPU, off on CPU.
        steps_per_execution: batches per `tf.function` call.
        batch_size: the global batch size of the training data; with XLA
            the batches are re-cut to exactly this size (one static shape).
            Training on cached features needs it.
        use_ema: keep an exponential moving average of the weights in the
            optimizer; validation and the saved models then use it.
        ema_momentum: EMA momentum per step.
    """

    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1
    jit_compile: object = "auto"
    steps_per_execution: int = 1
    batch_size: int | None = None
    use_ema: bool = False
    ema_momentum: float = 0.99

    def __post_init__(self):
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"train.ema_momentum must be in [0, 1), got {self.ema_momentum}")


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """What a run watches, logs and saves.

    Attributes:
        monitor: epoch log key that picks `best.keras` (e.g. "val_mAP", "loss").
        val_max_batches: cap on val batches for the per-epoch metrics and `val_loss`.
        threshold: score threshold of the per-epoch CF1 / OF1.
        backup_steps: back up the training state every this many steps;
            0 backs up at the end of each epoch.
        backup_name: folder in the run dir for the backups of this call; a
            phase with another optimizer needs its own.
        verbose: Keras `fit` verbosity.
    """

    monitor: str = "val_mAP"
    val_max_batches: int | None = None
    threshold: float = 0.5
    backup_steps: int = 0
    backup_name: str = "backup"
    verbose: object = "auto"

    def __post_init__(self):
        if self.backup_steps < 0:
            raise ValueError(
                f"train.backup_steps must be >= 0 (0: back up each epoch), got {self.backup_steps}"
            )


@dataclasses.dataclass(frozen=True)
class PhaseSchedule:
    """A frozen-backbone phase, then fine-tuning (`fine_tuning.train_in_phases`).

    Attributes:
        frozen_epochs: epochs with the backbone frozen (0: no frozen phase;
            >= the run's epochs: the backbone stays frozen throughout).
        unfreeze_blocks: for the second phase: -1 all, K the top K blocks.
        learning_rate_factor: the second phase's peak learning rate is the
            run's learning rate times this.
        frozen_steps: optimiser steps of the frozen phase at the least; its
            epochs are lengthened to reach it (a small data set otherwise
            gets a few dozen steps). 0: one pass over the data per epoch.
        min_steps: the same for the phase with the backbone trainable (or
            for the whole run without a frozen phase).
        warm_start_epochs: epochs of BCE on the backbone with a temporary
            sigmoid layer before the first phase (`warm_start`; 0: none).
        warm_start_seed: the seed of that layer's random start. With it, one
            seed warm-starts the same CNN whatever the heads are; None draws
            from Keras' global seed, after the heads' own draws.
        freeze_batch_norm: keep the backbone's BatchNormalization frozen
            when it is unfrozen (see `fine_tuning.set_backbone_trainable`).
        feature_cache: a `feature_cache.FeatureCacheInputs` to train the
            frozen phase on cached features, or None to run the backbone on
            every step.
    """

    frozen_epochs: int = 0
    unfreeze_blocks: int = -1
    learning_rate_factor: float = 0.1
    frozen_steps: int = 0
    min_steps: int = 0
    warm_start_epochs: int = 0
    warm_start_seed: int = None
    freeze_batch_norm: bool = True
    feature_cache: object = None

    def __post_init__(self):
        if self.warm_start_epochs < 0:
            raise ValueError(f"train.warm_start_epochs must be >= 0 (0: none), got {self.warm_start_epochs}")
