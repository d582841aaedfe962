"""BatchNorm folded into the convolutions: the same function, fewer ops."""

import keras
import numpy as np
import pytest

from hybridnet_tf.export.fold_batch_norm import fold_batch_norm
from hybridnet_tf.model.hybridnet import build_model


def randomise_batch_norm(model, seed=0):
    """Moving statistics, scale and shift away from their initial values (else folding is a no-op)."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=n))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, size=n))
            if layer.center:
                layer.beta.assign(rng.normal(size=n))


def batch_norms(model):
    return [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("head", ["hybrid", "hybrid_rnn"])
def test_folded_hybridnet_answers_the_same_without_batch_norm(head):
    keras.utils.set_random_seed(0)
    model = build_model(5, image_size=32, max_length=4, embedding_dim=8, gru_units=16, head=head)
    randomise_batch_norm(model)
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    folded, count = fold_batch_norm(model)
    assert count == len(batch_norms(model)) == 4
    assert batch_norms(folded) == []
    assert batch_norms(model)  # the original is left as it was
    want, got = model(images, training=False), folded(images, training=False)
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(got["label_ids"].numpy(), want["label_ids"].numpy())


def small_graph(conv_activation=None, second_reader=False, depth_multiplier=1):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, activation=conv_activation, name="conv")(inputs)
    y = keras.layers.BatchNormalization(name="bn")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=depth_multiplier, name="dw")(y)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    y = keras.layers.ReLU()(y)
    if second_reader:
        y = keras.layers.GlobalAveragePooling2D()(y) + keras.layers.GlobalAveragePooling2D()(x)[:, :1]
    return keras.Model(inputs, y)


@pytest.mark.parametrize("depth_multiplier", [1, 2])
def test_depthwise_channels_are_scaled_in_their_own_order(depth_multiplier):
    keras.utils.set_random_seed(0)
    model = small_graph(depth_multiplier=depth_multiplier)
    randomise_batch_norm(model)
    images = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    folded, count = fold_batch_norm(model)
    assert count == 2
    np.testing.assert_allclose(folded(images).numpy(), model(images).numpy(), atol=1e-5)


@pytest.mark.parametrize("case", ["conv activation", "conv output read twice"])
def test_pairs_that_are_not_an_affine_map_of_one_conv_stay(case):
    keras.utils.set_random_seed(0)
    model = small_graph(conv_activation="relu") if case == "conv activation" else small_graph(second_reader=True)
    randomise_batch_norm(model)
    images = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    folded, count = fold_batch_norm(model)
    assert count == 1  # only the depthwise pair
    assert [l.name for l in batch_norms(folded)] == ["bn"]
    np.testing.assert_allclose(folded(images).numpy(), model(images).numpy(), atol=1e-5)
