"""The tf.data pipeline: (encoded image or path, multi-hot) -> batched model inputs.

Reading, decoding and resizing run in parallel (`AUTOTUNE`); training adds
shuffling and augmentation. The decoder's label sequences are made from
the multi-hot labels by the model's own `with_training_targets`.

Broken files never end an epoch. `image_check` finds the usual culprits
before training starts; whatever still reaches the pipeline is checked again
in the graph (empty, no JPEG/PNG/GIF/BMP/WebP/JPEG XL signature, a JPEG
without any FFD9 end marker, a PNG without IEND), skipped and counted by a
`SkippedImages`, which logs one warning per pass over the data with the
count and a few file names. Damage in the middle of a file only shows when
decoding fails; such elements are dropped by `ignore_errors`, the last safety
net, which logs them but cannot count them.
"""

import logging
import os
import threading

import tensorflow as tf

from hybridnet_tf.data.exif_orientation import apply_orientation, exif_orientation, has_exif

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# "random_resized_crop" is a training policy; evaluation and export use its
# counterpart "squash" (the whole image, as the crops are squashed too).
RESIZE_POLICIES = ("squash", "center_crop", "random_resized_crop")
# Milder than Inception's (0.08, 1): a crop that loses most of the image also
# loses objects whose labels it keeps.
CROP_AREA_RANGE = (0.5, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

# Why an encoded image is skipped, indexed by `image_problem`'s code.
IMAGE_PROBLEMS = (
    "",
    "empty file (0 bytes)",
    "truncated JPEG: no end-of-image marker (FFD9)",
    "truncated PNG: no IEND chunk in its last 16 bytes",
    "not a JPEG, PNG, GIF or BMP image",
)
# The same signatures and tail length as `image_check`.
_HEAD_BYTES = 8
_TAIL_BYTES = 16


def eval_resize_policy(resize):
    """The policy to use outside training for a configured `resize` policy."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {resize!r}; choose one of {list(RESIZE_POLICIES)}")
    return "squash" if resize == "random_resized_crop" else resize


def _contains(data, pattern):
    """Whether the uint8 vector `data` holds the byte string `pattern`."""
    span = int(data.shape[0]) - len(pattern) + 1
    found = tf.ones([span], tf.bool)
    for offset, byte in enumerate(pattern):
        found &= tf.equal(data[offset : offset + span], byte)
    return tf.reduce_any(found)


def _starts_with(head, pattern):
    return tf.reduce_all(tf.equal(head[: len(pattern)], list(pattern)))


def image_problem(encoded):
    """Checks encoded bytes in the graph without decoding them.

    Reads only the first 8 and the last 16 bytes, with the rules of
    `image_check.find_unreadable_images`.

    Args:
        encoded: a scalar string tensor.

    Returns:
        A scalar int32: 0 when the bytes look like a whole image, else an
        index into `IMAGE_PROBLEMS`.
    """
    length = tf.strings.length(encoded)
    # Zero padding gives fixed-size head and tail vectors even for tiny files.
    head = tf.strings.substr(tf.strings.join([encoded, b"\0" * _HEAD_BYTES]), 0, _HEAD_BYTES)
    padded = tf.strings.join([b"\0" * _TAIL_BYTES, encoded])
    tail = tf.strings.substr(padded, length, _TAIL_BYTES)
    head = tf.reshape(tf.io.decode_raw(head, tf.uint8), [_HEAD_BYTES])
    tail = tf.reshape(tf.io.decode_raw(tail, tf.uint8), [_TAIL_BYTES])

    is_jpeg = _starts_with(head, _JPEG_SIGNATURE)
    is_png = _starts_with(head, b"\x89PNG\r\n\x1a\n")
    is_other = (
        _starts_with(head, b"GIF87a") | _starts_with(head, b"GIF89a") | _starts_with(head, b"BM")
        | _starts_with(head, b"RIFF")  # WebP (RIFF....WEBP; the 8 head bytes end before WEBP)
        | _starts_with(head, b"\xff\x0a") | _starts_with(head, b"\0\0\0\x0cJXL ")  # JPEG XL
    )
    code = tf.where(is_other, 0, 4)
    code = tf.where(is_png, tf.where(_contains(tail, b"IEND"), 0, 3), code)
    # TF decodes a JPEG with any number of bytes after its end marker: look
    # for the marker in the whole file when the tail lacks it (rare, O(size)).
    jpeg_end = tf.cond(
        _contains(tail, b"\xff\xd9"),
        lambda: tf.constant(True),
        lambda: tf.size(tf.strings.split(encoded, sep=b"\xff\xd9")) > 1,
    )
    code = tf.where(is_jpeg, tf.where(jpeg_end, 0, 2), code)
    return tf.where(length == 0, 1, code)


def decode_rgb(encoded, min_side=None):
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, 3], upright.

    Grayscale and CMYK come out as RGB; a JPEG's EXIF orientation is applied
    (TF's decoders ignore it), so a phone's portrait photo stands up.

    Args:
        encoded: a scalar string tensor of encoded image bytes.
        min_side: None decodes every pixel. A number lets a large JPEG decode
            at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, much cheaper
            than decoding every pixel and resizing them) as long as its
            shorter side keeps at least `min_side` pixels.
    """
    index = tf.constant(0)
    if min_side is not None:
        is_jpeg = _is_jpeg(encoded)
        # A stand-in header for other formats keeps the shape read free of
        # control flow, which costs more than the read in a tf.data map.
        shape = tf.image.extract_jpeg_shape(tf.where(is_jpeg, encoded, _ONE_PIXEL_JPEG_HEADER))
        index = tf.where(is_jpeg, _jpeg_ratio_index(tf.reduce_min(shape[:2]), min_side), 0)

    def as_stored():
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    def turned_or_reduced():
        branches = [as_stored] + [
            (lambda r=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=r)) for ratio in _JPEG_RATIOS[1:]
        ]
        image = tf.switch_case(index, branches)
        image.set_shape([None, None, 3])
        return apply_orientation(image, exif_orientation(encoded))

    # One cond, on a dozen cheap ops: the photos of a data set like COCO (no
    # EXIF, 640 px) take the plain decode. The ops of the branch not taken
    # still cost some in a tf.data map: about 1.2x a plain decode's CPU there.
    image = tf.cond((index > 0) | has_exif(encoded), turned_or_reduced, as_stored)
    image.set_shape([None, None, 3])
    return image


def _is_jpeg(encoded):
    """Whether encoded bytes start with the JPEG signature (a scalar bool tensor)."""
    return tf.strings.substr(encoded, 0, 3) == _JPEG_SIGNATURE


# libjpeg's DCT scaling factors that decode_jpeg's `ratio` accepts.
_JPEG_RATIOS = (1, 2, 4, 8)
# The smallest header extract_jpeg_shape reads: start, a 1x1 frame, a scan, end.
_ONE_PIXEL_JPEG_HEADER = (
    b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x01\x00\x01\x03\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00\xff\xd9"
)


def _jpeg_ratio_index(shorter, min_side):
    """Index into `_JPEG_RATIOS` of the largest ratio that keeps `shorter` pixels >= `min_side`."""
    # libjpeg rounds a scaled side up: ceil(side / ratio).
    fits = [(shorter + ratio - 1) // ratio >= min_side for ratio in _JPEG_RATIOS[1:]]
    return tf.reduce_sum(tf.cast(tf.stack(fits), tf.int32))  # the fits are nested: 1/2 before 1/4


def resize_image(image, image_size, resize="squash"):
    """Resizes a [H, W, 3] image to float32 [size, size, 3] in 0..255.

    Args:
        image: uint8 or float 0..255 pixels.
        image_size: output height and width.
        resize: "squash" (resize to a square ignoring aspect, as ASL does),
            "center_crop" (resize the shorter side, then crop the centre) or
            "random_resized_crop" (here: its evaluation counterpart, squash).
    """
    resize = eval_resize_policy(resize)
    image = tf.cast(image, tf.float32)
    if resize == "squash":
        image = tf.image.resize(image, [image_size, image_size], antialias=True)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = image_size / tf.reduce_min(shape)
        new_shape = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        image = tf.image.resize(image, new_shape, antialias=True)
        image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    return tf.clip_by_value(image, 0.0, 255.0)


def decode_and_resize(encoded, image_size, resize="squash"):
    """Decodes JPEG/PNG/GIF/BMP bytes to a float32 [size, size, 3] image of 0..255 pixels.

    Grayscale and CMYK images come out as 3 channels, upright by the EXIF
    orientation. A JPEG with a shorter side of 4x `image_size` or more is
    decoded at a reduced scale that keeps at least 2x (`decode_rgb`'s
    `min_side`): a 12-megapixel phone photo at 224 px decodes at 1/4 scale;
    COCO's 640 px photos decode whole. This is the evaluation,
    prediction and export path: it draws no random numbers.

    Args:
        encoded: a scalar string tensor of encoded image bytes.
        image_size: output height and width.
        resize: see `resize_image`.
    """
    return resize_image(decode_rgb(encoded, min_side=2 * image_size), image_size, resize)


def decode_random_resized_crop(
    encoded,
    image_size,
    seed,
    area_range=CROP_AREA_RANGE,
    aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
):
    """Decodes a random crop of an image and squashes it to [size, size, 3] float32 0..255.

    The crop covers `area_range` of the image with an aspect ratio in
    `aspect_ratio_range` (the whole image when no such crop is found).
    JPEGs decode only the crop window, unless the crop's shorter side is 4x
    `image_size` or more: then it is cut from the JPEG decoded at the
    reduced scale `decode_and_resize` would use for it.

    Args:
        encoded: a scalar string tensor of encoded image bytes.
        image_size: output height and width.
        seed: shape [2] int tensor; the same seed gives the same crop.
        area_range: (min, max) fraction of the image area kept.
        aspect_ratio_range: (min, max) width / height of the crop.
    """

    def window_of(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=aspect_ratio_range,
            area_range=area_range,
            max_attempts=10,
        )
        return begin, size

    def crop_jpeg():
        # The window is drawn on the stored pixels and the crop turned upright
        # after: the crop's area and aspect ranges are the same either way up.
        begin, size = window_of(tf.image.extract_jpeg_shape(encoded))
        window = tf.stack([begin[0], begin[1], size[0], size[1]])

        def whole_scale():
            return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

        def reduced(ratio):
            # As `decode_and_resize`: a crop of a large photo is cut from the
            # photo decoded at reduced scale, which costs less than decoding
            # the crop's every pixel.
            image = tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)
            # The window's edges rounded to the nearest scaled pixel.
            start = (begin[:2] + ratio // 2) // ratio
            end = (begin[:2] + size[:2] + ratio // 2) // ratio
            start = tf.minimum(start, tf.shape(image)[:2] - 1)
            extent = tf.clip_by_value(end - start, 1, tf.shape(image)[:2] - start)
            return tf.slice(image, tf.concat([start, [0]], 0), tf.concat([extent, [3]], 0))

        index = _jpeg_ratio_index(tf.reduce_min(size[:2]), 2 * image_size)
        branches = [whole_scale] + [(lambda r=ratio: reduced(r)) for ratio in _JPEG_RATIOS[1:]]
        image = tf.switch_case(index, branches)
        image.set_shape([None, None, 3])
        return apply_orientation(image, exif_orientation(encoded))

    def crop_other():
        image = decode_rgb(encoded)
        begin, size = window_of(tf.shape(image))
        return tf.slice(image, begin, size)

    image = tf.cond(_is_jpeg(encoded), crop_jpeg, crop_other)
    image.set_shape([None, None, 3])
    return resize_image(image, image_size, "squash")


class SkippedImages:
    """Counts the images a pipeline skipped, with a warning after every pass over the data.

    `make_dataset` makes one when none is passed; pass your own to read the
    counts.

    Args:
        name: what the warning calls the data, e.g. "train".
        max_named: how many file names a warning shows.

    Example:
        >>> skipped = SkippedImages("train")
        >>> for batch in make_dataset(source, 64, 32, skipped=skipped): ...
        >>> skipped.total, skipped.last_pass
        (1, [('/data/cut.jpg', 'truncated JPEG: ...')])
    """

    def __init__(self, name="data", max_named=5):
        self.name = name
        self.max_named = max_named
        self.total = 0
        self.passes = 0
        self.last_pass = []
        self._current = []
        self._lock = threading.Lock()

    def record(self, name, problem):
        """Notes one skipped image (called from the graph through `tf.py_function`)."""
        name = name.numpy().decode("utf-8", "replace") if hasattr(name, "numpy") else str(name)
        problem = int(problem)
        with self._lock:
            self._current.append((name, IMAGE_PROBLEMS[problem]))
        return False

    def end_pass(self):
        """Closes a pass over the data; warns when it skipped images."""
        with self._lock:
            skipped, self._current = self._current, []
            self.last_pass = skipped
            self.total += len(skipped)
            self.passes += 1
        if skipped:
            examples = "; ".join(f"{name} ({why})" for name, why in skipped[: self.max_named])
            logger.warning(
                "%s: skipped %d undecodable image(s) in pass %d over the data, e.g. %s",
                self.name, len(skipped), self.passes, examples,
            )
        return False


def _load_checked(encoded, name, skipped, decode, image_size):
    """`decode(encoded)` when the bytes look whole, else zeros and a record in `skipped`."""
    problem = image_problem(encoded)

    def good():
        return decode(encoded), tf.constant(True)

    def bad():
        keep = tf.py_function(skipped.record, [name, problem], tf.bool)
        keep.set_shape([])
        return tf.zeros([image_size, image_size, 3]), keep

    return tf.cond(tf.equal(problem, 0), good, bad)


def _end_of_pass(skipped, element_spec):
    """An empty dataset that tells `skipped` a pass is over when iteration reaches it."""

    def placeholder(spec):
        return tf.zeros([d if d is not None else 0 for d in spec.shape], spec.dtype)

    hook = tf.data.Dataset.from_tensors(0).map(lambda _: tf.py_function(skipped.end_pass, [], tf.bool))
    hook = hook.filter(lambda keep: keep)
    return hook.map(lambda _: tf.nest.map_structure(placeholder, element_spec))


CACHE_MODES = ("memory", "none")
# Elements in the shuffle buffers that hold image data (encoded TFDS bytes,
# decoded images after a cache); lists of files are shuffled whole.
DEFAULT_SHUFFLE_BUFFER = 2048


def cache_setting(cache):
    """Normalises a cache setting to None (no cache), "" (memory) or a file path prefix.

    Args:
        cache: "memory", "none", a file path prefix (tf.data writes
            `<path>.index` and `<path>.data-*` files), or, as older configs
            say, True (memory), False or None (none).
    """
    if cache is None or cache is False or cache == "none":
        return None
    if cache is True or cache == "memory":
        return ""
    if not isinstance(cache, str) or not cache.strip():
        raise ValueError(f"data.cache must be 'memory', 'none' or a file path, got {cache!r}")
    folder = os.path.dirname(os.path.abspath(cache))
    if not os.path.isdir(folder):
        raise ValueError(
            f"data.cache={cache!r}: folder {folder} does not exist; create it or choose "
            "'memory' or 'none'"
        )
    return cache


def make_dataset(
    source,
    image_size,
    batch_size,
    training=False,
    from_files=True,
    resize="squash",
    augment=None,
    shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
    cache=None,
    seed=None,
    deterministic=None,
    skipped=None,
    with_names=False,
):
    """Builds a batched `tf.data.Dataset` of `(image, multi_hot)`.

    Args:
        source: a dataset of `(path, multi_hot)` (`from_files=True`) or of
            `(encoded_bytes, multi_hot)` (`from_files=False`, e.g. TFDS).
        image_size: output height and width in pixels.
        batch_size: examples per batch.
        training: shuffle, augment and draw random crops when True.
        resize: "squash", "center_crop" or "random_resized_crop" (random
            crops in training, squash otherwise); see `resize_image`.
        augment: optional function `(images, multi_hot) -> (images, multi_hot)`
            applied per batch in training (e.g. `augment.build_augmentation`).
        shuffle_buffer: in training, the size of the shuffle buffers that hold
            image data: encoded bytes (`from_files=False`) and decoded images
            after a cache. A list of files of known length is shuffled whole
            every epoch instead (only paths and labels are buffered), so a
            source sorted by label or id is mixed.
        cache: "memory", "none" or a file path prefix (see `cache_setting`;
            True / False mean memory / none). Decoded images are cached as
            uint8 after the resize (rounded to whole pixel values), except
            with random crops, which must be redrawn each epoch: then the
            encoded bytes are.
        seed: seed of the shuffles and of the random crops.
        deterministic: True gives the same batches for the same seeds on
            every fresh dataset (ordered parallel maps, augmentation run batch
            after batch; needs a seed in training); False lets parallel maps
            return elements out of order; None keeps tf.data's default.
        skipped: a `SkippedImages` that counts undecodable images; by default
            a new one that only logs.
        with_names: also give each image's file name (`<in-memory image>`
            for encoded bytes), so evaluation can tell which images it
            scored; not in training.

    Returns:
        A dataset of `(images [B, S, S, 3] float32 0..255, multi_hot [B, L] float32)`,
        with `names [B]` string as a third element when `with_names`.
    """
    if with_names and training:
        raise ValueError("with_names=True is for evaluation data (training=False)")
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {resize!r}; choose one of {list(RESIZE_POLICIES)}")
    cache = cache_setting(cache)
    random_crop = training and resize == "random_resized_crop"
    if deterministic and training and seed is None:
        raise ValueError("deterministic=True in training needs a seed, e.g. seed=0")
    if skipped is None:
        skipped = SkippedImages("train" if training else "eval")
    options = tf.data.Options()
    if deterministic is not None:
        options.deterministic = deterministic
    dataset = source.with_options(options)
    # The second shuffle (after a cache) gets its own seed.
    cached_seed = None if seed is None else seed + 1

    def read(item):
        return tf.io.read_file(item) if from_files else item

    def name_of(item):
        return item if from_files else tf.constant("<in-memory image>")

    if training:
        # Shuffle the cheap (path or bytes, labels) pairs before decoding: a
        # file list whole, a stream of encoded images through a buffer. With
        # a cache this runs once, and the cached order is shuffled again below.
        size = int(dataset.cardinality())
        whole = from_files and size > 0
        dataset = dataset.shuffle(size if whole else shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    if random_crop:
        # Cache the encoded bytes and draw fresh crops after the cache; each
        # element gets its own seed from a stream that changes every epoch.
        if cache is not None:
            dataset = dataset.map(
                lambda item, labels: (read(item), labels, name_of(item)), num_parallel_calls=AUTOTUNE
            )
            dataset = dataset.cache(cache)
            dataset = dataset.shuffle(shuffle_buffer, seed=cached_seed, reshuffle_each_iteration=True)
        else:
            dataset = dataset.map(lambda item, labels: (item, labels, name_of(item)))
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, seeds))

        def load(element, element_seed):
            item, labels, name = element
            encoded = item if cache is not None else read(item)
            crop_seed = tf.stack([element_seed, tf.constant(0, tf.int64)])
            decode = lambda e: decode_random_resized_crop(e, image_size, crop_seed)  # noqa: E731
            image, keep = _load_checked(encoded, name, skipped, decode, image_size)
            return image, labels, keep

    else:
        policy = eval_resize_policy(resize)

        def load(item, labels):
            decode = lambda e: decode_and_resize(e, image_size, policy)  # noqa: E731
            image, keep = _load_checked(read(item), name_of(item), skipped, decode, image_size)
            return (image, labels, keep, name_of(item)) if with_names else (image, labels, keep)

    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE)
    # Damage in the middle of a file that passed the checks must not end an
    # epoch (evaluation finds such images by name: `with_names`).
    dataset = dataset.ignore_errors(log_warning=True)
    dataset = dataset.filter(lambda image, labels, keep, *name: keep)
    cache_decoded = cache is not None and not random_crop
    if cache_decoded:
        # uint8 is a quarter of float32: 224 px COCO train takes 18 GB, not 71 GB.
        dataset = dataset.map(
            lambda image, labels, keep, *name: (tf.cast(tf.round(image), tf.uint8), labels, *name)
        )
    else:
        dataset = dataset.map(lambda image, labels, keep, *name: (image, labels, *name))
    dataset = dataset.concatenate(_end_of_pass(skipped, dataset.element_spec))
    if cache_decoded:
        dataset = dataset.cache(cache)
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=cached_seed, reshuffle_each_iteration=True)
        dataset = dataset.map(lambda image, labels, *name: (tf.cast(image, tf.float32), labels, *name))
    dataset = dataset.batch(batch_size, drop_remainder=False, num_parallel_calls=AUTOTUNE)
    if training and augment is not None:
        # Keras' random layers advance a seed state per call: in deterministic
        # mode the batches must reach them in order.
        dataset = dataset.map(augment, num_parallel_calls=None if deterministic else AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)
