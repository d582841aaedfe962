"""The label vocabulary: names, index order and training frequencies.

Stored as JSON beside every model so that label ids can always be turned
back into names (and so that the label ordering used in training can be
rebuilt) without pickle.
"""

import json
from dataclasses import dataclass, field

import numpy as np

from hybridnet_tf.atomic_files import write_json_atomically

LABEL_ORDERINGS = ("freq2rare", "rare2freq", "fixed")


@dataclass
class LabelVocabulary:
    """Label names in index order, with how many training images hold each.

    Args:
        names: label names; index `i` of a multi-hot vector is `names[i]`.
        frequencies: number of training images that carry each label.
        source_ids: optional ids the labels had in their source (e.g. COCO
            category ids 1..90), in the same order as `names`.

    Example:
        >>> vocab = LabelVocabulary(["cat", "dog"], [10, 3])
        >>> vocab.index("dog")
        1
    """

    names: list
    frequencies: list = field(default_factory=list)
    source_ids: list = None

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        if len(set(self.names)) != len(self.names):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"label names must be unique; repeated: {dupes}")
        if not self.frequencies:
            self.frequencies = [0] * len(self.names)
        self.frequencies = [int(f) for f in self.frequencies]
        if len(self.frequencies) != len(self.names):
            raise ValueError(
                f"{len(self.names)} label names but {len(self.frequencies)} frequencies"
            )
        if self.source_ids is not None:
            self.source_ids = [int(i) for i in self.source_ids]
            if len(self.source_ids) != len(self.names):
                raise ValueError(
                    f"{len(self.names)} label names but {len(self.source_ids)} source ids"
                )

    def __len__(self):
        return len(self.names)

    def index(self, name):
        """Returns the index of label `name`; raises KeyError naming the known labels."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(
                f"unknown label {name!r}; the vocabulary has {len(self)} labels, "
                f"e.g. {self.names[:5]}"
            ) from None

    def with_frequencies(self, multi_hot):
        """Returns a copy whose frequencies are counted from a [N, L] multi-hot array."""
        counts = np.asarray(multi_hot).astype(bool).sum(axis=0)
        return LabelVocabulary(self.names, counts.tolist(), self.source_ids)

    def label_rank(self, ordering="freq2rare"):
        """Returns an int array: position of each label in the decoding order.

        `freq2rare` puts the most frequent training label first (the CNN-RNN
        paper's default); ties are broken by index so the order is stable.
        """
        index = np.arange(len(self))
        freq = np.asarray(self.frequencies)
        if ordering == "freq2rare":
            order = np.lexsort((index, -freq))
        elif ordering == "rare2freq":
            order = np.lexsort((index, freq))
        elif ordering == "fixed":
            order = index
        else:
            raise ValueError(
                f"unknown label ordering {ordering!r}; choose one of {list(LABEL_ORDERINGS)}"
            )
        rank = np.empty(len(self), dtype=np.int32)
        rank[order] = np.arange(len(self), dtype=np.int32)
        return rank

    def to_json_dict(self):
        data = {"names": self.names, "frequencies": self.frequencies}
        if self.source_ids is not None:
            data["source_ids"] = self.source_ids
        return data

    def save(self, path):
        """Writes the vocabulary as JSON to `path` (atomically)."""
        write_json_atomically(path, self.to_json_dict())

    @classmethod
    def load(cls, path):
        """Reads a vocabulary written by `save`."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"label vocabulary {path} not found; it is written beside the model "
                "by `hybridnet-tf train`"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if "names" not in data:
            raise ValueError(f"{path} has no 'names' list; is it a label vocabulary?")
        return cls(data["names"], data.get("frequencies", []), data.get("source_ids"))
