"""EXIF orientation: read in the graph, applied as PIL applies it, on every decoding path."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from hybridnet_tf.data.exif_orientation import apply_orientation, exif_orientation
from hybridnet_tf.data.pipeline import decode_and_resize, decode_random_resized_crop, decode_rgb

# PIL's own table (ImageOps.exif_transpose): the oracle the graph's transforms must match.
PIL_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _pixels(height=24, width=40, seed=0):
    """Blocky random pixels: no symmetry, and JPEG keeps the blocks' colours."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), np.uint8))


def _jpeg_with_pil_exif(pixels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _app1(orientation, big_endian, extra_entries=0):
    """An APP1 Exif segment written by hand, with `extra_entries` other tags before orientation."""
    order = "big" if big_endian else "little"

    def u16(v):
        return v.to_bytes(2, order)

    def u32(v):
        return v.to_bytes(4, order)

    entries = b"".join(u16(0x010F + i) + u16(2) + u32(4) + b"abc\0" for i in range(extra_entries))
    entries += u16(0x0112) + u16(3) + u32(1) + u16(orientation) + b"\0\0"
    tiff = (b"MM\0*" if big_endian else b"II*\0") + u32(8) + u16(extra_entries + 1) + entries + u32(0)
    body = b"Exif\0\0" + tiff
    return b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body


def _jpeg_with_app1(pixels, app1, after_jfif=True):
    """A JPEG whose APP1 comes right after the start marker, or after PIL's JFIF APP0."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    plain = buffer.getvalue()
    if after_jfif:
        app0_end = 4 + int.from_bytes(plain[4:6], "big")
        return plain[:app0_end] + app1 + plain[app0_end:]
    return plain[:2] + app1 + plain[2:]


def _stored(encoded):
    """The pixels as stored, ignoring the tag (what TF's decoder gives)."""
    return tf.io.decode_jpeg(encoded, channels=3).numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_is_read_and_turned_as_pil_turns_it(orientation):
    encoded = _jpeg_with_pil_exif(_pixels(), orientation)
    assert int(exif_orientation(tf.constant(encoded))) == orientation
    stored = _stored(encoded)
    expected = stored if orientation == 1 else np.asarray(Image.fromarray(stored).transpose(PIL_TRANSPOSE[orientation]))
    np.testing.assert_array_equal(decode_rgb(tf.constant(encoded)).numpy(), expected)
    # PIL reading the file itself agrees up to the two JPEG decoders' rounding.
    with Image.open(io.BytesIO(encoded)) as opened:
        by_pil = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"), np.float32)
    assert by_pil.shape == expected.shape
    assert np.abs(by_pil - expected).mean() < 2.0


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("after_jfif", [False, True])
def test_tag_is_found_in_either_byte_order_and_behind_other_tags(big_endian, after_jfif):
    app1 = _app1(6, big_endian, extra_entries=5)
    encoded = _jpeg_with_app1(_pixels(), app1, after_jfif)
    assert int(exif_orientation(tf.constant(encoded))) == 6
    assert decode_rgb(tf.constant(encoded)).shape == (40, 24, 3)


def test_tag_is_found_behind_an_app0_of_any_length():
    app0 = b"\xff\xe0" + (2 + 40).to_bytes(2, "big") + b"JFXX\0" + bytes(35)
    encoded = _jpeg_with_app1(_pixels(), app0 + _app1(8, True), after_jfif=False)
    assert int(exif_orientation(tf.constant(encoded))) == 8


@pytest.mark.parametrize("after_jfif", [False, True])
def test_exif_behind_other_segments_is_not_read(after_jfif):
    # Against the standard (APP1 first): such files keep their stored pixels, as documented.
    icc = b"\xff\xe2" + (2 + 300).to_bytes(2, "big") + b"ICC_PROFILE\0" + bytes(288)
    encoded = _jpeg_with_app1(_pixels(), icc + _app1(8, True), after_jfif)
    assert int(exif_orientation(tf.constant(encoded))) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _jpeg_with_app1(p, b""),  # no EXIF at all
        lambda p: _jpeg_with_app1(p, _app1(9, False)),  # out of range
        lambda p: _jpeg_with_app1(p, _app1(0, True)),
        lambda p: _jpeg_with_app1(p, _app1(6, False)[:20]),  # segment cut short
        lambda p: _jpeg_with_app1(p, _app1(6, False).replace(b"II*\0", b"XX*\0")),  # no byte order
        lambda p: _jpeg_with_app1(p, b"\xff\xfe\0\x0cExif\0\0abcd"),  # "Exif" in a comment, not APP1
        lambda p: tf.io.encode_png(p).numpy(),
        lambda p: b"",
    ],
)
def test_missing_or_damaged_tags_leave_the_pixels_as_stored(make):
    encoded = make(_pixels())
    assert int(exif_orientation(tf.constant(encoded))) == 1


def test_a_tag_beyond_the_first_64_entries_is_not_read():
    # The cap is what keeps the search a fixed-size gather; cameras write few tags.
    encoded = _jpeg_with_app1(_pixels(), _app1(6, False, extra_entries=70))
    assert int(exif_orientation(tf.constant(encoded))) == 1


def test_resized_and_cropped_inputs_come_out_upright():
    pixels = _pixels(32, 64)
    upright = _jpeg_with_pil_exif(pixels, 1)
    # Stored lying on its side, tagged to be turned 90 degrees clockwise: the same photo.
    lying = _jpeg_with_pil_exif(np.ascontiguousarray(np.rot90(pixels, 1)), 6)
    for encoded in (upright, lying):
        assert decode_rgb(tf.constant(encoded)).shape == (32, 64, 3)
    a = decode_and_resize(tf.constant(upright), 16, "center_crop").numpy()
    b = decode_and_resize(tf.constant(lying), 16, "center_crop").numpy()
    assert np.abs(a - b).mean() < 4.0
    whole = dict(area_range=(1.0, 1.0), aspect_ratio_range=(0.5, 2.0))
    a = decode_random_resized_crop(tf.constant(upright), 16, tf.constant([1, 0]), **whole).numpy()
    b = decode_random_resized_crop(tf.constant(lying), 16, tf.constant([1, 0]), **whole).numpy()
    assert np.abs(a - b).mean() < 4.0
    # Without the tag applied the two differ by far more: the check can fail.
    stored = tf.image.resize(tf.cast(_stored(lying), tf.float32), [16, 16], antialias=True).numpy()
    assert np.abs(a - stored).mean() > 20.0


def test_apply_orientation_turns_tensors_of_any_channel_count():
    image = tf.reshape(tf.range(2 * 3 * 4), [2, 3, 4])
    assert apply_orientation(image, tf.constant(8)).shape == (3, 2, 4)
    np.testing.assert_array_equal(apply_orientation(image, tf.constant(12)).numpy(), image.numpy())
