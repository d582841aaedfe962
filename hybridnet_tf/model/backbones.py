"""Image backbones chosen by name from a plain dict.

Every backbone takes images with pixel values 0..255 and applies its own
preprocessing inside the model, so callers (tf.data, exports, apps) always
feed raw pixels. Every backbone returns its last spatial feature map
[B, h, w, C]; `hybridnet.build_model` pools it for the pooled heads and
hands the map itself to the attention decoder.

`hub` is any KerasHub image backbone, chosen by `hub_preset` (ViT, SigLIP's
vision tower, DINOv2, ...; `hub_backbones.py`): its transformer tokens are
laid on the patch grid, so it returns a map like the CNNs.
"""

import os
import shutil
from dataclasses import dataclass

import keras

# The backbone name of KerasHub presets (`hub_backbones.py`).
HUB = "hub"

@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Args:
        constructor: a `keras.applications`-style function, or a function
            `(input_shape, weights) -> keras.Model` for in-project backbones.
        default_size: the image size the backbone was pretrained at (None:
            the hub preset's own, `default_image_size`).
        preprocessing: what to do to 0..255 pixels before the constructor's
            model: "none" (the model does it itself) or "scale_minus1_1".
        imagenet_file: Keras' own file name of the no-top ImageNet weights,
            for backbones whose preprocessing depends on `weights=="imagenet"`.
    """

    constructor: object
    default_size: int
    preprocessing: str = "none"
    imagenet_file: str = None


def small_cnn(input_shape, weights=None):
    """A small, fast CNN for tests and the demo (random init only).

    Args:
        input_shape: (height, width, 3).
        weights: must be None or a `.weights.h5` path saved from this model.

    Returns:
        A `keras.Model` mapping 0..255 pixels to a 128-channel feature map
        at 1/8 of the input size.
    """
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    for index, filters in enumerate((32, 64, 96, 128)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{index}")(x)
        # Momentum 0.9, not Keras' 0.99: the demo and small data sets train this CNN
        # from scratch for a few hundred steps, and with 0.99 the moving statistics
        # are still mostly their initial values then (0.99**195 = 14 % of the start is
        # left after 400 images x 15 epochs), so inference-mode outputs drift from the
        # training ones: val loss rose from epoch 2 and every head's val sets emptied.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{index}")(x)
        x = keras.layers.Activation("relu")(x)
        if index < 3:
            x = keras.layers.MaxPooling2D()(x)
    model = keras.Model(inputs, x, name="small_cnn")
    if weights is not None:
        load_weights_file(model, weights)
    return model


def _efficientnet_lite(variant):
    def build(input_shape, weights=None):
        # Imported here so that the dict below costs nothing to import.
        from hybridnet_tf.model.efficientnet_lite import EfficientNetLite

        return EfficientNetLite(
            variant, include_top=False, weights=weights, input_shape=input_shape, pooling=None
        )

    return build


apps = keras.applications
BACKBONES = {
    "small_cnn": BackboneSpec(small_cnn, 96),
    "efficientnet_b0": BackboneSpec(apps.EfficientNetB0, 224, imagenet_file="efficientnetb0_notop.h5"),
    "efficientnet_b1": BackboneSpec(apps.EfficientNetB1, 240, imagenet_file="efficientnetb1_notop.h5"),
    "efficientnet_b2": BackboneSpec(apps.EfficientNetB2, 260, imagenet_file="efficientnetb2_notop.h5"),
    "efficientnet_b3": BackboneSpec(apps.EfficientNetB3, 300, imagenet_file="efficientnetb3_notop.h5"),
    "efficientnet_v2_b0": BackboneSpec(apps.EfficientNetV2B0, 224),
    "efficientnet_v2_s": BackboneSpec(apps.EfficientNetV2S, 384),
    "efficientnet_lite0": BackboneSpec(_efficientnet_lite("lite0"), 224),
    "efficientnet_lite1": BackboneSpec(_efficientnet_lite("lite1"), 240),
    "efficientnet_lite2": BackboneSpec(_efficientnet_lite("lite2"), 260),
    "efficientnet_lite3": BackboneSpec(_efficientnet_lite("lite3"), 280),
    "efficientnet_lite4": BackboneSpec(_efficientnet_lite("lite4"), 300),
    "resnet50_v2": BackboneSpec(apps.ResNet50V2, 224, preprocessing="scale_minus1_1"),
    "resnet101_v2": BackboneSpec(apps.ResNet101V2, 224, preprocessing="scale_minus1_1"),
    "mobilenet_v3_small": BackboneSpec(apps.MobileNetV3Small, 224),
    "mobilenet_v3_large": BackboneSpec(apps.MobileNetV3Large, 224),
    # ConvNeXt normalises 0..255 pixels itself (include_preprocessing=True) with any weights.
    "convnext_tiny": BackboneSpec(apps.ConvNeXtTiny, 224),
    "convnext_small": BackboneSpec(apps.ConvNeXtSmall, 224),
    "convnext_base": BackboneSpec(apps.ConvNeXtBase, 224),
    # A KerasHub preset named by `hub_preset`; its weights and size come with it.
    HUB: BackboneSpec(None, None),
}
del apps


def load_weights_file(model, path, what="backbone", alternatives=None):
    """Loads a weights file into `model` with errors that say what to do.

    Args:
        model: the Keras model to fill.
        path: the weights file.
        what: how the error messages name the model (e.g. "EfficientNet-Lite").
        alternatives: what else the user may pass, for the not-found message.
    """
    if not os.path.isfile(path):
        alternatives = alternatives or (
            "pass weights=None to train from scratch or 'imagenet' to download "
            "Keras' ImageNet weights"
        )
        raise FileNotFoundError(f"{what} weights file {path} not found; {alternatives}")
    try:
        model.load_weights(path)
    except Exception as error:  # Keras raises several types for a mismatch.
        raise ValueError(
            f"{what} weights file {path} does not fit model {model.name!r} (a file saved "
            f"from another variant or architecture?): {error}"
        ) from error


def _keras_models_dir():
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")


def default_image_size(name, hub_preset=None):
    """The image size a backbone was pretrained at; for `hub`, its preset's (read from the preset)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if name == HUB:
        from hybridnet_tf.model.hub_backbones import preset_image_size

        return preset_image_size(hub_preset)
    return BACKBONES[name].default_size


def build_backbone(name, image_size, weights=None, hub_preset=None):
    """Builds a named backbone as a model from 0..255 pixels to its last feature map.

    Args:
        name: a key of `BACKBONES`.
        image_size: input height and width in pixels; None: the backbone's
            default (`default_image_size`).
        weights: None (random init), "imagenet" (Keras' own download, or the
            project's converted weights for EfficientNet-Lite), or a path to a
            weights file; for `hub`: "preset" (the preset's weights) or None.
        hub_preset: for `hub`: a KerasHub preset name, "hf://...",
            "kaggle://..." or a local preset directory.

    Returns:
        A `keras.Model` named "backbone" with output [B, h, w, C].

    Example:
        >>> build_backbone("small_cnn", 32).output.shape
        (None, 4, 4, 128)
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if name == HUB:
        from hybridnet_tf.model.hub_backbones import build_hub_backbone

        return build_hub_backbone(hub_preset, image_size, weights=weights)
    spec = BACKBONES[name]
    image_size = image_size or spec.default_size
    input_shape = (image_size, image_size, 3)
    if spec.constructor.__module__.startswith("keras"):
        if isinstance(weights, str) and weights != "imagenet" and spec.imagenet_file:
            weights = _as_keras_imagenet_file(weights, spec.imagenet_file)
        kwargs = {"include_top": False, "input_shape": input_shape, "pooling": None}
        if weights in (None, "imagenet"):
            core = spec.constructor(weights=weights, **kwargs)
        else:
            core = spec.constructor(weights=None, **kwargs)
            load_weights_file(core, weights)
    else:
        core = spec.constructor(input_shape, weights=weights)

    inputs = keras.Input(input_shape, name="image")
    x = inputs
    if spec.preprocessing == "scale_minus1_1":
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(x)
    features = core(x)
    return keras.Model(inputs, features, name="backbone")


def _as_keras_imagenet_file(path, imagenet_file):
    """Uses a local copy of Keras' own ImageNet file through `weights="imagenet"`.

    keras.applications adds EfficientNet's ImageNet input scaling only when
    `weights == "imagenet"` (TF-TRAPS.md, tensorflow/tensorflow#62193), so
    Keras' own file loaded by path would see wrongly scaled input. Placing
    it in Keras' cache keeps the real preprocessing and downloads nothing.
    Any other file is loaded into the plain architecture.
    """
    if os.path.basename(path) != imagenet_file:
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file {path} not found")
    cache_dir = _keras_models_dir()
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, imagenet_file)
    if not os.path.exists(cached) or os.path.getsize(cached) != os.path.getsize(path):
        shutil.copyfile(path, cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    return "imagenet"
