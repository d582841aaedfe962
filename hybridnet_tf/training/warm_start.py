"""The BCE warm start: a backbone trained from scratch learns with a sigmoid head before the decoder.

Wang et al. (CNN-RNN) and Yazici et al. (orderless RNN) pre-train the CNN with
a per-label BCE loss before the RNN decoder. A pretrained backbone needs no
warm start (its ImageNet features are the start; the frozen phase then sets
the sigmoid head and the decoder's image logits by a linear probe). A backbone
trained from scratch does: trained jointly with a decoder from the first
step, its features learn from the sequence loss while the decoder is still
random. `bce_warm_start` trains the backbone with a temporary sigmoid layer
for a few epochs; `fine_tuning.train_in_phases` then goes on as it would for
a pretrained backbone (frozen phase on cached features, probe, decoder).

The warm start's weights are kept in `run_dir/warm_start.weights.h5` until the
run ends, so a run killed later does not redo it; its loss and PR-AUC go to
TensorBoard under `run_dir/logs/warm_start`.
"""

import os
import warnings

import keras

from hybridnet_tf.console import fit_verbosity
from hybridnet_tf.model.hybridnet import IMAGE_ENCODER
from hybridnet_tf.training import distribution
from hybridnet_tf.training.callbacks import StopOnNonFiniteLoss, save_weights_atomically
from hybridnet_tf.training.compute import dtype_policy
from hybridnet_tf.training.trainer import adamw_optimizer

WARM_START_WEIGHTS = "warm_start.weights.h5"


def bce_warm_start(model, train_data, val_data, run_dir, epochs, steps_per_epoch, optimization,
                   num_labels, val_max_batches=None, seed=None, verbose="auto"):
    """Trains `model`'s image encoder with a temporary sigmoid layer and a BCE loss.

    Args:
        model: the inference model from `build_model`; its image encoder
            (backbone, pooling, feature dropout) is trained in place.
        train_data: batches of `(images, multi_hot)`.
        val_data: batches of `(images, multi_hot)` for the printed val loss
            and PR-AUC (at most `val_max_batches` of them), or None.
        run_dir: where the warm start's weights are kept until the run ends.
        epochs: warm-start epochs of `steps_per_epoch` steps.
        optimization: a `settings.Optimization` (learning rate, weight
            decay, warmup).
        num_labels: width of the temporary sigmoid layer.
        seed: an int for the temporary layer's random start, so that one
            seed warm-starts the same CNN whatever heads `model` has (their
            weights are drawn before this layer); None: Keras' global seed.

    Returns:
        The warm start's Keras History, or None when `run_dir` already held
        its weights (they are loaded into `model` instead).
    """
    marker = os.path.join(run_dir, WARM_START_WEIGHTS)
    if os.path.isfile(marker):
        print(f"BCE warm start already done ({marker}); loading its weights")
        model.load_weights(marker)
        return None
    strategy = model.distribute_strategy
    if distribution.is_multi_worker(strategy):
        raise ValueError("train.warm_start_epochs does not run with several workers; warm-start on one "
                         "machine, or set it to 0")
    encoder = model.get_layer(IMAGE_ENCODER)
    with strategy.scope(), dtype_policy(model.dtype_policy.name):
        image = keras.Input(encoder.input.shape[1:], name="image")
        encoded = encoder(image)
        # With the attention decoder the encoder also hands over the map: the pooled feature comes first.
        features = encoded[0] if isinstance(encoded, (list, tuple)) else encoded
        # Its own seed: drawn from the global one, the start would follow the heads' draws, and one seed
        # would warm-start a different CNN for each head. Not zeros: from a zero kernel every label's
        # column moves along the mean feature at first, and the demo's warm start reached val PR-AUC
        # 0.64 instead of 0.95 in 15 epochs (400 photos, seed 0).
        logits = keras.layers.Dense(
            num_labels, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), dtype="float32",
            name="warm_start_labels",
        )(features)
        warm = keras.Model(image, logits, name="bce_warm_start")
        warm.compile(
            optimizer=adamw_optimizer(
                optimization, epochs * steps_per_epoch, int(round(optimization.warmup_epochs * steps_per_epoch))
            ),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            # Keras' PR-AUC per label, averaged: close to, not the same as, the run's mAP.
            metrics=[keras.metrics.AUC(curve="PR", multi_label=True, from_logits=True, name="pr_auc")],
        )
    print(f"BCE warm start: the backbone with a sigmoid layer for {epochs} epoch(s) of {steps_per_epoch} steps")
    if val_data is not None and val_max_batches:
        val_data = val_data.take(val_max_batches)
    with warnings.catch_warnings(), strategy.scope():
        # Keras warns at the end of every finite val set whose length tf.data does not know.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = warm.fit(
            train_data.repeat(),
            shuffle=False,  # tf.data already shuffles
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_data,
            callbacks=[
                StopOnNonFiniteLoss(
                    "BCE warm-start", state="the warm start stopped and saved nothing; it starts over on the next run"
                ),
                # Its own TensorBoard run beside the run's train / validation ones.
                keras.callbacks.TensorBoard(os.path.join(run_dir, "logs", "warm_start"), write_graph=False),
            ],
            verbose=fit_verbosity(verbose),
        )
    if distribution.is_chief(strategy):
        save_weights_atomically(model, marker)
    return history


def remove_warm_start_weights(model, run_dir):
    """Deletes the warm start's weights once the run they belong to has ended."""
    marker = os.path.join(run_dir, WARM_START_WEIGHTS)
    if os.path.isfile(marker) and distribution.is_chief(model.distribute_strategy):
        os.remove(marker)
