"""Batch augmentation: shapes and ranges, seeded flips, the multi-hot mixing rule, tf.data."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from hybridnet_tf.data.augment import apply_flip, apply_rand_augment, build_augmentation, mix_multi_hot

CONFIGURATIONS = {
    "flip": dict(flip=True),
    "rand_augment": dict(flip=False, rand_augment=True),
    "mixup": dict(flip=False, mixup_alpha=0.4),
    "cutmix": dict(flip=False, cutmix_alpha=1.0),
    "everything": dict(flip=True, rand_augment=True, mixup_alpha=0.4, cutmix_alpha=1.0),
}


def _batch(size=8, side=16, labels=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (size, side, side, 3)).astype(np.float32)
    multi_hot = np.eye(labels, dtype=np.float32)[np.arange(size) % labels]
    return images, multi_hot


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_shapes_ranges_and_hard_labels_are_kept(name):
    images, multi_hot = _batch()
    out_images, out_labels = build_augmentation(seed=0, **CONFIGURATIONS[name])(images, multi_hot)
    assert out_images.shape == images.shape and out_images.dtype == tf.float32
    assert out_labels.shape == multi_hot.shape and out_labels.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out_images)) and float(tf.reduce_max(out_images)) <= 255.0
    assert set(np.unique(out_labels.numpy())) <= {0.0, 1.0}
    # Mixing only ever adds labels: every image keeps its own or the other's.
    assert (out_labels.numpy().sum(axis=1) >= 1).all()


def test_flip_flips_some_images_with_a_fixed_seed():
    images, multi_hot = _batch(size=16)
    out_images, out_labels = build_augmentation(flip=True, seed=3)(images, multi_hot)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out_images.numpy(), images)]
    kept = [np.array_equal(o, i) for o, i in zip(out_images.numpy(), images)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is either flipped or untouched
    assert 0 < sum(flipped) < 16
    np.testing.assert_array_equal(out_labels, multi_hot)
    # The same seed in a new function flips the same images.
    again, _ = build_augmentation(flip=True, seed=3)(images, multi_hot)
    np.testing.assert_array_equal(again, out_images)


def test_flip_select_matches_the_keras_layer():
    images, _ = _batch(size=16)
    reference = keras.layers.RandomFlip("horizontal", seed=2)
    selected = keras.layers.RandomFlip("horizontal", seed=2)
    for _ in range(2):
        np.testing.assert_array_equal(apply_flip(selected, images), reference(images, training=True))


def test_rand_augment_switch_matches_the_keras_layer():
    images, _ = _batch(size=4, side=24)
    for seed in range(3):
        reference = keras.layers.RandAugment(value_range=(0, 255), seed=seed)
        switched = keras.layers.RandAugment(value_range=(0, 255), seed=seed)
        for _ in range(2):  # successive draws of the seed state stay in step
            expected = reference(images, training=True)
            np.testing.assert_allclose(apply_rand_augment(switched, images), expected, atol=1e-3)
        assert not np.allclose(expected, images)


def test_mix_rule_on_a_hand_worked_pair():
    labels = [[1, 0, 0, 1], [0, 1, 0, 1]]
    swap = [1, 0]
    # Both images visible: the union.
    np.testing.assert_array_equal(mix_multi_hot(labels, swap, [0.6, 0.4]), [[1, 1, 0, 1], [1, 1, 0, 1]])
    # Image 1 is only a 10% ghost in mixed image 0; mixed image 1 is 90% image 0.
    np.testing.assert_array_equal(mix_multi_hot(labels, swap, [0.9, 0.1]), [[1, 0, 0, 1], [1, 0, 0, 1]])
    # min_share=0.5 keeps only the dominant image's labels.
    np.testing.assert_array_equal(
        mix_multi_hot(labels, swap, [0.6, 0.4], min_share=0.5), [[1, 0, 0, 1], [1, 0, 0, 1]]
    )
    # An image mixed with itself keeps its labels.
    np.testing.assert_array_equal(mix_multi_hot(labels, [0, 1], [0.5, 0.5]), labels)


def _black_and_white_pair(side=32):
    images = np.stack([np.zeros((side, side, 3)), np.full((side, side, 3), 200.0)]).astype(np.float32)
    return images, np.array([[1, 0, 0], [0, 1, 0]], np.float32)


def _white_share(kind, image):
    if kind == "mixup_alpha":
        # A blend of constant images is constant: value = 200 * white share.
        return float(image[0, 0, 0]) / 200.0
    return float(np.mean(image[..., 0] == 200.0))


@pytest.mark.parametrize("kind", ["mixup_alpha", "cutmix_alpha"])
def test_mixed_labels_follow_the_visible_share(kind):
    images, labels = _black_and_white_pair()
    outcomes = []
    for seed in range(16):
        out, mixed = build_augmentation(flip=False, seed=seed, **{kind: 1.0})(images, labels)
        for i in range(2):
            white = _white_share(kind, out[i].numpy())
            # The rule's threshold is on the layer's own (box) share; skip pixel rounding cases.
            if min(abs(white - 0.25), abs(white - 0.75)) < 0.03:
                continue
            expected = np.maximum(labels[0] * (1 - white >= 0.25), labels[1] * (white >= 0.25))
            np.testing.assert_array_equal(mixed[i], expected, err_msg=f"seed {seed}, white share {white:.2f}")
            outcomes.append(int(expected.sum()))
    # Both outcomes were seen: unions of two label sets and single sets.
    assert outcomes.count(2) >= 2 and outcomes.count(1) >= 2, outcomes


def test_runs_inside_tf_data_and_is_seeded():
    images, multi_hot = _batch(size=12)

    def run():
        dataset = tf.data.Dataset.from_tensor_slices((images, multi_hot)).batch(4)
        augment = build_augmentation(**CONFIGURATIONS["everything"], seed=5)
        return [(x.numpy(), y.numpy()) for x, y in dataset.map(augment)]

    first, second = run(), run()
    assert len(first) == 3
    for (xa, ya), (xb, yb) in zip(first, second):
        assert xa.shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(x, images[4 * i : 4 * i + 4]) for i, (x, _) in enumerate(first))


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        build_augmentation(mixup_alpha=-1.0)
    with pytest.raises(ValueError, match="cutmix_alpha must be at most 1"):
        build_augmentation(cutmix_alpha=2.0)
    with pytest.raises(ValueError, match="min_share"):
        build_augmentation(min_share=0.7)


@pytest.mark.parametrize(
    "overrides, flips",
    [((), True), (("data.augment_flip=false",), False), (("train.augment_flip=false",), False)],
)
def test_config_switches_reach_the_augmentation(overrides, flips):
    from hybridnet_tf.config import load_config
    from hybridnet_tf.experiment import augmentation_of

    images, multi_hot = _batch(size=16)
    out, _ = augmentation_of(load_config(None, overrides))(images, multi_hot)
    assert (not np.array_equal(out, images)) == flips
