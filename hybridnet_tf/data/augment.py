"""Batch augmentation with Keras' own preprocessing layers, for multi-hot labels.

The layers (`RandomFlip`, `RandAugment`, `MixUp`, `CutMix`) are safe inside
tf.data with the TensorFlow backend. Images stay float 0..255: the model
normalises inside. Flips and RandAugment use the layers' own random draws
but apply them with less work than the layers' `call` (`apply_flip`,
`apply_rand_augment`; tested to give the layers' output): RandAugment's
`call` computes all 11 of its ops per slot, about 8x the work.

How mixing treats labels. MixUp blends two images, `share * a + (1 - share) * b`;
CutMix pastes a box of image b into image a, leaving a `share` of a's area.
Keras mixes the labels the same way, into soft labels. The HybridNet decoder
cannot learn from soft labels: it is trained on label *sequences* made from
the multi-hot vector thresholded at 0.5 (`make_label_sequence`), so a label is
either in the sequence or not. Passed through that threshold, Keras' convex
combination would silently keep only the dominant image's labels (plus the
shared ones) and call the other image's objects absent even when they fill
45% of the picture. So the mixed label here is an explicit hard set: the
union of the labels of each image that contributes at least `min_share` of
the result (default 0.25):

    mixed = max(a * [share >= min_share], b * [1 - share >= min_share])

Both images' objects are visible in a blend or a large enough patch, so both
label sets are named; an image reduced to a faint ghost or a small patch
gives none. With `min_share=0.5` the rule reduces to "the dominant image's
labels". Without boxes it cannot know whether b's patch holds b's objects.
"""

import functools

import keras
import tensorflow as tf

# An image must make up at least this share of a mixed image for its labels to be kept.
MIN_SHARE = 0.25


def mix_multi_hot(labels, permutation, share, min_share=MIN_SHARE):
    """Hard multi-hot labels of images mixed with `images[permutation]`.

    Args:
        labels: [B, L] 0/1 multi-hot labels of the batch before mixing.
        permutation: [B] int; example i was mixed with example `permutation[i]`.
        share: [B] (or [B, 1, 1, 1]) fraction of mixed image i that comes from
            image i itself (MixUp weight or CutMix's remaining area).
        min_share: the fraction an image needs for its labels to be kept.

    Returns:
        [B, L] float32 0/1: the union of the labels of the images whose share
        reaches `min_share`.

    Example:
        >>> mix_multi_hot([[1, 0, 0], [0, 1, 1]], [1, 0], [0.7, 0.9]).numpy()
        array([[1., 1., 1.],
               [0., 1., 1.]], dtype=float32)
    """
    labels = tf.cast(labels, tf.float32)
    share = tf.reshape(tf.cast(share, tf.float32), [-1, 1])
    other = tf.gather(labels, tf.cast(permutation, tf.int32))
    own_kept = tf.cast(share >= min_share, tf.float32)
    other_kept = tf.cast(1.0 - share >= min_share, tf.float32)
    return tf.maximum(labels * own_kept, other * other_kept)


def apply_flip(layer, images):
    """Runs a horizontal `keras.layers.RandomFlip` on a batch with a cheaper select.

    Same random draws and output as the layer; the layer broadcasts a
    `where` over the whole batch, a row select costs less than half of that.

    Args:
        layer: a `keras.layers.RandomFlip("horizontal")`.
        images: [B, H, W, C] float images.
    """
    flips = tf.reshape(layer.get_random_transformation(images, training=True)["flips"], [-1])
    images = tf.cast(images, layer.compute_dtype)
    return tf.raw_ops.Select(condition=flips, x=tf.reverse(images, [2]), y=images)


def apply_rand_augment(layer, images):
    """Runs a `keras.layers.RandAugment` on a batch, computing only the ops it draws.

    The layer itself computes all of its 11 ops for each of its `num_ops`
    slots and keeps the drawn one with `where`; a `tf.switch_case` runs only
    the drawn op. Same random draws, same output, several times less work.

    Args:
        layer: a `keras.layers.RandAugment`.
        images: [B, H, W, C] float images in the layer's value range.
    """
    transformation = layer.get_random_transformation(images, training=True)
    transforms = transformation["transforms"]
    images = tf.cast(images, layer.compute_dtype)
    for slot in range(layer.num_ops):
        # The op order is the order of `transforms`, as in RandAugment.transform_images.
        branches = [
            functools.partial(getattr(layer, name).transform_images, images, params)
            for name, params in transforms.items()
        ]
        shape = images.shape
        images = tf.switch_case(tf.cast(transformation["layer_idxes"][slot], tf.int32), branches)
        images.set_shape(shape)
    return images


def build_augmentation(
    flip=True,
    rand_augment=False,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    seed=None,
    min_share=MIN_SHARE,
):
    """Makes a per-batch augmentation `(images, multi_hot) -> (images, multi_hot)`.

    Applied in this order: horizontal flip, RandAugment, then MixUp or CutMix
    (one of the two per batch, chosen at random, when both are on). Labels
    change only with mixing; see the module docstring for the rule.

    Args:
        flip: random horizontal flips (`RandomFlip`, run by `apply_flip`).
        rand_augment: Keras' `RandAugment` (2 ops, factor 0.5), run by
            `apply_rand_augment`.
        mixup_alpha: MixUp's Beta(alpha, alpha) parameter; 0 turns it off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter, at most 1; 0
            turns it off.
        seed: integer seed of every random layer (None: unseeded). Each call
            makes new layers, so two functions built with the same seed
            give the same sequence of batches.
        min_share: see `mix_multi_hot`.

    Returns:
        A function of batched float32 images [B, H, W, 3] (0..255) and
        multi-hot labels [B, L]; returns images in 0..255 and 0/1 labels.

    Example:
        >>> augment = build_augmentation(flip=True, mixup_alpha=0.2, seed=0)
        >>> dataset = make_dataset(source, 224, 32, training=True, augment=augment)
    """
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if alpha < 0:
            raise ValueError(f"{name} must be >= 0 (0 turns it off), got {alpha}")
    if cutmix_alpha > 1:
        raise ValueError(f"cutmix_alpha must be at most 1 (keras.layers.CutMix's range), got {cutmix_alpha}")
    if not 0.0 <= min_share <= 0.5:
        raise ValueError(f"min_share must be in [0, 0.5] so that some labels are kept, got {min_share}")

    def seed_of(offset):
        # Different layers get different seeds, or their draws would be correlated.
        return None if seed is None else seed + offset

    flip_layer = keras.layers.RandomFlip("horizontal", seed=seed_of(0), dtype="float32") if flip else None
    rand_layer = (
        keras.layers.RandAugment(value_range=(0, 255), seed=seed_of(1), dtype="float32")
        if rand_augment
        else None
    )
    mixers = []
    if mixup_alpha > 0:
        mixers.append(keras.layers.MixUp(alpha=mixup_alpha, seed=seed_of(2), dtype="float32"))
    if cutmix_alpha > 0:
        # A fixed factor (a, a) makes CutMix draw from Beta(a, a).
        mixers.append(keras.layers.CutMix(factor=(cutmix_alpha, cutmix_alpha), seed=seed_of(3), dtype="float32"))
    choice = keras.random.SeedGenerator(seed_of(4)) if len(mixers) == 2 else None

    def mix_with(layer, images, labels):
        transformation = layer.get_random_transformation(images, training=True)
        images = layer.transform_images(images, transformation, training=True)
        labels = mix_multi_hot(
            labels, transformation["permutation_order"], transformation["mix_weight"], min_share
        )
        return images, labels

    def augment(images, multi_hot):
        images = tf.cast(images, tf.float32)
        if flip_layer is not None:
            images = apply_flip(flip_layer, images)
        if rand_layer is not None:
            images = apply_rand_augment(rand_layer, images)
        if len(mixers) == 1:
            images, multi_hot = mix_with(mixers[0], images, multi_hot)
        elif len(mixers) == 2:
            use_mixup = keras.random.uniform((), seed=choice) < 0.5
            images, multi_hot = tf.cond(
                use_mixup,
                lambda: mix_with(mixers[0], images, multi_hot),
                lambda: mix_with(mixers[1], images, multi_hot),
            )
        return tf.clip_by_value(images, 0.0, 255.0), tf.cast(multi_hot, tf.float32)

    return augment
