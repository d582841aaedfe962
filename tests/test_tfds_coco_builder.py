"""TFDS' own `coco/2017` builder, offline, on miniature official-layout zips of coco128 images.

Not `tfds.testing.mock_data`: TFDS extracts the zips, parses the COCO JSON,
writes TFRecords and `dataset_info.json`, and the project reads them back
through `data.source: tfds`, trains, evaluates.

TFDS verifies every archive against its registered checksum, so miniature
zips put in `manual_dir` are refused (`NonMatchingChecksumError`: tested
below), and no `DownloadConfig` switch turns that off (`register_checksums`
would rewrite the checksum file inside the installed package). The zips are
therefore placed in TFDS' download cache (`<data_dir>/downloads/coco/`)
under the names TFDS gives the official files; TFDS trusts a cached file by
that name and extracts it as if it had downloaded it.
"""

import json
import math
import os
import zipfile

import numpy as np
import pytest

from hybridnet_tf.data.coco_classes import COCO_CATEGORY_IDS
from hybridnet_tf.data.tfds_coco import tfds_builder

ROOT_URL = "http://images.cocodataset.org/"
# coco128 image ids. Train: ten labelled images, the two without annotations,
# and 438, whose annotations this test marks as crowd regions: coco128's own
# crowd annotations all share their category with a non-crowd object of the
# same image, so include_crowd would change no label there.
TRAIN_IDS = [9, 25, 30, 34, 36, 42, 49, 61, 64, 71, 250, 508, 438]
CROWD_ONLY_ID = 438
VAL_IDS = [72, 73, 74, 77]
TEST_IDS = [78, 81]
BATCH_SIZE = 4


def _subset(annotations, ids):
    ids = set(ids)
    subset = {key: value for key, value in annotations.items() if key not in ("images", "annotations")}
    subset["images"] = [image for image in annotations["images"] if image["id"] in ids]
    subset["annotations"] = [
        dict(a, iscrowd=1) if a["image_id"] == CROWD_ONLY_ID else a
        for a in annotations["annotations"]
        if a["image_id"] in ids
    ]
    return subset


def _write_miniature_coco(coco128_dir, out_dir):
    """The five COCO 2017 archives `coco/2017` asks for, with a few coco128 images.

    Returns:
        `({url: zip path}, train annotations, val annotations)`.
    """
    with open(coco128_dir / "annotations/instances_train2017.json", encoding="utf-8") as f:
        annotations = json.load(f)
    file_names = {image["id"]: image["file_name"] for image in annotations["images"]}
    os.makedirs(out_dir, exist_ok=True)
    archives = {}

    def archive(relative_url, members):
        path = os.path.join(out_dir, os.path.basename(relative_url))
        with zipfile.ZipFile(path, "w") as z:
            for name, content in members.items():
                if isinstance(content, dict):
                    z.writestr(name, json.dumps(content))
                else:
                    z.write(content, name)
        archives[ROOT_URL + relative_url] = path

    for folder, ids in (("train2017", TRAIN_IDS), ("val2017", VAL_IDS), ("test2017", TEST_IDS)):
        archive(
            f"zips/{folder}.zip",
            {f"{folder}/{file_names[i]}": str(coco128_dir / "train2017" / file_names[i]) for i in ids},
        )
    train, val = _subset(annotations, TRAIN_IDS), _subset(annotations, VAL_IDS)
    archive(
        "annotations/annotations_trainval2017.zip",
        {"annotations/instances_train2017.json": train, "annotations/instances_val2017.json": val},
    )
    test_info = _subset(annotations, TEST_IDS)
    del test_info["annotations"]
    archive("annotations/image_info_test2017.zip", {"annotations/image_info_test2017.json": test_info})
    return archives, train, val


def _seed_download_cache(archives, data_dir):
    """Puts the zips where TFDS keeps the official files it downloaded."""
    from etils import epath
    from tensorflow_datasets.core.download import resource

    url_infos = tfds_builder("coco/2017", data_dir=data_dir).url_infos
    assert set(archives) <= set(url_infos), "the builder asks for other files than these"
    for url, path in archives.items():
        expected = url_infos[url]
        cached = epath.Path(data_dir) / "downloads" / "coco" / resource.get_dl_fname(url, expected.checksum)
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, cached)
        resource.write_info_file(
            url=url, path=cached, dataset_name="coco",
            original_fname=os.path.basename(path), url_info=expected,
        )


def _expected(train, include_crowd, keep_empty):
    """(images, examples per label) computed from the annotations alone."""
    column = {category_id: i for i, category_id in enumerate(COCO_CATEGORY_IDS)}
    labels = {image["id"]: set() for image in train["images"]}
    for a in train["annotations"]:
        if include_crowd or not a["iscrowd"]:
            labels[a["image_id"]].add(column[a["category_id"]])
    kept = [s for s in labels.values() if s or keep_empty]
    counts = np.zeros(80, int)
    for s in kept:
        counts[list(s)] += 1
    return len(kept), counts.tolist()


def _data_section(data_dir, **options):
    from hybridnet_tf.config import DEFAULTS

    return {
        **DEFAULTS["data"],
        "source": "tfds",
        "tfds_name": "coco/2017",
        "tfds_data_dir": data_dir,
        "tfds_download": True,
        **options,
    }


def _write_config(path, data_dir):
    import yaml

    config = {
        "data": {"source": "tfds", "tfds_data_dir": data_dir, "tfds_download": True},
        "model": {"backbone": "small_cnn", "image_size": 32, "gru_units": 16, "embedding_dim": 8},
        "train": {"epochs": 1, "batch_size": BATCH_SIZE, "val_max_images": 8},
        "eval": {"batch_size": BATCH_SIZE},
    }
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return str(path)


class _StepsSpy:
    """Wraps `train_in_phases` to record the steps per epoch `train` asks for."""

    def __init__(self, monkeypatch):
        from hybridnet_tf.training import fine_tuning

        self.steps = []
        real = fine_tuning.train_in_phases

        def spy(*args, **kwargs):
            self.steps.append(kwargs["steps_per_epoch"])
            return real(*args, **kwargs)

        monkeypatch.setattr(fine_tuning, "train_in_phases", spy)


@pytest.mark.slow  # prepares the data, trains twice and evaluates: ~40-60 s on 2 CPU cores
def test_real_builder_train_and_evaluate_offline(coco128_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("importlib_resources", reason="TFDS needs it to prepare data on Python 3.11")
    from hybridnet_tf.cli import main
    from hybridnet_tf.data import tfds_coco
    from hybridnet_tf.data.load_splits import load_split, load_splits

    data_dir = str(tmp_path / "tfds")
    archives, train_annotations, val_annotations = _write_miniature_coco(coco128_dir, tmp_path / "zips")
    _seed_download_cache(archives, data_dir)
    config = _write_config(tmp_path / "coco.yaml", data_dir)
    spy = _StepsSpy(monkeypatch)

    # First run: TFDS prepares the data (data.tfds_download: true), the project counts once.
    run_dir = str(tmp_path / "run")
    assert main(["train", "--config", config, "--run-dir", run_dir]) == 0
    version_dir = os.path.join(data_dir, "coco", "2017", "1.1.0")
    with open(os.path.join(version_dir, "dataset_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    assert {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]} == {
        "train": len(TRAIN_IDS), "validation": len(VAL_IDS), "test": len(TEST_IDS)
    }
    num_train, frequencies = _expected(train_annotations, include_crowd=True, keep_empty=False)
    assert num_train == 11  # the two images without annotations are dropped
    assert f"train: {num_train} images, val: {len(VAL_IDS)}" in capsys.readouterr().out
    assert spy.steps == [math.ceil(num_train / BATCH_SIZE)] == [3]  # it was 1 (cardinality -2)
    with open(os.path.join(run_dir, "vocabulary.json"), encoding="utf-8") as f:
        assert json.load(f)["frequencies"] == frequencies
    cached = os.path.join(version_dir, "hybridnet_tf-counts-train-crowd1-empty0.json")
    with open(cached, encoding="utf-8") as f:
        assert json.load(f)["label_counts"] == frequencies

    # Second run and evaluation: no pass over the data to count anything, and
    # evaluation reads nothing of train (its records are moved away).
    def no_counting(*args, **kwargs):
        raise AssertionError("the label counts should come from the cache")

    monkeypatch.setattr(tfds_coco, "count_examples_and_labels", no_counting)
    second_run = str(tmp_path / "run2")
    assert main(["train", "--config", config, "--run-dir", second_run]) == 0
    assert spy.steps == [3, 3]
    train_files = [name for name in os.listdir(version_dir) if name.startswith("coco-train.")]
    assert train_files
    for name in train_files:
        os.replace(os.path.join(version_dir, name), os.path.join(tmp_path, name))
    assert main(["evaluate", "--run-dir", second_run]) == 0
    assert os.path.isfile(os.path.join(second_run, "eval", "metrics.json"))
    with np.load(os.path.join(second_run, "eval", "predictions.npz")) as predictions:
        y_true = predictions["y_true"]
    # The val images, in id order, with the labels of their annotations.
    assert y_true.shape == (len(VAL_IDS), 80)
    assert y_true.sum(axis=0).astype(int).tolist() == _expected(val_annotations, True, False)[1]
    assert load_split(_data_section(data_dir), "val").num_examples == len(VAL_IDS)
    for name in train_files:
        os.replace(os.path.join(tmp_path, name), os.path.join(version_dir, name))

    # The crowd and empty options change what is counted (counted afresh per option).
    monkeypatch.undo()
    for include_crowd, keep_empty in ((False, False), (True, True)):
        splits = load_splits(
            _data_section(data_dir, include_crowd=include_crowd, keep_empty=keep_empty)
        )
        expected_count, expected_frequencies = _expected(train_annotations, include_crowd, keep_empty)
        assert splits.num_train == expected_count == len(list(splits.train))
        assert splits.vocabulary.frequencies == expected_frequencies
        assert splits.num_val == len(VAL_IDS)
    assert _expected(train_annotations, False, False)[0] == 10  # the crowd-only image is dropped
    assert _expected(train_annotations, True, True)[0] == 13

    # A damaged cache file is counted afresh and rewritten.
    with open(cached, "w", encoding="utf-8") as f:
        f.write("{half a file")
    assert tfds_coco.split_statistics(data_dir=data_dir) == (num_train, frequencies)
    with open(cached, encoding="utf-8") as f:
        assert json.load(f)["num_examples"] == num_train


def test_miniature_zips_in_manual_dir_are_refused_with_a_clear_error(coco128_dir, tmp_path):
    pytest.importorskip("importlib_resources", reason="TFDS needs it to prepare data on Python 3.11")
    from hybridnet_tf.data.tfds_coco import load_tfds_coco

    manual_dir = tmp_path / "zips"
    _write_miniature_coco(coco128_dir, manual_dir)
    with pytest.raises(ValueError, match=r"wrong checksum.*official COCO zips"):
        load_tfds_coco(data_dir=str(tmp_path / "tfds"), download=True, manual_dir=str(manual_dir))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_tfds_coco(data_dir=str(tmp_path / "tfds"), download=True, manual_dir=str(tmp_path / "nope"))
