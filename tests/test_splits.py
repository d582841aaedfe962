"""split_train_val: seeded, sized, and keeping every label with >= 2 images in both splits."""

import numpy as np
import pytest

from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.data.splits import split_train_val
from hybridnet_tf.vocabulary import LabelVocabulary


def _random_images(seed, num_images=80):
    """Common, medium and rare labels (2 and 3 images), a label seen once, some empty images."""
    rng = np.random.default_rng(seed)
    rates = [0.5, 0.3, 0.1, 0.1, 0.1]
    labels = np.zeros((num_images, 8), np.float32)
    labels[:, :5] = rng.random((num_images, 5)) < rates
    for label, count in ((5, 2), (6, 3), (7, 1)):
        labels[rng.choice(num_images, count, replace=False), label] = 1
    vocabulary = LabelVocabulary([f"label{i}" for i in range(8)])
    return LabeledImages([f"/img/{i:03d}.jpg" for i in range(num_images)], labels, vocabulary)


def _counts(part):
    return part.labels.sum(axis=0)


def test_same_seed_same_split_other_seed_other_split():
    images = _random_images(0)
    train_a, val_a = split_train_val(images, seed=3)
    train_b, val_b = split_train_val(images, seed=3)
    _, val_c = split_train_val(images, seed=4)
    assert val_a.paths == val_b.paths and train_a.paths == train_b.paths
    assert val_a.paths != val_c.paths


@pytest.mark.parametrize("val_fraction", [0.2, 0.35])
def test_sizes_disjoint_and_order_kept(val_fraction):
    images = _random_images(1)
    train, val = split_train_val(images, val_fraction=val_fraction)
    assert len(val) == round(80 * val_fraction) and len(train) == 80 - len(val)
    assert sorted(train.paths + val.paths) == images.paths
    assert train.paths == sorted(train.paths) and val.paths == sorted(val.paths)
    by_path = dict(zip(images.paths, images.labels.tolist()))
    assert all(by_path[p] == y for p, y in zip(val.paths, val.labels.tolist()))


@pytest.mark.parametrize("seed", range(12))
def test_every_label_with_two_images_in_both_splits(seed):
    images = _random_images(seed)
    train, val = split_train_val(images, val_fraction=0.2, seed=seed)
    total = _counts(images)
    both = total >= 2
    assert np.all(_counts(train)[both] >= 1) and np.all(_counts(val)[both] >= 1)
    assert _counts(train)[7] == 1  # the label seen once stays in train
    assert len(val) == 16


def test_a_plain_random_split_would_miss_rare_labels():
    """Guards the test above: the data really is hard for an unstratified split."""
    misses = 0
    for seed in range(12):
        images = _random_images(seed)
        val_rows = np.random.default_rng(seed).permutation(80)[:16]
        misses += bool(np.any(images.labels[val_rows][:, 5:7].sum(axis=0) == 0))
    assert misses >= 6


def test_vocabulary_counts_train():
    images = _random_images(5)
    train, val = split_train_val(images)
    assert train.vocabulary is val.vocabulary
    assert train.vocabulary.names == images.vocabulary.names
    assert train.vocabulary.frequencies == _counts(train).astype(int).tolist()


def test_bad_arguments():
    images = _random_images(0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(images, val_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        split_train_val(images.subset([0]))


def _disjoint_labels(images_per_label, num_labels):
    labels = np.kron(np.eye(num_labels), np.ones((images_per_label, 1))).astype(np.float32)
    vocabulary = LabelVocabulary([f"label{i}" for i in range(num_labels)])
    return LabeledImages([f"/img/{i:03d}.jpg" for i in range(len(labels))], labels, vocabulary)


def test_labels_beyond_the_val_size_still_reach_val():
    # Five labels on three images each: val's share of 20% (3 images) fills
    # up with the first three labels; the other two are moved in after.
    images = _disjoint_labels(3, 5)
    for seed in range(5):
        train, val = split_train_val(images, val_fraction=0.2, seed=seed)
        np.testing.assert_array_equal(_counts(val), [1] * 5)
        np.testing.assert_array_equal(_counts(train), [2] * 5)


def test_val_topped_up_to_its_size():
    # Two labels on ten images each, 25%: each label's share rounds to 2,
    # so one more image must move to reach round(20 * 0.25) = 5.
    images = _disjoint_labels(10, 2)
    train, val = split_train_val(images, val_fraction=0.25)
    assert len(val) == 5 and len(train) == 15
    assert sorted(_counts(val).tolist()) == [2, 3]
