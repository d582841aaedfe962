"""Grad-CAM of a HybridNet's label scores on the backbone's last spatial feature map.

Grad-CAM (Selvaraju et al., ICCV 2017): the gradient of one label's score
with respect to the last convolutional map A [h, w, C], averaged over the
positions, weighs the channels; the map is ReLU(sum_c weight_c * A_c),
scaled to 0..1 per image and label. The gradient is taken with
`tf.GradientTape` through the model's own layers (shared weights).

Where the scores are the sigmoid head's (heads `bce`, and `hybrid` with
`score_mix` 1), the gradient is that of the label's logit, as the paper
takes the score before the softmax: a confident sigmoid rounds to 1.0 in
float32 and its gradient to exactly 0, which would leave an empty map.
Decoder scores are differentiated as they are.

Where the spatial map is depends on the backbone: inside a nested
`keras.applications` model that pools, or as the backbone's own output
when the image encoder pools. `SpatialSplit` walks `image_encoder` down to
the last 4-D tensor and checks, on a test image, that the pieces give the
model's scores.
"""

import keras
import numpy as np
import tensorflow as tf

from hybridnet_tf.model.hybridnet import IMAGE_ENCODER, SIGMOID_HEAD, build_head_model, layer_or_none


class NoSpatialMapError(ValueError):
    """The model has no 4-D feature map to explain."""


def _split(model):
    """`(to_spatial, tail)` of a functional model whose layers lead to a 4-D map.

    `to_spatial` maps the model's input to its last 4-D tensor; `tail` is
    the list of layers that map that tensor to the model's output, in order.
    Nested models are entered; the layers before one and after the map must
    form a chain (checked by the caller on real numbers).
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for index in reversed(range(len(layers))):
        layer = layers[index]
        if isinstance(layer, keras.Model):
            try:
                inner_to_spatial, inner_tail = _split(layer)
            except NoSpatialMapError:
                continue
            before = layers[:index]
            return _chain(before + [inner_to_spatial]), inner_tail + layers[index + 1:]
        # `layer.output` of a plain layer is its tensor in `model`'s own graph, so
        # this sub-model is valid even where `model` is a DAG (EfficientNet blocks).
        if len(layer.output.shape) == 4:
            return keras.Model(model.inputs, layer.output), layers[index + 1:]
    raise NoSpatialMapError(f"no 4-D feature map in model {model.name!r}")


def _chain(layers):
    def call(x, training=False):
        for layer in layers:
            x = layer(x, training=False)
        return x

    return call


class SpatialSplit:
    """A HybridNet cut at the backbone's last spatial map: image -> map -> scores.

    Args:
        model: an inference model from `build_model` (or its `.keras` file).

    Attributes:
        map_shape: `(h, w, C)` of the spatial map.

    Raises:
        NoSpatialMapError: when the image encoder has no 4-D map, or the
            pieces do not reproduce the model's scores (an unusual graph).
    """

    def __init__(self, model):
        self.model = model
        encoder = model.get_layer(IMAGE_ENCODER)
        self._to_spatial, tail = _split(encoder)
        self._tail = _chain(tail)  # map -> the pooled feature
        try:
            self._heads = build_head_model(model)
        except ValueError as error:
            # Models saved before the image encoder pooled the backbone's map
            # (its "pool" layer) have no heads model of their own.
            raise NoSpatialMapError(
                f"Grad-CAM needs the heads of model {model.name!r} on their own and they cannot be "
                f"separated ({error}); a run saved before the image encoder pooled the backbone's "
                "map has to be retrained for heat maps"
            ) from error
        # The heads read the pooled feature, or (attention decoder) the map itself.
        self._heads_read_map = len(self._heads.input.shape) == 4
        mix = layer_or_none(model, "score_mix")
        self._sigmoid_head = layer_or_none(model, SIGMOID_HEAD)
        if mix is not None and mix.sigmoid_weight != 1.0:
            self._sigmoid_head = None
        image_shape = tuple(int(d) for d in model.input.shape[1:])
        probe = tf.random.stateless_uniform((1, *image_shape), seed=(1, 2), maxval=255.0)
        spatial = self._to_spatial(probe)
        self.map_shape = tuple(int(d) for d in spatial.shape[1:])
        expected = np.asarray(model(probe, training=False)["scores"])
        got = np.asarray(self.target_and_scores(spatial)[1])
        # Loose enough for mixed precision; a wrong cut is off by far more.
        if not np.allclose(expected, got, atol=1e-3):
            raise NoSpatialMapError(
                f"cutting model {model.name!r} at its {self.map_shape} feature map changes its "
                f"scores (max difference {np.abs(expected - got).max():.3g}): its image encoder "
                "is not a chain of layers after the map; Grad-CAM cannot be computed for it"
            )

    def spatial_map(self, images):
        """The backbone's last spatial map [B, h, w, C] of 0..255 images [B, H, W, 3]."""
        return self._to_spatial(images)

    def target_and_scores(self, spatial):
        """`(target, scores)` [B, L] from the spatial map: what Grad-CAM differentiates, and the scores.

        The target is the sigmoid head's logits where the scores are its
        sigmoid, else the scores themselves.
        """
        if self._sigmoid_head is not None:
            logits = tf.cast(self._sigmoid_head(self._tail(spatial), training=False), tf.float32)
            return logits, tf.sigmoid(logits)
        head_input = spatial if self._heads_read_map else self._tail(spatial)
        scores = tf.cast(self._heads(head_input, training=False)["scores"], tf.float32)
        return scores, scores


def make_grad_cam(model):
    """A traced Grad-CAM function of `model`.

    Returns:
        `grad_cam(images, label_ids)`: images float32 [N, H, W, 3] (0..255),
        label_ids int32 [N] (one label per row; repeat an image to explain
        several labels) -> `(maps [N, h, w] float32 in 0..1, scores [N])`
        (the model's scores of those labels).
        A map is all zeros where no position raises the score.

    Example:
        >>> grad_cam = make_grad_cam(model)
        >>> maps, scores = grad_cam(tf.zeros((2, 64, 64, 3)), tf.constant([0, 3]))
    """
    split = SpatialSplit(model)

    @tf.function(reduce_retracing=True)
    def grad_cam(images, label_ids):
        with tf.GradientTape() as tape:
            spatial = tf.cast(split.spatial_map(images), tf.float32)
            tape.watch(spatial)
            target, scores = split.target_and_scores(spatial)
            # Rows are independent at inference (BatchNorm uses its moving
            # statistics), so one gradient of the summed chosen targets gives
            # every row the gradient of its own label.
            total = tf.reduce_sum(tf.gather(target, label_ids, batch_dims=1))
        chosen = tf.gather(scores, label_ids, batch_dims=1)
        gradients = tape.gradient(total, spatial)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        maps = tf.nn.relu(tf.reduce_sum(channel_weights * spatial, axis=-1))
        peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
        maps = tf.math.divide_no_nan(maps, peak)
        return maps, chosen

    grad_cam.split = split
    return grad_cam
