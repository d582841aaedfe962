"""EfficientNet-Lite0..4 as a Keras functional model.

EfficientNet-Lite is EfficientNet made friendly to mobile accelerators and
quantisation: no squeeze-excite, ReLU6 instead of swish, and a stem (32
filters) and head (1280 filters) that are not scaled with the width.

The architecture follows the PyTorch port `efficientnet_lite_pytorch`
(itself converted from the TensorFlow checkpoints), because its `.pth` files
are where the ImageNet weights come from (see `lite_weights.py`). Layer
names follow `keras.applications.EfficientNet*` (`stem_conv`,
`block3a_dwconv`, `top_conv`, ...): weights are converted by these names
and a trainer can unfreeze whole blocks with `block_names`.

The model takes pixels 0..255 (float) and normalises them itself, as
`(x - 127) / 128` (the "inception-style" mean/std of the TensorFlow Lite
training: MEAN_RGB = 127, STDDEV_RGB = 128 in `efficientnet_lite_builder.py`).
"""

import math
import os
import re
from dataclasses import dataclass

import keras

from hybridnet_tf.model.backbones import load_weights_file

# The TF Lite training's input normalisation (chosen there for better
# post-training quantisation); the converted weights expect it.
INPUT_MEAN = 127.0
INPUT_STD = 128.0

# TF's BatchNorm momentum 0.99 is PyTorch's momentum 0.01 in the port.
BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3
# Stochastic depth, scaled linearly from 0 (first block) to this (last).
DROP_CONNECT_RATE = 0.2
STEM_FILTERS = 32
TOP_FILTERS = 1280
WIDTH_DIVISOR = 8


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling coefficients of one EfficientNet-Lite variant.

    Args:
        width: multiplier of the block filters (stem and head stay fixed).
        depth: multiplier of the block repeats (first and last stage fixed).
        resolution: the image size the variant was trained at.
        dropout: dropout rate before the classifier.
    """

    width: float
    depth: float
    resolution: int
    dropout: float


# From efficientnet_lite_builder.py, identical in the PyTorch port.
VARIANTS = {
    "lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block (inverted residual, no squeeze-excite).

    Args:
        name: layer-name prefix, e.g. "block2a".
        kernel_size: depthwise kernel size.
        strides: depthwise stride.
        filters_in: input channels.
        filters_out: output channels.
        expand_ratio: expansion of `filters_in` before the depthwise conv.
    """

    name: str
    kernel_size: int
    strides: int
    filters_in: int
    filters_out: int
    expand_ratio: int

    @property
    def has_skip(self):
        return self.strides == 1 and self.filters_in == self.filters_out


# The B0/Lite0 stages: (kernel, repeats, filters_in, filters_out, expand, strides).
BASE_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)

_BLOCK_PREFIX = re.compile(r"^(block\d+[a-z]+)_")


def round_filters(filters, width):
    """Scales a filter count by `width`, rounded to a multiple of 8 as in TF.

    Args:
        filters: the Lite0 filter count.
        width: the variant's width coefficient.

    Returns:
        The scaled filter count (int); never more than 10% below `filters * width`.
    """
    scaled = filters * width
    rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += WIDTH_DIVISOR
    return int(rounded)


def block_specs(variant):
    """The MBConv blocks of a variant, in order.

    Lite keeps the repeats of the first and last stage fixed and feeds the
    first stage from the fixed 32-filter stem.

    Args:
        variant: a key of `VARIANTS`.

    Returns:
        A list of `BlockSpec`, e.g. 16 blocks "block1a".."block7a" for lite0.
    """
    coefficients = _variant(variant)
    specs = []
    last_stage = len(BASE_STAGES) - 1
    for stage, (kernel, repeats, filters_in, filters_out, expand, strides) in enumerate(BASE_STAGES):
        filters_in = STEM_FILTERS if stage == 0 else round_filters(filters_in, coefficients.width)
        filters_out = round_filters(filters_out, coefficients.width)
        if stage not in (0, last_stage):
            repeats = int(math.ceil(coefficients.depth * repeats))
        for index in range(repeats):
            specs.append(
                BlockSpec(
                    name=f"block{stage + 1}{chr(ord('a') + index)}",
                    kernel_size=kernel,
                    strides=strides if index == 0 else 1,
                    filters_in=filters_in if index == 0 else filters_out,
                    filters_out=filters_out,
                    expand_ratio=expand,
                )
            )
    return specs


def EfficientNetLite(
    variant="lite0",
    include_top=False,
    weights=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    name=None,
    classifier_activation=None,
):
    """Builds EfficientNet-Lite as a functional `keras.Model`.

    Args:
        variant: one of "lite0".."lite4".
        include_top: whether to add the pooling, dropout and `predictions`
            Dense layer of the ImageNet classifier.
        weights: None (random init), "imagenet" (the PyTorch port's ImageNet
            weights, converted and cached on first use: see
            `lite_weights.imagenet_weights_path`; lite0..lite2 only), or the
            path of a `.weights.h5` file saved from an `EfficientNetLite` of
            the same variant (a file with the classifier also loads into a
            model without it).
        input_shape: (height, width, 3); default (None, None, 3). The
            variant's training size is `VARIANTS[variant].resolution`.
        pooling: without top: None (4-D feature map), "avg" or "max"
            (2-D feature vector). Ignored with `include_top`.
        classes: number of classifier outputs with `include_top`; must be
            1000 with `weights="imagenet"`.
        name: model name; default "efficientnet_<variant>".
        classifier_activation: activation of `predictions`; None gives
            logits, like the PyTorch reference.

    Returns:
        A `keras.Model` from float pixels 0..255 (normalised inside as
        `(x - 127) / 128`) to features or class scores.

    Example:
        >>> model = EfficientNetLite("lite0", input_shape=(64, 64, 3), pooling="avg")
        >>> model.output.shape
        (None, 1280)
    """
    coefficients = _variant(variant)
    input_shape = _check_arguments(include_top, weights, input_shape, pooling, classes)
    model = _build(
        variant, coefficients, include_top, input_shape, pooling, classes, name, classifier_activation
    )

    if weights == "imagenet":
        # Imported here: lite_weights imports this module.
        from hybridnet_tf.model.lite_weights import imagenet_weights_path

        path = imagenet_weights_path(variant)
        if include_top:
            _load_weights_file(model, path)
        else:
            # The cached file holds the classifier: load it into a model with
            # one, then copy every layer that both models have, by name.
            full = _build(variant, coefficients, True, input_shape, None, 1000, None, None)
            _load_weights_file(full, path)
            copy_weights_by_layer_name(full, model)
    elif weights is not None:
        _load_weights_file(model, os.fspath(weights))
    return model


def block_names(model):
    """The MBConv block prefixes of an EfficientNet-Lite model, input to output.

    Every layer of a block is named "<prefix>_<part>" (e.g. "block6c_dwconv"),
    so a trainer can unfreeze the last K blocks (the stem layers are named
    "stem_*", the head "top_*", the classifier "predictions"). Models nested
    inside `model` (e.g. a backbone wrapped by `build_backbone`) are searched too.

    Args:
        model: a `keras.Model` built by `EfficientNetLite`, or one containing it.

    Returns:
        A list of prefixes, e.g. ["block1a", "block2a", ..., "block7a"].

    Example:
        >>> last_two = tuple(f"{n}_" for n in block_names(model)[-2:])
        >>> for layer in model.layers:
        ...     layer.trainable = layer.name.startswith(last_two + ("top_",))
    """
    names = []
    for layer in _flat_layers(model):
        match = _BLOCK_PREFIX.match(layer.name)
        if match and match.group(1) not in names:
            names.append(match.group(1))
    if not names:
        raise ValueError(
            f"model {model.name!r} has no EfficientNet-Lite blocks (layers named "
            "'block<stage><letter>_...'); pass a model built by EfficientNetLite"
        )
    return names


def copy_weights_by_layer_name(source, target):
    """Copies the weights of every layer of `target` from `source`'s layer of the same name.

    Args:
        source: the `keras.Model` to copy from; must have every weighted layer
            of `target` (it may have more, e.g. a classifier).
        target: the `keras.Model` to copy into.

    Returns:
        The names of the layers copied.
    """
    source_layers = {layer.name: layer for layer in source.layers}
    copied = []
    for layer in target.layers:
        if not layer.weights:
            continue
        if layer.name not in source_layers:
            raise ValueError(
                f"layer {layer.name!r} of model {target.name!r} is missing in model "
                f"{source.name!r}; build both with the same variant"
            )
        layer.set_weights(source_layers[layer.name].get_weights())
        copied.append(layer.name)
    return copied


def _variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _check_arguments(include_top, weights, input_shape, pooling, classes):
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(
            f"weights='imagenet' with include_top=True needs classes=1000, got {classes}; "
            "use include_top=False and add your own head"
        )
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    if input_shape is None:
        input_shape = (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3) (channels last), got {input_shape}")
    return input_shape


def _build(variant, coefficients, include_top, input_shape, pooling, classes, name, classifier_activation):
    inputs = keras.Input(input_shape, name="image")
    # (x - mean) / std as one affine layer, so exports see a single op.
    x = keras.layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalization")(inputs)

    # "same" padding is TF's SAME (extra row/column at the bottom/right),
    # which is what the port's Conv2dStaticSamePadding computes.
    x = keras.layers.Conv2D(
        STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
        kernel_initializer=_CONV_INITIALIZER, name="stem_conv",
    )(x)
    x = _batch_norm("stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_activation")(x)

    specs = block_specs(variant)
    for index, spec in enumerate(specs):
        x = _mbconv_block(x, spec, DROP_CONNECT_RATE * index / len(specs))

    x = keras.layers.Conv2D(
        TOP_FILTERS, 1, padding="same", use_bias=False,
        kernel_initializer=_CONV_INITIALIZER, name="top_conv",
    )(x)
    x = _batch_norm("top_bn")(x)
    x = keras.layers.ReLU(6.0, name="top_activation")(x)

    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if coefficients.dropout > 0:
            x = keras.layers.Dropout(coefficients.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(
            classes, activation=classifier_activation,
            kernel_initializer=_DENSE_INITIALIZER, name="predictions",
        )(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.Model(inputs, x, name=name or f"efficientnet_{variant}")


def _mbconv_block(inputs, spec, drop_rate):
    prefix = spec.name
    filters = spec.filters_in * spec.expand_ratio
    x = inputs
    if spec.expand_ratio != 1:
        x = keras.layers.Conv2D(
            filters, 1, padding="same", use_bias=False,
            kernel_initializer=_CONV_INITIALIZER, name=f"{prefix}_expand_conv",
        )(x)
        x = _batch_norm(f"{prefix}_expand_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{prefix}_expand_activation")(x)

    x = keras.layers.DepthwiseConv2D(
        spec.kernel_size, strides=spec.strides, padding="same", use_bias=False,
        depthwise_initializer=_CONV_INITIALIZER, name=f"{prefix}_dwconv",
    )(x)
    x = _batch_norm(f"{prefix}_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{prefix}_activation")(x)

    x = keras.layers.Conv2D(
        spec.filters_out, 1, padding="same", use_bias=False,
        kernel_initializer=_CONV_INITIALIZER, name=f"{prefix}_project_conv",
    )(x)
    x = _batch_norm(f"{prefix}_project_bn")(x)

    if spec.has_skip:
        if drop_rate > 0:
            # Drops the whole residual branch per example (stochastic depth).
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop")(x)
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def _batch_norm(name):
    return keras.layers.BatchNormalization(
        axis=-1, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, name=name
    )


# As keras.applications.EfficientNet: He-style fan-out init for convs.
# Configs, not instances: each layer then gets its own initializer.
_CONV_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}
_DENSE_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"},
}


def _flat_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def _load_weights_file(model, path):
    if os.path.isfile(path) and not path.endswith(".weights.h5"):
        raise ValueError(
            f"EfficientNet-Lite weights file {path} must be a Keras '.weights.h5' file "
            "(saved with model.save_weights)"
        )
    load_weights_file(
        model,
        path,
        what="EfficientNet-Lite",
        alternatives="pass weights=None for random init, 'imagenet' for the converted "
        "ImageNet weights, or an existing .weights.h5 path",
    )
