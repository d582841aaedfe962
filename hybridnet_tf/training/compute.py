"""What the training runs on: device detection, XLA and mixed-precision choices.

The settings `"auto"` resolve here, from the devices TensorFlow sees and the
`tf.distribute` strategy in use; the engines themselves are TensorFlow's and
Keras' own (`compile(jit_compile=...)`, `keras.mixed_precision`).
"""

import contextlib

import keras
import tensorflow as tf

JIT_CHOICES = ("auto", True, False)
PRECISION_CHOICES = ("auto", "float32", "mixed_float16", "mixed_bfloat16")

# mixed_float16 pays on Tensor Cores, which start at compute capability 7.0 (Volta).
TENSOR_CORE_CAPABILITY = (7, 0)


def gpu_compute_capabilities():
    """The `(major, minor)` compute capability of each visible GPU ([] without GPUs)."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def is_tpu_strategy(strategy):
    """True for `tf.distribute.TPUStrategy` (and its experimental variant)."""
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def resolve_jit_compile(setting, strategy=None):
    """Turns `train.jit_compile` into the bool passed to `Model.compile`.

    `"auto"` follows Keras' own rule: XLA where a GPU is present and training
    is not spread by `tf.distribute`; off on CPU, where XLA made
    EfficientNetB0 ~8x slower per step on 2 cores after a 76 s compile
    (TF-TRAPS.md). XLA for the heads alone loses on CPU too: the
    cached-feature phase of the coco128 recipe (GRU decoder + sigmoid
    head, batch 16) ran 0.37x as fast per step with `jit_compile=True`,
    after a compile 3x longer (docs/performance.md), so "auto" stays off
    on CPU for every phase. TPUs compile with XLA whatever this says.

    Args:
        setting: "auto", True or False.
        strategy: the `tf.distribute.Strategy` in use (None: the current one).

    Returns:
        A bool.
    """
    if setting not in JIT_CHOICES:
        raise ValueError(f"jit_compile must be one of {list(JIT_CHOICES)}, got {setting!r}")
    if setting != "auto":
        return bool(setting)
    strategy = strategy or tf.distribute.get_strategy()
    if is_tpu_strategy(strategy) or strategy.num_replicas_in_sync > 1:
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def resolve_mixed_precision(setting, strategy=None):
    """Turns `train.mixed_precision` into a Keras dtype policy name.

    `"auto"`: mixed_bfloat16 on TPUs, mixed_float16 when every GPU has
    Tensor Cores (compute capability >= 7.0), float32 otherwise (CPU, older
    GPUs).

    Args:
        setting: one of `PRECISION_CHOICES`.
        strategy: the `tf.distribute.Strategy` in use (None: the current one).

    Returns:
        "float32", "mixed_float16" or "mixed_bfloat16".
    """
    if setting not in PRECISION_CHOICES:
        raise ValueError(
            f"mixed_precision must be one of {list(PRECISION_CHOICES)}, got {setting!r}"
        )
    if setting != "auto":
        return setting
    if is_tpu_strategy(strategy or tf.distribute.get_strategy()):
        return "mixed_bfloat16"
    capabilities = gpu_compute_capabilities()
    if capabilities and min(capabilities) >= TENSOR_CORE_CAPABILITY:
        return "mixed_float16"
    return "float32"


@contextlib.contextmanager
def dtype_policy(name):
    """Sets Keras' global dtype policy inside the block and restores it after.

    Layers take the global policy when they are created, so build the model
    inside the block; Keras wraps the optimizer of a `mixed_float16` model
    in a `LossScaleOptimizer` when it is compiled.

    Example:
        >>> with dtype_policy("mixed_bfloat16"):
        ...     model = build_model(num_labels=4, image_size=32)
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def describe_devices():
    """One line naming the devices TensorFlow sees, for the training log."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "devices: CPU only (no GPU visible to TensorFlow)"
    capabilities = ", ".join(f"{major}.{minor}" for major, minor in gpu_compute_capabilities())
    return f"devices: {len(gpus)} GPU(s), compute capability {capabilities}"
