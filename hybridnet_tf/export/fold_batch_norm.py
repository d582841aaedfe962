"""An inference copy of a model with its BatchNormalization folded into the convolutions.

At inference a BatchNormalization after a convolution is a per-channel
affine map, `gamma * (x - mean) / sqrt(var + eps) + beta`, which the
convolution can absorb: its kernel times the scale, a bias of the shift.
Keras runs the normalization as four element-wise passes over the feature
map (subtract, multiply, multiply, add); folded, they are gone. The
profile of our SavedModel's batch inference put those passes at 20 % of the
op time (docs/performance.md). TFLite's converter folds them itself; TF
Serving and `tf.function` inference do not.

`fold_batch_norm(model)` clones the functional graph (Keras'
`clone_model`, nested models included), turns each conv that feeds only a
BatchNormalization into a conv with a bias, replaces that normalization by
a pass-through layer of the same name and copies every other weight. The
copy is for inference only: training it would train a different model
(no normalization any more).
"""

import logging

import keras
import numpy as np

logger = logging.getLogger(__name__)

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


@keras.saving.register_keras_serializable("hybridnet_tf")
class FoldedNormalization(keras.layers.Layer):
    """Where a BatchNormalization was before its conv absorbed it: passes its input on.

    Takes the normalization's call arguments (`training`, `mask`), which the
    cloned graph still passes.
    """

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def fold_batch_norm(model):
    """A copy of `model` for inference, each conv + BatchNormalization pair folded into one conv.

    Pairs that cannot be folded stay as they are: a conv with an activation
    of its own, a conv whose output has another reader, channels-first
    data, a normalization over another axis. Nothing is folded in a model
    that is not a Keras functional graph (then `model` itself comes back).

    Args:
        model: a built Keras functional model (e.g. from `build_model`).

    Returns:
        `(folded_model, count)`: the copy (same inputs, outputs and layer
        names) and the number of BatchNormalization layers folded.
    """
    if not _is_functional(model):
        return model, 0
    folds = {}  # id(conv) -> its BatchNormalization
    for functional in _functional_models(model):
        for layer in functional.layers:
            conv = _foldable_conv(layer)
            if conv is not None:
                folds[id(conv)] = layer
    if not folds:
        return model, 0
    folded_norms = {id(norm) for norm in folds.values()}

    def clone(layer):
        if id(layer) in folded_norms:
            return FoldedNormalization(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        if id(layer) in folds:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    _copy_weights(model, folded, folds)
    return folded, len(folds)


def _is_functional(layer):
    """A Keras functional graph (what `clone_model` rebuilds layer by layer)."""
    return isinstance(layer, keras.Model) and hasattr(layer, "_run_through_graph")


def _functional_models(model):
    """`model` and every functional model nested in it."""
    found = [model]
    for layer in model.layers:
        if _is_functional(layer):
            found += _functional_models(layer)
    return found


def _foldable_conv(layer):
    """The conv that `layer` (a BatchNormalization) can be folded into, or None."""
    if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
        return None
    parents = layer._inbound_nodes[0].parent_nodes
    if len(parents) != 1:
        return None
    conv = parents[0].operation
    if (
        not isinstance(conv, _CONVS)
        or len(conv._inbound_nodes) != 1
        or len(conv._outbound_nodes) != 1
        or conv.data_format != "channels_last"
        or conv.activation not in (None, keras.activations.linear)
        or layer.axis not in (-1, len(conv.output.shape) - 1)
    ):
        return None
    return conv


def _copy_weights(source, target, folds):
    """Copies `source`'s weights into its clone `target`, folding the normalizations of `folds`."""
    for layer in source.layers:
        if not layer.weights:
            continue  # (input layers get new names in a clone)
        twin = target.get_layer(layer.name)
        if _is_functional(layer):
            _copy_weights(layer, twin, folds)
        elif id(layer) in folds:
            twin.set_weights(_folded_weights(layer, folds[id(layer)]))
        elif isinstance(twin, FoldedNormalization):
            continue  # its conv holds its weights now
        else:
            twin.set_weights(layer.get_weights())


def _folded_weights(conv, norm):
    """The kernel and bias of `conv` with `norm` (inference mode) folded in."""
    gamma = norm.gamma.numpy() if norm.scale else 1.0
    beta = norm.beta.numpy() if norm.center else 0.0
    mean = norm.moving_mean.numpy()
    variance = norm.moving_variance.numpy()
    scale = (gamma / np.sqrt(variance + norm.epsilon)).astype(np.float64)
    kernel = conv.kernel.numpy().astype(np.float64)
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        # [kh, kw, in, multiplier]; output channel c * multiplier + m.
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * scale  # [kh, kw, in, out]
    bias = conv.bias.numpy().astype(np.float64) if conv.use_bias else 0.0
    bias = (bias - mean) * scale + beta
    dtype = conv.kernel.dtype
    return [kernel.astype(dtype), np.asarray(bias).astype(dtype)]
