"""find_unreadable_images flags what tf.io.decode_image fails on, and nothing else."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hybridnet_tf.data.image_check import find_unreadable_images


def _encoded(fmt, size=(40, 30)):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _decodes(path):
    try:
        tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        return False


@pytest.fixture
def files(tmp_path):
    jpeg, png = _encoded("JPEG"), _encoded("PNG")
    contents = {
        "good.jpg": jpeg,
        "padded.jpg": jpeg + b"\x00" * 10,  # trailing bytes after FFD9
        "long_tail.jpg": jpeg + b"\x00" * 300,  # more than the 16 tail bytes: TF still decodes it
        "good.webp": _encoded("WEBP"),
        "webp_inside.jpg": _encoded("WEBP"),
        "truncated.webp": _encoded("WEBP")[:-30],
        "png_inside.jpg": png,
        "good.png": png,
        "good.gif": _encoded("GIF"),
        "good.bmp": _encoded("BMP"),
        "truncated.jpg": jpeg[: len(jpeg) * 2 // 3],
        "truncated.png": png[:-20],
        "zero.jpg": b"",
        "text.jpg": b"<html><body>404 Not Found</body></html>\n",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    paths["missing.jpg"] = tmp_path / "missing.jpg"
    return paths


def test_flags_broken_files_with_reasons(files):
    bad = dict(find_unreadable_images([str(p) for p in files.values()], num_threads=2))
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in bad.items()}
    assert set(reasons) == {
        "truncated.jpg", "truncated.png", "truncated.webp", "zero.jpg", "text.jpg", "missing.jpg"
    }
    assert reasons["truncated.jpg"].endswith("TensorFlow cannot decode it")
    assert reasons["truncated.jpg"].startswith("truncated JPEG")
    assert reasons["truncated.png"].startswith("truncated PNG")
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert reasons["missing.jpg"] == "missing file"
    assert "text starting b'<html>" in reasons["text.jpg"]


def test_verdicts_match_decode_image(files):
    bad = {path for path, _ in find_unreadable_images([str(p) for p in files.values()])}
    for name, path in files.items():
        assert _decodes(path) == (str(path) not in bad), name


def test_order_kept_and_other_formats_named(tmp_path, files):
    tiff = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    paths = [files["missing.jpg"], files["good.jpg"], tiff, files["zero.jpg"]]
    bad = find_unreadable_images(paths)
    assert [p for p, _ in bad] == [str(paths[0]), str(tiff), str(paths[3])]
    assert bad[1][1] == "not an image tf.io.decode_image reads: TIFF; TensorFlow cannot decode it"


def test_progress_bar_for_many_files(tmp_path, capsys):
    paths = [str(tmp_path / f"{i}.jpg") for i in range(5001)]
    bad = find_unreadable_images(paths, num_threads=2)
    assert len(bad) == 5001
    assert "checking images" in capsys.readouterr().err
    assert find_unreadable_images([]) == []


def test_real_coco_jpegs_pass(coco128_dir):
    paths = sorted((coco128_dir / "train2017").glob("*.jpg"))
    assert len(paths) == 128
    assert find_unreadable_images(paths) == []
