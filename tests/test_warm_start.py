"""The BCE warm start of a backbone trained from scratch (`training.warm_start`)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.hybridnet import build_model
from hybridnet_tf.training import warm_start
from hybridnet_tf.training.fine_tuning import train_in_phases
from hybridnet_tf.training.settings import Checkpointing, Optimization, PhaseSchedule


def eight_images(num_labels=4, size=32):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    labels = (rng.uniform(size=(8, num_labels)) < 0.5).astype(np.float32)
    labels[:, 0] = 1.0 - labels[:, 1]  # every image has a label
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


def backbone_kernels(model):
    backbone = model.get_layer("image_encoder").get_layer("backbone")
    return [w.numpy().copy() for w in backbone.weights if "kernel" in w.path]


def test_warm_start_fits_eight_images_with_the_backbone(tmp_path):
    model = build_model(4, image_size=32, head="hybrid", gru_units=16, embedding_dim=8)
    before = backbone_kernels(model)
    history = warm_start.bce_warm_start(
        model, eight_images(), None, str(tmp_path), epochs=40, steps_per_epoch=1,
        optimization=Optimization(learning_rate=1e-2, warmup_epochs=0), num_labels=4, verbose=0,
    )
    losses = history.history["loss"]
    # BCE at chance is log 2 = 0.69: the warm start fits the 8 images, and trains the backbone to do it.
    assert losses[0] > 0.5 and losses[-1] < 0.2, losses
    assert all(not np.array_equal(b, a) for b, a in zip(before, backbone_kernels(model)))
    assert os.path.isfile(tmp_path / warm_start.WARM_START_WEIGHTS)


def test_a_rerun_loads_the_warm_start_instead_of_redoing_it(tmp_path, capsys):
    model = build_model(4, image_size=32, head="hybrid_rnn", gru_units=16, embedding_dim=8)
    model.save_weights(str(tmp_path / warm_start.WARM_START_WEIGHTS))
    saved = backbone_kernels(model)
    kernel = [w for w in model.get_layer("image_encoder").get_layer("backbone").weights if "kernel" in w.path][0]
    kernel.assign(kernel + 1.0)
    result = warm_start.bce_warm_start(
        model, eight_images(), None, str(tmp_path), epochs=5, steps_per_epoch=1,
        optimization=Optimization(), num_labels=4, verbose=0,
    )
    assert result is None
    assert "already done" in capsys.readouterr().out
    for s, now in zip(saved, backbone_kernels(model)):
        np.testing.assert_array_equal(s, now)


def test_phases_after_the_warm_start_keep_its_backbone_and_clean_up(tmp_path):
    model = build_model(4, image_size=32, head="hybrid_rnn", gru_units=16, embedding_dim=8)
    before = backbone_kernels(model)
    warmed = {}
    real = warm_start.bce_warm_start

    def spy(model, *args, **kwargs):
        history = real(model, *args, **kwargs)
        warmed["kernels"] = backbone_kernels(model)
        return history

    data = eight_images()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warm_start, "bce_warm_start", spy)
        history = train_in_phases(
            model, data, data, np.arange(4), str(tmp_path), steps_per_epoch=1, epochs=2,
            optimization=Optimization(learning_rate=1e-2), checkpointing=Checkpointing(monitor="loss", verbose=0),
            schedule=PhaseSchedule(frozen_epochs=2, warm_start_epochs=3),
        )
    assert history.epoch == [0, 1]  # the warm start's epochs are not the run's
    assert all(not np.array_equal(b, w) for b, w in zip(before, warmed["kernels"]))
    for w, now in zip(warmed["kernels"], backbone_kernels(model)):
        np.testing.assert_array_equal(w, now)  # the frozen phase trained the decoder on the warmed backbone
    assert not os.path.exists(tmp_path / warm_start.WARM_START_WEIGHTS)


def test_negative_warm_start_is_refused():
    with pytest.raises(ValueError, match="warm_start_epochs"):
        PhaseSchedule(warm_start_epochs=-1)


def test_a_nan_in_the_warm_start_stops_it_with_the_step_named_and_saves_nothing(tmp_path):
    from hybridnet_tf.training.callbacks import NonFiniteLossError

    model = build_model(4, image_size=32, head="hybrid", gru_units=16, embedding_dim=8)

    def poison(position, batch):
        images, labels = batch
        return tf.where(position == 1, tf.fill(tf.shape(images), np.nan), images), labels

    poisoned = eight_images().repeat().enumerate().map(poison)  # the 2nd batch has NaN pixels
    with pytest.raises(NonFiniteLossError, match=r"BCE warm-start loss became nan at epoch 2 of 3, batch 1 of 1"):
        warm_start.bce_warm_start(
            model, poisoned, None, str(tmp_path), epochs=3, steps_per_epoch=1,
            optimization=Optimization(), num_labels=4, verbose=0,
        )
    assert not os.path.exists(tmp_path / warm_start.WARM_START_WEIGHTS)


def encoder_weights(model):
    return [w.numpy().copy() for w in model.get_layer("image_encoder").weights]


def test_the_warm_start_gives_one_backbone_whatever_the_head(tmp_path):
    # With one seed, bce and hybrid must warm-start the same CNN, so that comparing heads compares heads
    # (the temporary layer's start must not depend on how many random draws the heads took before it).
    import keras

    warmed = {}
    for head in ("bce", "hybrid"):
        keras.utils.set_random_seed(7)
        model = build_model(4, image_size=32, head=head, gru_units=16, embedding_dim=8, dropout=0.3)
        warm_start.bce_warm_start(
            model, eight_images(), None, str(tmp_path / head), epochs=3, steps_per_epoch=1,
            optimization=Optimization(learning_rate=1e-2, warmup_epochs=0), num_labels=4, seed=3, verbose=0,
        )
        warmed[head] = encoder_weights(model)
    assert len(warmed["bce"]) == len(warmed["hybrid"]) > 0
    for a, b in zip(warmed["bce"], warmed["hybrid"]):
        np.testing.assert_array_equal(a, b)
