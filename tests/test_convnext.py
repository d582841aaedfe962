"""ConvNeXt backbones (keras.applications): raw pixels in, the stride-32 map out, its blocks for fine-tuning."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.model.backbones import BACKBONES, build_backbone
from hybridnet_tf.model.hybridnet import (
    IMAGE_ENCODER,
    build_model,
    build_training_model,
    training_loss,
    with_training_targets,
)
from hybridnet_tf.training.fine_tuning import backbone_blocks, set_backbone_trainable

SIZE = 64  # ConvNeXt's stride is 32: a 2x2 map
NUM_LABELS = 4


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("convnext_tiny", SIZE)


def test_convnext_takes_raw_pixels_and_returns_its_last_map(tiny):
    assert tiny.name == "backbone" and tiny.output.shape == (None, 2, 2, 768)
    # ImageNet mean / std on 0..255 pixels inside the model: the mean pixel becomes 0.
    core = tiny.get_layer("convnext_tiny")
    normalise = core.get_layer("convnext_tiny_prestem_normalization")
    mean_pixel = np.array([[[[0.485, 0.456, 0.406]]]], np.float32) * 255.0
    np.testing.assert_allclose(normalise(mean_pixel).numpy(), 0.0, atol=1e-4)
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    assert tiny(images).shape == (2, 2, 2, 768)
    assert {name: BACKBONES[name].default_size for name in ("convnext_tiny", "convnext_small", "convnext_base")} == {
        "convnext_tiny": 224, "convnext_small": 224, "convnext_base": 224}


# ConvNeXt-Small and -Base: 50 M and 88 M weights to initialise (~8 s each).
@pytest.mark.parametrize("name, channels, stage_2_blocks", [("convnext_small", 768, 27), ("convnext_base", 1024, 27)])
def test_bigger_convnexts_map_and_blocks(name, channels, stage_2_blocks):
    model = build_backbone(name, SIZE)
    assert model.output.shape == (None, 2, 2, channels)
    blocks = backbone_blocks(model)
    assert len(blocks) == 3 + 3 + stage_2_blocks + 3 + 3


def test_convnext_blocks_are_its_stage_blocks_and_downsampling_layers(tiny):
    blocks = backbone_blocks(tiny)
    stage = lambda s, n: [f"convnext_tiny_stage_{s}_block_{b}" for b in range(n)]  # noqa: E731
    down = lambda s: [f"convnext_tiny_downsampling_block_{s}"]  # noqa: E731
    assert blocks == stage(0, 3) + down(0) + stage(1, 3) + down(1) + stage(2, 9) + down(2) + stage(3, 3)


@pytest.mark.slow  # 30-110 s on 2 shared cores (a 28 M-weight model saved and loaded)
def test_convnext_train_step_with_the_top_stage_unfrozen_and_keras_round_trip(tmp_path):
    model = build_model(NUM_LABELS, backbone="convnext_tiny", image_size=SIZE, max_length=3, embedding_dim=8,
                        gru_units=16, decoder="attention", attention_units=8)
    backbone = model.get_layer(IMAGE_ENCODER).get_layer("backbone")
    # The top 3 blocks are stage 3; the downsampling into it stays frozen, the final norm trains.
    set_backbone_trainable(model, 3)
    layers = {w.path.split("/")[-2] for w in backbone.trainable_weights}
    # keras.applications leaves the final norm unnamed: "layer_normalization[_N]".
    final = [name for name in layers if name.startswith("layer_normalization")]
    assert len(final) == 1
    assert layers - set(final) == {f"convnext_tiny_stage_3_block_{b}_{part}" for b in range(3)
                                   for part in ("depthwise_conv", "layernorm", "pointwise_conv_1",
                                                "pointwise_conv_2", "layer_scale")}, sorted(layers)
    set_backbone_trainable(model, 4)
    assert any("downsampling" in w.path for w in backbone.trainable_weights)
    set_backbone_trainable(model, 3)

    training_model = build_training_model(model)
    training_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=training_loss(model))
    images = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], np.float32)
    data = with_training_targets(tf.data.Dataset.from_tensors((images, labels)), model, np.arange(NUM_LABELS))
    top = backbone.get_layer("convnext_tiny").get_layer("convnext_tiny_stage_3_block_2_pointwise_conv_2").kernel
    below = backbone.get_layer("convnext_tiny").get_layer("convnext_tiny_stage_2_block_8_pointwise_conv_2").kernel
    before = top.numpy().copy(), below.numpy().copy()
    for batch in data:
        loss = training_model.train_on_batch(*batch, return_dict=True)["loss"]
    assert np.isfinite(loss)
    assert not np.allclose(top.numpy(), before[0])
    np.testing.assert_array_equal(below.numpy(), before[1])

    path = str(tmp_path / "convnext.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for key, value in model(images).items():
        np.testing.assert_array_equal(loaded(images)[key].numpy(), value.numpy())
