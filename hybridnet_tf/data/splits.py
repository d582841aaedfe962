"""A seeded train/val split for sources that come as one split (folder, CSV)."""

import numpy as np

from hybridnet_tf.data.labeled_images import LabeledImages

_UNASSIGNED, _TRAIN, _VAL = -1, 0, 1


def split_train_val(images, val_fraction=0.2, seed=0):
    """Splits `images` into train and val, keeping rare labels in both.

    A light iterative stratification (after Sechidis et al., 2011): labels
    are visited from the rarest, and each label's still unassigned images go
    to val until val holds its share of that label (at least one and at most
    all but one image for labels with two or more images), the rest to train.
    Images without labels fill up what is left. Then single images move
    between the splits: first where a label with >= 2 images is missing from
    one split (rarer labels may have placed all its images), then to make
    val hold `round(len(images) * val_fraction)` images; no move takes a
    label's last image from its split. So every label with >= 2 images is in
    both splits and a label seen once is in train, unless the labels'
    overlaps make that impossible by single moves; the val size misses its
    target only when that rule forbids it.

    Args:
        images: a `LabeledImages` with at least 2 images.
        val_fraction: share of the images that go to val, in (0, 1).
        seed: the same seed gives the same split.

    Returns:
        `(train, val)` `LabeledImages`, each in the original order, sharing a
        vocabulary whose frequencies are counted on train.

    Example:
        >>> train, val = split_train_val(load_folder("clothes"), val_fraction=0.2)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    num_images = len(images)
    if num_images < 2:
        raise ValueError(f"need at least 2 images to split, got {num_images}")
    rng = np.random.default_rng(seed)
    labels = images.labels > 0
    num_val = int(np.clip(round(num_images * val_fraction), 1, num_images - 1))

    split = np.full(num_images, _UNASSIGNED)
    num_in_val = 0
    counts = labels.sum(axis=0)
    # Rarest first; equally frequent labels in a seeded random order.
    for label in np.lexsort((rng.permutation(len(counts)), counts)):
        if counts[label] == 0:
            continue
        members = np.flatnonzero(labels[:, label])
        wanted_val = _val_share(counts[label], val_fraction)
        have_val = int((split[members] == _VAL).sum())
        for i in rng.permutation(members[split[members] == _UNASSIGNED]):
            if have_val < wanted_val and num_in_val < num_val:
                split[i] = _VAL
                have_val += 1
                num_in_val += 1
            else:
                split[i] = _TRAIN
    for i in rng.permutation(np.flatnonzero(split == _UNASSIGNED)):
        split[i] = _VAL if num_in_val < num_val else _TRAIN
        num_in_val += int(split[i] == _VAL)

    _repair(split, labels, rng)
    _balance(split, labels, num_val, rng)
    train_vocabulary = images.vocabulary.with_frequencies(labels[split == _TRAIN])
    return tuple(
        LabeledImages(
            [images.paths[i] for i in np.flatnonzero(split == part)],
            images.labels[split == part],
            train_vocabulary,
        )
        for part in (_TRAIN, _VAL)
    )


def _val_share(count, val_fraction):
    """How many of a label's `count` images val should hold."""
    if count < 2:
        return 0  # a label seen once is worth more in train
    return int(np.clip(round(count * val_fraction), 1, count - 1))


def _repair(split, labels, rng):
    """Gives a label with >= 2 images that one split lacks an image moved from the other.

    This happens when rarer labels already placed all its images. A move is
    made only when it takes no label's last image from its split.
    """
    counts = labels.sum(axis=0)
    for label in np.flatnonzero(counts >= 2):
        for source, target in ((_TRAIN, _VAL), (_VAL, _TRAIN)):
            members = np.flatnonzero(labels[:, label])
            if (split[members] == target).any():
                continue
            left_in_source = labels[split == source].sum(axis=0)
            for i in rng.permutation(members):
                if np.all(left_in_source[labels[i]] >= 2):
                    split[i] = target
                    break


def _balance(split, labels, num_val, rng):
    """Moves images so val has `num_val`, never taking a label's last image from a split."""
    num_in_val = int((split == _VAL).sum())
    for source, target in ((_TRAIN, _VAL), (_VAL, _TRAIN)):
        left_in_source = labels[split == source].sum(axis=0)
        for i in rng.permutation(np.flatnonzero(split == source)):
            if num_in_val == num_val or (num_in_val > num_val) == (source == _TRAIN):
                break
            if np.all(left_in_source[labels[i]] >= 2):
                split[i] = target
                left_in_source -= labels[i]
                num_in_val += 1 if target == _VAL else -1
