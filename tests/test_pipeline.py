"""The tf.data pipeline: decoding, resize policies, determinism, skipping broken files."""

import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hybridnet_tf.data.augment import build_augmentation
from hybridnet_tf.data.image_check import find_unreadable_images
from hybridnet_tf.data.pipeline import (
    IMAGE_PROBLEMS,
    SkippedImages,
    decode_and_resize,
    decode_random_resized_crop,
    decode_rgb,
    image_problem,
    make_dataset,
    resize_image,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _stripes(height=40, width=80):
    """Left quarter red, middle half green, right quarter blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 4] = RED
    pixels[:, width // 4 : 3 * width // 4] = GREEN
    pixels[:, 3 * width // 4 :] = BLUE
    return Image.fromarray(pixels)


def _noise_jpeg(seed=0, size=(40, 30)):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG")


# Broken files of the kinds the pipeline must skip and count, by expected problem.
BROKEN = {
    "truncated.jpg": (lambda: _noise_jpeg()[:300], 2),
    "zero.jpg": (lambda: b"", 1),
    "text.jpg": (lambda: b"<html><body>404 Not Found</body></html>\n", 4),
}


@pytest.mark.parametrize(
    "image, fmt, expected",
    [
        (Image.new("L", (16, 12), 77), "JPEG", (77, 77, 77)),
        (Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", RED),
        (Image.new("RGBA", (16, 12), (0, 0, 255, 128)), "PNG", BLUE),
        (Image.new("P", (16, 12), 0), "GIF", (0, 0, 0)),
    ],
    ids=["grayscale_jpeg", "cmyk_jpeg", "rgba_png", "gif"],
)
def test_decode_gives_three_channels(image, fmt, expected):
    encoded = tf.constant(_encode(image, fmt, quality=95) if fmt == "JPEG" else _encode(image, fmt))
    for decoded in (
        decode_and_resize(encoded, 8),
        decode_random_resized_crop(encoded, 8, tf.constant([1, 2])),
    ):
        assert decoded.shape == (8, 8, 3) and decoded.dtype == tf.float32
        np.testing.assert_allclose(decoded.numpy()[4, 4], expected, atol=4)


def test_png_data_in_a_jpg_file_decodes(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(_encode(_stripes(), "PNG"))
    encoded = tf.io.read_file(str(path))
    assert int(image_problem(encoded)) == 0
    assert decode_and_resize(encoded, 20).shape == (20, 20, 3)


def test_squash_keeps_the_whole_image():
    image = decode_and_resize(tf.constant(_encode(_stripes(), "PNG")), 20, "squash").numpy()
    assert image.shape == (20, 20, 3)
    np.testing.assert_allclose(image[10, 1], RED, atol=1)
    np.testing.assert_allclose(image[10, 10], GREEN, atol=1)
    np.testing.assert_allclose(image[10, 18], BLUE, atol=1)


def test_center_crop_keeps_only_the_centre():
    image = decode_and_resize(tf.constant(_encode(_stripes(), "PNG")), 20, "center_crop").numpy()
    assert image.shape == (20, 20, 3)
    # 40x80 -> 20x40, whose middle 20 columns are the green half; the
    # antialiasing filter only tints the outermost columns.
    np.testing.assert_allclose(image[:, 1:-1], np.broadcast_to(GREEN, (20, 18, 3)), atol=1)
    assert image[:, [0, -1], 1].min() > 200


def test_random_resized_crop_is_seeded_and_squashes_a_full_crop():
    encoded = tf.constant(_encode(_stripes(), "PNG"))
    first = decode_random_resized_crop(encoded, 20, tf.constant([3, 0]))
    again = decode_random_resized_crop(encoded, 20, tf.constant([3, 0]))
    np.testing.assert_array_equal(first, again)
    crops = [decode_random_resized_crop(encoded, 20, tf.constant([s, 0])).numpy() for s in range(6)]
    assert any(not np.array_equal(crops[0], c) for c in crops[1:])
    assert all(c.min() >= 0 and c.max() <= 255 for c in crops)
    # A crop that must keep the whole area is the whole image, squashed.
    whole = decode_random_resized_crop(
        encoded, 20, tf.constant([3, 0]), area_range=(1.0, 1.0), aspect_ratio_range=(0.4, 3.0)
    )
    np.testing.assert_allclose(whole, decode_and_resize(encoded, 20, "squash"), atol=1e-3)


def test_random_resized_crop_of_a_jpeg_decodes_only_the_window():
    encoded = tf.constant(_encode(_stripes(80, 160), "JPEG", quality=95))
    # Narrow crops of a tenth of the area are at most 35 px wide: never all three stripes.
    for seed in range(4):
        crop = decode_random_resized_crop(
            encoded, 16, tf.constant([seed, 0]), area_range=(0.08, 0.12), aspect_ratio_range=(0.4, 0.6)
        )
        colours = {tuple(np.round(p / 255).astype(int)) for p in crop.numpy().reshape(-1, 3)}
        assert len(colours) < 3, colours


def test_eval_uses_squash_for_random_resized_crop():
    source = tf.data.Dataset.from_tensor_slices(([_encode(_stripes(), "PNG")], [[1.0, 0.0]]))
    crop = make_dataset(source, 20, 1, training=False, from_files=False, resize="random_resized_crop")
    squash = make_dataset(source, 20, 1, training=False, from_files=False, resize="squash")
    np.testing.assert_array_equal(next(iter(crop))[0], next(iter(squash))[0])


def test_ops_give_the_same_inside_tf_data():
    encoded = [_encode(_stripes(), "PNG"), _noise_jpeg()]
    for resize in ("squash", "center_crop"):
        mapped = tf.data.Dataset.from_tensor_slices(encoded).map(lambda e: decode_and_resize(e, 12, resize))
        for inside, data in zip(mapped, encoded):
            np.testing.assert_allclose(inside, decode_and_resize(tf.constant(data), 12, resize), atol=1e-4)
    problems = tf.data.Dataset.from_tensor_slices([b"", b"BM"]).map(image_problem)
    assert [int(p) for p in problems] == [1, 0]


def _write_files(folder, names_and_bytes):
    paths = []
    for name, data in names_and_bytes.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def test_image_problem_agrees_with_image_check(tmp_path):
    jpeg = _noise_jpeg()
    png = _encode(_stripes(), "PNG")
    files = {
        "good.jpg": jpeg,
        "padded.jpg": jpeg + b"\0" * 10,
        "long_tail.jpg": jpeg + b"\0" * 300,
        "png_inside.jpg": png,
        "truncated.png": png[:-20],
        "tiny.jpg": b"\xff\xd8",
        "webp.jpg": b"RIFF\0\0\0\0WEBPVP8 ",
        "good.bmp": _encode(Image.new("RGB", (4, 4)), "BMP"),
        **{name: make() for name, (make, _) in BROKEN.items()},
    }
    paths = _write_files(tmp_path, files)
    flagged = {path for path, _ in find_unreadable_images(paths)}
    for path, data in zip(paths, files.values()):
        problem = int(image_problem(tf.constant(data)))
        assert (problem != 0) == (path in flagged), (path, IMAGE_PROBLEMS[problem])
    for name, (make, expected) in BROKEN.items():
        assert int(image_problem(tf.constant(make()))) == expected, name


def _labeled_files(folder, broken=True):
    files = {f"good{i}.jpg": _noise_jpeg(seed=i) for i in range(5)}
    if broken:
        files.update({name: make() for name, (make, _) in BROKEN.items()})
        # Whole-looking but undecodable: only ignore_errors, the last safety net, catches it.
        files["garbage_inside.jpg"] = b"\xff\xd8\xff\xe0" + b"garbage!" * 10 + b"\xff\xd9"
    paths = _write_files(folder, files)
    labels = np.eye(len(paths), dtype=np.float32)
    return tf.data.Dataset.from_tensor_slices((paths, labels)), paths


@pytest.mark.parametrize("resize, cache", [("squash", False), ("random_resized_crop", False), ("squash", True)])
def test_broken_files_are_skipped_and_counted(tmp_path, caplog, resize, cache):
    source, paths = _labeled_files(tmp_path)
    skipped = SkippedImages("train")
    dataset = make_dataset(source, 16, 3, training=True, resize=resize, cache=cache, seed=0, skipped=skipped)
    assert dataset.element_spec[0].shape.as_list() == [None, 16, 16, 3]
    with caplog.at_level(logging.WARNING, logger="hybridnet_tf.data.pipeline"):
        for epoch in (1, 2):
            labels = np.concatenate([y.numpy() for _, y in dataset])
            assert labels.shape == (5, len(paths))
            # Exactly the five good files came through, each once.
            assert sorted(labels.argmax(axis=1)) == [0, 1, 2, 3, 4]
            # A cache replays the first pass, so only that pass is checked.
            assert skipped.passes == (1 if cache else epoch)
    assert skipped.total == (3 if cache else 6)
    names = sorted(name.rsplit("/", 1)[-1] for name, _ in skipped.last_pass)
    assert names == sorted(BROKEN)
    reasons = {name.rsplit("/", 1)[-1]: why for name, why in skipped.last_pass}
    assert reasons["zero.jpg"] == IMAGE_PROBLEMS[1]
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == skipped.passes
    assert "skipped 3 undecodable image(s)" in warnings[0] and "truncated.jpg" in warnings[0]


def test_no_warning_for_clean_data(tmp_path, caplog):
    source, _ = _labeled_files(tmp_path, broken=False)
    skipped = SkippedImages()
    with caplog.at_level(logging.WARNING, logger="hybridnet_tf.data.pipeline"):
        assert sum(int(x.shape[0]) for x, _ in make_dataset(source, 16, 2, skipped=skipped)) == 5
    assert skipped.total == 0 and skipped.passes == 1
    assert not caplog.records


def _two_passes(dataset):
    return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(2)]


def test_deterministic_mode_repeats_across_fresh_datasets(tmp_path):
    source, _ = _labeled_files(tmp_path, broken=False)

    def fresh():
        return make_dataset(
            source, 16, 2, training=True, resize="random_resized_crop", seed=7,
            augment=build_augmentation(flip=True, mixup_alpha=0.4, seed=7),
            shuffle_buffer=8, deterministic=True,
        )

    assert fresh().element_spec[0].shape.as_list() == [None, 16, 16, 3]
    first, second = _two_passes(fresh()), _two_passes(fresh())
    for pass_a, pass_b in zip(first, second):
        assert len(pass_a) == len(pass_b) == 3
        for (xa, ya), (xb, yb) in zip(pass_a, pass_b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    # Each pass still draws new crops and a new order.
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first[0], first[1]))


def test_deterministic_training_needs_a_seed(tmp_path):
    source, _ = _labeled_files(tmp_path, broken=False)
    with pytest.raises(ValueError, match="needs a seed"):
        make_dataset(source, 16, 2, training=True, deterministic=True)
    with pytest.raises(ValueError, match="unknown resize policy"):
        make_dataset(source, 16, 2, resize="stretch")


def test_coco128_config_loads_and_feeds_the_pipeline(coco128_dir, monkeypatch):
    from conftest import REPO_ROOT

    from hybridnet_tf.config import ConfigError, load_config
    from hybridnet_tf.data.load_splits import load_splits
    from hybridnet_tf.experiment import as_dataset

    monkeypatch.chdir(REPO_ROOT)  # the config's data paths are relative to the repo root
    # The fixture may live elsewhere (HYBRIDNET_COCO128).
    fixture = [
        f"data.train_images={coco128_dir / 'train2017'}",
        f"data.train_annotations={coco128_dir / 'annotations/instances_train2017.json'}",
    ]
    config = load_config("configs/coco128.yaml", fixture)
    assert config["model"]["image_size"] == 128
    with pytest.raises(ConfigError, match="model.image_size must be an integer or null"):
        load_config("configs/coco128.yaml", ["model.image_size=big"])
    splits = load_splits(config["data"])
    train, val, vocabulary = splits.train, splits.val, splits.vocabulary
    assert (len(train), len(val), len(vocabulary)) == (95, 31, 80)
    images, labels = next(iter(as_dataset(train, config, training=True, batch_size=4)))
    assert images.shape == (4, 128, 128, 3) and labels.shape == (4, 80)
    assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255


def _folder_sorted_by_label(root, labels=("apple", "bread", "cheese", "dates"), per_label=8):
    """A folder source: label-named sub-folders, so `load_folder` lists the files grouped by label."""
    from hybridnet_tf.data.folder_csv import load_folder

    for label_index, label in enumerate(labels):
        (root / label).mkdir(parents=True)
        _write_files(root / label, {
            f"{i}.jpg": _noise_jpeg(seed=10 * label_index + i, size=(12, 10)) for i in range(per_label)
        })
    return load_folder(str(root))


def _label_order(dataset):
    return [int(row.argmax()) for _, y in dataset for row in y.numpy()]


@pytest.mark.parametrize("resize, cache", [
    ("squash", "none"), ("random_resized_crop", "none"), ("squash", "memory"), ("random_resized_crop", "memory"),
])
def test_file_list_sorted_by_label_is_shuffled_whole_every_epoch(tmp_path, resize, cache):
    images = _folder_sorted_by_label(tmp_path)
    assert _label_order([(None, tf.constant(images.labels))]) == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8

    def fresh():
        # A shuffle buffer of 4 would keep the first batches within the first label;
        # the list of 32 files is shuffled whole regardless.
        return make_dataset(images.to_dataset(), 8, 4, training=True, resize=resize, cache=cache,
                            shuffle_buffer=4, seed=3, deterministic=True)

    dataset = fresh()
    epochs = [_label_order(dataset) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
        # Labels are mixed within the first two batches (8 images).
        assert len(set(order[:8])) >= 3, order
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    assert _label_order(fresh()) == epochs[0]  # seeded: a fresh dataset repeats the orders


def test_encoded_bytes_stream_uses_the_shuffle_buffer():
    # A stream of 32 encoded images sorted by label, as TFDS gives them (cardinality unknown).
    encoded = [_noise_jpeg(seed=i, size=(12, 10)) for i in range(32)]
    labels = np.repeat(np.eye(4, dtype=np.float32), 8, axis=0)
    source = tf.data.Dataset.from_tensor_slices((encoded, labels)).filter(lambda x, y: True)
    assert int(source.cardinality()) == tf.data.UNKNOWN_CARDINALITY

    def first_labels(buffer):
        dataset = make_dataset(source, 8, 4, training=True, from_files=False, shuffle_buffer=buffer,
                               seed=0, deterministic=True)
        return _label_order(dataset)

    # A buffer of 2 can only swap neighbours; 32 mixes the whole stream.
    assert set(first_labels(2)[:4]) == {0}
    assert len(set(first_labels(32)[:8])) >= 3


def test_cache_holds_uint8_images_and_gives_the_rounded_pixels(tmp_path):
    source, _ = _labeled_files(tmp_path, broken=False)
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(source, 16, 2)])
    prefix = tmp_path / "cache" / "train"
    prefix.parent.mkdir()
    for cache in ("memory", str(prefix), True):
        dataset = make_dataset(source, 16, 2, cache=cache)
        for _ in range(2):  # the second pass reads the cache
            cached = np.concatenate([x.numpy() for x, _ in dataset])
            assert cached.dtype == np.float32
            np.testing.assert_array_equal(cached, np.round(plain))
    # The file cache holds 5 uint8 images (+ labels), a quarter of their float32 size.
    [data_file] = [p for p in prefix.parent.iterdir() if p.name.startswith("train.data")]
    uint8_bytes = 5 * 16 * 16 * 3
    assert uint8_bytes <= data_file.stat().st_size < 2 * uint8_bytes
    assert np.abs(plain - np.round(plain)).max() > 0  # rounding did something to compare


def test_cache_settings():
    from hybridnet_tf.data.pipeline import cache_setting

    assert cache_setting("none") is None and cache_setting(False) is None and cache_setting(None) is None
    assert cache_setting("memory") == "" and cache_setting(True) == ""
    with pytest.raises(ValueError, match=r"folder /no/such does not exist; create it or choose 'memory'"):
        cache_setting("/no/such/cache")
    with pytest.raises(ValueError, match="must be 'memory', 'none' or a file path"):
        cache_setting(" ")


def _large_photo_jpeg(height, width, seed=0, grain=32):
    """A smooth photo-like JPEG (noise blurred over `grain` pixels) of the given size."""
    small = np.random.default_rng(seed).integers(0, 256, (height // grain, width // grain, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.mark.parametrize(
    "height, width, size, scale",
    [(1024, 768, 64, 4), (1024, 768, 100, 2), (1024, 768, 200, 1), (2048, 1536, 32, 8), (200, 500, 16, 4)],
)
def test_large_jpegs_decode_at_the_smallest_scale_that_keeps_twice_the_size(height, width, size, scale):
    encoded = tf.constant(_large_photo_jpeg(height, width))
    reduced = decode_rgb(encoded, min_side=2 * size)
    assert reduced.shape == (-(-height // scale), -(-width // scale), 3)
    assert min(reduced.shape[:2]) >= 2 * size
    # The same picture as decoding every pixel, to within JPEG's own rounding.
    full = resize_image(decode_rgb(encoded), size)
    assert np.abs(decode_and_resize(encoded, size).numpy() - full.numpy()).mean() < 1.5


def test_reduced_scale_leaves_small_jpegs_and_other_formats_whole():
    png = tf.io.encode_png(np.full((900, 900, 3), 7, np.uint8))
    assert decode_rgb(png, min_side=20).shape == (900, 900, 3)
    small = tf.constant(_large_photo_jpeg(256, 320))
    np.testing.assert_array_equal(decode_rgb(small, min_side=200).numpy(), decode_rgb(small).numpy())


def test_coco_sized_photos_decode_exactly_as_before(coco128_dir):
    # 640 px photos at 224 px keep their full decode: the real-photo results stand.
    for path in sorted((coco128_dir / "train2017").glob("*.jpg"))[:12]:
        encoded = tf.io.read_file(str(path))
        plain = resize_image(tf.io.decode_image(encoded, channels=3, expand_animations=False), 224)
        np.testing.assert_array_equal(decode_and_resize(encoded, 224).numpy(), plain.numpy())


def test_random_crops_of_large_jpegs_match_full_scale_crops():
    # Coarse grain: the reduced-scale window's edges may sit up to half a scaled
    # pixel off the full-scale ones, which fine grain would turn into big differences.
    encoded = tf.constant(_large_photo_jpeg(1024, 768, seed=3, grain=128))
    for seed in range(3):
        crop_seed = tf.constant([seed, 0])
        reduced = decode_random_resized_crop(encoded, 48, crop_seed).numpy()
        # The same window decoded at full scale (a crop size that keeps the whole-scale path).
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(encoded), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.5, 1.0), max_attempts=10,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        full = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        full = resize_image(full, 48).numpy()
        assert np.abs(reduced - full).mean() < 2.0
    # Different seeds still give different crops.
    first, second = (decode_random_resized_crop(encoded, 48, tf.constant([s, 0])).numpy() for s in (0, 1))
    assert np.abs(first - second).mean() > 2.0
