"""Fine-tuning a pretrained backbone: frozen first, then its top blocks unfrozen.

As in the Keras fine-tuning guide: train the new layers with the backbone
frozen for a few epochs, then unfreeze the top K blocks (or all of it) and
go on at a lower learning rate. BatchNormalization layers stay frozen and in
inference mode (the model calls a pretrained backbone with
`training=False`), so small batches do not wreck their statistics.

The two phases are two `fit` calls with their own optimizers, so each has
its own `BackupAndRestore` folder; the weights at the end of the frozen
phase are kept in `run_dir/frozen_phase.weights.h5` until the run ends, so a
run killed during fine-tuning resumes without redoing the frozen phase.
"""

import os
import re

import keras

from hybridnet_tf.model.hybridnet import IMAGE_ENCODER
from hybridnet_tf.training import distribution
from hybridnet_tf.training.trainer import train

FROZEN_PHASE_WEIGHTS = "frozen_phase.weights.h5"
FINE_TUNING_BACKUP = "backup_fine_tuning"

# Names of the repeated blocks of each backbone family, in layer-name prefixes:
# EfficientNet / -V2 / -Lite "block6a_...", ResNetV2 "conv5_block3_...",
# MobileNetV3 "expanded_conv_3_...", the small CNN "conv2" / "bn2".
_BLOCK_PATTERNS = (
    re.compile(r"^(block\d+[a-z]?)_"),
    re.compile(r"^(conv\d_block\d+)_"),
    re.compile(r"^(expanded_conv(?:_\d+)?)_"),
    re.compile(r"^(?:conv|bn)(\d+)$"),
)


def _leaf_layers(layer):
    for sub in getattr(layer, "layers", ()):
        if isinstance(sub, keras.Model):
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


def set_backbone_trainable(model, num_blocks):
    """Freezes a HybridNet's backbone, or unfreezes its top blocks.

    Args:
        model: the inference model from `build_model`.
        num_blocks: 0 freezes the whole backbone; K > 0 unfreezes the top K
            blocks and the layers above them (e.g. `top_conv`); -1 unfreezes
            everything. BatchNormalization layers stay frozen either way.

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
        layer.trainable = wanted and not isinstance(layer, keras.layers.BatchNormalization)
    return sum(int(w.shape.num_elements() or 0) for w in backbone.trainable_weights)


def train_in_phases(
    model,
    train_data,
    val_data,
    label_rank,
    run_dir,
    steps_per_epoch,
    epochs,
    learning_rate,
    frozen_epochs=0,
    unfreeze_blocks=-1,
    learning_rate_factor=0.1,
    **train_kwargs,
):
    """`trainer.train` with an optional frozen-backbone phase before fine-tuning.

    Args:
        model, train_data, val_data, label_rank, run_dir, steps_per_epoch,
        epochs, learning_rate: as in `trainer.train` (`epochs` counts both phases).
        frozen_epochs: epochs with the backbone frozen (0: no frozen phase;
            >= `epochs`: the backbone stays frozen throughout).
        unfreeze_blocks: for the second phase: -1 all, K the top K blocks.
        learning_rate_factor: the second phase's peak learning rate is
            `learning_rate * learning_rate_factor`.
        **train_kwargs: passed on to `trainer.train`.

    Returns:
        The History of the run (every epoch of both phases).
    """
    common = dict(train_data=train_data, val_data=val_data, label_rank=label_rank,
                  run_dir=run_dir, steps_per_epoch=steps_per_epoch, **train_kwargs)
    if frozen_epochs <= 0:
        # No schedule: train the model as built. (Unfreezing "all" here would
        # freeze BatchNorm, which ruins a backbone trained from scratch.)
        if unfreeze_blocks != -1:
            set_backbone_trainable(model, unfreeze_blocks)
        return train(model, epochs=epochs, learning_rate=learning_rate, **common)
    if frozen_epochs >= epochs:
        set_backbone_trainable(model, 0)
        return train(model, epochs=epochs, learning_rate=learning_rate, **common)

    marker = os.path.join(run_dir, FROZEN_PHASE_WEIGHTS)
    if os.path.isfile(marker):
        print(f"frozen phase already done ({marker}); resuming the fine-tuning phase")
        model.load_weights(marker)
    else:
        print(f"phase 1: backbone frozen for {frozen_epochs} epoch(s)")
        set_backbone_trainable(model, 0)
        train(model, epochs=frozen_epochs, learning_rate=learning_rate, **common)
        if distribution.is_chief(model.distribute_strategy):
            tmp = marker.replace(".weights.h5", ".tmp.weights.h5")
            model.save_weights(tmp)
            os.replace(tmp, marker)
    count = set_backbone_trainable(model, unfreeze_blocks)
    which = "all blocks" if unfreeze_blocks == -1 else f"the top {unfreeze_blocks} block(s)"
    print(f"phase 2: fine-tuning {which} of the backbone ({count:,} weights) "
          f"at learning rate {learning_rate * learning_rate_factor:g}")
    history = train(
        model,
        epochs=epochs,
        initial_epoch=frozen_epochs,
        learning_rate=learning_rate * learning_rate_factor,
        backup_name=FINE_TUNING_BACKUP,
        **common,
    )
    if os.path.isfile(marker) and distribution.is_chief(model.distribute_strategy):
        os.remove(marker)
    return history
