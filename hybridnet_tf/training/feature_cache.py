"""Backbone features computed once, for training the heads while the backbone is frozen.

With the backbone frozen (and BatchNorm in inference mode) and no
augmentation that changes pixels, the backbone's output for an image is a
fixed function of it: compute it once, keep it in memory, and train the
heads on it. What is kept is what the heads read (`hybridnet.head_input_shape`):
the pooled feature, or the whole spatial map for the attention decoder. Horizontal flips are kept as a second cached view of every image. On
a CPU this makes a frozen-phase step cost the heads only, one to two
orders of magnitude less than a pass through the backbone.

Memory: 4 bytes x feature size x views per image (EfficientNet-Lite0:
1280 floats, 5 KB a view; all of COCO train, 118k images x 2 views: 1.2 GB;
the attention decoder's 7 x 7 map at 224 px is 49 times that, 245 KB a
view: fine for thousands of images, not for all of COCO, where
`train.feature_cache: false` trains through the frozen backbone instead).
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hybridnet_tf.console import progress_bar
from hybridnet_tf.model.hybridnet import IMAGE_ENCODER, POOL, model_decoder


@dataclass
class CachedFeatures:
    """Backbone features of every image (and view) of a split, with their labels.

    Attributes:
        features: [N * views, D] float32 pooled features, or [N * views, h, w, C]
            spatial maps for the attention decoder.
        labels: [N * views, L] float32 multi-hot.
        views: 1, or 2 when each image is also cached flipped left-right.
    """

    features: np.ndarray
    labels: np.ndarray
    views: int = 1

    def __len__(self):
        return len(self.features)

    def pooled(self):
        """[N * views, D] pooled features (the mean of spatial maps over their positions)."""
        if self.features.ndim == 4:
            return self.features.mean(axis=(1, 2))
        return self.features

    def to_dataset(self, batch_size, training=False, seed=None):
        """Batches of `(features, multi_hot)`; in training reshuffled on every pass."""
        dataset = tf.data.Dataset.from_tensor_slices((self.features, self.labels))
        if training:
            dataset = dataset.shuffle(len(self.features), seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def frozen_backbone(model):
    """The backbone of a HybridNet from `build_model`."""
    return model.get_layer(IMAGE_ENCODER).get_layer("backbone")


def extract_features(model, dataset, flip_views=False, progress=True, name="train"):
    """Runs `model`'s backbone once over `dataset` (inference mode) and keeps what its heads read.

    Args:
        model: a HybridNet from `build_model`.
        dataset: batches of `(images, multi_hot)` without random augmentation
            (e.g. `make_dataset(..., training=False)`).
        flip_views: also cache every image flipped left-right (the flip
            augmentation, as a second view).
        progress: show a progress bar.
        name: what the progress line calls the split.

    Returns:
        A `CachedFeatures`.
    """
    backbone = frozen_backbone(model)
    pool = None if model_decoder(model) == "attention" else model.get_layer(IMAGE_ENCODER).get_layer(POOL)

    def head_input(images):
        features = backbone(images, training=False)
        return tf.cast(features if pool is None else pool(features), tf.float32)

    encode = tf.function(head_input, reduce_retracing=True)
    cardinality = int(dataset.cardinality())
    if progress:
        print(f"caching backbone features of {name} images" + (" and their mirror images" if flip_views else ""))
    bar = progress_bar(cardinality if cardinality >= 0 else None) if progress else None
    views = [[] for _ in range(2 if flip_views else 1)]
    labels = []
    for images, multi_hot in dataset:
        views[0].append(encode(images).numpy())
        if flip_views:
            views[1].append(encode(tf.image.flip_left_right(images)).numpy())
        labels.append(multi_hot.numpy())
        if bar is not None:
            bar.add(1)
    if not labels:
        raise ValueError(f"no {name} image could be read to cache its features")
    labels = np.concatenate(labels).astype(np.float32)
    features = np.concatenate([np.concatenate(view) for view in views])
    return CachedFeatures(features, np.concatenate([labels] * len(views)), len(views))


@dataclass
class FeatureCacheInputs:
    """What the frozen phase needs to cache features: the training images, unaugmented.

    Attributes:
        train: batches of `(images, multi_hot)` of the training split with no
            random augmentation and no shuffling.
        flip_views: cache each image flipped left-right too (when training
            would flip).
        seed: shuffle seed of the cached features.
        probe_init: set a sigmoid head by a linear probe of the features
            (`linear_probe`) before the decoder trains, and keep it fixed then.
    """

    train: object
    flip_views: bool = False
    seed: int = None
    probe_init: bool = True
