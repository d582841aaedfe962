"""Label vocabulary: orderings and JSON round trip."""

import json

import numpy as np
import pytest

from hybridnet_tf.vocabulary import LabelVocabulary


def test_label_rank_orderings():
    vocab = LabelVocabulary(["a", "b", "c", "d"], [5, 9, 1, 9])
    # freq2rare: b and d (9, tie broken by index), then a (5), then c (1).
    assert vocab.label_rank("freq2rare").tolist() == [2, 0, 3, 1]
    assert vocab.label_rank("rare2freq").tolist() == [1, 2, 0, 3]
    assert vocab.label_rank("fixed").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown label ordering"):
        vocab.label_rank("alphabetical")


def test_json_round_trip(tmp_path):
    vocab = LabelVocabulary(["person", "bicycle"], [10, 2], source_ids=[1, 2])
    path = tmp_path / "vocabulary.json"
    vocab.save(str(path))
    assert json.loads(path.read_text())["names"] == ["person", "bicycle"]
    loaded = LabelVocabulary.load(str(path))
    assert loaded == vocab


def test_frequencies_from_multi_hot():
    vocab = LabelVocabulary(["a", "b", "c"])
    counted = vocab.with_frequencies(np.array([[1, 0, 1], [1, 0, 0]]))
    assert counted.frequencies == [2, 0, 1]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        LabelVocabulary(["a", "a"])
    with pytest.raises(ValueError, match="frequencies"):
        LabelVocabulary(["a", "b"], [1])
    with pytest.raises(KeyError, match="unknown label 'z'"):
        LabelVocabulary(["a"]).index("z")
    with pytest.raises(FileNotFoundError, match="written beside the model"):
        LabelVocabulary.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LabelVocabulary.load(str(bad))
