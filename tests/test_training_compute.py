"""Compute options of training: auto resolution, mixed precision, XLA, EMA, the callback hook."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.hybridnet import build_model
from hybridnet_tf.training.compute import dtype_policy, resolve_jit_compile, resolve_mixed_precision
from hybridnet_tf.training.settings import Checkpointing, Optimization
from hybridnet_tf.training.trainer import train, training_batches

NUM_LABELS = 4
SIZE = 32


def tiny_model():
    return build_model(NUM_LABELS, image_size=SIZE, max_length=4, embedding_dim=8, gru_units=16)


def tiny_batches(num_examples=10, batch_size=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (num_examples, SIZE, SIZE, 3)).astype("float32")
    labels = (rng.uniform(size=(num_examples, NUM_LABELS)) < 0.4).astype("float32")
    labels[:, 0] = 1.0  # every image has a label
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


class Record(keras.callbacks.Callback):
    """Keeps what the fitted model looked like, and adds a key to the logs."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def on_train_begin(self, logs=None):
        self.seen["optimizer"] = type(self.model.optimizer).__name__
        self.seen["jit_compile"] = self.model.jit_compile

    def on_epoch_end(self, epoch, logs=None):
        self.seen["raw_weights"] = [w.copy() for w in self.model.get_weights()]
        logs["hook_epoch"] = float(epoch)


def fit_tiny(model, tmp_path, epochs=1, extra_callbacks=(), **optimization):
    return train(model, tiny_batches(), None, np.arange(NUM_LABELS), str(tmp_path), steps_per_epoch=2,
                 epochs=epochs, optimization=Optimization(**{"warmup_epochs": 0, **optimization}),
                 checkpointing=Checkpointing(monitor="loss", verbose=0), extra_callbacks=extra_callbacks)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="checks the CPU choice")
def test_auto_resolves_to_no_xla_and_float32_on_cpu():
    assert resolve_jit_compile("auto") is False
    assert resolve_mixed_precision("auto") == "float32"


def test_explicit_settings_pass_through_and_bad_ones_fail():
    assert resolve_jit_compile(True) is True
    assert resolve_jit_compile(False) is False
    assert resolve_mixed_precision("mixed_bfloat16") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_mixed_precision("float16")
    with pytest.raises(ValueError, match="jit_compile"):
        resolve_jit_compile("yes")


def test_dtype_policy_is_restored():
    before = keras.mixed_precision.global_policy().name
    with dtype_policy("mixed_bfloat16"):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before


def test_mixed_bfloat16_fit_step_keeps_float32_probabilities(tmp_path):
    with dtype_policy("mixed_bfloat16"):
        model = tiny_model()
    history = fit_tiny(model, tmp_path)
    assert np.isfinite(history.history["loss"][0])
    backbone_conv = model.get_layer("image_encoder").get_layer("backbone").get_layer("small_cnn")
    conv = backbone_conv.get_layer("conv0")
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    scores = model(np.zeros((2, SIZE, SIZE, 3), "float32"))["scores"]
    assert scores.dtype == tf.float32
    assert keras.mixed_precision.global_policy().name == "float32"


def test_static_batches_for_xla():
    model = tiny_model()
    free = training_batches(tiny_batches(), model, np.arange(NUM_LABELS))
    static = training_batches(tiny_batches(), model, np.arange(NUM_LABELS), static_batch_size=4)
    assert free.element_spec[0]["image"].shape[0] is None
    assert static.element_spec[0]["image"].shape[0] == 4
    # 10 examples in batches of 4: the third batch of a pass has 2 without re-cutting.
    assert [int(x["image"].shape[0]) for x, _ in free.take(3)] == [4, 4, 2]
    assert [int(x["image"].shape[0]) for x, _ in static.take(3)] == [4, 4, 4]


@pytest.mark.slow  # XLA compiles the step for ~15-25 s on 2 CPU cores
def test_jit_compile_fit_step(tmp_path):
    record = Record()
    history = fit_tiny(
        tiny_model(), tmp_path, jit_compile=True, batch_size=4, extra_callbacks=[record]
    )
    assert record.seen["jit_compile"] is True  # Keras did not quietly turn XLA off
    assert np.isfinite(history.history["loss"][0])


def test_mixed_float16_loss_scaling_ema_checkpoints_and_hook_logs(tmp_path):
    # One fit checks three things, as each fit costs ~10 s of tracing on CPU.
    with dtype_policy("mixed_float16"):
        model = tiny_model()
    record = Record()
    fit_tiny(model, tmp_path, epochs=2, use_ema=True, ema_momentum=0.9, learning_rate=1e-2,
             extra_callbacks=[record])
    # Keras wrapped the optimizer for loss scaling because the model is mixed_float16.
    assert record.seen["optimizer"] == "LossScaleOptimizer"
    saved = keras.models.load_model(os.path.join(tmp_path, "last.keras")).get_weights()
    final = model.get_weights()
    raw = record.seen["raw_weights"]  # the trained weights at the last epoch end
    # fit leaves the EMA weights in the model, and last.keras holds them, not the raw ones.
    assert all(np.allclose(s, f) for s, f in zip(saved, final))
    assert any(not np.allclose(s, r) for s, r in zip(saved, raw))
    history = json.load(open(os.path.join(tmp_path, "history.json")))
    assert history["hook_epoch"] == [0.0, 1.0]  # an extra callback's logs reach the history
    assert all(np.isfinite(history["loss"]))
