"""A float32 copy of a model trained under mixed precision, for export.

A model trained under `mixed_float16` (the default on a modern GPU) keeps
its layers' float16 compute in `best.keras`; the TFLite converter and CPU
serving need float32. Its variables are float32 already, so the model is
rebuilt from its own config with every layer's dtype policy set to
float32 and the weights are copied over: the same numbers, float32 ops.
"""

import keras

_MIXED = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def _is_low_precision(policy):
    return getattr(policy, "compute_dtype", "float32") != "float32" or policy.name in _MIXED


def uses_mixed_precision(model):
    """True when any layer of `model` computes in float16 / bfloat16."""
    return any(_is_low_precision(layer.dtype_policy) for layer in model._flatten_layers())


def _float32_policies(config):
    """`config` with every serialized dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
            config.get("config"), dict
        ):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def float32_model(model):
    """`model` itself when it computes in float32, else a float32 rebuild with its weights.

    Args:
        model: a Keras model (e.g. loaded from a run's `best.keras`).

    Returns:
        A model with float32 layers and the same weights (variables of a
        mixed-precision model are float32, so they copy exactly).

    Example:
        >>> model = float32_model(keras.models.load_model("best.keras", safe_mode=True))
    """
    if not uses_mixed_precision(model):
        return model
    # Importing registers the custom layers before the config is deserialised.
    import hybridnet_tf.model.hybridnet  # noqa: F401

    from hybridnet_tf.training.compute import dtype_policy

    config = _float32_policies(keras.saving.serialize_keras_object(model))
    with dtype_policy("float32"):  # layers made without a serialized policy too
        rebuilt = keras.saving.deserialize_keras_object(config, safe_mode=True)
    rebuilt.set_weights(model.get_weights())
    if uses_mixed_precision(rebuilt):
        raise ValueError(f"could not rebuild model {model.name!r} in float32 for export")
    return rebuilt
