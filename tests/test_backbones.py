"""Backbones by name: shapes, preprocessing inside the model, weights files."""

import numpy as np
import pytest

from hybridnet_tf.model import backbones
from hybridnet_tf.model.backbones import BACKBONES, build_backbone


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'.*efficientnet_b0"):
        build_backbone("vgg16", 32)


@pytest.mark.parametrize("name, size", [("small_cnn", 32), ("efficientnet_b0", 32), ("mobilenet_v3_small", 32)])
def test_backbones_take_raw_pixels_and_return_a_spatial_map(name, size):
    model = build_backbone(name, size)
    assert model.name == "backbone"
    features = model(np.full((2, size, size, 3), 255.0, np.float32))
    # The last feature map at stride 8 (small_cnn) or 32, before any pooling.
    stride = 8 if name == "small_cnn" else 32
    assert features.shape[:3] == (2, size // stride, size // stride) and len(features.shape) == 4


def test_resnet_v2_scales_pixels_to_minus1_1():
    model = build_backbone("resnet50_v2", 32)
    scale = model.get_layer("preprocessing")
    out = scale(np.array([[0.0, 127.5, 255.0]], np.float32)).numpy()
    np.testing.assert_allclose(out, [[-1.0, 0.0, 1.0]], atol=1e-6)


def test_weights_file_round_trip(tmp_path):
    first = build_backbone("small_cnn", 32)
    inner = first.get_layer("small_cnn")
    path = str(tmp_path / "cnn.weights.h5")
    inner.save_weights(path)
    second = build_backbone("small_cnn", 32, weights=path)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(first(images), second(images), atol=1e-6)


def test_missing_or_mismatched_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("small_cnn", 32, weights=str(tmp_path / "none.weights.h5"))
    other = build_backbone("efficientnet_b0", 32).get_layer("efficientnetb0")
    path = str(tmp_path / "b0.weights.h5")
    other.save_weights(path)
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("small_cnn", 32, weights=path)


def test_keras_named_imagenet_file_goes_through_keras_cache(tmp_path, monkeypatch):
    # Keras' own EfficientNet file must be used via weights="imagenet" so that
    # the ImageNet input scaling is kept (tensorflow/tensorflow#62193).
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    source = tmp_path / "efficientnetb0_notop.h5"
    source.write_bytes(b"0123456789")
    assert backbones._as_keras_imagenet_file(str(source), "efficientnetb0_notop.h5") == "imagenet"
    cached = tmp_path / "keras_home" / "models" / "efficientnetb0_notop.h5"
    assert cached.read_bytes() == b"0123456789"
    other = tmp_path / "mine.weights.h5"
    assert backbones._as_keras_imagenet_file(str(other), "efficientnetb0_notop.h5") == str(other)


def test_every_backbone_has_a_default_size():
    # The hub backbone's size is its preset's (tests/test_hub_backbones.py).
    assert all(spec.default_size >= 32 for name, spec in BACKBONES.items() if name != "hub")
    assert BACKBONES["hub"].default_size is None


def test_small_cnn_moving_statistics_catch_up_within_a_small_runs_steps():
    """After 100 training steps, inference-mode outputs match training-mode ones.

    The demo's 400-image run has 13 steps an epoch (195 in all); with Keras'
    default momentum 0.99 the moving statistics would still hold 37 % of
    their initial values after 100 steps and the inference outputs would be
    far off (measured: 93-97 % relative difference).
    """
    import keras

    model = build_backbone("small_cnn", 32)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (100 * 4, 32, 32, 3)).astype(np.float32)
    target = np.zeros((len(images), 4, 4, 128), np.float32)
    model.fit(images, target, batch_size=4, epochs=1, shuffle=False, verbose=0)
    batch = images[:64]
    inference = model(batch, training=False).numpy()
    training = model(batch, training=True).numpy()
    # learning rate 0: only the moving statistics changed.
    relative = np.abs(inference - training).mean() / np.abs(training).mean()
    assert relative < 0.05, relative
