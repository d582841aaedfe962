"""Tests for the synthetic demo data set (hybridnet_tf.data.demo_scenes)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridnet_tf.data import demo_scenes
from hybridnet_tf.data.demo_scenes import (
    DEMO_CATEGORIES,
    EXCLUSIVE_PAIRS,
    demo_label_statistics,
    label_set_statistics,
    sample_label_sets,
    write_demo_dataset,
)

SMALL = dict(num_train=40, num_val=10, image_size=64, progress=False)


def _all_files(root):
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo_seed0")
    info = write_demo_dataset(out_dir, seed=0, **SMALL)
    return out_dir, info


def test_same_seed_gives_byte_identical_files(demo_dir, tmp_path):
    first_dir, first_info = demo_dir
    write_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    first, again = _all_files(first_dir), _all_files(tmp_path / "again")
    assert len(first) == 40 + 10 + 2
    assert first == again

    write_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    other = _all_files(tmp_path / "other")
    assert other.keys() == first.keys()
    changed = [name for name in first if first[name] != other[name]]
    assert len(changed) == len(first), "a different seed should change every file"


def test_split_sizes_do_not_change_each_others_content(demo_dir, tmp_path):
    first_dir, _ = demo_dir
    write_demo_dataset(tmp_path / "fewer", seed=0, num_train=3, num_val=10, image_size=64,
                       progress=False)
    val_files = sorted((first_dir / "val").glob("*.jpg"))
    for path in val_files:
        assert (tmp_path / "fewer/val" / path.name).read_bytes() == path.read_bytes()
    for name in ("000001.jpg", "000003.jpg"):
        fewer_train = (tmp_path / "fewer/train" / name).read_bytes()
        assert fewer_train == (first_dir / "train" / name).read_bytes()


def test_writes_valid_coco(demo_dir):
    from pycocotools.coco import COCO

    out_dir, info = demo_dir
    assert info["num_train"] == 40 and info["num_val"] == 10
    expected_ids = [c[0] for c in DEMO_CATEGORIES]
    assert expected_ids[0] == 1 and expected_ids != list(range(1, len(expected_ids) + 1))

    for split, num_images in (("train", 40), ("val", 10)):
        coco = COCO(info[f"{split}_annotations"])
        assert sorted(coco.getCatIds()) == expected_ids
        assert len(coco.getImgIds()) == num_images
        assert len(coco.getAnnIds()) == info[f"num_{split}_objects"]
        with open(info[f"{split}_annotations"]) as f:
            raw = json.load(f)
        assert {"info", "licenses", "images", "annotations", "categories"} <= raw.keys()

        for image_info in coco.loadImgs(coco.getImgIds()):
            with Image.open(out_dir / split / image_info["file_name"]) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert image.size == (image_info["width"], image_info["height"]) == (64, 64)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"]))
            assert 1 <= len({a["category_id"] for a in annotations}) <= 5
            for annotation in annotations:
                x, y, w, h = annotation["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
                # Objects should be big enough to recognise at this size.
                assert max(w, h) >= 0.15 * 64
                assert annotation["iscrowd"] == 0 and annotation["category_id"] in expected_ids
                # The polygon, its area and its box agree (pycocotools rasterises it).
                mask = coco.annToMask(annotation)
                assert abs(mask.sum() - annotation["area"]) <= 0.15 * annotation["area"] + 4
                rows, cols = np.nonzero(mask)
                # Within 2 px: a sharp tip may miss every pixel centre.
                assert abs(cols.min() - x) <= 2 and abs(rows.min() - y) <= 2

    # Some image holds two objects of one class: instance counts != label counts.
    train = COCO(info["train_annotations"])
    assert any(
        len(anns) > len({a["category_id"] for a in anns})
        for anns in (train.loadAnns(train.getAnnIds(imgIds=i)) for i in train.getImgIds())
    )


def test_written_labels_match_the_sampler(demo_dir):
    _, info = demo_dir
    written = demo_label_statistics(info["train_annotations"])
    sampled = label_set_statistics(sample_label_sets(40, seed=0, split="train"))
    assert written["class_names"] == sampled["class_names"]
    np.testing.assert_array_equal(written["cooccurrence"], sampled["cooccurrence"])


def test_label_sets_have_learnable_dependencies():
    label_sets = sample_label_sets(400, seed=0)
    stats = label_set_statistics(label_sets)
    index = {name: i for i, name in enumerate(stats["class_names"])}

    def p(given, then):
        return stats["conditional"][index[given], index[then]]

    # The "dinner" pair: red_circle nearly always brings blue_square.
    assert p("red_circle", "blue_square") > 0.8
    assert p("red_circle", "blue_square") > stats["frequency"][index["blue_square"]] + 0.3
    # The "garden" triple comes together.
    assert p("green_triangle", "yellow_star") > 0.7 and p("green_triangle", "orange_cross") > 0.7
    for a, b in EXCLUSIVE_PAIRS:
        assert stats["cooccurrence"][index[a], index[b]] == 0, (a, b)
    sizes = {len(labels) for labels in label_sets}
    assert sizes == {1, 2, 3, 4, 5}
    assert all(len(set(labels)) == len(labels) for labels in label_sets)
    assert stats["frequency"].min() > 0.02, "every class should occur"


@pytest.mark.parametrize(
    "bad_arguments",
    [dict(num_train=0), dict(image_size=31), dict(num_val=-1), dict(seed=-1), dict(num_train=2.5)],
)
def test_bad_arguments_raise(tmp_path, bad_arguments):
    arguments = dict(num_train=2, num_val=1, image_size=32, progress=False)
    arguments.update(bad_arguments)
    with pytest.raises(ValueError, match=next(iter(bad_arguments))):
        write_demo_dataset(tmp_path, **arguments)


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown split"):
        demo_scenes.sample_label_sets(3, split="test")
