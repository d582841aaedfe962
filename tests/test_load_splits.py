"""load_splits / load_split: a config's data section -> splits; the data keys of the config."""

import numpy as np
import pytest

from hybridnet_tf.config import DEFAULTS, ConfigError, load_config
from hybridnet_tf.data.load_splits import load_split, load_splits

from test_pipeline import _folder_sorted_by_label


def _data(**keys):
    return {**DEFAULTS["data"], **keys}


def test_evaluating_val_reads_no_train_data(coco128_dir, tmp_path):
    annotations = str(coco128_dir / "annotations/instances_train2017.json")
    images = str(coco128_dir / "train2017")
    data = _data(
        source="coco_json",
        train_annotations=str(tmp_path / "gone/instances_train2017.json"),
        train_images=str(tmp_path / "gone"),
        val_annotations=annotations,
        val_images=images,
    )
    with pytest.raises(Exception, match="gone"):
        load_splits(data)  # training needs train
    val = load_split(data, "val")
    assert val.from_files and val.num_examples == len(val.examples) == 126  # 2 images unlabelled
    assert len(val.names) == 80
    with_empty = load_split(dict(data, keep_empty=True), "val")
    assert with_empty.num_examples == 128


def test_val_folder_maps_onto_the_run_vocabulary(tmp_path):
    train = _folder_sorted_by_label(tmp_path / "train", per_label=2)
    _folder_sorted_by_label(tmp_path / "val", labels=("cheese",), per_label=2)
    data = _data(source="folder", train_path=str(tmp_path / "train"), val_path=str(tmp_path / "val"))
    val = load_split(data, "val", vocabulary=train.vocabulary)
    assert val.names == ["apple", "bread", "cheese", "dates"]
    np.testing.assert_array_equal(val.examples.labels, [[0, 0, 1, 0]] * 2)
    # Without the run's vocabulary the val folder knows one label only.
    assert load_split(data, "val").names == ["cheese"]
    assert load_split(data, "train").num_examples == 8


def test_val_cut_from_train_is_the_same_as_in_training(tmp_path):
    _folder_sorted_by_label(tmp_path, per_label=5)
    data = _data(source="folder", train_path=str(tmp_path), val_fraction=0.2, split_seed=4)
    splits = load_splits(data)
    val, train = load_split(data, "val"), load_split(data, "train")
    assert val.examples.paths == splits.val.paths and val.num_examples == splits.num_val == 4
    assert train.examples.paths == splits.train.paths and train.num_examples == 16
    with pytest.raises(ValueError, match="no val split; set data.val_annotations"):
        load_split(dict(data, val_fraction=0.0), "val")
    with pytest.raises(ValueError, match="no test split; set data.test_annotations"):
        load_split(data, "test")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        load_split(data, "holdout")


def test_test_fraction_is_cut_before_val_and_never_trained_on(tmp_path):
    _folder_sorted_by_label(tmp_path, per_label=10)
    data = _data(source="folder", train_path=str(tmp_path), val_fraction=0.2, test_fraction=0.25,
                 split_seed=4)
    splits = load_splits(data)
    test = load_split(data, "test")
    assert test.num_examples == 10  # a quarter of 40
    train, val = set(splits.train.paths), set(splits.val.paths)
    assert not set(test.examples.paths) & (train | val)
    assert len(train | val | set(test.examples.paths)) == 40
    # Evaluation reads the same cuts as training did.
    assert load_split(data, "train").examples.paths == splits.train.paths
    assert load_split(data, "val").examples.paths == splits.val.paths
    assert test.names == splits.vocabulary.names


def test_own_test_folder_is_loaded_as_the_test_split(tmp_path):
    train = _folder_sorted_by_label(tmp_path / "train", per_label=2)
    _folder_sorted_by_label(tmp_path / "test", labels=("bread",), per_label=3)
    data = _data(source="folder", train_path=str(tmp_path / "train"), test_path=str(tmp_path / "test"),
                 test_fraction=0.5)  # own test data: no cut from train
    test = load_split(data, "test", vocabulary=train.vocabulary)
    assert test.num_examples == 3 and test.names == ["apple", "bread", "cheese", "dates"]
    assert load_splits(data).num_train == 8


@pytest.mark.parametrize("value", ["true", "false", "memory", "none", "/data/cache/coco224"])
def test_data_cache_accepts_modes_paths_and_old_booleans(value):
    config = load_config(overrides=[f"data.cache={value}"])
    assert config["data"]["cache"] == {"true": True, "false": False}.get(value, value)


def test_data_cache_refuses_other_values():
    with pytest.raises(ConfigError, match="data.cache must be a string or true/false, got 3"):
        load_config(overrides=["data.cache=3"])
    assert load_config()["data"]["cache"] == "none"
    assert load_config(overrides=["data.shuffle_buffer=512"])["data"]["shuffle_buffer"] == 512
