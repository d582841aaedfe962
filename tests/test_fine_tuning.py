"""Fine-tuning schedule: which weights each phase trains, and resuming between phases."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.efficientnet_lite import EfficientNetLite, block_names
from hybridnet_tf.model.hybridnet import build_model
from hybridnet_tf.training import fine_tuning
from hybridnet_tf.training.fine_tuning import backbone_blocks, set_backbone_trainable, train_in_phases
from hybridnet_tf.training.settings import Checkpointing, Optimization, PhaseSchedule

QUIET_ON_LOSS = Checkpointing(monitor="loss", verbose=0)


def trainable_backbone_names(model):
    backbone = model.get_layer("image_encoder").get_layer("backbone")
    return {w.path for w in backbone.trainable_weights}


def test_blocks_of_efficientnet_lite_match_its_own_list():
    lite = EfficientNetLite("lite0", input_shape=(32, 32, 3), pooling="avg")
    assert backbone_blocks(lite) == block_names(lite)


def test_freeze_top_blocks_and_all():
    model = build_model(4, backbone="efficientnet_lite0", image_size=32)
    assert set_backbone_trainable(model, 0) == 0
    assert trainable_backbone_names(model) == set()

    set_backbone_trainable(model, 2)
    names = trainable_backbone_names(model)
    assert names, "nothing unfrozen"
    assert all(("block7a" in n or "block6d" in n or "top_conv" in n) for n in names), sorted(names)
    assert not any("bn" in n.split("/")[-2] for n in names), "BatchNorm must stay frozen"
    assert any("top_conv" in n for n in names)

    set_backbone_trainable(model, -1)
    names = trainable_backbone_names(model)
    assert any("stem_conv" in n for n in names) and any("block1a" in n for n in names)
    assert not any("gamma" in n or "beta" in n for n in names), "BatchNorm must stay frozen"

    with pytest.raises(ValueError, match="unfreeze_blocks"):
        set_backbone_trainable(model, -2)


def tiny_data(num_labels=4, count=16, size=32):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (count, size, size, 3)).astype(np.float32)
    labels = (rng.uniform(size=(count, num_labels)) < 0.4).astype(np.float32)
    labels[:, 0] = 1.0
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)


def backbone_values(model):
    backbone = model.get_layer("image_encoder").get_layer("backbone")
    return [w.numpy().copy() for w in backbone.weights if "conv" in w.path and "kernel" in w.path]


def test_two_phases_train_the_right_weights_and_log_every_epoch(tmp_path, monkeypatch):
    model = build_model(4, image_size=32, gru_units=16, embedding_dim=8)
    before = backbone_values(model)
    after_phase_1 = {}
    real_train = fine_tuning.train

    def spy_train(model, **kwargs):
        history = real_train(model, **kwargs)
        if kwargs.get("initial_epoch", 0) == 0:
            after_phase_1["values"] = backbone_values(model)
        return history

    monkeypatch.setattr(fine_tuning, "train", spy_train)
    data = tiny_data()
    history = train_in_phases(
        model, data, data, np.arange(4), str(tmp_path), steps_per_epoch=2, epochs=3,
        optimization=Optimization(learning_rate=1e-2), checkpointing=Checkpointing(verbose=0),
        schedule=PhaseSchedule(frozen_epochs=1, unfreeze_blocks=-1),
    )
    for b, a in zip(before, after_phase_1["values"]):
        np.testing.assert_array_equal(b, a)  # phase 1: backbone frozen
    changed = [not np.array_equal(a, c) for a, c in zip(after_phase_1["values"], backbone_values(model))]
    assert all(changed)  # phase 2: all conv kernels trained
    assert history.epoch == [0, 1, 2]
    assert len(json.load(open(tmp_path / "history.json"))["loss"]) == 3
    assert not os.path.exists(tmp_path / fine_tuning.FROZEN_PHASE_WEIGHTS)


def test_resume_skips_a_finished_frozen_phase(tmp_path, capsys):
    model = build_model(4, image_size=32, gru_units=16, embedding_dim=8)
    model.save_weights(str(tmp_path / fine_tuning.FROZEN_PHASE_WEIGHTS))
    data = tiny_data()
    history = train_in_phases(
        model, data, None, np.arange(4), str(tmp_path), steps_per_epoch=2, epochs=2,
        optimization=Optimization(learning_rate=1e-2), checkpointing=QUIET_ON_LOSS,
        schedule=PhaseSchedule(frozen_epochs=1),
    )
    assert "frozen phase already done" in capsys.readouterr().out
    assert history.epoch == [1]


def test_no_schedule_trains_the_backbone_as_built(tmp_path):
    # A backbone trained from scratch needs its BatchNorm layers trainable
    # (frozen ones would run in inference mode with their initial statistics).
    model = build_model(4, image_size=32, gru_units=16, embedding_dim=8)
    before = {w.path for w in model.trainable_weights}
    data = tiny_data()
    train_in_phases(
        model, data, None, np.arange(4), str(tmp_path), steps_per_epoch=1, epochs=1,
        optimization=Optimization(learning_rate=1e-2), checkpointing=QUIET_ON_LOSS,
        schedule=PhaseSchedule(frozen_epochs=0),
    )
    after = {w.path for w in model.trainable_weights}
    assert after == before
    assert any("bn" in name for name in after)
