"""Fine-tuning a pretrained backbone: frozen first, then its top blocks unfrozen.

As in the Keras fine-tuning guide: train the new layers with the backbone
frozen for a few epochs, then unfreeze the top K blocks (or all of it) and
go on at a lower learning rate. BatchNormalization layers of a pretrained
backbone stay frozen (`trainable = False`, which in Keras 3 also means
inference mode) in both phases, so small batches do not wreck their
statistics. The frozen phase trains the heads on cached backbone features
when it can (`feature_cache`, `head_phase`).

The two phases are two `fit` calls with their own optimizers, so each has
its own `BackupAndRestore` folder; the weights at the end of the frozen
phase are kept in `run_dir/frozen_phase.weights.h5` until the run ends, so a
run killed during fine-tuning resumes without redoing the frozen phase.
`continue_training` lengthens a finished run in the setting of its last phase.
"""

import dataclasses
import math
import os
import re
import time

import keras

from hybridnet_tf.model.decoder_ensemble import decoder_members
from hybridnet_tf.model.hybridnet import IMAGE_ENCODER, LABEL_DECODER, SIGMOID_HEAD, layer_or_none
from hybridnet_tf.training import distribution
from hybridnet_tf.training.callbacks import save_weights_atomically
from hybridnet_tf.training.settings import Checkpointing, Optimization, PhaseSchedule
from hybridnet_tf.training.trainer import train

FROZEN_PHASE_WEIGHTS = "frozen_phase.weights.h5"
FINE_TUNING_BACKUP = "backup_fine_tuning"

# Names of the repeated blocks of each backbone family, in layer-name prefixes:
# EfficientNet / -V2 / -Lite "block6a_...", ResNetV2 "conv5_block3_...",
# MobileNetV3 "expanded_conv_3_...", the small CNN "conv2" / "bn2", ConvNeXt
# "convnext_tiny_stage_3_block_2_..." and its downsampling layers between stages
# (one Sequential each, a block of its own); whole layers for KerasHub's
# transformer blocks: ViT "transformer_block_12", SigLIP / CLIP
# "encoder_block_11", DINOv2 / v3 "layers_11" (names may carry a prefix); KerasHub's
# ResNet "stack3_block2_...".
_BLOCK_PATTERNS = (
    re.compile(r"^(block\d+[a-z]?)_"),
    re.compile(r"^(conv\d_block\d+)_"),
    re.compile(r"^(expanded_conv(?:_\d+)?)_"),
    re.compile(r"^(?:conv|bn)(\d+)$"),
    re.compile(r"^(convnext_[a-z]+_stage_\d+_block_\d+)_"),
    re.compile(r"^(convnext_[a-z]+_downsampling_block_\d+)$"),
    re.compile(r"^(transformer_block_\d+)$"),
    re.compile(r"^((?:\w+_)?encoder_block_\d+)$"),
    re.compile(r"^((?:\w+_)?layers_\d+)$"),
    re.compile(r"^(stack\d+_block\d+)_"),
)


def _sublayers(layer):
    if isinstance(layer, keras.Model):
        return layer.layers
    # No public API lists a plain layer's sub-layers; KerasHub keeps its transformer
    # blocks inside one such layer (ViTEncoder, DINOV2Encoder).
    return layer._flatten_layers(include_self=False, recursive=False)


def _holds_a_block(layer):
    return any(_block_of(sub.name) is not None or _holds_a_block(sub) for sub in _sublayers(layer))


def _leaf_layers(layer):
    """The layers the schedule sets one by one: nested models and block containers opened, blocks whole."""
    for sub in _sublayers(layer):
        if _block_of(sub.name) is not None:
            yield sub
        elif isinstance(sub, keras.Model):
            yield from _leaf_layers(sub)
        elif _holds_a_block(sub):
            yield sub  # its own weights, if any; its blocks follow and are set after it
            yield from _leaf_layers(sub)
        else:
            yield sub


def _block_of(name):
    for pattern in _BLOCK_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return None


def backbone_blocks(backbone):
    """The block names of a backbone, bottom to top (e.g. ["block1a", ..., "block7a"])."""
    blocks = []
    for layer in _leaf_layers(backbone):
        block = _block_of(layer.name)
        if block is not None and block not in blocks:
            blocks.append(block)
    return blocks


def set_backbone_trainable(model, num_blocks, freeze_batch_norm=True):
    """Freezes a HybridNet's backbone, or unfreezes its top blocks.

    Args:
        model: the inference model from `build_model`.
        num_blocks: 0 freezes the whole backbone; K > 0 unfreezes the top K
            blocks and the layers above them (e.g. `top_conv`); -1 unfreezes
            everything.
        freeze_batch_norm: keep the BatchNormalization layers frozen (in
            inference mode) when unfreezing; False trains them with the rest
            (large batches, or a backbone trained from scratch).

    Returns:
        The number of backbone weights left trainable.
    """
    backbone = model.get_layer(IMAGE_ENCODER).get_layer("backbone")
    if num_blocks == 0:
        backbone.trainable = False
        return 0
    if num_blocks < -1:
        raise ValueError(f"train.unfreeze_blocks must be -1 (all), 0 or a positive count, got {num_blocks}")
    blocks = backbone_blocks(backbone)
    if num_blocks > 0 and not blocks:
        raise ValueError(
            f"cannot find the blocks of backbone {backbone.layers[-1].name!r} to unfreeze the top "
            f"{num_blocks}; use train.unfreeze_blocks=-1 to unfreeze it all"
        )
    chosen = set(blocks if num_blocks == -1 else blocks[-num_blocks:])
    backbone.trainable = True
    seen_block = False  # layers before the first block are the stem
    after_last = False  # layers after the last block are the head (top_conv, ...)
    for layer in _leaf_layers(backbone):
        block = _block_of(layer.name)
        seen_block = seen_block or block is not None
        if blocks and block == blocks[-1]:
            after_last = True
        in_head = after_last and block is None
        stem = not seen_block
        wanted = num_blocks == -1 or block in chosen or in_head
        if stem and num_blocks != -1:
            wanted = False
        is_batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = wanted and not (freeze_batch_norm and is_batch_norm)
    return sum(int(w.shape.num_elements() or 0) for w in backbone.trainable_weights)


def _lengthened(steps_per_epoch, epochs, min_steps):
    """Steps per epoch so that `epochs` epochs make at least `min_steps` optimiser steps."""
    return max(steps_per_epoch, math.ceil(min_steps / max(epochs, 1))) if min_steps > 0 else steps_per_epoch


def train_in_phases(
    model,
    train_data,
    val_data,
    label_rank,
    run_dir,
    steps_per_epoch,
    epochs,
    optimization=None,
    checkpointing=None,
    schedule=None,
):
    """`trainer.train` with an optional frozen-backbone phase before fine-tuning.

    The frozen phase trains the heads on cached backbone features when
    `schedule.feature_cache` is given (`head_phase.train_heads_on_features`):
    seconds instead of a pass through the backbone per step. With
    `schedule.warm_start_epochs` the backbone first trains with a BCE loss
    (`warm_start.bce_warm_start`), then the phases run as for a pretrained one.

    Args:
        model, train_data, val_data, label_rank, run_dir, steps_per_epoch,
        epochs: as in `trainer.train` (`epochs` counts both phases).
        optimization: a `settings.Optimization`; its learning rate is the
            frozen phase's (`batch_size` is needed with a feature cache).
        checkpointing: a `settings.Checkpointing`; the fine-tuning phase
            backs up to its own folder.
        schedule: a `settings.PhaseSchedule` (default: no frozen phase).

    Returns:
        The History of the run (every epoch of both phases).
    """
    optimization = optimization or Optimization()
    checkpointing = checkpointing or Checkpointing()
    schedule = schedule or PhaseSchedule()
    common = dict(train_data=train_data, val_data=val_data, label_rank=label_rank, run_dir=run_dir,
                  checkpointing=checkpointing)
    if schedule.warm_start_epochs > 0 and not os.path.isfile(os.path.join(run_dir, FROZEN_PHASE_WEIGHTS)):
        from hybridnet_tf.training.warm_start import bce_warm_start

        bce_warm_start(
            model, train_data, val_data, run_dir, schedule.warm_start_epochs, steps_per_epoch, optimization,
            num_labels=int(model.output["scores"].shape[-1]), val_max_batches=checkpointing.val_max_batches,
            seed=schedule.warm_start_seed, verbose=checkpointing.verbose,
        )
    history = _phases(model, steps_per_epoch, epochs, optimization, schedule, common)
    if schedule.warm_start_epochs > 0:
        from hybridnet_tf.training.warm_start import remove_warm_start_weights

        remove_warm_start_weights(model, run_dir)
    return history


def _phases(model, steps_per_epoch, epochs, optimization, schedule, common):
    """The body of `train_in_phases` after the warm start: frozen phase, then fine-tuning."""
    checkpointing, run_dir = common["checkpointing"], common["run_dir"]
    if schedule.frozen_epochs <= 0:
        # No schedule: train the model as built. (Unfreezing "all" here keeps a
        # backbone trained from scratch with trainable BatchNorm.)
        if schedule.unfreeze_blocks != -1:
            set_backbone_trainable(model, schedule.unfreeze_blocks, schedule.freeze_batch_norm)
        return train(model, epochs=epochs, optimization=optimization,
                     steps_per_epoch=_lengthened(steps_per_epoch, epochs, schedule.min_steps), **common)
    frozen_epochs = min(schedule.frozen_epochs, epochs)
    marker = os.path.join(run_dir, FROZEN_PHASE_WEIGHTS)
    if os.path.isfile(marker):
        print(f"frozen phase already done ({marker}); resuming the fine-tuning phase")
        model.load_weights(marker)
    else:
        set_backbone_trainable(model, 0)
        history = _frozen_phase(model, frozen_epochs, steps_per_epoch, optimization, schedule, common)
        if frozen_epochs == epochs:
            return history
        if distribution.is_chief(model.distribute_strategy):
            save_weights_atomically(model, marker)
    count = set_backbone_trainable(model, schedule.unfreeze_blocks, schedule.freeze_batch_norm)
    which = "all blocks" if schedule.unfreeze_blocks == -1 else f"the top {schedule.unfreeze_blocks} block(s)"
    fine_tuning, fine_tuning_checkpoints = _fine_tuning_settings(optimization, checkpointing, schedule)
    print(f"phase 2: fine-tuning {which} of the backbone ({count:,} weights) "
          f"at learning rate {fine_tuning.learning_rate:g}")
    history = train(
        model,
        epochs=epochs,
        initial_epoch=frozen_epochs,
        optimization=fine_tuning,
        steps_per_epoch=_lengthened(steps_per_epoch, epochs - frozen_epochs, schedule.min_steps),
        **{**common, "checkpointing": fine_tuning_checkpoints},
    )
    if os.path.isfile(marker) and distribution.is_chief(model.distribute_strategy):
        os.remove(marker)
    return history


def continue_training(model, train_data, val_data, label_rank, run_dir, steps_per_epoch, epochs,
                      optimization, checkpointing, schedule, initial_epoch):
    """Trains a finished run on from epoch `initial_epoch` to `epochs`, from the weights in `model`.

    The trainable part and learning rate are those of the run's last phase
    (fine-tuning after a frozen phase: `schedule.unfreeze_blocks` at the
    learning rate times `schedule.learning_rate_factor`); the schedule
    (warmup, cosine decay) and the optimizer state start afresh for the
    added epochs. `best.keras` is replaced only by an epoch better than the
    run's earlier best. The arguments are those of `train_in_phases`.
    """
    if schedule.frozen_epochs > 0:
        set_backbone_trainable(model, schedule.unfreeze_blocks, schedule.freeze_batch_norm)
        optimization, checkpointing = _fine_tuning_settings(optimization, checkpointing, schedule)
    elif schedule.unfreeze_blocks != -1:
        set_backbone_trainable(model, schedule.unfreeze_blocks, schedule.freeze_batch_norm)
    # The epoch length train_in_phases gives this phase (small data sets).
    steps_per_epoch = _lengthened(steps_per_epoch, epochs - schedule.frozen_epochs, schedule.min_steps)
    return train(model, train_data, val_data, label_rank, run_dir, steps_per_epoch, epochs=epochs,
                 optimization=optimization, checkpointing=checkpointing, initial_epoch=initial_epoch)


def _fine_tuning_settings(optimization, checkpointing, schedule):
    """The settings of the phase after a frozen one: the learning rate times the schedule's factor,
    and a backup folder of its own (its optimizer differs)."""
    return (
        dataclasses.replace(optimization, learning_rate=optimization.learning_rate * schedule.learning_rate_factor),
        dataclasses.replace(checkpointing, backup_name=FINE_TUNING_BACKUP),
    )


def _frozen_phase(model, epochs, steps_per_epoch, optimization, schedule, common):
    """Phase 1: the heads trained with the backbone frozen, on cached features when possible."""
    feature_cache = schedule.feature_cache
    if feature_cache is None:
        steps = _lengthened(steps_per_epoch, epochs, schedule.frozen_steps)
        print(f"phase 1: backbone frozen for {epochs} epoch(s) of {steps} steps")
        return train(model, epochs=epochs, optimization=optimization, steps_per_epoch=steps, **common)
    from hybridnet_tf.training.feature_cache import extract_features
    from hybridnet_tf.training.head_phase import cached_batch_size, save_fixed_heads, train_heads_on_features

    batch_size = cached_batch_size(optimization)  # before minutes of feature extraction
    start = time.perf_counter()
    train_features = extract_features(model, feature_cache.train, flip_views=feature_cache.flip_views)
    val_features = None
    if common["val_data"] is not None:
        val_features = extract_features(model, common["val_data"], name="val")
    print(f"cached {len(train_features)} feature views in {time.perf_counter() - start:.1f} s")
    checkpointing = common["checkpointing"]
    sigmoid_head = layer_or_none(model, SIGMOID_HEAD)
    decoder = layer_or_none(model, LABEL_DECODER)
    # The layers a probe sets; they stay fixed while the decoder trains.
    probe_layers = []
    if feature_cache.probe_init:
        members = decoder_members(decoder) if decoder is not None else []
        probe_layers = [layer for layer in [sigmoid_head] + [getattr(m, "image_to_labels", None) for m in members]
                        if layer is not None]
    if probe_layers:
        _set_from_probe(model, train_features, feature_cache.seed or 0)
        if decoder is None:
            # Nothing left to train: the probe is the phase's model, and its val
            # metrics are the row a fine-tuned epoch must beat.
            return save_fixed_heads(model, val_features, common["label_rank"], common["run_dir"], epoch=epochs - 1,
                                    threshold=checkpointing.threshold, seed=feature_cache.seed)
        score_mix = layer_or_none(model, "score_mix")
        if score_mix is not None and score_mix.sigmoid_weight == 1.0 and checkpointing.monitor == "val_mAP":
            # The scores are the fixed probe's: pick the decoder's epoch by its label sets.
            checkpointing = dataclasses.replace(checkpointing, monitor="val_decoded_OF1")
    for layer in probe_layers:
        layer.trainable = False
    steps = _lengthened(math.ceil(len(train_features) / batch_size), epochs, schedule.frozen_steps)
    print(f"phase 1: heads on cached features for {epochs} epoch(s) of {steps} steps; "
          f"best epoch by {checkpointing.monitor}")
    try:
        return train_heads_on_features(
            model,
            train_features,
            val_features,
            common["label_rank"],
            common["run_dir"],
            epochs=epochs,
            steps_per_epoch=steps,
            optimization=optimization,
            checkpointing=checkpointing,
            seed=feature_cache.seed,
            val_images=common["val_data"],
        )
    finally:
        for layer in probe_layers:
            layer.trainable = True


def _set_from_probe(model, train_features, seed):
    """Fits a linear probe of the cached features and sets the heads that take one from it:
    the sigmoid head, and the decoder's `image_to_labels` when it has one."""
    from hybridnet_tf.training.linear_probe import fit_linear_probe, set_decoder_image_logits, set_sigmoid_head

    start = time.perf_counter()
    # The unflipped view only: an image and its mirror must not sit on both
    # sides of the probe's cross-validation.
    originals = len(train_features) // train_features.views
    print(f"phase 1: fitting a linear probe of {originals} images' features (C by 3-fold cross-validation)")
    probe = fit_linear_probe(train_features.pooled()[:originals], train_features.labels[:originals], seed=seed,
                             progress=True)
    targets = []
    if layer_or_none(model, SIGMOID_HEAD) is not None:
        set_sigmoid_head(model, probe)
        targets.append("sigmoid head")
    decoder = layer_or_none(model, LABEL_DECODER)
    if decoder is not None and getattr(decoder_members(decoder)[0], "image_to_labels", None) is not None:
        set_decoder_image_logits(model, probe)
        targets.append("decoder's image logits")
    print(f"phase 1: {' and '.join(targets)} set by a linear probe (logistic regression, C={probe.c:g}) "
          f"in {time.perf_counter() - start:.1f} s; fixed while the decoder trains")
