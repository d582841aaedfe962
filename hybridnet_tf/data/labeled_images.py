"""A split of a data set as image files and multi-hot labels."""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from hybridnet_tf.vocabulary import LabelVocabulary


@dataclass
class LabeledImages:
    """Image file paths and their multi-hot labels, sharing one vocabulary.

    Every file-based source (COCO JSON, folder, CSV, demo data) returns this;
    the pipeline turns it into `(encoded image bytes, multi-hot)` elements.

    Args:
        paths: image file paths, one per example.
        labels: [N, num_labels] multi-hot array (0/1).
        vocabulary: the label vocabulary the columns of `labels` refer to.
    """

    paths: list
    labels: np.ndarray
    vocabulary: LabelVocabulary

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.labels.ndim != 2 or self.labels.shape[0] != len(self.paths):
            raise ValueError(
                f"labels must be [num_images={len(self.paths)}, num_labels], "
                f"got shape {self.labels.shape}"
            )
        if self.labels.shape[1] != len(self.vocabulary):
            raise ValueError(
                f"labels have {self.labels.shape[1]} columns but the vocabulary has "
                f"{len(self.vocabulary)} labels"
            )

    def __len__(self):
        return len(self.paths)

    def subset(self, indices):
        """Returns the examples at `indices` (same vocabulary)."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabeledImages(
            [self.paths[i] for i in indices], self.labels[indices], self.vocabulary
        )

    def to_dataset(self):
        """A `tf.data.Dataset` of `(path, multi_hot)`; files are read by the pipeline."""
        return tf.data.Dataset.from_tensor_slices(
            (tf.constant(self.paths, tf.string), tf.constant(self.labels, tf.float32))
        )
