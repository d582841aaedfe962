"""Reads a JPEG's EXIF orientation tag in the graph and turns its pixels upright.

`tf.io.decode_image` and `decode_jpeg` ignore the tag (tensorflow#8430,
closed without a fix), and so do Keras' image loaders. Phones store a photo
taken in portrait as landscape pixels with orientation 6 or 8, so without
this a user's own photos train, evaluate and are served lying on their
side, while every photo viewer (and the camera that feeds the phone app)
shows them upright. Parsing in TF ops keeps one code path for training,
evaluation, prediction and the SavedModel's image-bytes signature.

Only a JPEG's APP1 "Exif" segment is read, where the EXIF standard puts it
(right after the start marker) or right after an APP0 (JFIF writers, PIL
among them); its orientation entry must be among IFD0's first 64 entries
and IFD0 within the first KiB (cameras put it at byte 8). A file with other
segments before APP1 (against the standard), a missing, damaged or
out-of-range tag, PNG and WebP read as 1: the pixels as stored.
"""

import tensorflow as tf

# APP1 is looked for at the start or behind an APP0, within the first 64 KiB
# (a segment holds at most 64 KiB).
_SEARCH_BYTES = 1 << 16
_TIFF_BYTES = 1 << 10
# IFD0 entries read; cameras write the orientation among the first dozen.
_MAX_ENTRIES = 64
_ORIENTATION_TAG = 0x0112
_SHORT = 3


def exif_orientation(encoded):
    """The EXIF orientation (1..8) of encoded image bytes; 1 when they carry none.

    Args:
        encoded: a scalar string tensor of encoded image bytes.

    Returns:
        A scalar int32 tensor. 1 is upright; 6 and 8 are the common phone
        portrait shots (turn 90° clockwise, counter-clockwise); see
        `apply_orientation`.
    """
    found, app1 = _exif_segment(encoded)
    head = tf.strings.join([tf.strings.substr(encoded, 0, _SEARCH_BYTES), b"\0" * (_TIFF_BYTES + 16)])
    return tf.where(found, _orientation_in_tiff(head, app1 + 10), 1)


def has_exif(encoded):
    """Whether encoded bytes are a JPEG with an EXIF segment where `exif_orientation` reads one.

    A dozen small ops, for deciding whether the parse is worth running.
    """
    return _exif_segment(encoded)[0]


def _exif_segment(encoded):
    """(found, offset of the APP1 "Exif" segment) of encoded bytes.

    Straight-line ops, no tf.cond: in a tf.data map every op costs a few
    microseconds, and so does control flow.
    """
    length = tf.strings.length(encoded)
    start = tf.strings.join([tf.strings.substr(encoded, 0, 6), b"\0" * 6])
    size = tf.cast(tf.io.decode_raw(tf.strings.substr(start, 4, 2), tf.uint8), tf.int32)
    # APP1 right after the start marker (the EXIF standard), or right after
    # an APP0 (JFIF writers, PIL among them, put theirs first).
    app1 = tf.where(tf.strings.substr(start, 2, 2) == b"\xff\xe0", 4 + size[0] * 256 + size[1], 2)
    app1 = tf.minimum(app1, tf.maximum(tf.minimum(length - 10, _SEARCH_BYTES - _TIFF_BYTES), 0))
    segment = tf.strings.join([tf.strings.substr(encoded, app1, 10), b"\0" * 10])
    found = (
        (tf.strings.substr(start, 0, 2) == b"\xff\xd8")
        & (tf.strings.substr(segment, 0, 2) == b"\xff\xe1")
        & (tf.strings.substr(segment, 4, 6) == b"Exif\0\0")
    )
    return found, app1


def _orientation_in_tiff(head, tiff_start):
    """The orientation tag of the TIFF structure at `tiff_start` in `head`, or 1.

    `head` must hold `_TIFF_BYTES` bytes from `tiff_start` (zero padding
    past the data reads as 0).
    """
    # TIFF keeps IFDs and their entries on even offsets, so 16-bit words read
    # at even offsets reach every field needed.
    tiff = tf.strings.substr(head, tiff_start, _TIFF_BYTES)
    little = tf.strings.substr(tiff, 0, 2) == b"II"
    big = tf.strings.substr(tiff, 0, 2) == b"MM"
    words = tf.cast(
        tf.where(
            little,
            tf.io.decode_raw(tiff, tf.uint16, little_endian=True),
            tf.io.decode_raw(tiff, tf.uint16, little_endian=False),
        ),
        tf.int32,
    )
    # IFD0's offset is 32 bits; offsets past what is read have a high word.
    ifd, high = tf.where(little, words[2], words[3]), tf.where(little, words[3], words[2])
    valid = (little | big) & tf.equal(words[1], 42) & tf.equal(high, 0) & (ifd >= 8) & (ifd % 2 == 0)
    at = tf.where(valid, ifd // 2, 0)
    count = tf.gather(words, tf.minimum(at, _TIFF_BYTES // 2 - 1))
    # An entry is 6 words: tag, type, count (2 words), value (2 words).
    entries = at + 1 + 6 * tf.range(_MAX_ENTRIES)
    fields = tf.gather(words, tf.minimum(entries[:, None] + [0, 1, 4], _TIFF_BYTES // 2 - 1))
    match = (
        (tf.range(_MAX_ENTRIES) < count)
        & tf.equal(fields[:, 0], _ORIENTATION_TAG)
        & tf.equal(fields[:, 1], _SHORT)
    )
    value = tf.gather(fields[:, 2], tf.argmax(tf.cast(match, tf.int32), output_type=tf.int32))
    ok = valid & tf.reduce_any(match) & (value >= 1) & (value <= 8)
    return tf.where(ok, value, 1)


def apply_orientation(image, orientation):
    """Turns `[H, W, C]` pixels stored with an EXIF `orientation` upright.

    The transforms are those of the EXIF standard (and of PIL's
    `ImageOps.exif_transpose`): 2 mirror, 3 rotate 180°, 4 flip, 5
    transpose, 6 rotate 90° clockwise, 7 transverse, 8 rotate 90°
    counter-clockwise. Orientations 5 to 8 swap height and width.

    Args:
        image: a `[H, W, C]` tensor.
        orientation: a scalar int tensor, 1..8 (anything else leaves the image).
    """
    transposed = lambda: tf.transpose(image, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,
        lambda: image,
        lambda: tf.reverse(image, [1]),
        lambda: tf.reverse(image, [0, 1]),
        lambda: tf.reverse(image, [0]),
        transposed,
        lambda: tf.reverse(transposed(), [1]),
        lambda: tf.reverse(transposed(), [0, 1]),
        lambda: tf.reverse(transposed(), [0]),
    ]
    orientation = tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)
    upright = tf.switch_case(tf.cast(orientation, tf.int32), branches)
    upright.set_shape([None, None, image.shape[-1]])
    return upright
