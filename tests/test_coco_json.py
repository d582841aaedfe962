"""load_coco_json on a generated COCO file and on the real coco128 fixture."""

import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hybridnet_tf.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from hybridnet_tf.data.coco_json import load_coco_json

RED = (200, 30, 30)


def _decode_rgb(path):
    data = tf.io.read_file(path)
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


@pytest.fixture
def tiny_coco(tmp_path):
    """Six images (gray, CMYK and PNG-named-.jpg among them), 3 categories with id gaps."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.new("L", (12, 10), 90).save(image_dir / "gray.jpg")
    Image.new("RGB", (12, 10), RED).convert("CMYK").save(image_dir / "cmyk.jpg", quality=95)
    Image.new("RGB", (12, 10), RED).save(image_dir / "rgb.jpg")
    Image.new("RGB", (12, 10), (0, 0, 255)).save(image_dir / "empty.jpg")
    Image.new("RGB", (12, 10), (0, 255, 0)).save(image_dir / "crowd.jpg")
    Image.new("RGB", (12, 10), RED).save(image_dir / "png_inside.jpg", format="PNG")
    images = [  # ids out of order on purpose: the loader sorts by id
        (3, "rgb.jpg"),
        (1, "gray.jpg"),
        (2, "cmyk.jpg"),
        (7, "png_inside.jpg"),
        (5, "crowd.jpg"),
        (4, "empty.jpg"),
    ]
    categories = [(90, "zebra"), (1, "cat"), (5, "dog")]  # ids with gaps, unsorted
    annotations = [  # (image id, category id, iscrowd)
        (3, 1, 0), (3, 5, 0), (3, 1, 0),  # a repeated category is one label
        (1, 5, 0),
        (2, 90, 0),
        (7, 1, 0),
        (5, 5, 0), (5, 90, 1),  # zebra only as a crowd region
    ]  # fmt: skip
    data = {
        "images": [{"id": i, "file_name": f, "width": 12, "height": 10} for i, f in images],
        "categories": [{"id": i, "name": n, "supercategory": "x"} for i, n in categories],
        "annotations": [
            {"id": k, "image_id": i, "category_id": c, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}
            for k, (i, c, crowd) in enumerate(annotations)
        ],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(data))
    return annotation_file, image_dir


def _names(images):
    return [os.path.basename(p) for p in images.paths]


def test_default_order_labels_and_frequencies(tiny_coco):
    annotation_file, image_dir = tiny_coco
    images = load_coco_json(annotation_file, image_dir)
    assert images.vocabulary.names == ["cat", "dog", "zebra"]  # ascending category id
    assert images.vocabulary.source_ids == [1, 5, 90]
    assert _names(images) == ["gray.jpg", "cmyk.jpg", "rgb.jpg", "crowd.jpg", "png_inside.jpg"]
    expected = [[0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0]]
    np.testing.assert_array_equal(images.labels, expected)
    assert images.vocabulary.frequencies == [2, 3, 2]
    assert all(os.path.isabs(p) for p in images.paths)


def test_crowd_and_empty_options(tiny_coco):
    annotation_file, image_dir = tiny_coco
    images = load_coco_json(annotation_file, image_dir, include_crowd=False, keep_empty=True)
    assert _names(images) == [
        "gray.jpg", "cmyk.jpg", "rgb.jpg", "empty.jpg", "crowd.jpg", "png_inside.jpg"
    ]  # fmt: skip
    np.testing.assert_array_equal(images.labels[3], [0, 0, 0])
    np.testing.assert_array_equal(images.labels[4], [0, 1, 0])  # crowd zebra ignored
    assert images.vocabulary.frequencies == [2, 3, 1]


def test_odd_jpegs_decode_to_rgb(tiny_coco):
    annotation_file, image_dir = tiny_coco
    images = load_coco_json(annotation_file, image_dir)
    decoded = {os.path.basename(p): _decode_rgb(p) for p in images.paths}
    assert all(image.shape == (10, 12, 3) for image in decoded.values())
    gray = decoded["gray.jpg"].astype(int)
    assert np.all(gray[..., 0] == gray[..., 1]) and abs(gray.mean() - 90) < 3
    for name in ("cmyk.jpg", "png_inside.jpg"):
        np.testing.assert_allclose(decoded[name][5, 6], RED, atol=6)


def test_missing_files_error_and_skip(tiny_coco, caplog):
    annotation_file, image_dir = tiny_coco
    (image_dir / "cmyk.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 5 images.*cmyk\.jpg.*missing_files='skip'"):
        load_coco_json(annotation_file, image_dir)
    with caplog.at_level(logging.WARNING):
        images = load_coco_json(annotation_file, image_dir, missing_files="skip")
    assert "cmyk.jpg" not in _names(images) and len(images) == 4
    assert "skipping 1 of 5" in caplog.text and "cmyk.jpg" in caplog.text
    assert images.vocabulary.frequencies == [2, 3, 1]  # counted on what is returned
    with pytest.raises(ValueError, match="missing_files"):
        load_coco_json(annotation_file, image_dir, missing_files="ignore")


def test_vocabulary_from_train_reports_unknown_categories(tiny_coco, tmp_path, caplog):
    annotation_file, image_dir = tiny_coco
    train = load_coco_json(annotation_file, image_dir)
    val = {
        "images": [{"id": 1, "file_name": "rgb.jpg"}, {"id": 2, "file_name": "gray.jpg"}],
        "categories": [{"id": 90, "name": "zebra"}, {"id": 7, "name": "unicorn"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 90, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "iscrowd": 0},
        ],
    }
    val_file = tmp_path / "val.json"
    val_file.write_text(json.dumps(val))
    with caplog.at_level(logging.WARNING):
        images = load_coco_json(val_file, image_dir, vocabulary=train.vocabulary)
    assert images.vocabulary is train.vocabulary
    assert _names(images) == ["rgb.jpg"]  # gray.jpg had only 'unicorn'
    np.testing.assert_array_equal(images.labels, [[0, 0, 1]])
    assert "1 categories unknown" in caplog.text and "unicorn" in caplog.text
    assert "2 annotations ignored" in caplog.text


def test_bad_annotation_files_name_the_file(tiny_coco, tmp_path):
    _, image_dir = tiny_coco
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco_json(tmp_path / "nope.json", image_dir)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_coco_json(broken, image_dir)
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json is not a COCO instances file"):
        load_coco_json(a_list, image_dir)


# -- the real coco128 fixture ------------------------------------------------


def _coco128(coco128_dir, **kwargs):
    return load_coco_json(
        coco128_dir / "annotations/instances_train2017.json", coco128_dir / "train2017", **kwargs
    )


def test_coco128_categories_and_empty_images(coco128_dir):
    images = _coco128(coco128_dir)
    assert images.vocabulary.names == list(COCO_CLASS_NAMES)
    assert images.vocabulary.source_ids == list(COCO_CATEGORY_IDS)
    assert len(images) == 126 and images.labels.shape == (126, 80)
    assert images.labels.any(axis=1).all()
    assert images.vocabulary.frequencies == images.labels.sum(axis=0).astype(int).tolist()

    with_empty = _coco128(coco128_dir, keep_empty=True)
    assert len(with_empty) == 128
    empty = [p for p, y in zip(_names(with_empty), with_empty.labels) if not y.any()]
    assert empty == ["000000000250.jpg", "000000000508.jpg"]


def test_coco128_crowd_annotations(coco128_dir, caplog):
    with caplog.at_level(logging.INFO, logger="hybridnet_tf.data.coco_json"):
        with_crowd = _coco128(coco128_dir)
        without_crowd = _coco128(coco128_dir, include_crowd=False)
    assert "10 crowd annotations used" in caplog.text
    assert "10 crowd annotations ignored" in caplog.text
    # Each of coco128's crowd regions sits beside instances of its category,
    # so image-level labels do not change.
    np.testing.assert_array_equal(with_crowd.labels, without_crowd.labels)


def test_coco128_grayscale_jpeg_decodes_to_rgb(coco128_dir):
    images = _coco128(coco128_dir)
    path = next(p for p in images.paths if p.endswith("000000000086.jpg"))
    raw = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    assert raw.shape[-1] == 1
    rgb = _decode_rgb(path)
    assert rgb.shape == (*raw.shape[:2], 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
