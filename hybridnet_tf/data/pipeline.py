"""The tf.data pipeline: (encoded image or path, multi-hot) -> batched model inputs.

Reading, decoding and resizing run in parallel (`AUTOTUNE`); training adds
shuffling, augmentation and the decoder's label sequences. Files that
cannot be decoded are dropped by `ignore_errors` instead of ending the
epoch; the file-level check in `image_check` finds and reports the usual
culprits before training starts.
"""

import tensorflow as tf

from hybridnet_tf.model.label_sequences import decoder_inputs_from_targets, make_label_sequence

AUTOTUNE = tf.data.AUTOTUNE
RESIZE_POLICIES = ("squash", "center_crop")


def decode_and_resize(encoded, image_size, resize="squash"):
    """Decodes JPEG/PNG/GIF/BMP bytes to a float32 [size, size, 3] image of 0..255 pixels.

    Grayscale and CMYK images come out as 3 channels.

    Args:
        encoded: a scalar string tensor of encoded image bytes.
        image_size: output height and width.
        resize: "squash" (resize to a square ignoring aspect, as ASL does) or
            "center_crop" (resize the shorter side, then crop the centre).
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    image = tf.cast(image, tf.float32)
    if resize == "squash":
        image = tf.image.resize(image, [image_size, image_size], antialias=True)
    elif resize == "center_crop":
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = image_size / tf.reduce_min(shape)
        new_shape = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        image = tf.image.resize(image, new_shape, antialias=True)
        image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    else:
        raise ValueError(f"unknown resize policy {resize!r}; choose one of {list(RESIZE_POLICIES)}")
    return tf.clip_by_value(image, 0.0, 255.0)


def make_dataset(
    source,
    image_size,
    batch_size,
    training=False,
    from_files=True,
    resize="squash",
    augment=None,
    shuffle_buffer=2048,
    cache=False,
    seed=None,
    deterministic=None,
):
    """Builds a batched `tf.data.Dataset` of `(image, multi_hot)`.

    Args:
        source: a dataset of `(path, multi_hot)` (`from_files=True`) or of
            `(encoded_bytes, multi_hot)` (`from_files=False`, e.g. TFDS).
        image_size: output height and width in pixels.
        batch_size: examples per batch.
        training: shuffle, augment and repeat-friendly ordering when True.
        resize: see `decode_and_resize`.
        augment: optional function `(images, multi_hot) -> (images, multi_hot)`
            applied per batch in training (e.g. Keras augmentation layers).
        shuffle_buffer: shuffle buffer size in training.
        cache: cache decoded images in memory (True) or in a file (a path).
        seed: shuffle seed.
        deterministic: keep element order with parallel maps (None: tf.data's default).

    Returns:
        A dataset of `(images [B, S, S, 3] float32 0..255, multi_hot [B, L] float32)`.
    """
    options = tf.data.Options()
    if deterministic is not None:
        options.deterministic = deterministic
    dataset = source.with_options(options)
    # Without a cache, shuffle the cheap (path, labels) pairs before decoding;
    # with one, shuffle after it, or every epoch would replay the first order.
    if training and not cache:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def load(item, labels):
        encoded = tf.io.read_file(item) if from_files else item
        return decode_and_resize(encoded, image_size, resize), labels

    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE)
    # A file that slipped past image_check must not end an epoch.
    dataset = dataset.ignore_errors(log_warning=True)
    if cache:
        dataset = dataset.cache("" if cache is True else str(cache))
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=False, num_parallel_calls=AUTOTUNE)
    if training and augment is not None:
        dataset = dataset.map(augment, num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)


def with_label_sequences(dataset, label_rank, max_length):
    """Maps `(images, multi_hot)` batches to teacher-forcing `(inputs, targets)`.

    Returns a dataset of `({"image", "decoder_inputs"}, targets)` where the
    targets come from `make_label_sequence` in the order given by `label_rank`.
    """
    label_rank = tf.constant(label_rank, tf.int32)
    num_labels = int(label_rank.shape[0])

    def to_sequences(images, multi_hot):
        targets = make_label_sequence(multi_hot, label_rank, max_length)
        inputs = {"image": images, "decoder_inputs": decoder_inputs_from_targets(targets, num_labels)}
        return inputs, targets

    return dataset.map(to_sequences, num_parallel_calls=AUTOTUNE)
