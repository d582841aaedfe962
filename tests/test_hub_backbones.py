"""KerasHub presets as backbones: tiny random ViT, SigLIP and DINOv2 presets saved to disk and loaded by path."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip(
    "keras_hub", reason='KerasHub is an optional extra: pip install -e ".[hub]" (CI installs it)'
)

from hybridnet_tf.config import load_config  # noqa: E402
from hybridnet_tf.experiment import build_model_from_config, image_size_of  # noqa: E402
from hybridnet_tf.model import hub_backbones  # noqa: E402
from hybridnet_tf.model.backbones import build_backbone, default_image_size  # noqa: E402
from hybridnet_tf.model.hybridnet import (  # noqa: E402
    IMAGE_ENCODER,
    build_model,
    build_training_model,
    training_loss,
    with_training_targets,
)
from hybridnet_tf.training.fine_tuning import backbone_blocks, set_backbone_trainable  # noqa: E402

SIZE, PATCH, HIDDEN, LAYERS = 32, 8, 16, 2
GRID = SIZE // PATCH
NUM_LABELS = 4
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _vit():
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3), patch_size=PATCH, num_layers=LAYERS, num_heads=2,
        hidden_dim=HIDDEN, mlp_dim=32,
    )
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(SIZE, SIZE), scale=list(1.0 / (255.0 * IMAGENET_STD)), offset=list(-IMAGENET_MEAN / IMAGENET_STD)
    )
    # The class token is first; ImageNet mean / std on 0..1 pixels.
    return backbone, converter, backbone, 1, lambda x: (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _siglip():
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=PATCH, hidden_dim=HIDDEN, num_layers=LAYERS, num_heads=2, intermediate_dim=32,
        image_shape=(SIZE, SIZE, 3),
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=32, embedding_dim=HIDDEN, hidden_dim=HIDDEN, num_layers=1, num_heads=2,
        intermediate_dim=32, max_sequence_length=8,
    )
    backbone = keras_hub.models.SigLIPBackbone(vision, text)
    converter = keras_hub.layers.SigLIPImageConverter(image_size=(SIZE, SIZE), scale=1.0 / 127.5, offset=-1.0)
    # No class token; the tokens are those before the attention-pooling head.
    tokens = keras.Model(vision.input, vision.post_layer_norm.output)
    return backbone, converter, tokens, 0, lambda x: x / 127.5 - 1.0


def _dinov2():
    backbone = keras_hub.models.DINOV2Backbone(
        patch_size=PATCH, num_layers=LAYERS, hidden_dim=HIDDEN, num_heads=2, intermediate_dim=32,
        num_register_tokens=2, image_shape=(SIZE, SIZE, 3), position_embedding_shape=(SIZE, SIZE, 3),
    )
    converter = keras_hub.layers.DINOV2ImageConverter(
        image_size=(SIZE, SIZE), scale=list(1.0 / (255.0 * IMAGENET_STD)), offset=list(-IMAGENET_MEAN / IMAGENET_STD)
    )
    # The class token, then 2 registers, then the patches.
    return backbone, converter, backbone, 3, lambda x: (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


FAMILIES = {"vit": _vit, "siglip": _siglip, "dinov2": _dinov2}
BLOCKS = {
    "vit": ["transformer_block_1", "transformer_block_2"],
    "siglip": ["encoder_block_0", "encoder_block_1"],
    "dinov2": ["layers_0", "layers_1"],
}

# The norm after the last block: "head" layers that unfreeze with the top block.
FINAL_NORM = {"vit": "ln", "siglip": "post_layer_norm", "dinov2": "layernorm"}


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """family -> (preset dir, the token model of the saved backbone, prefix tokens, its normalisation)."""
    made = {}
    for family, make in FAMILIES.items():
        keras.utils.set_random_seed(7)
        backbone, converter, tokens, prefix, normalise = make()
        directory = str(tmp_path_factory.mktemp(family))
        backbone.save_to_preset(directory)
        converter.save_to_preset(directory)
        made[family] = (directory, tokens, prefix, normalise)
    return made


def _images(count=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 3)).astype(np.float32)


def _model(preset, **kwargs):
    return build_model(NUM_LABELS, backbone="hub", hub_preset=preset, weights="preset", max_length=3,
                       embedding_dim=8, gru_units=16, decoder="attention", attention_units=8, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_spatial_map_is_the_patch_tokens_on_their_grid(presets, family):
    preset, tokens, prefix, normalise = presets[family]
    backbone = build_backbone("hub", SIZE, weights="preset", hub_preset=preset)
    assert backbone.name == "backbone" and backbone.output.shape == (None, GRID, GRID, HIDDEN)
    images = _images()
    spatial = backbone(images).numpy()
    # The saved backbone's own tokens on the preset's normalisation, written out here.
    normalised = normalise(images)
    inputs = {"images": normalised} if isinstance(tokens.input, dict) else normalised
    own = keras.ops.convert_to_numpy(tokens(inputs))
    assert own.shape == (2, prefix + GRID * GRID, HIDDEN)
    np.testing.assert_allclose(spatial, own[:, prefix:].reshape(2, GRID, GRID, HIDDEN), atol=1e-5)
    # Row-major grid: token prefix + 5 is patch (1, 1); the class token is not in the map.
    np.testing.assert_allclose(spatial[:, 1, 1], own[:, prefix + GRID + 1], atol=1e-5)
    if prefix:
        assert not np.isclose(spatial, own[:, :1, None]).all(axis=-1).any()
    # weights=None: the preset's architecture, randomly initialised.
    random_init = build_backbone("hub", SIZE, weights=None, hub_preset=preset)
    assert random_init.output.shape == backbone.output.shape
    assert not np.allclose(random_init(images).numpy(), spatial, atol=1e-3)


def test_default_size_is_the_presets_and_dinov2_runs_at_another_size(presets):
    vit, dinov2 = presets["vit"][0], presets["dinov2"][0]
    assert default_image_size("hub", vit) == SIZE
    model = build_model(NUM_LABELS, backbone="hub", hub_preset=vit, weights="preset")
    assert model.input.shape == (None, SIZE, SIZE, 3)
    # DINOv2 interpolates its position embeddings: a 6x6 grid at 48 px.
    assert build_backbone("hub", 48, weights="preset", hub_preset=dinov2).output.shape == (None, 6, 6, HIDDEN)
    # ViT's position embeddings are fixed.
    with pytest.raises(ValueError, match="built for 32x32 images.*set model.image_size to 32"):
        build_backbone("hub", 48, weights="preset", hub_preset=vit)


def test_clear_errors(presets, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs model.hub_preset"):
        build_backbone("hub", SIZE)
    with pytest.raises(ValueError, match="weights come from model.hub_preset"):
        build_backbone("hub", SIZE, weights="imagenet", hub_preset=presets["vit"][0])
    backbone_only = str(tmp_path / "no_converter")
    keras_hub.models.Backbone.from_preset(presets["vit"][0]).save_to_preset(backbone_only)
    with pytest.raises(ValueError, match="has no image converter"):
        build_backbone("hub", SIZE, hub_preset=backbone_only)
    with pytest.raises(ValueError, match="cannot load hub preset .*Unknown preset identifier"):
        build_backbone("hub", SIZE, hub_preset=str(tmp_path / "no_such_folder"))
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hub\]"'):
        hub_backbones.import_keras_hub()


def test_config_keys_reach_the_hub_backbone(presets):
    config = load_config(None, ["data.source=folder", "model.backbone=hub", f"model.hub_preset={presets['dinov2'][0]}",
                                "model.weights=preset", "model.gru_units=16", "model.embedding_dim=8"])
    assert image_size_of(config) == SIZE
    model = build_model_from_config(config, NUM_LABELS)
    backbone = model.get_layer(IMAGE_ENCODER).get_layer("backbone")
    assert backbone.output.shape == (None, GRID, GRID, HIDDEN)


@pytest.mark.slow  # 25-50 s each on 2 shared cores
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_step_round_trip_and_top_block_fine_tuning(presets, family, tmp_path):
    preset = presets[family][0]
    model = _model(preset)
    backbone = model.get_layer(IMAGE_ENCODER).get_layer("backbone")
    blocks = backbone_blocks(backbone)
    # SigLIP's blocks carry its tower's name: "sig_lip_vision_encoder_encoder_block_0".
    assert len(blocks) == LAYERS and all(b.endswith(n) for b, n in zip(blocks, BLOCKS[family])), blocks
    # Top block only: its weights and the final norm after it, nothing below.
    count = set_backbone_trainable(model, 1)
    trainable = {w.path for w in backbone.trainable_weights}
    expected = {w.path for w in backbone.weights
                if BLOCKS[family][-1] in w.path or w.path.split("/")[-2].endswith(FINAL_NORM[family])}
    assert trainable == expected and len(expected) > 4, trainable
    assert count == sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)

    training_model = build_training_model(model)
    training_model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=training_loss(model))
    labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], np.float32)
    data = with_training_targets(tf.data.Dataset.from_tensors((_images(), labels)), model,
                                 np.arange(NUM_LABELS), seed=0)
    frozen_block = [w for w in backbone.weights if BLOCKS[family][0] in w.path][0]
    top_block = [w for w in backbone.trainable_weights if BLOCKS[family][-1] in w.path][0]
    before = frozen_block.numpy().copy(), top_block.numpy().copy()
    for batch in data:
        loss = training_model.train_on_batch(*batch, return_dict=True)["loss"]
    assert np.isfinite(loss)
    np.testing.assert_array_equal(frozen_block.numpy(), before[0])
    assert not np.allclose(top_block.numpy(), before[1])

    images = _images(3, seed=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for key, value in model(images).items():
        np.testing.assert_array_equal(loaded(images)[key].numpy(), value.numpy())


@pytest.mark.slow  # 40-70 s each
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_savedmodel_and_builtins_only_tflite_match_keras(presets, family, tmp_path):
    from hybridnet_tf.export.artifacts import load_predictor
    from hybridnet_tf.export.saved_model import export_saved_model
    from hybridnet_tf.export.tflite import export_tflite

    model = _model(presets[family][0])
    names = ["a", "b", "c", "d"]
    images = _images(4, seed=2)
    expected = {k: v.numpy() for k, v in model(images).items()}
    saved = export_saved_model(model, names, str(tmp_path / "saved" / "1"), SIZE)
    served = tf.saved_model.load(saved)
    got = served.signatures["predict_images"](image=tf.constant(images))
    np.testing.assert_allclose(got["scores"].numpy(), expected["scores"], atol=1e-5)
    np.testing.assert_array_equal(got["label_ids"].numpy(), expected["label_ids"])
    for quantize, tolerance in (("none", 1e-4), ("float16", 2e-2)):
        path = tmp_path / f"model_{quantize}.tflite"
        export_tflite(model, path, quantize=quantize, vocabulary=names)
        predictor = load_predictor(path, num_threads=2)
        ops = predictor.op_names()
        assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
        lite = predictor(images)
        assert np.abs(lite["scores"] - expected["scores"]).max() < tolerance, quantize
        if quantize == "none":
            np.testing.assert_array_equal(lite["label_ids"], expected["label_ids"])


@pytest.mark.slow  # a fresh TensorFlow process
def test_a_saved_hub_model_loads_where_keras_hub_was_never_imported(presets, tmp_path):
    import subprocess

    model = _model(presets["siglip"][0])
    path = tmp_path / "model.keras"
    model.save(str(path))
    images = _images(1)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "scores.npy", model(images)["scores"].numpy())
    # What `load_run_model` does in a fresh CLI process: Keras imports KerasHub's classes by module.
    script = (
        "import sys, keras, numpy as np\n"
        "import hybridnet_tf.model.label_decoder\n"
        "assert 'keras_hub' not in sys.modules\n"
        f"model = keras.models.load_model({str(path)!r}, safe_mode=True)\n"
        f"scores = model(np.load({str(tmp_path / 'images.npy')!r}))['scores'].numpy()\n"
        f"print(float(np.abs(scores - np.load({str(tmp_path / 'scores.npy')!r})).max()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0


def test_a_hub_cnn_keeps_its_feature_map_and_blocks(tmp_path):
    # KerasHub's ResNet returns a map already: nothing dropped or reshaped.
    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 2], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(SIZE, SIZE, 3),
    )
    preset = str(tmp_path / "resnet")
    resnet.save_to_preset(preset)
    keras_hub.layers.ResNetImageConverter(image_size=(SIZE, SIZE), scale=1.0 / 255.0).save_to_preset(preset)
    backbone = build_backbone("hub", SIZE, weights="preset", hub_preset=preset)
    assert backbone.output.shape == (None, 4, 4, 16)
    images = _images()
    np.testing.assert_allclose(backbone(images).numpy(), resnet(images / 255.0).numpy(), atol=1e-5)
    assert backbone_blocks(backbone) == ["stack0_block0", "stack1_block0", "stack1_block1"]


def test_a_hub_cnn_folds_its_batch_norm_for_inference(tmp_path):
    from hybridnet_tf.export.fold_batch_norm import fold_batch_norm

    keras.utils.set_random_seed(0)
    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 2], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(SIZE, SIZE, 3),
    )
    rng = np.random.default_rng(0)
    for layer in resnet._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):  # statistics away from the defaults
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size=n))
    preset = str(tmp_path / "resnet")
    resnet.save_to_preset(preset)
    keras_hub.layers.ResNetImageConverter(image_size=(SIZE, SIZE), scale=1.0 / 255.0).save_to_preset(preset)
    model = _model(preset)
    folded, count = fold_batch_norm(model)
    assert count == sum(isinstance(l, keras.layers.BatchNormalization) for l in model._flatten_layers()) > 0
    images = _images()
    want, got = model(images, training=False), folded(images, training=False)
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), atol=1e-5)
