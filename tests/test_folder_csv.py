"""load_folder and load_csv on tiny generated layouts."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from hybridnet_tf.data.folder_csv import load_csv, load_folder


def _image(path, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format=fmt)


@pytest.fixture
def clothes(tmp_path):
    root = tmp_path / "train"
    _image(root / "black_jeans" / "b.jpg")
    _image(root / "black_jeans" / "a.JPEG")
    _image(root / "blue_shirt" / "c.png", fmt="PNG")
    _image(root / "blue_shirt" / "d.Bmp", fmt="BMP")
    (root / "blue_shirt" / "notes.txt").write_text("not an image")
    (root / "blue_shirt" / ".hidden.jpg").write_bytes(b"")
    _image(root / "black_shirt" / "e.gif", fmt="GIF")
    return root


def _rows(images):
    """{file name: set of label names}."""
    names = images.vocabulary.names
    return {
        os.path.basename(p): {names[i] for i in np.flatnonzero(y)}
        for p, y in zip(images.paths, images.labels)
    }


def test_folder_names_split_into_labels(clothes):
    images = load_folder(clothes)
    assert images.vocabulary.names == ["black", "blue", "jeans", "shirt"]  # sorted
    names = [os.path.basename(p) for p in images.paths]
    assert names == ["a.JPEG", "b.jpg", "e.gif", "c.png", "d.Bmp"]
    assert _rows(images) == {
        "a.JPEG": {"black", "jeans"},
        "b.jpg": {"black", "jeans"},
        "e.gif": {"black", "shirt"},
        "c.png": {"blue", "shirt"},
        "d.Bmp": {"blue", "shirt"},
    }
    assert images.vocabulary.frequencies == [3, 2, 2, 3]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in images.paths)


def test_folder_with_train_vocabulary_drops_unknown_labels(clothes, tmp_path, caplog):
    train = load_folder(clothes)
    val_root = tmp_path / "val"
    _image(val_root / "red_jeans" / "1.jpg")
    _image(val_root / "red_jeans" / "2.jpg")
    _image(val_root / "red_hat" / "3.jpg")
    with caplog.at_level(logging.WARNING):
        val = load_folder(val_root, vocabulary=train.vocabulary)
    assert val.vocabulary is train.vocabulary
    assert _rows(val) == {"1.jpg": {"jeans"}, "2.jpg": {"jeans"}, "3.jpg": set()}
    assert "2 labels unknown" in caplog.text
    assert "red: 3" in caplog.text and "hat: 1" in caplog.text
    assert "1 images are left without any label" in caplog.text


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no sub-folders"):
        load_folder(tmp_path)
    (tmp_path / "cat_dog").mkdir()
    (tmp_path / "cat_dog" / "x.webp").write_bytes(b"RIFF")
    with pytest.raises(ValueError, match=r"cat_dog holds no images \(1 other files\)"):
        load_folder(tmp_path)


def test_folder_custom_separator(tmp_path):
    _image(tmp_path / "dark blue+t-shirt" / "1.jpg")
    images = load_folder(tmp_path, label_separator="+")
    assert images.vocabulary.names == ["dark blue", "t-shirt"]


@pytest.fixture
def csv_layout(tmp_path):
    for name in ("a.jpg", "b.jpg", "sub/c.png"):
        _image(tmp_path / "imgs" / name)
    return tmp_path


def test_csv_with_separator_and_image_root(csv_layout):
    csv_path = csv_layout / "train.csv"
    csv_path.write_text(
        "file,tags,extra\n"
        'a.jpg,"cat;dog; cat",1\n'
        "b.jpg,,2\n"  # no labels: an all-negative example
        "sub/c.png,bird,3\n"
    )
    images = load_csv(
        csv_path, image_root=csv_layout / "imgs", label_separator=";",
        path_column="file", labels_column="tags",
    )  # fmt: skip
    assert images.vocabulary.names == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(images.labels, [[0, 1, 1], [0, 0, 0], [1, 0, 0]])
    assert images.paths[2] == str(csv_layout / "imgs" / "sub" / "c.png")
    assert images.vocabulary.frequencies == [1, 1, 1]


def test_csv_paths_relative_to_csv_folder_and_unknown_labels(csv_layout, caplog):
    train_csv = csv_layout / "imgs" / "train.csv"
    train_csv.write_text("path,labels\na.jpg,cat dog\nb.jpg,dog\n")
    train = load_csv(train_csv)
    val_csv = csv_layout / "imgs" / "sub" / "val.csv"
    val_csv.write_text(f"path,labels\nc.png,dog fox\n{csv_layout / 'imgs' / 'a.jpg'},fox owl fox\n")
    with caplog.at_level(logging.WARNING):
        val = load_csv(val_csv, vocabulary=train.vocabulary)
    assert val.paths == [str(csv_layout / "imgs/sub/c.png"), str(csv_layout / "imgs/a.jpg")]
    np.testing.assert_array_equal(val.labels, [[0, 1], [0, 0]])
    assert val.vocabulary is train.vocabulary
    assert "2 labels unknown" in caplog.text and "fox: 2" in caplog.text and "owl: 1" in caplog.text


def test_csv_errors_name_file_and_line(csv_layout):
    bad = csv_layout / "bad.csv"
    bad.write_text("path,labels\na.jpg,cat\nb.jpg,cat,dog\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: expected 2 fields .* found 3"):
        load_csv(bad, image_root=csv_layout / "imgs")
    bad.write_text("path,labels\na.jpg,cat\n,dog\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: empty 'path' cell"):
        load_csv(bad, image_root=csv_layout / "imgs")
    bad.write_text("image,labels\na.jpg,cat\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 1: .*lacks the column\(s\) \['path'\]"):
        load_csv(bad, image_root=csv_layout / "imgs")
    bad.write_text("path,labels\na.jpg,cat\n\nmissing.jpg,dog\n")
    with pytest.raises(FileNotFoundError, match=r"bad\.csv: 1 of 2 .*line 4: .*missing\.jpg"):
        load_csv(bad, image_root=csv_layout / "imgs")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        load_csv(csv_layout / "absent.csv")
